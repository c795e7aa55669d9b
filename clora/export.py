"""``clora export``: a collection's unified LoRA in the layout another tool loads, with a model card.

Every format carries the same weights (the same ``scale * up @ down`` per module) and the unified
file's ``clora`` header (trigger map, captions, prompts, sampler settings), so nothing is lost:

- ``diffusers``: the unified file itself (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``,
  ``lora_adapter_metadata``): ``transformer.load_lora_adapter(path, prefix="transformer")`` and a
  Qwen-Image pipeline's ``load_lora_weights(path)`` read it;
- ``peft``: a folder as ``PeftModel.save_pretrained`` writes it: ``adapter_model.safetensors``
  (``base_model.model.<module>.lora_A.weight``) and ``adapter_config.json``;
- ``comfyui``: kohya keys, ``lora_unet_<module, dots as underscores>.lora_down.weight`` / ``lora_up.weight``
  / ``alpha``. ComfyUI's ``comfy.lora.model_lora_keys_unet`` maps ``lora_unet_<key>`` for every
  ``diffusion_model.<key>.weight`` of any model, and its Qwen-Image transformer
  (``comfy/ldm/qwen_image/model.py``) names its modules as diffusers does; diffusers'
  ``QwenImageLoraLoaderMixin.lora_state_dict`` converts these keys back (folding alpha / rank in).

A file format's ``--out`` is a ``.safetensors`` path (the card goes beside it as ``<stem>.README.md``, so
several exports can share a folder such as ComfyUI's ``models/loras``) or a folder, which gets
``clora-v<N>.safetensors`` (``clora-v<N>.comfyui.safetensors``) and ``README.md``: a folder ready to
upload as a Hugging Face model repository. The peft folder holds its ``README.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clora.distill.config import read_config
from clora.errors import CloraError
from clora.fileio import atomic_path
from clora.registry import Collection, Registry
from clora.unified import UnifiedHeader, read_header, read_student_state

if TYPE_CHECKING:
    import torch

    from clora.plugins import Components

#: format id -> what it writes (``clora export --help``)
FORMATS = {
    "diffusers": "a .safetensors file for diffusers (load_lora_adapter, a pipeline's load_lora_weights)",
    "peft": "a folder for peft (PeftModel.from_pretrained): adapter_model.safetensors + adapter_config.json",
    "comfyui": "a kohya-layout .safetensors file for ComfyUI's LoRA loaders (lora_unet_*, with .alpha)",
}
KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
CARD = "README.md"


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    version: int
    format: str
    #: the LoRA file, or the peft folder
    lora: Path
    #: the model card, None with ``card=False``
    card: Path | None
    modules: int
    rank: int
    alpha: float
    effects: list[str]
    #: things the user should know (e.g. the card has no diffusers code because the base did not load)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "format": self.format,
            "lora": str(self.lora),
            "card": str(self.card) if self.card else None,
            "modules": self.modules,
            "rank": self.rank,
            "alpha": self.alpha,
            "effects": self.effects,
            "notes": self.notes,
        }


def export(
    registry: Registry,
    components: Components,
    version: int | None,
    fmt: str,
    out: str | os.PathLike[str],
    card: bool = True,
    force: bool = False,
) -> ExportResult:
    """Write collection ``version`` (None: the latest) as ``fmt`` at ``out``, with a model card unless
    ``card`` is False; an existing output is replaced only with ``force``. The card's diffusers code
    comes from the base's factory (``BackboneFactory.pipeline_usage``; no weights are loaded). Every
    check runs before anything is written; a failed check is a one-line :class:`CloraError`."""
    if fmt not in FORMATS:
        raise CloraError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    col = registry.require_collection(version)
    header = read_header(col.file)
    state = read_student_state(col.file)
    lora_path, card_path = _plan(fmt, Path(out).expanduser(), col.version, card, force)
    modules = _modules(state)
    tensors = _tensors(fmt, modules, header)
    notes: list[str] = []
    text = None
    if card_path is not None:
        kind, usage = _base_facts(registry, components, header, fmt, lora_path, notes)
        text = model_card(
            col, header, fmt, lora_path.name, kind, usage, registry.collection_version(col.parent_id)
        )
    clora_meta = {"clora": header.to_json(), "format": "pt"}
    try:
        if fmt == "peft":
            _write_peft(lora_path, tensors, clora_meta, header, modules, text)
        else:
            if fmt == "diffusers":  # the unified file is this layout already: copy it, byte for byte
                _write_file(lora_path, lambda tmp: shutil.copyfile(col.file, tmp))
            else:
                _write_file(lora_path, lambda tmp: _save(tensors, tmp, clora_meta))
            if card_path is not None and text is not None:
                _write_file(card_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise CloraError(f"cannot write {lora_path}: {e.strerror or e}; pick a writable --out") from None
    ranks = {m[0].shape[0] for m in modules.values()}
    return ExportResult(
        version=col.version,
        format=fmt,
        lora=lora_path,
        card=card_path,
        modules=len(modules),
        rank=max(ranks),
        alpha=header.alpha,
        effects=sorted(header.effects),
        notes=notes,
    )


def _plan(fmt: str, out: Path, version: int, card: bool, force: bool) -> tuple[Path, Path | None]:
    """Where the LoRA and the card go; refuses a path of the wrong kind or an existing output."""
    if fmt == "peft":
        if out.suffix == ".safetensors" or out.is_file():
            raise CloraError(
                f"--format peft writes a folder (adapter_model.safetensors, adapter_config.json); {out} "
                "is a file path, pass a folder"
            )
        _check_parent(out)
        if out.is_dir() and any(out.iterdir()):
            if not force:
                raise CloraError(f"{out} exists; pass --force to replace it, or another --out")
            if not (out / PEFT_CONFIG).is_file():
                raise CloraError(
                    f"{out} is not a peft adapter folder (no {PEFT_CONFIG}); --force replaces only those, "
                    "pass another --out"
                )
        return out, (out / CARD) if card else None
    if out.suffix == ".safetensors":
        if out.is_dir():
            raise CloraError(
                f"{out} is a folder; pass a file path ending in .safetensors, or the folder name"
            )
        lora, card_path = out, out.with_name(out.name.removesuffix(".safetensors") + ".README.md")
    elif out.is_dir() or not out.suffix:
        if out.is_file():
            raise CloraError(f"{out} is a file; --format {fmt} takes a .safetensors path or a folder")
        name = f"clora-v{version}" + ("" if fmt == "diffusers" else f".{fmt}") + ".safetensors"
        lora, card_path = out / name, out / CARD
    else:
        raise CloraError(
            f"--format {fmt} writes a .safetensors file; {out} ends in {out.suffix}, pass a path ending in "
            ".safetensors or a folder"
        )
    _check_parent(lora)
    targets = [lora] + ([card_path] if card else [])
    for p in targets:
        if p.is_dir():
            raise CloraError(f"{p} is a folder; pass another --out")
        if p.exists() and not force:
            raise CloraError(f"{p} exists; pass --force to replace it, or another --out")
    return lora, card_path if card else None


def _check_parent(path: Path) -> None:
    """The nearest existing folder above ``path`` must be a writable folder."""
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise CloraError(f"cannot write {path}: {p} is a file, not a folder; pick another --out")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CloraError(f"cannot write {path}: {p} is not writable; pick another --out")


def _modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (down [r, in], up [out, r])}`` of a peft-style student state."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            up = state.get(f"{name}.lora_B.weight")
            if up is None:
                raise CloraError(f"the unified LoRA has no lora_B for module '{name}'; distill it again")
            out[name] = (down, up)
    if not out:
        raise CloraError("the unified LoRA holds no LoRA modules; distill it again")
    return dict(sorted(out.items()))


def _tensors(
    fmt: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], header: UnifiedHeader
) -> dict[str, torch.Tensor]:
    """The tensors of ``fmt`` (diffusers: none, the unified file is copied as it is)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    if fmt == "peft":
        for name, (down, up) in modules.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = down
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = up
    elif fmt == "comfyui":
        for name, (down, up) in modules.items():
            flat = KOHYA_PREFIX + name.replace(".", "_")
            if f"{flat}.lora_down.weight" in out:  # kohya names are only reversible when unique
                raise CloraError(f"two modules flatten to the kohya name '{flat}'; export --format diffusers")
            out[f"{flat}.lora_down.weight"] = down
            out[f"{flat}.lora_up.weight"] = up
            # ComfyUI and diffusers scale each module by alpha / rank, rank read from lora_down
            out[f"{flat}.alpha"] = torch.tensor(float(header.alpha))
    return out


