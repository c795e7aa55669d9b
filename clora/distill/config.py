"""The distiller's typed configuration, in named sections. A run stores its resolved config once (the
run folder, the run's and the collection's registry rows); :func:`read_config` reads any stored one.

A config file (``clora distill --config FILE``) is JSON with any of these fields, nested by section::

    {"steps": 2000, "student": {"rank": 32}, "anchoring": {"share": 0.5},
     "losses": {"level_anchor": {"weight": 1.0, "schedule": "cosine", "final_weight": 0.1}}}

``clora distill --set section.field=value`` sets one field. Fields left ``None`` are filled by
:func:`clora.distill.resolve.resolve` from the base model (guidance, steps of the teacher's sampler,
resolution, ...). Measurements behind the defaults are in benchmarks/README.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clora.errors import CloraError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def cosine_mix(frac: float) -> float:
    """0 at ``frac`` 0, 1 at ``frac`` 1, along half a cosine: the shape of every cosine schedule here."""
    frac = min(max(frac, 0.0), 1.0)
    return 0.5 * (1 - math.cos(math.pi * frac))


class LossSpec(_Section):
    """One loss term's weight, optionally following a schedule over training."""

    weight: float = Field(1.0, ge=0, description="weight at step 0")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="how the weight moves from `weight` to `final_weight` over the run"
    )
    final_weight: float = Field(0.0, ge=0, description="weight at the last step (linear/cosine only)")

    def at(self, step: int, total: int) -> float:
        """The weight at ``step`` of ``total``."""
        if self.schedule == "constant" or total <= 1:
            return self.weight
        frac = min(max(step / (total - 1), 0.0), 1.0)
        mix = frac if self.schedule == "linear" else cosine_mix(frac)
        return self.weight + (self.final_weight - self.weight) * mix


def default_losses() -> dict[str, LossSpec]:
    # anchoring at the sampler's own levels leads; the on-policy terms (DMD, target simulation) train
    # in the on-policy phase of runs with anchoring.share < 1, the critic's term on student samples
    return {
        "level_anchor": LossSpec(weight=1.0),
        "dmd": LossSpec(weight=0.1),
        "target_sim": LossSpec(weight=0.1),
        "critic_fm": LossSpec(),
    }


class StudentConfig(_Section):
    """The unified LoRA: its shape, its sampler and the prompts it learns under."""

    rank: int | None = Field(
        None,
        ge=1,
        description="LoRA rank of the student (and critic); default: from the number of effects, by the "
        "base model's rule (the toy's: 8 per effect, 16 to 128)",
    )
    alpha: float | None = Field(None, gt=0, description="LoRA alpha of the student (default: equal to rank)")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="module-name suffixes the student and critic adapt (default: the base model's choice, "
        "Backbone.lora_target_modules; an incremental run keeps its parent's)",
    )
    few_steps: Literal[4, 8] = Field(4, description="sampling steps of the unified LoRA")
    shift: float = Field(
        3.0, gt=0, description="timestep shift of the few-step schedule: s = shift*u / (1 + (shift-1)*u)"
    )
    on_policy_shift: float | None = Field(
        1.0,
        gt=0,
        description="timestep shift of the few-step levels of the effects that train on-policy "
        "(on_policy.effects: those whose result varies with the seed); lower ends their sampler at a "
        "lower noise level, where more of the seed's texture is drawn (1: levels to 0.25, shift 3: to "
        "0.50); the collection records them and clora samples those effects with them; null: shift, "
        "the collection's levels",
    )
    asymmetric_prompts: bool = Field(
        True,
        description="the student learns each effect under its trigger + caption; off: under the teacher's "
        "own prompt (an ablation)",
    )
    captioner: str = Field("template", description="captioner plugin id for effects without a caption")

    @property
    def lora_rank(self) -> int:
        """The rank of a resolved config (the rule has filled it in)."""
        if self.rank is None:
            raise ValueError("the student's rank is picked when the run's config is resolved")
        return self.rank

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.lora_rank)


