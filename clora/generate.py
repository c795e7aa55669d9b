"""Few-step editing with a unified LoRA: any member effect by its trigger, or several composed."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clora.backbone import Backbone
from clora.bases import get_factory
from clora.devices import pick
from clora.errors import CloraError, OutputError, UnknownEffectError, did_you_mean
from clora.fileio import os_error_message, sha256_file
from clora.lora import attach_teacher
from clora.plugins import Components
from clora.registry import Registry
from clora.sampling import euler_sample, few_step_sample, few_step_sigmas
from clora.unified import UnifiedHeader, read_header

ADAPTER = "unified"


def drop_adapters(transformer: Any, names: list[str]) -> None:
    """Delete those of ``names`` that are loaded on ``transformer`` (so a name can be loaded afresh)."""
    present = [n for n in names if n in getattr(transformer, "peft_config", {})]
    if present:
        transformer.delete_adapters(present)


def fused_adapters(transformer: Any) -> set[str]:
    """The adapters merged into ``transformer``'s base weights (diffusers ``fuse_lora``), if any."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: set[str] = set()
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            out.update(module.merged_adapters)
    return out


def unfuse(transformer: Any) -> None:
    """Restore the base weights if an adapter is fused into them; call before running any other adapter
    (a merged layer ignores which adapter is active)."""
    if fused_adapters(transformer):
        transformer.unfuse_lora()


