"""The distiller's typed configuration. It is saved in every checkpoint and collection row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clora.errors import CloraError


class LossSpec(BaseModel):
    """One loss term's weight, optionally following a schedule over training."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, ge=0, description="weight at step 0")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="how the weight moves from `weight` to `final_weight` over the run"
    )
    final_weight: float = Field(0.0, ge=0, description="weight at the last step (linear/cosine only)")

    def at(self, step: int, total: int) -> float:
        """The weight at ``step`` of ``total``."""
        import math

        if self.schedule == "constant" or total <= 1:
            return self.weight
        frac = min(max(step / (total - 1), 0.0), 1.0)
        mix = frac if self.schedule == "linear" else 0.5 * (1 - math.cos(math.pi * frac))
        return self.weight + (self.final_weight - self.weight) * mix


def default_losses() -> dict[str, LossSpec]:
    # Trajectory anchoring at the sampler's own levels leads. On the toy world the on-policy terms
    # (DMD, target simulation) cost fidelity: the edits are deterministic, the student can match its
    # teachers' outputs almost exactly, and DMD's normalised gradient stays O(1) however close it is
    # (measured; see benchmarks/README.md). They are kept, with the reference's roles, for runs with
    # anchor_share < 1.
    return {
        "level_anchor": LossSpec(weight=1.0),
        "dmd": LossSpec(weight=0.1),
        "target_sim": LossSpec(weight=0.1),
        "critic_fm": LossSpec(),
    }


