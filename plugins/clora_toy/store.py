"""Where built toy artifacts live: ``$CLORA_HOME/toy/<backbone>-<hash>/``, keyed by the recipe."""

from __future__ import annotations

from pathlib import Path

from clora.paths import clora_home
from clora_toy.config import ToyConfig

BASE_WEIGHTS = "base.safetensors"
BASE_SHEET = "base_sheet.png"
BASE_REPORT = "base.json"
TEACHER_WEIGHTS = "lora.safetensors"
TEACHER_SHEET = "sheet.png"
TEACHER_REPORT = "teacher.json"


def base_dir(backbone_id: str, config: ToyConfig) -> Path:
    """Folder of one built base (its weights, contact sheet and report)."""
    return clora_home() / "toy" / f"{backbone_id}-{config.base_hash()}"


def teacher_dir(backbone_id: str, config: ToyConfig, effect_name: str) -> Path:
    """Folder of one effect's teacher LoRA on one built base."""
    return base_dir(backbone_id, config) / "teachers" / f"{effect_name}-{config.teacher_hash(effect_name)}"
