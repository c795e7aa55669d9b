"""The prepare stage: source images, teacher targets and encoded prompts, cached on disk by content.

Teacher targets ``y_T`` (each source image run through its teacher's full sampler with CFG) are
the expensive part; they are keyed by everything that determines them, so a rerun or an
incremental run reuses them. Prompts are encoded once, after which the text encoder can be freed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from clora.backbone import Backbone, PromptEmbeds
from clora.distill.adapters import AdapterSet
from clora.distill.config import DistillConfig
from clora.distill.plan import Plan
from clora.effects import list_images
from clora.fileio import save_safetensors
from clora.images import read_image
from clora.paths import clora_home
from clora.progress import progress_bar
from clora.sampling import euler_sample, noise_key


@dataclass
class Prepared:
    """Everything the loop reads, already on the run's device."""

    sources: dict[str, torch.Tensor]  # effect -> source latents [N, ...]
    targets: dict[str, torch.Tensor]  # effect -> teacher output latents [N, ...]
    general_sources: torch.Tensor  # [M, ...]
    general_prompts: list[str]  # M instructions
    general_targets: torch.Tensor | None  # the base's own outputs for them (cfg.general_targets)
    prompts: dict[str, PromptEmbeds]  # text -> embeds of one row


def digest(obj: object) -> str:
    """A short content key of a JSON-able object (cache file names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def tensor_digest(t: torch.Tensor) -> str:
    """A short content key of a tensor's bytes."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:24]


def effect_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}:{seed}".encode()).digest()[:4], "big")


def load_images(folder: str | Path, size: tuple[int, int], limit: int) -> torch.Tensor:
    """Up to ``limit`` images of ``folder`` as ``[N,3,H,W]`` in [0,1], resized to ``size``."""
    return torch.stack([read_image(p, size) for p in list_images(folder)[:limit]])


def source_images(
    backbone: Backbone, examples_dir: str | None, name: str, cfg: DistillConfig
) -> torch.Tensor:
    if examples_dir:
        return load_images(examples_dir, backbone.image_size, cfg.sources_per_effect)
    return backbone.sample_sources(cfg.sources_per_effect, effect_seed(name, cfg.seed))


def prepare(
    backbone: Backbone,
    adapters: AdapterSet,
    plan: Plan,
    cfg: DistillConfig,
    examples: dict[str, str | None],
    show_progress: bool = True,
) -> Prepared:
    """Build (or load from the cache) targets and prompt encodings for ``plan``."""
    cache = clora_home() / "cache"
    sources: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    todo = []
    for e in plan.effects:
        images = source_images(backbone, examples.get(e.name), e.name, cfg)
        key = digest(
            {
                "base": backbone.fingerprint,
                "teacher": e.lora_sha256,
                "prompt": e.teacher_prompt,
                "steps": cfg.teacher_steps,
                "guidance": cfg.guidance,
                "shift": cfg.shift,
                "images": tensor_digest(images),
                "seed": cfg.seed,
                "dtype": cfg.dtype,
                **noise_key(backbone),
            }
        )
        path = cache / "targets" / f"{key}.safetensors"
        if path.exists():
            data = load_file(str(path), device=str(backbone.device))
            sources[e.name], targets[e.name] = (
                data["sources"].to(backbone.dtype),
                data["targets"].to(backbone.dtype),
            )
        else:
            todo.append((e, images, path))
    if todo:
        total = sum(len(images) for _, images, _ in todo)
        with progress_bar(show_progress) as bar:
            task = bar.add_task("teacher targets", total=total, info="")
            for e, images, path in todo:
                src = backbone.encode_images(images)
                adapters.use_teacher(e.lora_path)
                g = torch.Generator().manual_seed(effect_seed(e.name, cfg.seed + 1))
                out = _full_sampler(
                    backbone, src, [e.teacher_prompt] * len(src), cfg, g, lambda n: bar.advance(task, n)
                )
                sources[e.name], targets[e.name] = src, out
                save_safetensors({"sources": src, "targets": targets[e.name]}, path)
        adapters.use(None)

    general_sources = torch.empty(0)
    general_prompts: list[str] = []
    general_targets = None
    if cfg.p_switch < 1.0:
        images, general_prompts = backbone.general_edits(cfg.general_pool, cfg.seed)
        general_sources = backbone.encode_images(images)
        if cfg.general_targets:
            general_targets = _general_targets(
                backbone, adapters, general_sources, general_prompts, cfg, cache, show_progress
            )

    texts = {""} | set(general_prompts)
    for e in plan.effects:
        texts |= {e.teacher_prompt, e.student_prompt}
    prompts = encode_prompts_cached(backbone, sorted(texts), cache)
    return Prepared(sources, targets, general_sources, general_prompts, general_targets, prompts)


