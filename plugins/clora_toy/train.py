"""Flow-matching trainers for the toy base editor and for per-effect teacher LoRAs."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from clora.fileio import save_safetensors
from clora.progress import progress_bar as clora_progress_bar
from clora.sampling import add_noise, shift_sigma, x0_from_velocity
from clora_toy.backbone import EFFECT_LORA_MODULES, ToyBackbone
from clora_toy.config import BaseTrainConfig, TeacherTrainConfig
from clora_toy.data import general_batch, make_sources, name_seed
from clora_toy.effects import Effect

LORA_PREFIX = "transformer."


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[float], None]]:
    """clora's progress bar with ETA; yields ``advance(loss)``."""
    with clora_progress_bar(enabled) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda loss: bar.update(task, advance=1, info=f"loss {loss:.4f}")


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """Linear warmup, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def sample_sigmas(n: int, shifted_frac: float, g: torch.Generator) -> torch.Tensor:
    """Training noise levels: a mix of U[0,1] and shift3(U) (the high noise where Euler spends its steps)."""
    u = torch.rand(n, generator=g)
    shifted = torch.rand(n, generator=g) < shifted_frac
    return torch.where(shifted, shift_sigma(u), u)


def _drop_prompts(prompts: list[str], p: float, g: torch.Generator) -> list[str]:
    keep = torch.rand(len(prompts), generator=g) >= p
    return [q if k else "" for q, k in zip(prompts, keep.tolist(), strict=True)]


def flow_matching_loss(
    backbone: ToyBackbone,
    sources: torch.Tensor,
    targets: torch.Tensor,
    prompts: list[str],
    sigma: torch.Tensor,
    g: torch.Generator,
) -> torch.Tensor:
    """Flow-matching MSE on images ``[B,3,H,W]``: on the velocity ``eps - x0``, or, for a model that
    predicts the clean image, on the image ``x_t - sigma * v`` it implies (the same error weighted
    by sigma^2, so low noise does not dominate)."""
    x0 = backbone.encode_images(targets)
    src = backbone.encode_images(sources)
    eps = torch.randn(x0.shape, generator=g).to(x0)
    sigma = sigma.to(x0)
    noisy = add_noise(x0, eps, sigma)
    v = backbone.predict_velocity(noisy, sigma, src, backbone.encode_prompts(prompts))
    if backbone.config.prediction != "velocity":
        return torch.nn.functional.mse_loss(x0_from_velocity(noisy, v, sigma), x0)
    return torch.nn.functional.mse_loss(v, eps - x0)


def _optimize(
    params: list[torch.nn.Parameter],
    steps: int,
    lr: float,
    warmup: int,
    grad_clip: float,
    weight_decay: float,
    loss_at: Callable[[int], torch.Tensor],
    description: str,
    show_progress: bool,
) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    losses = []
    with progress_bar(description, steps, show_progress) as advance:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, steps, warmup)
            loss = loss_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            losses.append(loss.item())
            advance(losses[-1])
    return losses


def train_base(backbone: ToyBackbone, cfg: BaseTrainConfig, show_progress: bool = True) -> dict[str, float]:
    """Train the whole transformer on procedural (source, edited, instruction) triplets, in place."""
    transformer = backbone.transformer
    transformer.train().requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(cfg.seed)
    size = backbone.image_size[0]

    def loss_at(step: int) -> torch.Tensor:
        sources, targets, prompts = general_batch(
            cfg.batch_size, size, name_seed("base", cfg.seed * 1_000_003 + step), weights=cfg.edit_weights
        )
        prompts = _drop_prompts(prompts, cfg.prompt_dropout, g)
        sigma = sample_sigmas(cfg.batch_size, cfg.shifted_sigma_frac, g)
        return flow_matching_loss(backbone, sources, targets, prompts, sigma, g)

    start, cpu_start = time.perf_counter(), time.process_time()
    losses = _optimize(
        params, cfg.steps, cfg.lr, cfg.warmup, cfg.grad_clip, cfg.weight_decay, loss_at, "base", show_progress
    )
    transformer.eval().requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "train_seconds": time.perf_counter() - start,
        # CPU seconds / threads is what the wall time would be on an otherwise idle machine
        "train_cpu_seconds": time.process_time() - cpu_start,
        "final_loss": sum(tail) / len(tail),
    }


def _augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # flips and quarter turns of the *source*; the target is recomputed from it, so pairs stay exact
    out = []
    for img in images:
        k = int(torch.randint(4, (1,), generator=g))
        img = torch.rot90(img, k, dims=(-2, -1))
        if torch.rand(1, generator=g).item() < 0.5:
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out)


def lora_config(rank: int, alpha: float, target_modules: list[str]) -> LoraConfig:
    """The peft config every toy teacher uses."""
    # peft types lora_alpha as int but takes any number (scale = alpha / r)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        target_modules=list(target_modules),
        init_lora_weights=True,
    )


def train_teacher(
    backbone: ToyBackbone,
    effect: Effect,
    cfg: TeacherTrainConfig,
    adapter_name: str = "teacher",
    show_progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train a LoRA for ``effect`` on the base; return its diffusers-layout state dict and stats.

    The adapter is removed again afterwards, so the backbone is left as it was.
    """
    transformer = backbone.transformer
    transformer.requires_grad_(False)
    # peft draws lora_A from the global generator: seed it, so a teacher is a function of its recipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(name_seed(effect.name, cfg.seed + 2))
        config = lora_config(cfg.rank, cfg.alpha, EFFECT_LORA_MODULES)
        transformer.add_adapter(config, adapter_name=adapter_name)
    try:
        transformer.set_adapter(adapter_name)
        transformer.train()
        params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        size = backbone.image_size[0]
        pairs = make_sources(cfg.num_pairs, size, name_seed(effect.name, cfg.seed))
        g = torch.Generator().manual_seed(name_seed(effect.name, cfg.seed + 1))

        def loss_at(step: int) -> torch.Tensor:
            idx = torch.randint(cfg.num_pairs, (cfg.batch_size,), generator=g)
            sources = _augment(pairs[idx], g)
            prompts = _drop_prompts([effect.prompt] * cfg.batch_size, cfg.prompt_dropout, g)
            sigma = sample_sigmas(cfg.batch_size, cfg.shifted_sigma_frac, g)
            # a stochastic effect: a fresh draw per sample, so the teacher learns the distribution (a
            # deterministic effect's exact result leaves g untouched, so its teachers stay as they were)
            targets = effect.sample(sources, g)
            return flow_matching_loss(backbone, sources, targets, prompts, sigma, g)

        start, cpu_start = time.perf_counter(), time.process_time()
        losses = _optimize(
            params, cfg.steps, cfg.lr, cfg.warmup, cfg.grad_clip, 0.0, loss_at, effect.name, show_progress
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
        state = {LORA_PREFIX + k: v.detach().clone() for k, v in state.items()}
    finally:
        transformer.eval()
        transformer.delete_adapters(adapter_name)
        transformer.requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10) :]
    return state, {
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "final_loss": sum(tail) / len(tail),
    }


def lora_metadata(
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
    base_id: str,
    prompt: str,
    effect_name: str,
    extra: dict[str, object] | None = None,
) -> dict[str, str]:
    """Safetensors header of a teacher LoRA: diffusers' adapter metadata plus clora's own keys."""
    adapter = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
    }
    meta = {
        "format": "pt",
        # diffusers' load_lora_adapter reads this key (prefixed like the tensors) to rebuild the LoraConfig
        "lora_adapter_metadata": json.dumps(
            {f"{LORA_PREFIX}{k}": v for k, v in adapter.items()}, sort_keys=True
        ),
        "clora.rank": str(rank),
        "clora.alpha": str(alpha),
        "clora.target_modules": json.dumps(sorted(target_modules)),
        "clora.base": base_id,
        "clora.prompt": prompt,
        "clora.effect": effect_name,
    }
    if extra:
        meta["clora.info"] = json.dumps(extra, sort_keys=True)
    return meta


def save_lora(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a LoRA atomically as safetensors."""
    save_safetensors(state, path, metadata)