class UnifiedModel:
    """The base model with one unified LoRA loaded (through diffusers' ``load_lora_adapter``).

    With ``fuse`` (the default) ``edit`` merges the LoRA into the base weights the first time it runs:
    one LoRA serves every effect, so it never has to be swapped out, and a fused layer costs what the
    base layer costs (about a quarter less time per image on the toy base). Functions here that run
    another adapter on the same transformer unfuse first."""

    def __init__(self, backbone: Backbone, file: Path, header: UnifiedHeader, fuse: bool = True) -> None:
        self.backbone, self.file, self.header, self.fuse = backbone, file, header, fuse

    @classmethod
    def load(
        cls,
        components: Components,
        file: str | os.PathLike[str],
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        backbone: Backbone | None = None,
        fuse: bool = True,
        registry: Registry | None = None,
    ) -> UnifiedModel:
        """Load the base named in ``file``'s header (a folder recorded in ``registry``, or a plugin's base;
        or use ``backbone``) and attach the unified LoRA (``fuse``: merge it into the base weights when
        editing; see the class). ``dtype`` None: the base's default on ``device``."""
        path = Path(file)
        header = read_header(path)
        if backbone is None:
            factory = get_factory(components, registry, header.base_id)
            name = dtype if isinstance(dtype, str) or dtype is None else str(dtype).removeprefix("torch.")
            dev, dt, _ = pick(device, name, factory.default_dtype(device))
            backbone = factory.load(dev, dt)
        if backbone.fingerprint != header.base_fingerprint:
            raise CloraError(
                f"{path} was distilled on other weights of base '{header.base_id}' than the ones installed; "
                "distill again on this base"
            )
        tr = backbone.transformer
        unfuse(tr)
        drop_adapters(tr, [ADAPTER])
        tr.load_lora_adapter(str(path), prefix="transformer", adapter_name=ADAPTER, use_safetensors=True)
        tr.requires_grad_(False)
        return cls(backbone, path, header, fuse)

    def activate(self) -> None:
        """Make the unified LoRA the one that runs: fused into the base weights, or as an adapter."""
        tr = self.backbone.transformer
        if self.fuse and fused_adapters(tr) == {ADAPTER}:
            return
        unfuse(tr)
        tr.enable_adapters()
        tr.set_adapter(ADAPTER)
        if self.fuse:
            tr.fuse_lora(adapter_names=[ADAPTER])

    @property
    def effects(self) -> list[str]:
        return sorted(self.header.effects)

    def check_effect(self, name: str) -> None:
        if name not in self.header.effects:
            raise UnknownEffectError(
                f"effect '{name}' is not in {self.file.name}; {did_you_mean(name, self.effects)}it has: "
                f"{', '.join(self.effects) or 'no effects'}"
            )

    def prompt(self, effects: list[str], extra: str | None = None) -> str:
        """The student prompt: each effect's trained prompt (``<trigger> <caption>``), composed in
        order, plus ``extra``."""
        for name in effects:
            self.check_effect(name)
        parts = [self.effect_prompt(n) for n in effects]
        text = self.backbone.compose_prompt(parts) if parts else ""
        if extra:
            text = f"{text}, {extra}" if text else extra
        return text

    def effect_prompt(self, name: str) -> str:
        """The text the student learned ``name`` under; files written before the header recorded it
        get trigger + caption, what a default run trains."""
        fields = self.header.effects[name]
        return fields.get("prompt") or f"{fields['trigger']} {fields['caption']}".strip()

    def sigmas(self, steps: int | None, effects: list[str] | None = None) -> torch.Tensor:
        """The few-step levels of ``steps`` steps (None: the trained ones) for a prompt of ``effects``:
        the collection's, or those of the first effect with levels of its own (effects whose result
        varies with the seed; ``student.on_policy_shift``)."""
        for name in effects or []:
            fields = self.header.effects.get(name, {})
            if "few_step_sigmas" in fields:
                return sampler_levels(fields["few_step_sigmas"], fields["shift"], steps)
        return sampler_levels(self.header.few_step_sigmas, self.header.shift, steps)

    @property
    def resolution(self) -> int | None:
        """The resolution the collection was distilled at (its sources' size)."""
        return self.header.resolution

    @torch.no_grad()
    def edit(
        self,
        images: torch.Tensor,
        effects: list[str],
        prompt: str | None = None,
        steps: int | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Edit ``images [B,3,H,W]`` in [0,1] (one size; see ``Backbone.image_size_for``) with ``effects``
        (composed in order); images in [0,1] out."""
        self.activate()
        text = self.prompt(effects, prompt)
        return sample_few_steps(
            self.backbone, images, [text] * len(images), self.sigmas(steps, effects), seed
        )


def sampler_levels(trained: list[float], shift: float, steps: int | None) -> torch.Tensor:
    """The few-step levels of ``steps`` steps: the ``trained`` ones when ``steps`` is None or their
    count, else the levels of ``shift`` for that count."""
    if steps is None or steps == len(trained):
        return torch.tensor(trained)
    return few_step_sigmas(steps, shift)


def sample_few_steps(
    backbone: Backbone, images: torch.Tensor, prompts: list[str], sigmas: torch.Tensor, seed: int
) -> torch.Tensor:
    """The few-step sampler with whatever adapters are active, from pixels to pixels."""
    bb = backbone
    images = images.to(bb.device, bb.dtype)
    source = bb.encode_sources(images)
    cond = bb.encode_prompts(prompts, images)
    first, renoise = bb.sampler_generators(seed)
    shape = (len(images), *bb.latent_shape(int(images.shape[-2]), int(images.shape[-1])))
    out = few_step_sample(
        bb, source, cond, sigmas.to(bb.device, bb.dtype), first, shape=shape, renoise_generator=renoise
    )
    return bb.decode_latents(out)


def sample_full(
    backbone: Backbone,
    images: torch.Tensor,
    prompts: list[str],
    steps: int,
    guidance: float,
    shift: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """The full Euler sampler with the backbone's guidance and whatever adapters are active."""
    bb = backbone
    images = images.to(bb.device, bb.dtype)
    source = bb.encode_sources(images)
    shape = (len(images), *bb.latent_shape(int(images.shape[-2]), int(images.shape[-1])))
    g = torch.Generator().manual_seed(seed)
    out = euler_sample(
        bb,
        source,
        prompts,
        steps=steps,
        guidance=guidance,
        generator=g,
        shift=shift,
        images=images,
        shape=shape,
    )
    return bb.decode_latents(out)


@torch.no_grad()
def full_edit(
    backbone: Backbone,
    adapter: str | None,
    prompt: str,
    images: torch.Tensor,
    steps: int = 20,
    guidance: float = 4.0,
    shift: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """The base with the loaded adapter ``adapter`` (None: no adapter) and ``prompt``: full Euler
    sampler with guidance."""
    tr = backbone.transformer
    unfuse(tr)
    if adapter is None:
        tr.disable_adapters()
    else:
        tr.enable_adapters()
        tr.set_adapter(adapter)
    return sample_full(backbone, images, [prompt] * len(images), steps, guidance, shift, seed)


def load_teacher(backbone: Backbone, components: Components, lora_path: str, adapter: str) -> None:
    """Load an effect's LoRA file (any registered format) as adapter ``adapter`` of the backbone: the one
    way every command loads a teacher."""
    tr = backbone.transformer
    unfuse(tr)
    drop_adapters(tr, [adapter])
    attach_teacher(tr, components.teacher_providers(), lora_path, adapter)


@torch.no_grad()
def teacher_edit(
    backbone: Backbone,
    components: Components,
    lora_path: str,
    teacher_prompt: str,
    images: torch.Tensor,
    steps: int = 20,
    guidance: float = 4.0,
    shift: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """The old way: base + the effect's own LoRA, full Euler sampler with guidance."""
    name = "teacher_edit"
    load_teacher(backbone, components, lora_path, name)
    try:
        return full_edit(backbone, name, teacher_prompt, images, steps, guidance, shift, seed)
    finally:
        backbone.transformer.delete_adapters([name])


@torch.no_grad()
def cascade_edit(
    backbone: Backbone,
    components: Components,
    lora_path: str,
    teacher_prompt: str,
    accel_file: str | os.PathLike[str],
    images: torch.Tensor,
    steps: int | None = None,
    seed: int = 0,
    strength: float = 1.0,
    accel_strength: float = 1.0,
) -> torch.Tensor:
    """The paper's baseline: the effect LoRA stacked with an acceleration LoRA, sampled in few steps.

    ``strength`` and ``accel_strength`` scale the two LoRAs' deltas (diffusers ``set_adapters``
    weights): the acceleration LoRA was distilled alone, and a lower strength can spoil the effect less.
    """
    header = read_header(accel_file)
    tr = backbone.transformer
    load_teacher(backbone, components, lora_path, "cascade_effect")
    drop_adapters(tr, ["cascade_accel"])
    tr.load_lora_adapter(
        str(accel_file), prefix="transformer", adapter_name="cascade_accel", use_safetensors=True
    )
    try:
        tr.enable_adapters()
        tr.set_adapters(["cascade_effect", "cascade_accel"], [strength, accel_strength])
        sigmas = sampler_levels(header.few_step_sigmas, header.shift, steps)
        return sample_few_steps(backbone, images, [teacher_prompt] * len(images), sigmas, seed)
    finally:
        tr.delete_adapters(["cascade_effect", "cascade_accel"])


# ---- editing image files (`clora generate`) ---------------------------------------------------------


@dataclass
class Editor:
    """What edits a batch for ``clora generate``: the unified LoRA (``model``), or an effect's own LoRA
    the old ways (``teacher``: full sampler with guidance; ``cascade``: with an acceleration LoRA)."""

    backbone: Backbone
    edit: Callable[[torch.Tensor], torch.Tensor]
    #: each effect alone, for the contact sheet of a composition (None: not a composition)
    each: Callable[[torch.Tensor], list[torch.Tensor]] | None
    resolution: int | None
    tag: str


def open_editor(
    registry: Registry,
    components: Components,
    effects: list[str],
    *,
    collection: int | None = None,
    teacher: bool = False,
    cascade: str | os.PathLike[str] | None = None,
    prompt: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    fuse: bool = True,
) -> Editor:
    """Check the request against the registry and load what edits it (one-line errors for bad input)."""
    from clora.distill.config import DistillConfig, read_config

    if (teacher or cascade) and len(effects) > 1:
        raise CloraError("--teacher and --cascade run one effect's own LoRA; pass a single --effect")
    if teacher and cascade:
        raise CloraError("choose one of --teacher and --cascade")
    registered = {name: registry.get_effect(name) for name in effects}  # unknown: "did you mean"
    # --teacher needs only the effect's own LoRA; everything else runs from a collection
    col = registry.get_collection(collection) if teacher else registry.require_collection(collection)
    cfg = read_config(col.config_json) if col is not None else DistillConfig()
    tag = editor_tag(effects, teacher, cascade is not None)
    if not (teacher or cascade):
        assert col is not None
        _check_members(registry, col, effects)
        model = UnifiedModel.load(
            components, col.file, device=device, dtype=dtype, fuse=fuse, registry=registry
        )

        def each(images: torch.Tensor) -> list[torch.Tensor]:
            return [model.edit(images, [name], prompt=prompt, steps=steps, seed=seed) for name in effects]

        return Editor(
            model.backbone,
            lambda images: model.edit(images, effects, prompt=prompt, steps=steps, seed=seed),
            each if len(effects) > 1 else None,
            cfg.data.resolution,
            tag,
        )
    e = registered[effects[0]]
    if not Path(e.lora_path).is_file():
        raise CloraError(
            f"the LoRA file of effect '{e.name}' ({e.lora_path}) is gone; see `clora effect update`"
        )
    if sha256_file(e.lora_path) != e.lora_sha256:
        raise CloraError(
            f"the LoRA file of effect '{e.name}' ({e.lora_path}) changed since it was added; if the change "
            f"is meant, record it (`clora effect update {e.name} --lora {e.lora_path}`)"
        )
    base_id = e.base_id or (col.base_id if col is not None else None)
    if base_id is None:
        raise CloraError(f"effect '{e.name}' is unbound; pass it a base with `clora base use ID`")
    factory = get_factory(components, registry, base_id)
    dev, dt, _ = pick(device, dtype, factory.default_dtype(device))
    bb = factory.load(dev, dt)
    if teacher:
        g = cfg.teachers.guidance
        n = steps or cfg.teachers.steps or bb.default_teacher_steps

        def edit(images: torch.Tensor) -> torch.Tensor:
            guidance = bb.default_guidance if g is None else g
            return teacher_edit(bb, components, e.lora_path, e.teacher_prompt, images, n, guidance, seed=seed)

    else:
        assert cascade is not None

        def edit(images: torch.Tensor) -> torch.Tensor:
            return cascade_edit(bb, components, e.lora_path, e.teacher_prompt, cascade, images, steps, seed)

    return Editor(bb, edit, None, cfg.data.resolution, tag)


def _check_members(registry: Registry, col: Any, effects: list[str]) -> None:
    members = {m.effect_name for m in col.members}
    for name in effects:
        if name in members:
            continue
        having = [
            c.version for c in registry.list_collections() if name in {m.effect_name for m in c.members}
        ]
        where = (
            f"it is in collection v{having[-1]} (--collection {having[-1]})"
            if having
            else "it needs a distill (`clora distill --incremental`)"
        )
        raise CloraError(f"effect '{name}' is not in collection v{col.version}; {where}")


def editor_tag(effects: list[str], teacher: bool = False, cascade: bool = False) -> str:
    """What output names carry after the input's stem: ``sepia+warm``, ``sepia.teacher``."""
    return "+".join(effects) + (".teacher" if teacher else ".cascade" if cascade else "")


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system holding ``folder`` (or its nearest existing
    parent) takes."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        return int(os.pathconf(existing, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def output_paths(files: list[Path], out: Path, tag: str, grid: bool = False) -> list[Path]:
    """Where ``generate_files`` writes each edited image, checked before anything is loaded or edited:
    ``out`` must be a folder (or a .png path for one image) and every name must fit the file system."""
    single_file = len(files) == 1 and out.suffix.lower() == ".png"
    folder = out.parent if single_file else out
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = f"--out {out}" if existing == out else f"{existing} (in --out {out})"
        raise CloraError(f"{what} is a file, not a folder; pass a folder, or a .png path for a single image")
    targets = [out] if single_file else [out / f"{f.stem}.{tag}.png" for f in files]
    limit = _name_max(folder)
    names = [t.name for t in targets] + ([f"grid.{tag}.png"] if grid else [])
    for name in names:
        if len(name.encode()) > limit:
            raise CloraError(
                f"the output name {name[:40]}... is {len(name.encode())} bytes, over this file system's "
                f"limit of {limit}; compose fewer effects or shorten the input's name (or pass "
                "--out FILE.png for a single image)"
            )
    return targets


@dataclass
class Generated:
    """What ``generate_files`` wrote."""

    written: list[Path]
    grid: Path | None


def generate_files(
    editor: Editor,
    files: list[Path],
    out: Path,
    *,
    batch_size: int = 16,
    resolution: int | None = None,
    grid: bool = False,
    show_progress: bool = True,
) -> Generated:
    """Edit image ``files`` and write each at its own aspect (``out``: a folder, or a .png for one file).

    Each image is edited at about ``resolution`` (default: the collection's) with its own aspect;
    images of one edit size share a batch. ``grid`` also writes a contact sheet: input | each effect
    (of a composition) | output."""
    from clora.distill.prepare import read_source
    from clora.images import contact_sheet, write_png
    from clora.progress import progress_bar

    bb = editor.backbone
    targets = dict(zip(files, output_paths(files, out, editor.tag, grid), strict=True))
    single_file = len(files) == 1 and out.suffix.lower() == ".png"
    by_size: dict[tuple[int, ...], list[tuple[Path, torch.Tensor]]] = {}
    for f in files:  # every input is read before --out is made: a bad one leaves nothing behind
        img = read_source(f, bb, resolution or editor.resolution)
        by_size.setdefault(tuple(img.shape[-2:]), []).append((f, img))
    if not single_file:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(os_error_message("create the --out folder", out, e)) from None
    rows: list[list[torch.Tensor]] = []
    written: list[Path] = []
    with progress_bar(show_progress) as bar:
        task = bar.add_task("generate", total=len(files), info="")
        for group in by_size.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                images = torch.stack([img for _, img in chunk]).to(bb.device, bb.dtype)
                edited = editor.edit(images)
                for (f, _), img in zip(chunk, edited, strict=True):
                    target = targets[f]
                    write_png(img, target, aspect_of=f)
                    written.append(target)
                if grid:
                    columns = [images, *(editor.each(images) if editor.each else []), edited]
                    rows += [[c[j] for c in columns] for j in range(len(chunk))]
                bar.advance(task, len(chunk))
    sheet = None
    if grid:
        sheet = (out.parent if single_file else out) / f"grid.{editor.tag}.png"
        contact_sheet(rows, sheet)
    return Generated(written, sheet)
