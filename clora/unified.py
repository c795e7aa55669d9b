"""The unified LoRA file: the deliverable of a distill run.

A safetensors file in diffusers layout (``transformer.<module>.lora_A.weight`` / ``lora_B``), so
``transformer.load_lora_adapter(path, prefix="transformer")`` loads it. Its header holds
``lora_adapter_metadata`` (rank, alpha, targets: diffusers honours it) and ``clora`` (JSON): base
model id, trigger map, captions, the few-step schedule and the clora version.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clora import __version__
from clora.errors import CloraError
from clora.fileio import save_safetensors

PREFIX = "transformer."
FORMAT_VERSION = 1


@dataclass
class UnifiedHeader:
    """The ``clora`` header of a unified LoRA."""

    base_id: str
    base_fingerprint: str
    # name -> {"trigger", "caption", "teacher_prompt", "prompt"} and, for an effect sampled with levels
    # of its own, "few_step_sigmas" and "shift"; "prompt", the text the student was trained with, is
    # absent from older files (read as trigger + caption, a default run's prompt)
    effects: dict[str, dict[str, Any]]
    few_step_sigmas: list[float]
    shift: float
    rank: int
    alpha: float
    target_modules: list[str]
    run_id: str
    parent_version: int | None
    #: sources are resized to about resolution^2 pixels (None: files from before it was recorded)
    resolution: int | None = None
    clora_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def write_unified(
    path: str | os.PathLike[str], student_state: dict[str, torch.Tensor], header: UnifiedHeader
) -> None:
    """Write the unified LoRA atomically."""
    tensors = {PREFIX + k: v for k, v in student_state.items()}
    meta = {
        "clora": header.to_json(),
        "lora_adapter_metadata": json.dumps(
            {
                f"{PREFIX}r": header.rank,
                f"{PREFIX}lora_alpha": header.alpha,
                f"{PREFIX}target_modules": header.target_modules,
            },
            sort_keys=True,
        ),
        "format": "pt",
    }
    save_safetensors(tensors, path, meta)


def read_header(path: str | os.PathLike[str]) -> UnifiedHeader:
    """The ``clora`` header of a unified LoRA file, or a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise CloraError(f"unified LoRA file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for bad files
        raise CloraError(f"{p} is not a readable safetensors file ({e})") from None
    if "clora" not in meta:
        raise CloraError(f"{p} is not a clora unified LoRA (no 'clora' header)")
    data: dict[str, Any] = json.loads(meta["clora"])
    known = set(UnifiedHeader.__dataclass_fields__)
    return UnifiedHeader(**{k: v for k, v in data.items() if k in known})


def read_student_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """peft-style state dict (no ``transformer.`` prefix) of a unified LoRA."""
    return {k.removeprefix(PREFIX): v for k, v in load_file(str(path)).items()}
