"""Generic flow-matching samplers over any :class:`clora.backbone.Backbone` (nothing toy-specific).

Convention: ``x_t = (1 - s) x0 + s eps``, the model predicts ``v = eps - x0``, so ``x0 = x_t - s v``.
CFG is the DMD form ``cond + g * (cond - uncond)`` with the empty prompt as ``uncond``; ``g = 0``
skips the unconditional pass.
"""

from __future__ import annotations

import itertools
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


def _embeds(backbone: Backbone, prompts: PromptEmbeds | list[str]) -> PromptEmbeds:
    return backbone.encode_prompts(prompts) if isinstance(prompts, list) else prompts


def guided_velocity(
    backbone: Backbone,
    noisy: torch.Tensor,
    sigma: torch.Tensor,
    source: torch.Tensor,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    guidance: float,
) -> torch.Tensor:
    """Velocity with DMD-style CFG ``cond + g (cond - uncond)`` (one batched pass for both)."""
    b = noisy.shape[0]
    sigma = torch.as_tensor(sigma, dtype=noisy.dtype, device=noisy.device).expand(b)
    if guidance == 0 or uncond is None:
        return backbone.predict_velocity(noisy, sigma, source, cond)
    from clora.backbone import PromptEmbeds

    both = backbone.predict_velocity(
        torch.cat([noisy, noisy]),
        torch.cat([sigma, sigma]),
        torch.cat([source, source]),
        PromptEmbeds.cat([cond, uncond]),
    )
    v_cond, v_uncond = both[:b], both[b:]
    return v_cond + guidance * (v_cond - v_uncond)


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
) -> torch.Tensor:
    """Full Euler ODE sampling from pure noise; returns target latents like ``source_latents``."""
    cond = _embeds(backbone, prompts)
    uncond = backbone.encode_prompts([""] * len(cond)) if guidance else None
    if noise is None:
        noise = backbone.sampling_noise(source_latents.shape, generator)
    x = noise.to(source_latents.device, source_latents.dtype)
    sigmas = sigma_schedule(steps, shift).tolist()
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
) -> torch.Tensor:
    """Few-step sampling: at each level predict x0, then re-noise it to the next level with fresh noise."""
    cond = _embeds(backbone, prompts)
    if noise is None:
        noise = backbone.sampling_noise(source_latents.shape, generator)
    x = noise.to(source_latents.device, source_latents.dtype)
    levels = sigmas.tolist()
    x0 = x
    for i, s in enumerate(levels):
        sigma = torch.tensor(s)
        x0 = x0_from_velocity(x, backbone.predict_velocity(x, sigma, source_latents, cond), sigma)
        if i + 1 < len(levels):
            fresh = backbone.sampling_noise(x0.shape, generator).to(x0)
            x = add_noise(x0, fresh, torch.tensor(levels[i + 1]))
    return x0
