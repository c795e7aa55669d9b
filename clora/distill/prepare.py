"""The prepare stage: source images, their encodings, prompt conditioning and teacher targets, cached
on disk by content.

Sources are read at the size the base edits them at (``Backbone.image_size_for``: the run's
``resolution`` with each image's own aspect) and grouped into buckets of one size; a batch always
comes from one bucket. Conditioning is per row (a Qwen2.5-VL prompt encoder sees the row's image),
so each row carries its teacher, student and unconditional prompt encodings. Teacher targets ``y_T``
(each source run through its teacher's full sampler with guidance) are the expensive part; they are
keyed by everything that determines them, so a rerun or an incremental run reuses them. The prompt
and image encoders are offloaded before the targets are sampled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from clora.backbone import Backbone, PromptEmbeds
from clora.distill.adapters import AdapterSet
from clora.distill.config import MIN_TARGET_STEPS, DistillConfig
from clora.distill.plan import Plan
from clora.effects import list_images
from clora.errors import CloraError
from clora.fileio import save_safetensors
from clora.images import read_image
from clora.paths import clora_home
from clora.progress import progress_bar
from clora.sampling import euler_sample, noise_key

#: an image bucket: the pixel size ``(H, W)`` every image in it has
Shape = tuple[int, int]

#: general-stream instructions for bases without built-in general edits and without --general-data:
#: edits a base model does well on its own, so the unified LoRA keeps doing them as the base does
NEUTRAL_INSTRUCTIONS = (
    "keep the image exactly as it is",
    "make the image slightly brighter",
    "make the image slightly darker",
    "increase the contrast a little",
    "make the colors a little more vivid",
    "make the colors a little warmer",
    "sharpen the details slightly",
    "remove the noise from the image",
)
GENERAL_PROMPTS_FILE = "prompts.jsonl"
GENERAL_PROMPT_FILE = "prompt.txt"


@dataclass
class Rows:
    """Rows of one image size: source latents, teacher outputs and each row's conditioning."""

    sources: torch.Tensor  # [N, *source latent shape]
    targets: torch.Tensor | None  # [N, *target latent shape]: teacher (or base) outputs
    teacher: PromptEmbeds  # the teacher's prompt (general stream: the instruction), per row
    student: PromptEmbeds  # what the student and critic are prompted with, per row
    uncond: PromptEmbeds  # the negative prompt, per row
    latent_shape: tuple[int, ...]  # per-sample shape of the target latents

    def __len__(self) -> int:
        return int(self.sources.shape[0])

    def take(self, idx: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Rows:
        """Rows ``idx``, moved to ``device`` (latents and embeddings in ``dtype``)."""

        def move(p: PromptEmbeds) -> PromptEmbeds:
            mask = p.mask[idx]
            n = int((mask != 0).sum(1).max()) if len(mask) else 0  # no padding beyond these rows' own
            return PromptEmbeds(p.embeds[idx, :n].to(device, dtype), mask[:, :n].to(device))

        return Rows(
            self.sources[idx].to(device, dtype),
            None if self.targets is None else self.targets[idx].to(device, dtype),
            move(self.teacher),
            move(self.student),
            move(self.uncond),
            self.latent_shape,
        )


@dataclass
class Prepared:
    """Everything the loop reads, by image bucket (kept on the CPU; batches move to the device)."""

    effects: dict[str, dict[Shape, Rows]]
    general: dict[Shape, Rows]
    #: each effect's seed spread (:func:`seed_spread`; measured when ``on_policy.effects`` is "auto")
    spread: dict[str, float] = field(default_factory=dict)
    #: the effects whose rows also train on-policy in the anchoring phase (:func:`pick_on_policy_effects`)
    on_policy: set[str] = field(default_factory=set)

    @property
    def general_rows(self) -> int:
        return sum(len(r) for r in self.general.values())


def digest(obj: object) -> str:
    """A short content key of a JSON-able object (cache file names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def tensor_digest(t: torch.Tensor) -> str:
    """A short content key of a tensor's dtype, shape and bytes (any dtype, bfloat16 included)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{flat.dtype}:{tuple(t.shape)}:".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def effect_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}:{seed}".encode()).digest()[:4], "big")


def read_source(path: str | Path, backbone: Backbone, resolution: int | None) -> torch.Tensor:
    """One source image ``[3,H,W]`` at the size the base edits it at (its aspect kept)."""
    return read_image(path, lambda height, width: backbone.image_size_for(height, width, resolution))


def bucketed(images: Iterable[torch.Tensor]) -> dict[Shape, torch.Tensor]:
    """Images of several sizes as one ``[N,3,H,W]`` stack per size (order kept within a size)."""
    groups: dict[Shape, list[torch.Tensor]] = {}
    for img in images:
        groups.setdefault((int(img.shape[-2]), int(img.shape[-1])), []).append(img)
    return {shape: torch.stack(group) for shape, group in groups.items()}


def load_images(
    folder: str | Path, backbone: Backbone, resolution: int | None, limit: int
) -> dict[Shape, torch.Tensor]:
    """Up to ``limit`` images of ``folder``, each at its edit size, bucketed by size."""
    return bucketed(read_source(p, backbone, resolution) for p in list_images(folder)[:limit])


def effect_sources(
    backbone: Backbone, examples_dir: str | None, name: str, cfg: DistillConfig
) -> dict[Shape, torch.Tensor]:
    """An effect's source images: its examples folder, else the base's built-in sources."""
    if examples_dir:
        return load_images(examples_dir, backbone, cfg.data.resolution, cfg.data.sources_per_effect)
    return bucketed(backbone.sample_sources(cfg.data.sources_per_effect, effect_seed(name, cfg.seed)))


def general_pool(
    backbone: Backbone, cfg: DistillConfig, examples: Iterable[str | None]
) -> tuple[dict[Shape, torch.Tensor], dict[Shape, list[str]]]:
    """The general stream's (image, instruction) pairs, bucketed: ``--general-data``, else the base's
    built-in general edits, else the effects' example images with :data:`NEUTRAL_INSTRUCTIONS`."""
    pairs: list[tuple[torch.Tensor, str]]
    data = cfg.data
    if data.general_data:
        pairs = read_general_data(Path(data.general_data), backbone, data.resolution, data.general_pool)
    else:
        try:
            images, prompts = backbone.general_edits(data.general_pool, cfg.seed)
            pairs = list(zip(images, prompts, strict=True))
        except CloraError:
            folders = sorted({e for e in examples if e})
            if not folders:
                raise CloraError(
                    f"base '{backbone.base_id}' has no built-in general edits and the effects have no "
                    "example images; pass --general-data DIR or --p-switch 1 (effect stream only)"
                ) from None
            files = [p for folder in folders for p in list_images(folder)][: data.general_pool]
            pairs = [
                (
                    read_source(p, backbone, data.resolution),
                    NEUTRAL_INSTRUCTIONS[i % len(NEUTRAL_INSTRUCTIONS)],
                )
                for i, p in enumerate(files)
            ]
    images_by: dict[Shape, list[torch.Tensor]] = {}
    prompts_by: dict[Shape, list[str]] = {}
    for img, prompt in pairs:
        shape = (int(img.shape[-2]), int(img.shape[-1]))
        images_by.setdefault(shape, []).append(img)
        prompts_by.setdefault(shape, []).append(prompt)
    return {s: torch.stack(v) for s, v in images_by.items()}, prompts_by


def general_data_pairs(folder: Path, limit: int) -> list[tuple[Path, str]]:
    """``--general-data DIR``: (image file, instruction) pairs from ``prompts.jsonl`` lines
    ``{"image": NAME, "prompt": TEXT}``, or every image of the folder with the one instruction in
    ``prompt.txt``; checked without reading the images, so a bad folder fails before a run starts."""
    if not folder.is_dir():
        raise CloraError(f"--general-data folder not found: {folder}")
    jsonl, single = folder / GENERAL_PROMPTS_FILE, folder / GENERAL_PROMPT_FILE
    if jsonl.is_file():
        pairs = []
        for i, line in enumerate(jsonl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, prompt = str(row["image"]), str(row["prompt"]).strip()
            except (ValueError, KeyError, TypeError):
                raise CloraError(
                    f'{jsonl}:{i}: expected {{"image": "file.png", "prompt": "an instruction"}}'
                ) from None
            if not prompt:
                raise CloraError(f"{jsonl}:{i}: the prompt is empty")
            if not (folder / name).is_file():
                raise CloraError(f"{jsonl}:{i}: image not found: {folder / name}")
            pairs.append((folder / name, prompt))
        if not pairs:
            raise CloraError(f"{jsonl} lists no images")
        return pairs[:limit]
    if single.is_file():
        prompt = single.read_text().strip()
        if not prompt:
            raise CloraError(f"{single} is empty; write the instruction for every image in it")
        return [(p, prompt) for p in list_images(folder)[:limit]]
    raise CloraError(
        f"--general-data {folder} needs {GENERAL_PROMPTS_FILE} (one JSON object per line: image, prompt) "
        f"or {GENERAL_PROMPT_FILE} (one instruction for every image)"
    )


def read_general_data(
    folder: Path, backbone: Backbone, resolution: int | None, limit: int
) -> list[tuple[torch.Tensor, str]]:
    """The ``--general-data`` pairs with each image read at its edit size."""
    return [(read_source(p, backbone, resolution), t) for p, t in general_data_pairs(folder, limit)]


def prepare(
    backbone: Backbone,
    adapters: AdapterSet,
    plan: Plan,
    cfg: DistillConfig,
    examples: dict[str, str | None],
    show_progress: bool = True,
) -> Prepared:
    """Build (or load from the cache) every effect's and the general pool's rows for ``plan``."""
    cache = clora_home() / "cache"
    images = {e.name: effect_sources(backbone, examples.get(e.name), e.name, cfg) for e in plan.effects}
    general_images: dict[Shape, torch.Tensor] = {}
    general_prompts: dict[Shape, list[str]] = {}
    if cfg.data.p_switch < 1.0 or not plan.effects:
        general_images, general_prompts = general_pool(backbone, cfg, examples.values())

    # 1. everything the prompt and image encoders produce, then they leave the device
    effects: dict[str, dict[Shape, Rows]] = {}
    for e in plan.effects:
        student_text = e.trained_prompt(cfg.student.asymmetric_prompts)
        effects[e.name] = {
            shape: _rows(backbone, imgs, [e.teacher_prompt] * len(imgs), [student_text] * len(imgs), cache)
            for shape, imgs in images[e.name].items()
        }
    general = {
        shape: _rows(backbone, imgs, general_prompts[shape], general_prompts[shape], cache)
        for shape, imgs in general_images.items()
    }
    backbone.offload_encoders()

    # 2. which effects train on-policy: with on_policy.effects auto, those whose teacher's result changes
    # with the seed, measured on a few sources first, so that their targets can be drawn at more steps
    teachers = cfg.teachers
    assert teachers.guidance is not None and teachers.steps is not None  # resolved before prepare
    jobs: list[_Job] = []
    for e in plan.effects:
        for shape, imgs in images[e.name].items():
            jobs.append(
                _Job(
                    effects[e.name][shape],
                    cache / "targets",
                    e.lora_path,
                    teachers.guidance,
                    effect_seed(e.name, cfg.seed + 1),
                    teachers.steps,
                    _target_key(backbone, cfg, imgs, e.lora_sha256, e.teacher_prompt, teachers.guidance),
                    e.name,
                    imgs,
                )
            )
    if cfg.data.general_targets:
        for shape, imgs in general_images.items():
            key = _target_key(backbone, cfg, imgs, None, general_prompts[shape], teachers.general_guidance)
            jobs.append(
                _Job(
                    general[shape],
                    cache / "targets",
                    None,
                    teachers.general_guidance,
                    cfg.seed + 2,
                    teachers.steps,
                    f"general-{key}",
                )
            )
    spread: dict[str, float] = {}
    if cfg.on_policy.effects == "auto" and cfg.anchor_steps > 0:  # else no step anchors
        for job in jobs:
            if job.name is not None and job.name not in spread:
                spread[job.name] = _spread_of(backbone, adapters, job, cfg)
        backbone.offload_encoders()  # a real base's VAE leaves the GPU again
    on_policy = pick_on_policy_effects(cfg, [e.name for e in plan.effects], spread)
    # 3. teacher targets: each effect's teacher, full sampler with guidance (the on-policy effects' at
    # teachers.on_policy_steps); the base on the general pool
    for job in jobs:
        own = teachers.on_policy_steps
        if job.name in on_policy and own is not None and own != job.steps:
            job.own_steps = own
    missing = sum(len(j.rows) for j in jobs if not j.path.exists())
    with progress_bar(show_progress and missing > 0) as bar:
        task = bar.add_task("teacher targets", total=missing, info="")
        for job in jobs:
            if job.path.exists():
                job.rows.targets = _read(job.path, "targets")
                continue
            adapters.use_teacher(job.lora)
            g = torch.Generator().manual_seed(job.seed)
            job.rows.targets = _full_sampler(
                backbone, job.rows, cfg, g, job.guidance, lambda n: bar.advance(task, n), job.sampler_steps
            )
            save_safetensors({"targets": job.rows.targets}, job.path)
    adapters.use(None)
    return Prepared(effects, general, spread, on_policy)


@dataclass
class _Job:
    """One bucket's teacher targets: sampled with ``lora`` (None: the base) into ``rows.targets``."""

    rows: Rows
    folder: Path
    lora: str | None
    guidance: float
    seed: int
    #: the full sampler's steps (``teachers.steps``) and the cache key of targets drawn with them
    steps: int
    key: str
    #: the effect (None: the general pool) and its source images
    name: str | None = None
    images: torch.Tensor | None = None
    #: steps of the effect's own when it trains on-policy (``teachers.on_policy_steps``), if others
    own_steps: int | None = None

    @property
    def sampler_steps(self) -> int:
        return self.own_steps or self.steps

    @property
    def path(self) -> Path:
        """The targets' cache file (its name says the steps when they are the effect's own)."""
        return self.folder / f"{self.key}{f'-steps{self.own_steps}' if self.own_steps else ''}.safetensors"

    @property
    def spread_path(self) -> Path:
        """The spread pair's cache file, beside the targets at the teachers' own steps."""
        return self.folder / f"{self.key}-spread{max(self.steps, MIN_TARGET_STEPS)}.safetensors"


#: sources of each effect that its teacher samples again at another seed to measure its spread
SPREAD_ROWS = 4


def seed_spread(first: torch.Tensor, second: torch.Tensor, sources: torch.Tensor) -> float:
    """How much of an edit's texture changes with the seed: ``mse(d - mean(d), 0) / (2 mse(y_a, x))``
    with ``d = y_a - y_b``, over images ``[B,C,H,W]`` in ``[0, 1]`` (two outputs of the same sources at
    two seeds, and the sources). 0: the same result at every seed, up to a shift of each image's colour;
    about 1: the whole edit is random (film grain, sparkles at random places).

    The per-image, per-channel mean of ``d`` is left out: a colour the seed draws for the whole image
    (a tint from a palette) is a choice the few-step student does not learn on-policy either, and its
    on-policy rows cost the deterministic colour edits (benchmarks/README.md, "The default budget")."""
    d = first.float() - second.float()
    local = (d - d.mean(dim=(-2, -1), keepdim=True)).pow(2).mean()
    edit = (first.float() - sources.float()).pow(2).mean().clamp_min(1e-8)
    return float(local / (2 * edit))


def pick_on_policy_effects(cfg: DistillConfig, names: list[str], spread: dict[str, float]) -> set[str]:
    """The effects ``on_policy.effects`` names: auto, those whose seed spread is at least
    ``on_policy.spread``; none; or a comma-separated list (of effects of the run)."""
    choice = cfg.on_policy.effects
    if choice == "auto":
        return {n for n in names if spread.get(n, 0.0) >= cfg.on_policy.spread}
    if choice == "none":
        return set()
    asked = set(choice.split(","))
    unknown = sorted(asked - set(names))
    if unknown:
        raise CloraError(
            f"on_policy.effects names {', '.join(unknown)}, not an effect of this run; use auto, none or "
            f"some of: {', '.join(names)}"
        )
    return asked


def _spread_of(backbone: Backbone, adapters: AdapterSet, job: _Job, cfg: DistillConfig) -> float:
    """The seed spread of one effect's teacher on the first :data:`SPREAD_ROWS` sources of ``job``'s
    bucket, sampled at two seeds with the full sampler at no fewer than
    :data:`~clora.distill.config.MIN_TARGET_STEPS` steps (cached beside the targets; measured before
    them, since it decides the steps the targets of the effects that train on-policy are drawn with)."""
    assert job.images is not None
    n = min(SPREAD_ROWS, len(job.rows))
    path = job.spread_path
    if path.exists():
        pair = [_read(path, "first"), _read(path, "second")]
    else:
        adapters.use_teacher(job.lora)
        rows = job.rows.take(torch.arange(n), torch.device("cpu"), job.rows.sources.dtype)
        steps = max(job.steps, MIN_TARGET_STEPS)
        pair = [
            _full_sampler(
                backbone, rows, cfg, torch.Generator().manual_seed(job.seed + k), job.guidance, steps=steps
            )
            for k in (1, 2)
        ]
        save_safetensors({"first": pair[0], "second": pair[1]}, path)
    dev, dt = backbone.device, backbone.dtype
    first, second = (backbone.decode_latents(y.to(dev, dt)).float().cpu() for y in pair)
    return round(seed_spread(first, second, job.images[:n].float()), 4)


def _target_key(
    backbone: Backbone,
    cfg: DistillConfig,
    images: torch.Tensor,
    teacher_sha256: str | None,
    prompt: str | list[str],
    guidance: float,
) -> str:
    return digest(
        {
            "base": backbone.fingerprint,
            "teacher": teacher_sha256,
            "prompt": prompt,
            "steps": cfg.teachers.steps,
            "guidance": guidance,
            "images": tensor_digest(images),
            "seed": cfg.seed,
            "dtype": cfg.dtype,
            **noise_key(backbone),
        }
    )


def _read(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def _rows(
    backbone: Backbone, images: torch.Tensor, teacher: list[str], student: list[str], cache: Path
) -> Rows:
    """Source latents and per-row conditioning of one bucket (from the cache when it has them)."""
    source_key = digest(
        {"base": backbone.fingerprint, "images": tensor_digest(images), "dtype": str(backbone.dtype)}
    )
    path = cache / "sources" / f"{source_key}.safetensors"
    if path.exists():
        sources = _read(path, "sources")
    else:
        sources = backbone.encode_sources(images.to(backbone.device, backbone.dtype)).cpu()
        save_safetensors({"sources": sources}, path)
    negative = [backbone.negative_prompt] * len(images)
    return Rows(
        sources=sources,
        targets=None,
        teacher=condition(backbone, images, teacher, cache),
        student=condition(backbone, images, student, cache),
        uncond=condition(backbone, images, negative, cache),
        latent_shape=backbone.latent_shape(int(images.shape[-2]), int(images.shape[-1])),
    )


def condition(backbone: Backbone, images: torch.Tensor, texts: list[str], cache: Path) -> PromptEmbeds:
    """Each row's prompt encoding (with its image, where the prompt encoder sees images), on the CPU,
    cached on disk: per (images, prompts) for such models, per prompt text for the others."""
    if backbone.prompt_sees_image:
        key = digest({"base": backbone.fingerprint, "texts": texts, "images": tensor_digest(images)})
        path = cache / "conditions" / f"{key}.safetensors"
        if not path.exists():
            enc = backbone.encode_prompts(texts, images.to(backbone.device, backbone.dtype))
            save_safetensors({"embeds": enc.embeds, "mask": enc.mask}, path)
        return PromptEmbeds(_read(path, "embeds"), _read(path, "mask"))
    unique = sorted(set(texts))
    by_text = encode_prompts_cached(backbone, unique, cache)
    return PromptEmbeds.cat([by_text[t] for t in texts])


def encode_prompts_cached(backbone: Backbone, texts: list[str], cache: Path) -> dict[str, PromptEmbeds]:
    """Encode ``texts`` (a text-only prompt encoder) once per base, on disk; rows on the CPU."""
    path = cache / "prompts" / f"{digest({'base': backbone.fingerprint, 'texts': texts})}.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    else:
        data = {}
        for i, text in enumerate(texts):
            enc = backbone.encode_prompts([text])
            data[f"embeds.{i}"], data[f"mask.{i}"] = enc.embeds.cpu(), enc.mask.cpu()
        save_safetensors(data, path, metadata={"texts": json.dumps(texts)})
    return {t: PromptEmbeds(data[f"embeds.{i}"], data[f"mask.{i}"]) for i, t in enumerate(texts)}


def _full_sampler(
    backbone: Backbone,
    rows: Rows,
    cfg: DistillConfig,
    generator: torch.Generator,
    guidance: float,
    advance: Callable[[int], object] = lambda _: None,
    steps: int | None = None,
) -> torch.Tensor:
    """The full Euler sampler with guidance over ``rows`` (``steps``: default the teachers'), in batches
    of ``teacher_batch_size``; the outputs on the CPU."""
    size = cfg.teachers.batch_size or cfg.optimizer.batch_size
    steps = steps or cfg.teachers.steps
    assert steps is not None  # resolved from the backbone before prepare
    outs = []
    for i in range(0, len(rows), size):
        chunk = rows.take(torch.arange(i, min(i + size, len(rows))), backbone.device, backbone.dtype)
        outs.append(
            euler_sample(
                backbone,
                chunk.sources,
                chunk.teacher,
                steps=steps,
                guidance=guidance,
                generator=generator,
                uncond=chunk.uncond,
                shape=(len(chunk), *chunk.latent_shape),
            ).cpu()
        )
        advance(len(chunk))
    return torch.cat(outs)