def _write_peft(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    header: UnifiedHeader,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    card_text: str | None,
) -> None:
    """Write the peft folder into a temporary folder beside ``folder``, then rename it into place."""
    from peft import LoraConfig

    ranks = {name: int(down.shape[0]) for name, (down, _) in modules.items()}
    rank = max(ranks.values())
    # peft types lora_alpha as int but scales by any number; a whole alpha is written as an int
    alpha: Any = int(header.alpha) if float(header.alpha).is_integer() else header.alpha
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        # modules of another rank keep the file's alpha, as diffusers reads the unified file
        rank_pattern={re.escape(k): r for k, r in ranks.items() if r != rank},
        bias="none",
        base_model_name_or_path=header.base_id,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        _write_file(tmp / PEFT_WEIGHTS, lambda t: _save(tensors, t, meta))
        config.save_pretrained(str(tmp))
        if card_text is not None:
            _write_file(tmp / CARD, lambda t: t.write_text(card_text, encoding="utf-8"))
        os.chmod(tmp, 0o777 & ~_umask())
        _replace_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_file(path: Path, fill: Callable[[Path], object]) -> None:
    """Write ``path`` atomically with ``fill(tmp)``, with the permissions the umask gives a new file (the
    temporary file is private): an export is meant to be shared."""
    with atomic_path(path) as tmp:
        fill(tmp)
        os.chmod(tmp, 0o666 & ~_umask())


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old)