class OptimizerConfig(_Section):
    """AdamW for the student and the critic, and the batch each step trains on."""

    batch_size: int = Field(16, ge=1, description="images per step")
    grad_accumulation: int = Field(
        1,
        ge=1,
        description="split each step's batch into this many micro-batches whose gradients add up before the "
        "optimizer step (less memory when the batch does not fit)",
    )
    lr: float = Field(
        3e-3,
        gt=0,
        description="learning rate of the student (reference: 1e-4); left out, it falls as sqrt(32 / rank) "
        "when more than 32 LoRA components train (the base model's rule)",
    )
    critic_lr: float = Field(5e-4, gt=0, description="learning rate of the critic (reference: 1e-4)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine",
        description="the student's learning rate over the run: constant, or cosine to lr_final_ratio",
    )
    lr_final_ratio: float = Field(0.01, ge=0, le=1, description="final / initial student lr (cosine)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (both optimizers)")
    grad_clip: float = Field(10.0, gt=0, description="max gradient norm (both optimizers)")
    gradient_checkpointing: bool | None = Field(
        None,
        description="recompute the transformer's activations in the backward pass instead of keeping them "
        "(default: on for real bases, off for the toy)",
    )

    @model_validator(mode="after")
    def _micro_batches_fit(self) -> OptimizerConfig:
        if self.batch_size % self.grad_accumulation:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accumulation "
                f"({self.grad_accumulation})"
            )
        return self


class DataConfig(_Section):
    """What each step trains on: sources, the two streams and how effects share a batch."""

    resolution: int | None = Field(
        None,
        ge=16,
        description="sources are resized to about resolution^2 pixels, keeping their aspect, to sides the "
        "base needs (default: the base's own; the toy edits one fixed size)",
    )
    sources_per_effect: int = Field(
        128,
        ge=1,
        description="source images per effect (at most its examples), each with its teacher's output",
    )
    general_pool: int = Field(256, ge=1, description="general-stream (image, instruction) pairs")
    general_data: str | None = Field(
        None,
        description="folder of general-stream images with prompts.jsonl ({image, prompt} per line) or "
        "prompt.txt (one instruction for all); default: the base's built-in general edits, else the "
        "effects' example images with built-in neutral instructions",
    )
    general_targets: bool = Field(
        True, description="also anchor the general stream, onto the base's own outputs (retention)"
    )
    p_switch: float = Field(
        0.9,
        ge=0,
        le=1,
        description="share of the blocks of steps that are effect-stream blocks; the rest, evenly spaced "
        "(at 0.9: every tenth block), train the general stream",
    )
    block_len: int = Field(5, ge=1, description="steps per routing block (reference: 20)")
    effects_per_batch: int = Field(
        8,
        ge=1,
        description="effects sharing one effect-stream batch, each with its own teacher (capped by the "
        "number of effects and the batch size; the reference trains one effect per block: 1)",
    )
    effect_balance: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weigh each effect's rows in the regression terms by (its running loss)^-b, normalised "
        "to mean 1: 0 is plain MSE; 1 makes every effect's relative error count alike",
    )
    router: str = Field(
        "balanced",
        description="router plugin id that picks the effects of each block: balanced (each effect alike), "
        "gap (effects furthest from their teachers at the latest probe more often), progress (effects "
        "whose probe PSNR rose most per block over the last probes more often), file-order",
    )
    router_floor: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of the progress router's picks given to the least-chosen effect, so that no "
        "effect starves while others gain faster",
    )
    probe_every: int = Field(
        100,
        ge=1,
        description="steps between probes, when the run probes (the gap and progress routers, or target_db "
        "set): the student's few-step samples scored against the teachers' outputs on held-out sources of "
        "each effect",
    )
    probe_rows: int = Field(
        2, ge=1, description="sources per effect held out of training for the probe (when the run probes)"
    )
    target_db: float | None = Field(
        None,
        gt=0,
        description="an effect whose probe PSNR against its teacher reaches this many dB is not routed "
        "until it falls below again, and the run ends early once every effect is there; None: every "
        "effect trains for the whole run",
    )


