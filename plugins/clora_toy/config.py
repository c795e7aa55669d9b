"""Typed recipes for the toy world: model size, base training and teacher training."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: numbers per patch of the 'affine' prediction besides its per-pixel residual: a 3x3 colour matrix and
#: an RGB bias
AFFINE_PARAMS = 12


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Shape of the toy transformer and its text encoder."""

    image_size: int = Field(32, description="square image side in pixels")
    patch_size: int = Field(2, description="pixels per packed latent patch side (Qwen-Image packs 2x2)")
    width: int = Field(128, description="transformer inner dim = heads * head_dim")
    num_layers: int = Field(4, description="dual-stream transformer blocks")
    num_heads: int = Field(4, description="attention heads")
    text_hidden: int = Field(64, description="text encoder hidden size = joint_attention_dim")
    text_layers: int = Field(2, description="text encoder layers")
    text_vocab: int = Field(8192, description="hashed word vocabulary size")
    text_max_words: int = Field(30, description="words kept per prompt (longer prompts are cut)")
    position_frequencies: int = Field(
        8,
        description="sin/cos frequencies per axis of each patch's centred position fed as extra input "
        "channels (0: none; RoPE alone gives only relative positions, which cannot express a mirror)",
    )
    prediction: Literal["velocity", "x0", "edit", "affine"] = Field(
        "affine",
        description="what the transformer outputs: the velocity itself ('velocity'), the clean image F "
        "('x0'), F minus the source image ('edit'), or per patch a colour matrix added to the identity, "
        "a colour bias and a residual per pixel, F = (I + A) source + b + R ('affine'; patch_size 1 or "
        "2); for all but 'velocity', velocity = (x_t - F) / max(sigma, sigma_floor), so the noise passes "
        "through exactly, and the toy trainers fit F in image space",
    )
    sigma_floor: float = Field(0.05, description="smallest sigma divided by under 'x0', 'edit' and 'affine'")
    clip_clean: bool = Field(
        True,
        description="clip F to the pixel range before it becomes a velocity (DDPM's clip_sample; the truth "
        "is always in range, so clipping never moves F away from it); a colour matrix then also expresses "
        "the edits that saturate (contrast, brighten, hue rotations); no effect under 'velocity'",
    )
    seed: int = Field(0, description="seed of the weight init and the frozen text encoder")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @model_validator(mode="after")
    def _affine_fits_a_patch(self) -> ModelConfig:
        if self.prediction == "affine" and AFFINE_PARAMS % self.patch_size**2:
            raise ValueError(
                f"prediction 'affine' needs patch_size 1 or 2 (its {AFFINE_PARAMS} numbers per patch are "
                f"spread over the patch's pixels), not {self.patch_size}"
            )
        return self


class BaseTrainConfig(_Strict):
    """Flow-matching training of the base editor on procedural edits."""

    steps: int = Field(800, description="optimizer steps")
    batch_size: int = Field(16, description="pairs per step")
    lr: float = Field(2e-3, description="peak AdamW learning rate (cosine decay after warmup)")
    warmup: int = Field(100, description="linear warmup steps")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    prompt_dropout: float = Field(0.1, description="probability of training on the empty prompt (for CFG)")
    shifted_sigma_frac: float = Field(
        0.5, description="fraction of sigmas drawn from shift3(U) (high noise) instead of U[0,1]"
    )
    grad_clip: float = Field(1.0, description="max gradient norm")
    edit_weights: dict[str, float] = Field(
        default_factory=lambda: {"flip": 3.0},
        description="sampling weight per general edit (1 if not named); the mirror is the slowest to learn",
    )
    seed: int = Field(1, description="data and noise seed")


class TeacherTrainConfig(_Strict):
    """Training of one effect's teacher LoRA on a few dozen exact pairs."""

    rank: int = Field(8, description="LoRA rank")
    alpha: float = Field(8.0, description="LoRA alpha (scale = alpha / rank)")
    steps: int = Field(300, description="optimizer steps")
    batch_size: int = Field(16, description="pairs per step")
    num_pairs: int = Field(48, description="distinct source images the LoRA sees")
    lr: float = Field(6e-3, description="peak AdamW learning rate (cosine decay after warmup)")
    warmup: int = Field(20, description="linear warmup steps")
    prompt_dropout: float = Field(0.1, description="probability of training on the empty prompt (for CFG)")
    shifted_sigma_frac: float = Field(0.5, description="fraction of sigmas drawn from shift3(U)")
    grad_clip: float = Field(1.0, description="max gradient norm")
    seed: int = Field(2, description="data and noise seed (mixed with the effect name)")


class EvalConfig(_Strict):
    """How the toy models are scored against ground truth."""

    steps: int = Field(20, description="Euler steps on the shift3 schedule (the base's edits)")
    base_guidance: float = Field(0.0, description="CFG g in cond + g*(cond-uncond) for base edits")
    # the teachers' sampler: the build scores them with it, and the toy backbone gives it to distill, eval
    # and generate. Measured on the shipped teachers (benchmarks/README.md, "Toy teachers"): best at 2-8
    # steps without CFG (10 effects: 39.3 dB at 4 steps without CFG, 35.8 at 20 steps with CFG 1)
    teacher_steps: int = Field(4, description="Euler steps of the teachers' sampler")
    teacher_guidance: float = Field(0.0, description="CFG g of the teachers' sampler (0: none)")
    num_images: int = Field(32, description="held-out source images per score")


class ToyConfig(_Strict):
    """Everything that determines a built toy base and its teachers."""

    model: ModelConfig = ModelConfig()
    base: BaseTrainConfig = BaseTrainConfig()
    teacher: TeacherTrainConfig = TeacherTrainConfig()
    eval: EvalConfig = EvalConfig()

    def base_hash(self) -> str:
        """Short hash of what determines the base weights (model + base training)."""
        return _digest({"model": _recipe(self.model), "base": _recipe(self.base)})

    def teacher_hash(self, effect_name: str) -> str:
        """Short hash of what determines one teacher LoRA."""
        return _digest(
            {"base": self.base_hash(), "teacher": self.teacher.model_dump(), "effect": effect_name}
        )


#: options added after bases were built and shipped, with the value that reproduces the older
#: recipe; at that value they are left out of the hash, so those bases keep their cache key
_NEUTRAL: dict[str, object] = {
    "position_frequencies": 0,
    "edit_weights": {},
    "prediction": "velocity",
    "sigma_floor": 0.05,
    "clip_clean": False,
}


def _recipe(part: BaseModel) -> dict[str, object]:
    return {k: v for k, v in part.model_dump().items() if not (k in _NEUTRAL and v == _NEUTRAL[k])}


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


TOY = ToyConfig()

TOY_TINY = ToyConfig(
    model=ModelConfig(
        image_size=16,
        width=32,
        num_layers=1,
        num_heads=2,
        text_hidden=32,
        text_layers=1,
        position_frequencies=4,
    ),
    base=BaseTrainConfig(steps=1500, batch_size=4, lr=3e-3, warmup=50),
    teacher=TeacherTrainConfig(rank=4, alpha=4.0, steps=300, batch_size=4, num_pairs=16, lr=5e-3, warmup=10),
    eval=EvalConfig(steps=8, num_images=8),
)
