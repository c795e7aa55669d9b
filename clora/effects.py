"""Registering effects: validate the name, read the LoRA, check it fits the base, allocate a trigger."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from clora.bases import get_factory
from clora.errors import CloraError, InvalidNameError
from clora.lora import check_fits, read_lora
from clora.plugins import Components
from clora.registry import RETIRED, Effect, Registry

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_BASE_KEY = "default_base"


def validate_name(name: str) -> None:
    """Raise unless ``name`` is a safe identifier (no path separators, no '..', 1-64 chars)."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid effect name {name!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a "
            "letter or digit, without '..' or path separators"
        )


def list_images(folder: str | os.PathLike[str], what: str = "examples folder") -> list[Path]:
    """Image files directly inside ``folder`` (the ``what`` of the messages), sorted by name."""
    d = Path(folder)
    if not d.is_dir():
        raise CloraError(f"{what} not found: {d}")
    images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CloraError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {what} {d}")
    return images


def check_examples(folder: str | os.PathLike[str]) -> list[Path]:
    """The images of an examples folder, each opened and decoded now: a bad one would otherwise stop a
    distill much later."""
    from PIL import Image, UnidentifiedImageError

    from clora.images import IMAGE_ERRORS

    images = list_images(folder)
    bad = []
    for path in images:
        try:
            with Image.open(path) as im:
                im.load()
        except IMAGE_ERRORS as e:
            why = (
                "too large to read safely"
                if isinstance(e, Image.DecompressionBombError)
                else "not an image"
                if isinstance(e, UnidentifiedImageError)
                else (str(e).splitlines() or [e.__class__.__name__])[0]
            )
            bad.append(f"{path.name}: {why}")
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CloraError(
            f"examples folder {folder}: {len(bad)} of {len(images)} image(s) cannot be read: "
            f"{'; '.join(bad[:3])}{more}; fix or remove them"
        )
    return images


def resolve_base(registry: Registry, base: str | None) -> str | None:
    """The base an effect binds to: ``base``, else the workspace default, else None (unbound)."""
    return base or registry.get_setting(DEFAULT_BASE_KEY) or None


def add_effect(
    registry: Registry,
    components: Components,
    *,
    name: str,
    lora_path: str | os.PathLike[str],
    prompt: str,
    base: str | None = None,
    trigger: str | None = None,
    examples: str | os.PathLike[str] | None = None,
    caption: str | None = None,
) -> Effect:
    """Validate everything first, then insert in one transaction: a failure leaves the registry unchanged."""
    validate_name(name)
    if not prompt.strip():
        raise CloraError("the teacher prompt is empty; pass the prompt the LoRA was trained with (--prompt)")
    if base is None:  # a removed member added back binds to its old base unless told otherwise
        retired = next((e for e in registry.list_effects(retired=True) if e.name == name), None)
        base = retired.base_id if retired is not None and retired.status == RETIRED else None
    examples_dir = None
    if examples is not None:
        check_examples(examples)
        examples_dir = str(Path(examples).resolve())
    return registry.add_effect(
        name=name,
        trigger=trigger,
        teacher_prompt=prompt.strip(),
        caption=caption,
        examples_dir=examples_dir,
        **_lora_fields(registry, components, lora_path, base),
    )


def _lora_fields(
    registry: Registry, components: Components, lora_path: str | os.PathLike[str], base: str | None
) -> dict[str, Any]:
    """Read and check a LoRA file against the base; the registry columns that describe it."""
    base_id = resolve_base(registry, base)
    shapes = get_factory(components, registry, base_id).module_shapes() if base_id else None
    lora = read_lora(lora_path, components.teacher_providers(), module_names=shapes)
    if base_id and shapes is not None:
        check_fits(lora.modules, shapes, base_id)
    return {
        "lora_path": str(lora.path),
        "lora_sha256": lora.sha256,
        "lora_size": lora.size,
        "lora_format": lora.format_id,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "target_modules_json": json.dumps(lora.target_modules),
        "base_id": base_id,
        "status": "registered" if base_id else "unbound",
    }


def update_lora(
    registry: Registry,
    components: Components,
    name: str,
    lora_path: str | os.PathLike[str],
    base: str | None = None,
) -> Effect:
    """Give effect ``name`` a new (e.g. retrained) LoRA file; its trigger, prompt and caption stay."""
    current = registry.get_effect(name)
    if current.status == RETIRED:
        raise CloraError(
            f"effect '{name}' was removed (retired); add it back with `clora effect add {name} --lora FILE "
            "--prompt TEXT` (it keeps its trigger)"
        )
    return registry.replace_lora(
        name, **_lora_fields(registry, components, lora_path, base or current.base_id)
    )
