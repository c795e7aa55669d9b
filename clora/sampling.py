"""Generic flow-matching samplers over any :class:`clora.backbone.Backbone` (nothing toy-specific).

Convention: ``x_t = (1 - s) x0 + s eps``, the model predicts ``v = eps - x0``, so ``x0 = x_t - s v``.
Guidance is the backbone's (``Backbone.combine_guidance``; by default DMD's ``cond + g * (cond -
uncond)``) with its negative prompt as ``uncond``; ``g = 0`` skips the unconditional pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clora.backbone import Backbone, PromptEmbeds


def noise_key(backbone: Backbone) -> dict[str, str]:
    """The sampling noise's part of a cache key for sampled outputs; empty for standard normal
    noise, so keys made before backbones could choose their noise stay valid."""
    noise = backbone.sampling_noise_id
    return {} if noise == "normal" else {"noise": noise}


def shift_sigma(u: torch.Tensor, shift: float = 3.0) -> torch.Tensor:
    """``shift * u / (1 + (shift - 1) * u)``; ``shift3(u) = 3u / (1 + 2u)``."""
    return shift * u / (1 + (shift - 1) * u)


def sigma_schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 down to 0 on the shifted schedule (Euler sampling)."""
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1), shift)


def few_step_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The few-step (x0-predict then re-noise) levels ``shift(1), shift((n-1)/n), ..., shift(1/n)``."""
    return shift_sigma(torch.arange(steps, 0, -1, dtype=torch.float32) / steps, shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - s) x0 + s eps`` with ``sigma`` per sample ``[B]`` or a scalar."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def x0_from_velocity(noisy: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t - s v``."""
    return noisy - _per_sample(sigma, noisy) * velocity


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 0:
        return s
    return s.view(-1, *([1] * (like.ndim - 1)))


def _embeds(
    backbone: Backbone, prompts: PromptEmbeds | list[str], images: torch.Tensor | None
) -> PromptEmbeds:
    return backbone.encode_prompts(prompts, images) if isinstance(prompts, list) else prompts


def guided_velocity(
    backbone: Backbone,
    noisy: torch.Tensor,
    sigma: torch.Tensor,
    source: torch.Tensor,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    guidance: float,
) -> torch.Tensor:
    """Velocity with the backbone's classifier-free guidance at scale ``guidance`` (one batched pass
    for the conditional and unconditional rows; none when the scale needs no unconditional pass)."""
    b = noisy.shape[0]
    sigma = torch.as_tensor(sigma, dtype=noisy.dtype, device=noisy.device).expand(b)
    if uncond is None or not backbone.guidance_active(guidance):
        return backbone.predict_velocity(noisy, sigma, source, cond)
    from clora.backbone import PromptEmbeds

    both = backbone.predict_velocity(
        torch.cat([noisy, noisy]),
        torch.cat([sigma, sigma]),
        torch.cat([source, source]),
        PromptEmbeds.cat([cond, uncond]),
    )
    return backbone.combine_guidance(both[:b], both[b:], guidance)


def _start(
    backbone: Backbone,
    source_latents: torch.Tensor,
    shape: torch.Size | tuple[int, ...] | None,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The sampler's first latents: ``noise``, else the backbone's initial noise of ``shape`` (default:
    shaped like the source latents, as on bases whose target and source latents match)."""
    if noise is None:
        size = torch.Size(shape) if shape is not None else source_latents.shape
        noise = backbone.initial_noise(size, generator)
    return noise.to(source_latents.device, source_latents.dtype)


@torch.no_grad()
def euler_sample(
    backbone: Backbone,
    source_latents: torch.Tensor,
    prompts: PromptEmbeds | list[str],
    steps: int = 20,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    shift: float = 3.0,
    *,
    uncond: PromptEmbeds | None = None,
    images: torch.Tensor | None = None,
    shape: torch.Size | tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Full Euler ODE sampling from pure noise on the backbone's own schedule (``teacher_sigmas``);
    returns target latents of ``shape`` (default: like ``source_latents``). ``prompts`` as text are
    encoded with ``images`` (the sources, for models whose prompt encoder sees them); ``uncond``
    defaults to the backbone's negative prompt."""
    cond = _embeds(backbone, prompts, images)
    if uncond is None and backbone.guidance_active(guidance):
        uncond = backbone.encode_prompts([backbone.negative_prompt] * len(cond), images)
    x = _start(backbone, source_latents, shape, noise, generator)
    sigmas = backbone.teacher_sigmas(steps, tuple(x.shape[1:]), shift).tolist()
    for s, s_next in itertools.pairwise(sigmas):
        v = guided_velocity(backbone, x, torch.tensor(s), source_latents, cond, uncond, guidance)
        x = x + (s_next - s) * v
    return x


@torch.no_grad()
def few_step_sample(
    backbone: Backbone,
    source_latents: torch.Tensor,
    prompts: PromptEmbeds | list[str],
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    *,
    images: torch.Tensor | None = None,
    shape: torch.Size | tuple[int, ...] | None = None,
    renoise_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Few-step sampling: at each level predict x0, then re-noise it to the next level with fresh noise
    (drawn from ``renoise_generator``, default ``generator``). ``sigmas`` is one level set ``[L]`` or
    one per row ``[B, L]``."""
    cond = _embeds(backbone, prompts, images)
    x = _start(backbone, source_latents, shape, noise, generator)
    renoise = renoise_generator if renoise_generator is not None else generator
    levels = torch.tensor(sigmas.tolist())
    last = levels.shape[-1] - 1

    def x0_at(noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x0_from_velocity(noisy, backbone.predict_velocity(noisy, sigma, source_latents, cond), sigma)

    x = renoise_rollout(x0_at, x, levels, last, lambda x0: backbone.sampling_noise(x0.shape, renoise))
    return x0_at(x, level_at(levels, -1))


def renoise_rollout(
    x0_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    levels: torch.Tensor,
    steps: int,
    noise: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The few-step sampler's first ``steps`` steps from ``x`` at its first level (``levels``: one set
    ``[L]`` or one per row ``[B, L]``, see :func:`level_at`): at each level predict x0
    (``x0_at(x, level)``), then re-noise it to the next level with ``noise(x0)``; returns the input of
    step ``steps`` (at ``levels[steps]``). The sampler, the distiller's backward simulation and the
    loss terms that run the student's sampler all go through here."""
    for i in range(steps):
        x0 = x0_at(x, level_at(levels, i))
        x = add_noise(x0, noise(x0).to(x0), level_at(levels, i + 1))
    return x


def level_at(levels: torch.Tensor, i: int) -> torch.Tensor:
    """Level ``i`` of a level set: ``levels`` is one set ``[L]`` (a scalar out) or one set per row
    ``[B, L]`` (a level per row ``[B]`` out, as in a batch of effects with their own levels)."""
    return levels[..., i]
