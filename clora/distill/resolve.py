"""One pure step from what the user asked for to what a run does: config + plan + parent + base model
-> the run's resolved config, stored once (the run folder, the run's and the collection's rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from clora.backbone import RankRule
from clora.distill.config import MIN_TARGET_STEPS, DistillConfig

if TYPE_CHECKING:
    from clora.backbone import Backbone


@dataclass(frozen=True)
class BaseDefaults:
    """What a base model chooses for the fields a config leaves out."""

    guidance: float
    target_modules: list[str]
    teacher_steps: int
    resolution: int
    #: a base of free image size (a real model): gradient checkpointing is on by default
    real: bool
    #: the student's rank and learning rate when the config leaves them out
    rank: RankRule = field(default_factory=RankRule)

    @classmethod
    def of(cls, backbone: Backbone) -> BaseDefaults:
        return cls(
            guidance=backbone.default_guidance,
            target_modules=list(backbone.lora_target_modules),
            teacher_steps=backbone.default_teacher_steps,
            resolution=backbone.image_size[0] if backbone.image_size else backbone.default_resolution,
            real=backbone.image_size is None,
            rank=backbone.student_rank,
        )


@dataclass(frozen=True)
class ParentRun:
    """The collection an incremental run grows: its resolved config and its file's target modules."""

    version: int
    config: DistillConfig
    target_modules: list[str]


@dataclass
class Resolved:
    """A run's resolved config and the state it starts from."""

    config: DistillConfig
    #: leading student LoRA components kept fixed (the parent's rank, in an incremental run that grows)
    frozen_rank: int = 0
    #: the parent's alpha / rank (its scale, folded into the grown student's B)
    parent_lora_scale: float = 1.0
    #: what the run picked for the user (the rank) and what it ignored of what they asked, in sentences
    notes: list[str] = field(default_factory=list)


def resolve(
    cfg: DistillConfig,
    *,
    kind: Literal["full", "incremental", "general-only"],
    n_effects: int,
    n_new: int,
    auto_steps: bool,
    base: BaseDefaults,
    dtype: str,
    parent: ParentRun | None = None,
) -> Resolved:
    """The run's config: ``cfg`` with the run's kind, its parent's shape and the base's defaults applied.

    ``auto_steps`` (no explicit step count): an incremental run trains ``steps_per_new_effect`` per new
    effect, a full run ``max(steps, steps_per_effect x effects)``.
    """
    c = cfg.model_copy(deep=True)
    notes: list[str] = []
    if kind == "general-only":
        c.data.p_switch = 0.0
    if kind == "incremental":
        inc = c.incremental
        ratio = inc.lr_ratio or (0.25 if inc.grow_rank == 0 else 0.6)
        c.optimizer.lr *= ratio
        inc.lr_ratio = ratio
        c.data.effects_per_batch = inc.effects_per_batch or c.data.effects_per_batch
        if auto_steps:
            c.steps = inc.steps_per_new_effect * n_new
    elif kind == "full" and auto_steps:
        c.steps = max(c.steps, c.steps_per_effect * n_effects)

    frozen, scale = 0, 1.0
    rule = base.rank
    if parent is None and c.student.rank is None:
        c.student.rank = rule.rank_for(n_effects)
        notes.append(
            f"student rank {c.student.rank} for {n_effects} effect(s) (the base model's rule: "
            f"{rule.describe()}; --rank sets it)"
        )
    trained = c.student.rank or 0  # set by here unless a parent gives the shape (below)
    if parent is not None:
        # the student keeps its parent's shape and modules; a grown one runs at alpha = rank (scale 1)
        # with the parent's scale moved into B
        p = parent.config.student
        p_rank = p.lora_rank
        grow = c.incremental.grow_rank
        if grow is None:  # grow to what a full run of every effect would get, by at least rule.least
            grow = max(rule.least, rule.rank_for(n_effects) - p_rank)
            c.incremental.grow_rank = grow
        scale = p.lora_alpha / p_rank
        trained = grow or p_rank
        shape = {
            "rank": p_rank + grow,
            "alpha": float(p_rank + grow) if grow else p.alpha,
            "few_steps": p.few_steps,
            # the parent's components were trained at its levels: the grown student samples at them too
            "shift": p.shift,
            "on_policy_shift": p.on_policy_shift,
            "target_modules": list(parent.target_modules),
        }
        asked = cfg.student.model_fields_set
        ignored = [
            f"{k} {getattr(cfg.student, k)}"
            for k, v in shape.items()
            if k in asked and getattr(cfg.student, k) not in (v, None)
        ]
        if ignored:
            notes.append(
                f"incremental run: the student keeps collection v{parent.version}'s shape (rank {p_rank} + "
                f"{grow} new, few_steps {p.few_steps}, its levels' shifts, its modules); ignoring "
                f"{', '.join(ignored)}"
            )
        c.student = c.student.model_copy(update=shape)
        frozen = p_rank if grow else 0
        if "grow_rank" not in cfg.incremental.model_fields_set:
            notes.append(
                f"student rank {p_rank} + {grow} new for {n_effects} effect(s) (the base model's rule: "
                f"{rule.describe()}; --grow-rank sets the new part)"
            )
    if "lr" not in cfg.optimizer.model_fields_set and rule.lr_scale(trained) < 1:
        c.optimizer.lr *= rule.lr_scale(trained)
        notes.append(
            f"learning rate {c.optimizer.lr:.2g}: sqrt({rule.lr_rank} / {trained}) of optimizer.lr for "
            f"{trained} trained components"
        )

    # the base model's own choices for what the config leaves out
    c.dtype = dtype  # type: ignore[assignment]  # checked by the caller against the device
    if c.teachers.guidance is None:
        c.teachers.guidance = base.guidance
    if c.student.target_modules is None:
        c.student.target_modules = list(base.target_modules)
    if c.teachers.steps is None:
        c.teachers.steps = base.teacher_steps
    if c.teachers.on_policy_steps is None:
        c.teachers.on_policy_steps = max(c.teachers.steps, MIN_TARGET_STEPS)
    if c.data.resolution is None:
        c.data.resolution = base.resolution
    if c.optimizer.gradient_checkpointing is None:
        c.optimizer.gradient_checkpointing = base.real
    # target simulation starts from the teacher's output at a late level: never the first, pure-noise one
    c.on_policy.target_levels = max(1, min(c.on_policy.target_levels, c.student.few_steps - 1))
    assert c.student.rank is not None
    if frozen >= c.student.rank:
        raise ValueError(f"the fixed components ({frozen}) must be fewer than the rank ({c.student.rank})")
    return Resolved(DistillConfig.model_validate(c.model_dump()), frozen, scale, notes)