def _base_facts(
    registry: Registry,
    components: Components,
    header: UnifiedHeader,
    fmt: str,
    lora_path: Path,
    notes: list[str],
) -> tuple[str, str | None]:
    """The base's kind and, for the file formats, its pipeline's usage code for the card."""
    from clora.bases import get_factory

    try:
        factory = get_factory(components, registry, header.base_id)
    except CloraError as e:
        notes.append(
            f"base '{header.base_id}' is not installed here ({e}); the card has no base kind or code"
        )
        return "unknown", None
    if fmt == "peft":  # a pipeline's load_lora_weights does not read a peft folder
        return factory.kind, None
    usage = factory.pipeline_usage(lora_path.name, list(header.few_step_sigmas), header.shift, 0)
    return factory.kind, usage


def _cell(text: object) -> str:
    """Text for one Markdown table cell."""
    return str(text if text not in (None, "") else "-").replace("|", "\\|").replace("\n", " ")


def _db(scores: dict[str, Any] | None) -> str:
    return "-" if not scores or scores.get("psnr") is None else f"{scores['psnr']:.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _layout(fmt: str, name: str) -> str:
    return {
        "diffusers": f"`{name}`: diffusers layout (`transformer.<module>.lora_A.weight` / `lora_B.weight`, "
        "the header's `lora_adapter_metadata` holds rank, alpha and target modules)",
        "peft": f"`{PEFT_WEIGHTS}` (`{PEFT_PREFIX}<module>.lora_A.weight` / `lora_B.weight`) and "
        f"`{PEFT_CONFIG}` in this folder, as peft's `save_pretrained` writes them",
        "comfyui": f"`{name}`: kohya layout as ComfyUI reads it (`{KOHYA_PREFIX}<module with _ for .>"
        ".lora_down.weight` / `lora_up.weight` / `alpha`)",
    }[fmt]


