"""The contract between clora and a base image-editing model.

A backbone plugin registers a :class:`BackboneFactory` (a fixed base such as the toy) or a
:class:`BaseKind` (a kind of local model folder, such as a saved ``QwenImageEditPlusPipeline``, that
``clora base add NAME --path DIR`` turns into a factory). ``factory.load(device, dtype)`` returns a
:class:`Backbone`. Everything clora does with a base model (teacher targets, distillation,
generation, evaluation) goes through these methods, so the host never knows which model it drives.

Conventions shared by every backbone:

* images are float tensors ``[B, 3, H, W]`` in ``[0, 1]``; one batch holds one image size (clora
  buckets images by shape). :meth:`Backbone.image_size_for` says what size a source of any size and
  aspect is resized to for a run's ``resolution``;
* there are two latent spaces: the *target* latents (``encode_images`` / ``decode_latents``; what is
  noised and denoised, shape ``[B, *latent_shape(H, W)]``) and the *source* latents
  (``encode_sources``; the conditioning image as the model sees it, which may have another size);
* conditioning is per row: ``encode_prompts(prompts, images)`` encodes each row's prompt, together
  with that row's source image when the model's text encoder sees images (``prompt_sees_image``);
* flow matching runs in the target latent space with ``x_t = (1 - s) * x0 + s * eps`` for a noise
  level ``s`` in ``[0, 1]`` and the model predicting the velocity ``v = eps - x0``; samplers draw
  ``eps`` from ``initial_noise`` / ``sampling_noise`` (standard normal unless the backbone overrides
  them), training draws standard normal noise;
* the backbone owns its full sampler's schedule (:meth:`Backbone.teacher_sigmas`) and its guidance
  (:meth:`Backbone.combine_guidance` with :attr:`Backbone.negative_prompt` as the unconditional
  prompt); the few-step student owns its own schedule;
* the LoRA adapters (teacher, student, critic) live on ``backbone.transformer`` through peft /
  diffusers' ``PeftAdapterMixin``; ``predict_velocity`` uses whichever adapters are active.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class PromptEmbeds:
    """Encoded prompts: ``embeds [B, L, D]`` and a boolean/0-1 ``mask [B, L]``."""

    embeds: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> PromptEmbeds:
        return PromptEmbeds(self.embeds.to(device), self.mask.to(device))

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def index(self, idx: torch.Tensor | list[int] | slice) -> PromptEmbeds:
        """Rows ``idx`` of the batch."""
        return PromptEmbeds(self.embeds[idx], self.mask[idx])

    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch, padding the token axis to the longest part."""
        import torch

        length = max(p.embeds.shape[1] for p in parts)
        embeds, masks = [], []
        for p in parts:
            pad = length - p.embeds.shape[1]
            embeds.append(torch.nn.functional.pad(p.embeds, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(p.mask, (0, pad)))
        return PromptEmbeds(torch.cat(embeds), torch.cat(masks))


@dataclass(frozen=True)
class RankRule:
    """How a base model sizes the student LoRA when a run's config leaves the rank out: ``per_effect``
    components for each effect, rounded up to a multiple of ``step``, at least ``least`` and at most
    ``most``; and the learning rate, tuned at rank ``lr_rank``, falls as ``sqrt(lr_rank / rank)``
    above it (larger ranks take larger steps at one rate: alpha = rank). Measured on the toy base
    (benchmarks/README.md, "Routing and rank at 16 effects")."""

    per_effect: int = 8
    least: int = 16
    most: int = 128
    step: int = 16
    lr_rank: int = 32

    def rank_for(self, n_effects: int) -> int:
        need = -(-max(n_effects, 1) * self.per_effect // self.step) * self.step
        return max(self.least, min(self.most, need))

    def lr_scale(self, trained_rank: int) -> float:
        return min(1.0, (self.lr_rank / max(trained_rank, 1)) ** 0.5)

    def describe(self) -> str:
        return f"{self.per_effect} per effect, {self.least} to {self.most}"


class Backbone(ABC):
    """A loaded base model on one device and dtype."""

    #: id of the base model (the ``--base`` value effects are bound to)
    base_id: str
    #: the diffusers transformer (a ``torch.nn.Module`` with ``PeftAdapterMixin``) adapters attach to
    transformer: Any
    device: torch.device
    dtype: torch.dtype
    #: the image size ``(H, W)`` of a model that edits one fixed size only (the toy), else None
    image_size: tuple[int, int] | None = None
    #: target image sides are multiples of this many pixels (models with a free size)
    size_multiple: int = 16
    #: the ``resolution`` a run uses when its config leaves it out: sources are resized to about
    #: ``resolution ** 2`` pixels (models with a free size)
    default_resolution: int = 512
    #: True when the prompt encoder also sees the row's source image (Qwen2.5-VL): prompt encodings
    #: are then cached per (image, prompt) instead of per prompt
    prompt_sees_image: bool = False
    #: the unconditional prompt of classifier-free guidance
    negative_prompt: str = ""
    #: Euler steps of the full (teacher) sampler when a run's config leaves ``teacher_steps`` out
    default_teacher_steps: int = 20
    #: the student's rank (and learning rate) when a run's config leaves them out
    student_rank: RankRule = RankRule()

    @property
    @abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Module-name suffixes a new LoRA (student, critic) should adapt; may be wider than what
        effect LoRAs adapt (one LoRA serving many effects gains from more modules)."""

    def image_size_for(self, height: int, width: int, resolution: int | None = None) -> tuple[int, int]:
        """The ``(H, W)`` a source image of ``height x width`` pixels is edited at: the fixed
        :attr:`image_size`, else about ``resolution ** 2`` pixels with the source's aspect, each side a
        multiple of :attr:`size_multiple`."""
        if self.image_size is not None:
            return self.image_size
        import math

        area, ratio, m = float(resolution or self.default_resolution) ** 2, width / height, self.size_multiple
        w = math.sqrt(area * ratio)
        return max(m, round(w / ratio / m) * m), max(m, round(w / m) * m)

    @abstractmethod
    def encode_prompts(self, prompts: list[str], images: torch.Tensor | None = None) -> PromptEmbeds:
        """Encode one prompt per row (no grad). Models whose prompt encoder sees the source image
        (``prompt_sees_image``) need ``images [B,3,H,W]``, row ``i`` being prompt ``i``'s source; others
        ignore it. :attr:`negative_prompt` is the unconditional prompt."""

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Map images ``[B,3,H,W]`` in ``[0,1]`` to target latents ``[B, *latent_shape(H, W)]``."""

    def encode_sources(self, images: torch.Tensor) -> torch.Tensor:
        """Map source images ``[B,3,H,W]`` (already at :meth:`image_size_for`) to the source latents
        ``predict_velocity`` conditions on; by default the same as :meth:`encode_images`."""
        return self.encode_images(images)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The per-sample shape of the target latents of an ``height x width`` image."""
        import torch

        probe = torch.zeros(1, 3, height, width, device=self.device, dtype=self.dtype)
        return tuple(self.encode_images(probe).shape[1:])

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map target latents back to images ``[B,3,H,W]`` in ``[0,1]`` (clamped)."""

    @abstractmethod
    def predict_velocity(
        self,
        noisy: torch.Tensor,
        sigma: torch.Tensor,
        source: torch.Tensor,
        prompts: PromptEmbeds,
    ) -> torch.Tensor:
        """Velocity for noisy target latents at noise levels ``sigma [B]`` given source latents."""

    def sampling_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise samplers re-noise with (float32, on the CPU): standard normal unless the backbone
        knows a better start for its latents or draws as its pipeline does. Training noise stays
        standard normal."""
        import torch

        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def initial_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise every sampler starts from (float32, on the CPU); :meth:`sampling_noise` unless
        the model's pipeline draws its first latents another way (so a seed gives its images)."""
        return self.sampling_noise(shape, generator)

    def sampler_generators(self, seed: int) -> tuple[torch.Generator, torch.Generator]:
        """The generators a seeded sampler draws its first noise and its re-noising from: one shared
        generator by default; a backbone whose pipeline draws them from two sources says so."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return g, g

    @property
    def sampling_noise_id(self) -> str:
        """Names what :meth:`sampling_noise` draws, so caches of sampled outputs (teacher targets,
        evaluation baselines) made with other noise are not reused."""
        return "normal"

    @property
    def default_guidance(self) -> float:
        """Guidance scale this model's teachers sample best with (see :meth:`combine_guidance`)."""
        return 4.0

    def guidance_active(self, scale: float) -> bool:
        """Whether guidance at ``scale`` needs the unconditional pass (0 never does)."""
        return scale != 0

    def combine_guidance(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided velocity from the conditional and unconditional ones: DMD's form
        ``cond + g * (cond - uncond)`` by default; a model whose pipeline guides another way (Qwen's
        ``true_cfg_scale`` with its norm rescale) overrides it, and ``scale`` means what it means there."""
        return cond + scale * (cond - uncond)

    def teacher_sigmas(self, steps: int, latent_shape: tuple[int, ...], shift: float = 3.0) -> torch.Tensor:
        """``steps + 1`` noise levels from 1 down to 0 of the full Euler sampler (teacher targets and
        baselines) for latents of ``latent_shape``: the shifted schedule by default; a model whose
        pipeline has its own schedule (dynamic shifting by token count) returns that instead."""
        from clora.sampling import sigma_schedule

        return sigma_schedule(steps, shift)

    @property
    def fingerprint(self) -> str:
        """Identifies these exact weights, so caches made with other weights are not reused."""
        return self.base_id

    def sample_sources(self, n: int, seed: int) -> torch.Tensor:
        """``n`` built-in source images ``[n,3,H,W]`` for effects registered without ``--examples``."""
        from clora.errors import CloraError

        raise CloraError(
            f"base '{self.base_id}' has no built-in source images; register effects with --examples DIR"
        )

    def general_edits(self, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        """``n`` (source image, instruction) pairs for the general stream (the base is their teacher);
        bases without built-in ones get the effects' example images with neutral instructions, or
        ``clora distill --general-data DIR``."""
        from clora.errors import CloraError

        raise CloraError(f"base '{self.base_id}' has no built-in general edits")

    def ground_truth(self, effect_name: str, images: torch.Tensor) -> torch.Tensor | None:
        """The exact result of a known deterministic effect on ``images`` (synthetic bases only), else
        None (also for a stochastic effect, which has no one exact result: see :meth:`truth_draws`)."""
        return None

    def truth_draws(self, effect_name: str, images: torch.Tensor, n: int, seed: int) -> torch.Tensor | None:
        """``n`` independent draws ``[n, B, C, H, W]`` from the true result distribution of a known
        stochastic effect (film grain, confetti, a tint from a palette, ...) on ``images``, the same for the
        same ``seed`` (synthetic bases only); None for a deterministic or unknown effect."""
        return None

    def offload_encoders(self) -> None:
        """Free the prompt and image encoders' device memory once the prepare stage has cached what
        it needs (optional; they may be moved back on the next encode)."""
        return None

    def compose_prompt(self, instructions: list[str]) -> str:
        """One prompt that applies several edits in order (zero-shot composition)."""
        if len(instructions) == 1:
            return instructions[0]
        first, *rest = instructions
        return f"first {first}, then " + ", then ".join(rest)


class BackboneFactory(ABC):
    """What a backbone plugin registers (or a :class:`BaseKind` builds): a :class:`Backbone` on demand."""

    #: unique id, also the base model id stored on effects and collections
    backbone_id: str
    #: one line for ``clora plugins`` and ``clora base list``
    description: str = ""
    #: the base's kind (``toy``, ``qwen-image-edit-plus``, ...) for ``clora base list``
    kind: str = ""

    @abstractmethod
    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Backbone:
        """Load the base model; raise ``clora.errors.CloraError`` with a next step if unavailable."""

    @property
    def fingerprint(self) -> str:
        """The :attr:`Backbone.fingerprint` that :meth:`load` will give, known without loading (a plugin
        whose weights can change under one id overrides both)."""
        return self.backbone_id

    def default_dtype(self, device: str) -> str:
        """The dtype (``float32``, ``bfloat16``, ``float16``) runs on ``device`` use when not told."""
        return "float32"

    @abstractmethod
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``{module name: (in_features, out_features)}`` of every Linear in the transformer.

        Used to check that an effect LoRA fits this base without loading weights.
        """

    def info(self) -> dict[str, Any]:
        """What ``clora base list/show`` prints about the base (kind, dtype, size, path, ...)."""
        return {"kind": self.kind, "description": self.description}

    def pipeline_usage(self, lora_file: str, sigmas: list[float], shift: float, seed: int) -> str | None:
        """Python code that runs an exported unified LoRA (``lora_file``) with this model's own diffusers
        pipeline and clora's few-step sampler (levels ``sigmas``, ``shift``) for the model card, or None
        when the model has no such pipeline. Known without loading the weights."""
        return None


class BaseKind(ABC):
    """A kind of local model folder (``register_base_kinds``): ``clora base add NAME --path DIR``
    records such a folder under NAME, and :meth:`factory` loads it."""

    #: unique id, stored on the registered base (``qwen-image-edit-plus``, ...)
    kind_id: str
    #: one line for ``clora plugins`` and ``clora base add --help``
    description: str = ""
    #: options ``clora base add --option KEY=VALUE`` takes, name -> one line of help
    options: dict[str, str] = {}  # noqa: RUF012 (read-only class default)

    @abstractmethod
    def detect(self, model_index: dict[str, Any]) -> bool:
        """Whether a folder whose ``model_index.json`` holds ``model_index`` is of this kind."""

    @abstractmethod
    def factory(self, name: str, folder: Path, options: dict[str, str]) -> BackboneFactory:
        """The factory of the base ``name`` stored in ``folder``; raise ``CloraError`` (one line) when the
        folder is incomplete or an option is invalid."""