def _general_targets(
    backbone: Backbone,
    adapters: AdapterSet,
    sources: torch.Tensor,
    prompts: list[str],
    cfg: DistillConfig,
    cache: Path,
    show_progress: bool,
) -> torch.Tensor:
    """The base model's own full-sampler outputs on the general pool (cached like teacher targets)."""
    key = digest(
        {
            "base": backbone.fingerprint,
            "prompts": prompts,
            "images": tensor_digest(sources),
            "steps": cfg.teacher_steps,
            "guidance": cfg.general_guidance,
            "shift": cfg.shift,
            "seed": cfg.seed,
            "dtype": cfg.dtype,
            **noise_key(backbone),
        }
    )
    path = cache / "targets" / f"general-{key}.safetensors"
    if path.exists():
        return load_file(str(path), device=str(backbone.device))["targets"].to(backbone.dtype)
    adapters.use(None)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    with progress_bar(show_progress) as bar:
        task = bar.add_task("base targets", total=len(sources), info="")
        targets = _full_sampler(
            backbone, sources, prompts, cfg, g, lambda n: bar.advance(task, n), cfg.general_guidance
        )
    save_safetensors({"targets": targets}, path)
    return targets


def encode_prompts_cached(backbone: Backbone, texts: list[str], cache: Path) -> dict[str, PromptEmbeds]:
    """Encode ``texts`` once per base, on disk, then release the text encoder."""
    path = cache / "prompts" / f"{digest({'base': backbone.fingerprint, 'texts': texts})}.safetensors"
    if path.exists():
        data = load_file(str(path), device=str(backbone.device))
    else:
        data = {}
        for i, text in enumerate(texts):
            enc = backbone.encode_prompts([text])
            data[f"embeds.{i}"], data[f"mask.{i}"] = enc.embeds, enc.mask
        save_safetensors(data, path, metadata={"texts": json.dumps(texts)})
    backbone.release_text_encoder()
    return {
        t: PromptEmbeds(data[f"embeds.{i}"].to(backbone.dtype), data[f"mask.{i}"])
        for i, t in enumerate(texts)
    }


def _full_sampler(
    backbone: Backbone,
    sources: torch.Tensor,
    prompts: list[str],
    cfg: DistillConfig,
    generator: torch.Generator,
    advance: Callable[[int], object],
    guidance: float | None = None,
) -> torch.Tensor:
    """The teacher's full Euler sampler with CFG (``guidance``, default the effects' teachers') over
    ``sources``, in batches of ``cfg.batch_size``."""
    if guidance is None:
        guidance = cfg.guidance if cfg.guidance is not None else backbone.default_guidance
    outs = []
    for i in range(0, len(sources), cfg.batch_size):
        chunk = sources[i : i + cfg.batch_size]
        outs.append(
            euler_sample(
                backbone,
                chunk,
                prompts[i : i + cfg.batch_size],
                steps=cfg.teacher_steps,
                guidance=guidance,
                generator=generator,
                shift=cfg.shift,
            )
        )
        advance(len(chunk))
    return torch.cat(outs)