#: the fewest Euler steps of the teachers' sampler that measure an effect's seed spread and, by
#: default, draw the targets of the effects that train on-policy: a few-step sampler draws a
#: seed-varying effect at a part of its spread (the toy's 4-step teachers keep about half of film
#: grain's), and a student anchored to such targets learns that part
MIN_TARGET_STEPS = 20


class TeacherConfig(_Section):
    """The teachers' full sampler, which makes the targets and scores the student on-policy."""

    steps: int | None = Field(
        None, ge=1, description="Euler steps of the full sampler (default: the base's: 4 toy, 40 Qwen)"
    )
    on_policy_steps: int | None = Field(
        None,
        ge=1,
        description="Euler steps that draw the targets of the effects that train on-policy (on_policy."
        "effects), whose result varies with the seed (default: steps, at least 20: fewer draw such an "
        "effect at a part of its spread)",
    )
    batch_size: int | None = Field(
        None, ge=1, description="images per batch when sampling targets (default: optimizer.batch_size)"
    )
    guidance: float | None = Field(
        None, ge=0, description="the effects' teachers' guidance scale (default: the base model's choice)"
    )
    general_guidance: float = Field(
        0.0,
        ge=0,
        description="guidance of the base model as the general stream's teacher (0: none, as `clora eval` "
        "scores retention)",
    )
    max_resident: int = Field(8, ge=1, description="teacher adapters kept on the base at once")


class AnchoringConfig(_Section):
    """The anchoring phase: regression of the student onto the teachers' outputs, no simulation."""

    share: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of the steps, at the start, that train by anchoring alone (off-policy terms, a "
        "few times cheaper a step); the on-policy phase follows; 1: the whole run anchors",
    )


class OnPolicyConfig(_Section):
    """The on-policy phase: the student's own samples scored by teacher vs critic (DMD)."""

    gen_every: int = Field(1, ge=1, description="one student update every gen_every steps (reference: 5)")
    critic_warmup: int = Field(
        20, ge=0, description="critic-only steps before the first student update (at most a quarter)"
    )
    critic_from_student: bool = Field(
        True, description="the critic starts the phase as a copy of the student"
    )
    effects: str = Field(
        "auto",
        description="effects whose rows also train on-policy (DMD, target simulation, the critic) in "
        "the anchoring phase, where the rest only anchor: auto (those whose teacher's texture changes "
        "with the seed: film grain, scattered sparkles, a streak in a random direction; see spread), none, "
        "or effect names separated by commas",
    )
    spread: float = Field(
        0.05,
        ge=0,
        description="auto: an effect trains on-policy when at least this share of its teacher's edit "
        "(mean squared change) differs between two seeds, less each image's mean colour difference, "
        "measured on 4 sources with the teacher's sampler at 20 steps or more and cached with the "
        "targets (toy: grain 0.97, confetti 1.22, random-direction streak 0.08; a tint from a palette "
        "0.001; the deterministic edits 0.01 at most)",
    )
    anchor_weight: float = Field(
        1.0,
        ge=0,
        description="weight of the regression (anchoring) terms on the rows of the on-policy effects in "
        "the anchoring phase (0: they train by DMD and target simulation alone)",
    )
    target_levels: int = Field(
        5,
        ge=1,
        description="target simulation noises y_T to one of the sampler's last N levels (at most all "
        "but the first, pure-noise one)",
    )

    @field_validator("effects")
    @classmethod
    def _effects(cls, v: str) -> str:
        """``auto``, ``none`` (also empty) or effect names, comma-separated, without blanks."""
        names = [n.strip() for n in v.split(",") if n.strip()]
        if len(names) == 1 and names[0].lower() in ("auto", "none"):
            return names[0].lower()
        return ",".join(names) or "none"


class IncrementalConfig(_Section):
    """Runs that grow an existing collection (``--incremental``)."""

    steps_per_new_effect: int = Field(700, ge=1, description="steps per new effect when --steps is not given")
    new_effect_share: float = Field(
        0.6,
        ge=0,
        le=1,
        description="share of effect slots given to the new effects (the rest replay old ones)",
    )
    effects_per_batch: int | None = Field(
        6, ge=1, description="data.effects_per_batch of incremental runs (None: the same as full runs)"
    )
    lr_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="the student trains at optimizer.lr x this (default: 0.6 when it grows, 0.25 when it "
        "trains the parent's own components)",
    )
    grow_rank: int | None = Field(
        None,
        ge=0,
        description="the parent's LoRA components stay fixed and this many new ones train (the rank grows by "
        "this much; default: to the rank a full run of all the effects would pick, by at least 16); 0: the "
        "parent's own components train (fixed size; old effects drift)",
    )


