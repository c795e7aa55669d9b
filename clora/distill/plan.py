"""What a distill run trains: its effects (with triggers and captions), base and parent collection."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clora.fileio import atomic_path


@dataclass
class EffectPlan:
    """One effect as the run sees it; triggers and captions are frozen into the plan."""

    name: str
    trigger: str
    caption: str
    teacher_prompt: str
    lora_path: str
    lora_sha256: str
    new: bool = True

    @property
    def student_prompt(self) -> str:
        """Asymmetric orthogonal prompting: the student sees ``<trigger> <caption>``."""
        return f"{self.trigger} {self.caption}"

    def trained_prompt(self, asymmetric: bool) -> str:
        """The text the student learns the effect under, and is prompted with afterwards: the
        student prompt, or the teacher's own prompt when asymmetric prompting is off (an ablation)."""
        return self.student_prompt if asymmetric else self.teacher_prompt


@dataclass
class Plan:
    """A run's fixed inputs, written to ``plan.json`` in the run folder so ``--resume`` can rebuild it."""

    run_id: str
    kind: str  # "full", "incremental" or "general-only"
    base_id: str
    effects: list[EffectPlan]
    parent_version: int | None = None
    parent_id: int | None = None
    parent_state: str | None = None
    out_file: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: leading student LoRA components kept fixed (an incremental run that grows: the parent's rank)
    frozen_rank: int = 0
    #: the parent's LoRA scale (alpha / rank), folded into the grown student's B
    parent_lora_scale: float = 1.0

    @property
    def new_effects(self) -> list[str]:
        return [e.name for e in self.effects if e.new]

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Plan:
        data = json.loads(path.read_text())
        data["effects"] = [EffectPlan(**e) for e in data["effects"]]
        if "parent_lora_scale" in data.get("extra", {}):  # plans written before it was a field
            data["parent_lora_scale"] = data["extra"].pop("parent_lora_scale")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
