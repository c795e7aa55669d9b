"""The contract between clora and a base image-editing model.

A backbone plugin registers a :class:`BackboneFactory`; ``factory.load(device, dtype)`` returns a
:class:`Backbone`. Everything clora does with a base model (teacher targets, distillation,
generation, evaluation) goes through these methods, so the host never knows which model it drives.

Conventions shared by every backbone:

* images are float tensors ``[B, 3, H, W]`` in ``[0, 1]``;
* latents are whatever ``encode_images`` returns; flow matching runs in latent space with
  ``x_t = (1 - s) * x0 + s * eps`` for a noise level ``s`` in ``[0, 1]`` and the model predicting
  the velocity ``v = eps - x0``; samplers draw ``eps`` from ``sampling_noise`` (standard normal
  unless the backbone overrides it), training draws standard normal noise;
* the LoRA adapters (teacher, student, critic) live on ``backbone.transformer`` through peft /
  diffusers' ``PeftAdapterMixin``; ``predict_velocity`` uses whichever adapters are active.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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


class Backbone(ABC):
    """A loaded base model on one device and dtype."""

    #: id of the base model (the ``--base`` value effects are bound to)
    base_id: str
    #: the diffusers transformer (a ``torch.nn.Module`` with ``PeftAdapterMixin``) adapters attach to
    transformer: Any
    device: torch.device
    dtype: torch.dtype
    #: pixel size ``(H, W)`` of the images this backbone edits
    image_size: tuple[int, int]

    @property
    @abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Module-name suffixes a new LoRA (student, critic) should adapt; may be wider than what
        effect LoRAs adapt (one LoRA serving many effects gains from more modules)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Encode text prompts (no grad); the empty string is the unconditional prompt."""

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Map images ``[B,3,H,W]`` in ``[0,1]`` to latents."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map latents back to images ``[B,3,H,W]`` in ``[0,1]`` (clamped)."""

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
        """The noise every sampler starts from and re-noises with (float32, on the CPU): standard
        normal unless the backbone knows a better start for its latents. Training noise stays
        standard normal."""
        import torch

        return torch.randn(shape, generator=generator, dtype=torch.float32)

    @property
    def sampling_noise_id(self) -> str:
        """Names what :meth:`sampling_noise` draws, so caches of sampled outputs (teacher targets,
        evaluation baselines) made with other noise are not reused."""
        return "normal"

    @property
    def default_guidance(self) -> float:
        """CFG scale ``g`` (in ``cond + g*(cond - uncond)``) this model's teachers sample best with."""
        return 4.0

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
        """``n`` (source image, instruction) pairs for the general stream (the base is their teacher)."""
        from clora.errors import CloraError

        raise CloraError(
            f"base '{self.base_id}' has no built-in general edits; distill with --p-switch 1 "
            "(effect stream only)"
        )

    def ground_truth(self, effect_name: str, images: torch.Tensor) -> torch.Tensor | None:
        """The exact result of a known effect on ``images`` (synthetic bases only), else None."""
        return None

    def release_text_encoder(self) -> None:
        """Free the text encoder once prompts are encoded and cached (optional)."""
        return None

    def compose_prompt(self, instructions: list[str]) -> str:
        """One prompt that applies several edits in order (zero-shot composition)."""
        if len(instructions) == 1:
            return instructions[0]
        first, *rest = instructions
        return f"first {first}, then " + ", then ".join(rest)


class BackboneFactory(ABC):
    """What a backbone plugin registers: builds a :class:`Backbone` on demand."""

    #: unique id, also the base model id stored on effects and collections
    backbone_id: str
    #: one line for ``clora plugins``
    description: str = ""

    @abstractmethod
    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Backbone:
        """Load the base model; raise ``clora.errors.CloraError`` with a next step if unavailable."""

    @property
    def fingerprint(self) -> str:
        """The :attr:`Backbone.fingerprint` that :meth:`load` will give, known without loading (a plugin
        whose weights can change under one id overrides both)."""
        return self.backbone_id

    @abstractmethod
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``{module name: (in_features, out_features)}`` of every Linear in the transformer.

        Used to check that an effect LoRA fits this base without loading weights.
        """