class DistillConfig(_Section):
    """Everything that determines a distill run ("reference: X" notes the reference's own value)."""

    steps: int = Field(
        600,
        ge=1,
        description="training steps; full runs without --steps train max(steps, steps_per_effect x effects)",
    )
    steps_per_effect: int = Field(375, ge=1, description="see steps")
    seed: int = Field(0, description="seed of routing, noise and data order")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="dtype of the frozen base (default: bfloat16 for real bases on CUDA, else float32); the "
        "trained LoRAs and their optimizer state stay float32",
    )
    checkpoint_every: int = Field(50, ge=1, description="write a checkpoint every N steps")
    losses: dict[str, LossSpec] = Field(default_factory=default_losses, description="loss term id -> weight")
    student: StudentConfig = Field(default_factory=StudentConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teachers: TeacherConfig = Field(default_factory=TeacherConfig)
    anchoring: AnchoringConfig = Field(default_factory=AnchoringConfig)
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    incremental: IncrementalConfig = Field(default_factory=IncrementalConfig)

    @field_validator("losses")
    @classmethod
    def _some_loss(cls, v: dict[str, LossSpec]) -> dict[str, LossSpec]:
        if not v:
            raise ValueError("at least one loss term is needed")
        return v

    @property
    def anchor_steps(self) -> int:
        """Steps of the anchoring phase at the start of the run."""
        return int(self.steps * self.anchoring.share)

    @property
    def uses_critic(self) -> bool:
        """Whether the run has an on-policy phase (and so a critic)."""
        return self.anchor_steps < self.steps

    def lr_at(self, step: int) -> float:
        """The student's learning rate at ``step`` of this run (``optimizer.lr_schedule``)."""
        opt = self.optimizer
        if opt.lr_schedule == "constant" or self.steps <= 1:
            return opt.lr
        r = opt.lr_final_ratio
        return opt.lr * (r + (1 - r) * (1 - cosine_mix(step / (self.steps - 1))))

    def to_json(self) -> dict[str, Any]:
        return dict(json.loads(self.model_dump_json()))


#: fields of the flat config clora stored before the sections (and still reads): name -> path
FLAT_FIELDS: dict[str, tuple[str, ...]] = {
    "rank": ("student", "rank"),
    "alpha": ("student", "alpha"),
    "target_modules": ("student", "target_modules"),
    "few_steps": ("student", "few_steps"),
    "shift": ("student", "shift"),
    "asymmetric_prompts": ("student", "asymmetric_prompts"),
    "captioner": ("student", "captioner"),
    "batch_size": ("optimizer", "batch_size"),
    "grad_accumulation": ("optimizer", "grad_accumulation"),
    "lr": ("optimizer", "lr"),
    "critic_lr": ("optimizer", "critic_lr"),
    "lr_schedule": ("optimizer", "lr_schedule"),
    "lr_final_ratio": ("optimizer", "lr_final_ratio"),
    "betas": ("optimizer", "betas"),
    "grad_clip": ("optimizer", "grad_clip"),
    "gradient_checkpointing": ("optimizer", "gradient_checkpointing"),
    "resolution": ("data", "resolution"),
    "sources_per_effect": ("data", "sources_per_effect"),
    "general_pool": ("data", "general_pool"),
    "general_data": ("data", "general_data"),
    "general_targets": ("data", "general_targets"),
    "p_switch": ("data", "p_switch"),
    "block_len": ("data", "block_len"),
    "effects_per_batch": ("data", "effects_per_batch"),
    "effect_balance": ("data", "effect_balance"),
    "router": ("data", "router"),
    "teacher_steps": ("teachers", "steps"),
    "teacher_batch_size": ("teachers", "batch_size"),
    "guidance": ("teachers", "guidance"),
    "general_guidance": ("teachers", "general_guidance"),
    "max_resident_teachers": ("teachers", "max_resident"),
    "anchor_share": ("anchoring", "share"),
    "gen_every": ("on_policy", "gen_every"),
    "critic_warmup": ("on_policy", "critic_warmup"),
    "critic_from_student": ("on_policy", "critic_from_student"),
    "target_levels": ("on_policy", "target_levels"),
    "on_policy_effects": ("on_policy", "effects"),
    "steps_per_new_effect": ("incremental", "steps_per_new_effect"),
    "new_effect_share": ("incremental", "new_effect_share"),
    "incremental_effects_per_batch": ("incremental", "effects_per_batch"),
    "incremental_lr_ratio": ("incremental", "lr_ratio"),
    "incremental_grow_rank": ("incremental", "grow_rank"),
}
#: fields no longer in the config (run state now kept in the run's plan)
RETIRED_FIELDS = {"frozen_rank"}


def set_path(data: dict[str, Any], path: tuple[str, ...] | list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, making sections as needed."""
    node = data
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise CloraError(f"config field {'.'.join(path)}: '{key}' is not a section")
        node = child
    node[path[-1]] = value


def _nest(data: dict[str, Any], strict: bool) -> dict[str, Any]:
    """Flat (pre-section) field names moved to their sections; retired ones dropped; with ``strict``
    other unknown top-level names stay (validation names them), else they are dropped."""
    known = set(DistillConfig.model_fields)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in RETIRED_FIELDS:
            continue
        if key in FLAT_FIELDS:
            set_path(out, FLAT_FIELDS[key], value)
        elif key in known and isinstance(value, dict) and key not in ("losses",):
            for sub, v in value.items():
                set_path(out, (key, sub), v)
        elif key in known or strict:
            out[key] = value
    return out


def _prune(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """``data`` without fields ``model`` (and its sections) does not know."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        sub = field.annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            out[key] = _prune(value, sub)
        else:
            out[key] = value
    return out


def _validate(data: dict[str, Any], where: str) -> DistillConfig:
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "config"
        raise CloraError(f"invalid distill config{where}: {field}: {err['msg']}") from None


#: fields whose default changed since clora first stored them: a stored config without one was
#: trained with the value given here, not today's default
_STORED_WITHOUT = {("student", "on_policy_shift"): None}


def read_config(stored: str | dict[str, Any]) -> DistillConfig:
    """A config stored by any clora version (flat or in sections; fields since retired are dropped,
    fields added since take the value the run had: their default, or :data:`_STORED_WITHOUT`'s)."""
    data = json.loads(stored) if isinstance(stored, str) else dict(stored)
    nested = _prune(_nest(data, strict=False), DistillConfig)
    for (section, name), value in _STORED_WITHOUT.items():
        nested.setdefault(section, {}).setdefault(name, value)
    return _validate(nested, " (stored)")


def parse_set(item: str) -> tuple[list[str], Any]:
    """``--set section.field=value``: the path and the value (JSON where it parses, else the text)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise CloraError(f"--set takes section.field=value, got {item!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    path = [p for p in key.strip().split(".") if p]
    if len(path) == 1 and path[0] in FLAT_FIELDS:
        path = list(FLAT_FIELDS[path[0]])
    return path, value


def load_config(
    path: str | Path | None, overrides: dict[str, object], settings: list[str] | None = None
) -> DistillConfig:
    """A config from a JSON file (optional), then the CLI's ``--set`` values and option ``overrides``
    (flat or dotted names; None values are left out); one-line error when invalid."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CloraError(f"config file not found: {p}")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CloraError(f"config file {p} is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CloraError(f"config file {p} must hold a JSON object")
        data = _nest(raw, strict=True)
    for item in settings or []:
        keys, value = parse_set(item)
        set_path(data, keys, value)
    for key, value in overrides.items():
        if value is not None:
            set_path(data, FLAT_FIELDS.get(key, tuple(key.split("."))), value)
    return _validate(data, "")