def model_card(
    col: Collection,
    header: UnifiedHeader,
    fmt: str,
    lora_name: str,
    kind: str,
    usage: str | None,
    parent_version: int | None,
) -> str:
    """The Markdown model card of an export: base, effects, sampler, usage, evaluation, training."""
    cfg = read_config(col.config_json or "{}")
    metrics: dict[str, Any] = json.loads(col.metrics_json or "{}")
    steps = len(header.few_step_sigmas)
    names = sorted(header.effects)
    first = names[0] if names else "NAME"
    lines = [
        f"# clora collection v{col.version}: {len(names)} effect(s) for {header.base_id}",
        "",
        f"One LoRA for {len(names)} image effect(s): the prompt picks the effect by its trigger word, and "
        f"the LoRA samples in {steps} steps without guidance. Distilled by clora from one LoRA per effect.",
        "",
        "## Base model",
        "",
        f"- base: `{header.base_id}` (kind `{kind}`)",
        f"- fingerprint: `{header.base_fingerprint}` (the weights it was distilled on; clora refuses to "
        "run it on other weights)",
        "",
        "## Files",
        "",
        f"- {_layout(fmt, lora_name)}; rank {header.rank}, alpha {header.alpha:g}.",
        "- The safetensors header's `clora` entry (JSON) holds everything below: the effects, their "
        "triggers and prompts, and the sampler settings.",
        "",
        "## Effects",
        "",
        "Use an effect's prompt (its trigger word and caption) as the edit prompt.",
        "",
        "| effect | trigger | prompt it was trained under | caption | teacher prompt |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        e = header.effects[name]
        prompt = e.get("prompt") or f"{e.get('trigger', '')} {e.get('caption', '')}".strip()
        lines.append(
            f"| {_cell(name)} | `{_cell(e.get('trigger'))}` | {_cell(prompt)} | {_cell(e.get('caption'))} | "
            f"{_cell(e.get('teacher_prompt'))} |"
        )
    lines += _sampling(header)
    lines += _usage(fmt, usage, col.version, lora_name, first, steps)
    lines += _evaluation(metrics.get("eval"), col.version)
    lines += [
        "## Training",
        "",
        f"- run: `{header.run_id}`, clora {header.clora_version}",
        f"- parent: {f'collection v{parent_version}' if parent_version else 'none (a full distill)'}",
        f"- distill steps: {cfg.steps}",
        f"- rank {header.rank}, alpha {header.alpha:g}; target modules: "
        + ", ".join(f"`{m}`" for m in header.target_modules),
        f"- resolution: {header.resolution or cfg.data.resolution or '-'}",
        f"- teachers: {cfg.teachers.steps or '-'} steps, guidance {_cell(cfg.teachers.guidance)}",
        "",
    ]
    return "\n".join(lines)


def _sampling(header: UnifiedHeader) -> list[str]:
    """The card's few-step sampler settings."""
    steps = len(header.few_step_sigmas)
    sigmas = ", ".join(f"{s:.6g}" for s in header.few_step_sigmas)
    return [
        "",
        "## Sampling",
        "",
        f"- steps: {steps}; at each noise level the model predicts the clean image, which is re-noised to "
        "the next level with fresh noise (the last prediction is the result)",
        f"- noise levels (sigmas, shift applied): [{sigmas}]",
        f"- shift: {header.shift:g}",
        *_own_levels(header),
        "- guidance: none (CFG scale 1)",
        "",
    ]


def _own_levels(header: UnifiedHeader) -> list[str]:
    """The card's lines for effects sampled with levels of their own (their result varies with the
    seed; they were trained at those levels)."""
    own: dict[str, list[str]] = {}
    for name in sorted(header.effects):
        fields = header.effects[name]
        if "few_step_sigmas" in fields:
            levels = ", ".join(f"{s:.6g}" for s in fields["few_step_sigmas"])
            own.setdefault(f"shift {fields['shift']:g}, sigmas [{levels}]", []).append(name)
    return [
        f"- {', '.join(names)} (their result varies with the seed): {levels}; a prompt with one of them "
        "samples with these"
        for levels, names in own.items()
    ]


def _usage(fmt: str, usage: str | None, version: int, lora_name: str, first: str, steps: int) -> list[str]:
    """How to run the export: the base's diffusers pipeline, peft, ComfyUI, clora."""
    lines = ["## Usage", ""]
    if usage:
        lines += ["With the model's own diffusers pipeline:", "", "```python", usage.rstrip(), "```", ""]
    if fmt == "peft":
        lines += [
            "With peft, on the base model's transformer:",
            "",
            "```python",
            "from peft import PeftModel",
            "",
            "# transformer: the base model's diffusers transformer; sample as above",
            'transformer = PeftModel.from_pretrained(transformer, "path/to/this/folder")',
            "```",
            "",
        ]
    if fmt == "comfyui":
        lines += [
            "In ComfyUI: put the file in `models/loras` and load it with a LoRA loader node on the model "
            f"(`LoraLoaderModelOnly`); sample {steps} steps at CFG 1 with the sigmas above and a sampler "
            "that predicts the clean image and re-noises it (`lcm`).",
            "",
        ]
    lines += ["With clora, in the workspace that distilled it:", "", "```bash"]
    lines += [f"clora generate --collection {version} --effect {first} --image input.png", "```", ""]
    if fmt == "diffusers":
        lines += [
            "or in Python:",
            "",
            "```python",
            "from clora.generate import UnifiedModel",
            "from clora.plugins import Components, get_plugin_manager",
            "",
            f'model = UnifiedModel.load(Components.collect(get_plugin_manager()), "{lora_name}")',
            f'edited = model.edit(images, ["{first}"])  # images: [B, 3, H, W] in [0, 1]',
            "```",
            "",
        ]
    return lines


def _evaluation(result: dict[str, Any] | None, version: int) -> list[str]:
    lines = ["## Evaluation", ""]
    if not result:
        return [*lines, f"Not evaluated: `clora eval --collection {version}` was not run.", ""]
    steps = result.get("steps") or {}
    lines += [
        f"`clora eval` on {result.get('n_images', '-')} held-out images per effect, PSNR in dB (student: "
        f"{steps.get('student', '-')} steps; teacher: the effect's own LoRA, {steps.get('teacher') or '-'} "
        "steps with guidance).",
        "",
        "| effect | student vs truth | teacher vs truth | student vs teacher |",
        "|---|---|---|---|",
    ]
    keys = ("student_vs_truth", "teacher_vs_truth", "student_vs_teacher")
    for name, row in sorted((result.get("effects") or {}).items()):
        lines.append(f"| {_cell(name)} | " + " | ".join(_db(row.get(k)) for k in keys) + " |")
    overall = result.get("overall") or {}
    lines.append("| mean | " + " | ".join(_db(overall.get(k)) for k in keys) + " |")
    bleed = result.get("bleeding") or {}
    teachers = bleed.get("teacher_bleed_rate")
    lines += [
        "",
        f"Bleed rate (outputs nearest another effect's {bleed.get('reference') or 'reference'}): "
        f"{_rate(bleed.get('bleed_rate'))}"
        + (f"; the teachers' own: {_rate(teachers)}." if teachers is not None else "."),
        "",
    ]
    return lines