class DistillConfig(BaseModel):
    """Everything that determines a distill run ("reference: X" notes the reference's own value)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(
        600,
        ge=1,
        description="training steps (each trains the critic; every gen_every also the student); "
        "a full run without --steps trains at least steps_per_effect per effect",
    )
    steps_per_effect: int = Field(
        375, ge=1, description="full runs without --steps train max(steps, this x effects) steps"
    )
    steps_per_new_effect: int = Field(
        600,
        ge=1,
        description="incremental runs without --steps train this many steps per new effect (more than a "
        "full run's share: the new effects start from zero; 2 new of 10 cost ~1/3 of a full run)",
    )
    rank: int = Field(16, ge=1, description="LoRA rank of the student (and critic)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha of the student (default: equal to rank)")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="module-name suffixes the student and critic LoRAs adapt (None: the base model's "
        "choice, Backbone.lora_target_modules; an incremental run keeps its parent's)",
    )
    few_steps: Literal[4, 8] = Field(4, description="sampling steps of the unified LoRA")
    shift: float = Field(
        3.0, gt=0, description="timestep shift of every schedule: s = shift*u / (1 + (shift-1)*u)"
    )
    p_switch: float = Field(
        0.9,
        ge=0,
        le=1,
        description="probability that a block of steps is an effect-stream block (reference: 0.5; on 8 toy "
        "effects 0.9 scored 0.7 dB over 0.75 and kept the general edits as well)",
    )
    block_len: int = Field(5, ge=1, description="steps per routing block (reference: 20)")
    effects_per_batch: int = Field(
        8,
        ge=1,
        description="effects sharing one effect-stream batch, each with its own teacher (capped by the "
        "number of effects and the batch size; the reference trains one effect per block: 1)",
    )
    incremental_effects_per_batch: int | None = Field(
        6,
        ge=1,
        description="effects_per_batch of incremental runs (None: the same as full runs); fewer effects "
        "a batch give each new effect more rows (+cool, solarize on 8 toy effects, one 1200-step run "
        "each: 6 beat 8 for the new and the old effects; the demo's 300-step run ranked them the other way)",
    )
    effect_balance: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weigh each effect's rows in the regression terms by (its running loss)^-b, normalised "
        "to mean 1 over the batch: 0 is plain MSE, where the effects with the largest errors steer the "
        "shared LoRA; 1 makes every effect's relative error count alike, as PSNR does, and the hardest "
        "effect falls back (on 8 toy effects 0.5 put all 8 within 2 dB of their teachers, 0 seven)",
    )
    router: str = Field("balanced", description="router plugin id that picks the effect of each effect block")
    new_effect_share: float = Field(
        0.5, ge=0, le=1, description="incremental runs: share of effect slots given to the new effects"
    )
    gen_every: int = Field(
        1, ge=1, description="one student update every gen_every steps (critic every step; reference: 5)"
    )
    anchor_share: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of the steps, at the start, that train the student by trajectory anchoring "
        "alone (off-policy terms only: no simulation, teacher or critic calls, a few times cheaper a "
        "step); the critic warm-up and the on-policy phase (DMD, target simulation) follow; 1: the "
        "whole run anchors (the default: on the toy world the on-policy terms cost fidelity)",
    )
    critic_warmup: int = Field(
        20,
        ge=0,
        description="critic-only steps before the first student update (at most a quarter of the run)",
    )
    critic_from_student: bool = Field(
        True,
        description="when the anchoring phase ends, the critic starts as a copy of the student (the "
        "student is then the best model of its own samples; a critic that has to catch up from the base "
        "makes the first DMD gradients point far past the teachers)",
    )
    batch_size: int = Field(16, ge=1, description="images per step")
    grad_accumulation: int = Field(
        1,
        ge=1,
        description="split each step's batch into this many micro-batches whose gradients add up before "
        "the optimizer step (same result, less memory, when the batch does not fit)",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="recompute the transformer's activations in the backward pass instead of keeping them "
        "(default: on for real bases, off for the toy)",
    )
    lr: float = Field(6e-3, gt=0, description="AdamW learning rate of the student (reference: 1e-4)")
    critic_lr: float = Field(5e-4, gt=0, description="AdamW learning rate of the critic (reference: 1e-4)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine",
        description="student learning rate over the run: constant, or cosine decay to lr_final_ratio",
    )
    lr_final_ratio: float = Field(
        0.01,
        ge=0,
        le=1,
        description="final / initial student lr (cosine; 0.01 scored 0.3 dB over 0.1 on 8 toy effects)",
    )
    incremental_lr_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="incremental runs train the student at lr x this (default: 1 when the student grows, "
        "0.25 when it trains the parent's own components, where a full-size restart makes it forget)",
    )
    incremental_grow_rank: int = Field(
        16,
        ge=0,
        description="incremental runs: the student keeps its parent's LoRA components fixed and trains this "
        "many new ones (the file's rank grows by this much each time); 0: it trains the parent's own "
        "components (a fixed file size, but the old effects drift: up to -2 dB measured on the toy world)",
    )
    frozen_rank: int = Field(
        0,
        ge=0,
        description="leading student LoRA components kept fixed (set by incremental runs that grow; "
        "not for hand-written configs)",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (both optimizers)")
    grad_clip: float = Field(10.0, gt=0, description="max gradient norm (both optimizers)")
    guidance: float | None = Field(
        None, ge=0, description="teacher CFG g in cond + g*(cond - uncond) (default: the base model's choice)"
    )
    general_guidance: float = Field(
        0.0,
        ge=0,
        description="CFG g of the base model as the general stream's teacher (its targets and, on-policy, "
        "its score): 0 is the base as `clora eval` scores its retention; on the toy, the effects' CFG of 1 "
        "made the general targets 1-17 dB worse against the truth",
    )
    teacher_steps: int | None = Field(
        None,
        ge=1,
        description="Euler steps of the teacher's full sampler for targets (default: the base model's "
        "choice: 20 on the toy, 40 on Qwen-Image-Edit)",
    )
    teacher_batch_size: int | None = Field(
        None, ge=1, description="images per batch when sampling teacher targets (default: batch_size)"
    )
    resolution: int | None = Field(
        None,
        ge=16,
        description="sources are resized to about resolution^2 pixels, keeping their aspect, to sides the "
        "base needs (default: the base's own; the toy edits one fixed size and ignores it)",
    )
    general_data: str | None = Field(
        None,
        description="folder of general-stream images with prompts.jsonl ({image, prompt} per line) or "
        "prompt.txt (one instruction for all); default: the base's built-in general edits, else the "
        "effects' example images with built-in neutral instructions",
    )
    sources_per_effect: int = Field(
        128,
        ge=1,
        description="source images per effect, each with its teacher's output (the prepare stage runs the "
        "teacher's full sampler on every one; on 8 toy effects 128 scored 0.7 dB over 32)",
    )
    general_pool: int = Field(256, ge=1, description="general-stream (image, instruction) pairs")
    general_targets: bool = Field(
        True,
        description="coarse-to-fine also on the general stream, toward the base's own outputs (retention)",
    )
    asymmetric_prompts: bool = Field(
        True, description="student/critic get trigger + caption; off: they get the teacher prompt (ablation)"
    )
    target_levels: int = Field(
        5, ge=1, description="target simulation noises y_T to one of the last N levels"
    )
    losses: dict[str, LossSpec] = Field(
        default_factory=default_losses, description="loss term id -> weight spec"
    )
    max_resident_teachers: int = Field(8, ge=1, description="teacher adapters kept on the base at once")
    checkpoint_every: int = Field(50, ge=1, description="write a checkpoint every N steps")
    captioner: str = Field("template", description="captioner plugin id for effects without a caption")
    seed: int = Field(0, description="seed of routing, noise and data order")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="dtype of the frozen base (default: bfloat16 for real bases on CUDA, else float32); "
        "the trained LoRAs and their optimizer state stay float32",
    )

    @field_validator("losses")
    @classmethod
    def _some_generator_loss(cls, v: dict[str, LossSpec]) -> dict[str, LossSpec]:
        if not v:
            raise ValueError("at least one loss term is needed")
        return v

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.target_levels > self.few_steps:
            self.target_levels = self.few_steps
        if self.batch_size % self.grad_accumulation:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accumulation "
                f"({self.grad_accumulation})"
            )
        if self.frozen_rank >= self.rank:
            raise ValueError(f"frozen_rank ({self.frozen_rank}) must be below rank ({self.rank})")
        return self

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def anchor_steps(self) -> int:
        """Steps of the anchoring phase at the start of the run."""
        return int(self.steps * self.anchor_share)

    def lr_at(self, step: int) -> float:
        """The student's learning rate at ``step`` of this run (``lr_schedule``)."""
        if self.lr_schedule == "constant" or self.steps <= 1:
            return self.lr
        import math

        frac = min(max(step / (self.steps - 1), 0.0), 1.0)
        r = self.lr_final_ratio
        return self.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * frac)))

    def to_json(self) -> dict[str, object]:
        return json.loads(self.model_dump_json())


def load_config(path: str | Path | None, overrides: dict[str, object]) -> DistillConfig:
    """A config from a JSON file (optional) with CLI overrides on top; one-line error when invalid."""
    data: dict[str, object] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CloraError(f"config file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CloraError(f"config file {p} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CloraError(f"config file {p} must hold a JSON object")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "config"
        raise CloraError(f"invalid distill config: {where}: {err['msg']}") from None
