"""Base models: the fixed ones plugins register (the toy) and local model folders a user records.

``clora base add NAME --path DIR`` reads ``DIR/model_index.json``, asks every registered
:class:`clora.backbone.BaseKind` whether it knows the pipeline, and records the folder under NAME
with its kind, options and a cheap fingerprint (configs plus the safetensors headers and sizes; no
hash of tens of GB). :func:`get_factory` is the one way from a base id to a
:class:`clora.backbone.BackboneFactory`: a recorded folder first, else a plugin's fixed base.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from clora.backbone import BackboneFactory, BaseKind
from clora.errors import CloraError, UnknownBackboneError
from clora.plugins import Components
from clora.registry import BaseModelRow, Registry

BASE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: files of a diffusers folder that decide its behaviour besides the weights
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja")
_MAX_CONFIG_BYTES = 64 * 2**20


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), read without the weights."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too large")
            header: dict[str, Any] = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise CloraError(f"{path} is not a readable safetensors file ({e})") from None
    return header


def folder_fingerprint(folder: Path) -> str:
    """A short hash of a model folder's configs and its safetensors files' names, sizes and headers."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        rel = p.relative_to(folder).as_posix()
        if p.suffix == ".safetensors":
            h.update(f"{rel}:{p.stat().st_size}:".encode())
            h.update(json.dumps(safetensors_header(p), sort_keys=True).encode())
        elif p.suffix in _CONFIG_SUFFIXES and p.stat().st_size <= _MAX_CONFIG_BYTES:
            h.update(f"{rel}:".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def weights_info(folder: Path) -> dict[str, Any]:
    """Parameters, bytes and the main dtype of each component's safetensors files (``transformer``...)."""
    out: dict[str, Any] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(sub.glob("*.safetensors"))
        if not files:
            continue
        params, dtypes = 0, Counter[str]()
        for f in files:
            for name, t in safetensors_header(f).items():
                if name == "__metadata__":
                    continue
                n = 1
                for d in t["shape"]:
                    n *= int(d)
                params += n
                dtypes[str(t["dtype"])] += n
        out[sub.name] = {
            "parameters": params,
            "bytes": sum(f.stat().st_size for f in files),
            "dtype": _DTYPE_NAMES.get(dtypes.most_common(1)[0][0], dtypes.most_common(1)[0][0].lower())
            if dtypes
            else None,
        }
    return out


_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def read_model_index(folder: Path) -> dict[str, Any]:
    """``model_index.json`` of a diffusers folder, or a one-line error saying what the folder lacks."""
    if not folder.is_dir():
        raise CloraError(f"base model folder not found: {folder}")
    index = folder / "model_index.json"
    if not index.is_file():
        raise CloraError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); pass the folder "
            "`pipeline.save_pretrained` wrote or a downloaded model snapshot"
        )
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise CloraError(f"{index} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CloraError(f"{index} does not hold a JSON object")
    return data


def detect_kind(components: Components, folder: Path) -> BaseKind:
    """The registered base kind that recognises ``folder``'s pipeline, or a one-line error."""
    index = read_model_index(folder)
    for kind_id in components.ids("base_kinds"):
        kind = components.get_base_kind(kind_id)
        if kind.detect(index):
            return kind
    known = ", ".join(components.ids("base_kinds")) or "none installed"
    raise CloraError(
        f"{folder} holds a {index.get('_class_name', 'unknown')} pipeline, which clora cannot load "
        f"(supported kinds: {known}); see `clora plugins` for base-model plugins"
    )


def parse_options(kind: BaseKind, values: list[str] | None) -> dict[str, str]:
    """``--option KEY=VALUE`` values, checked against the kind's options."""
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CloraError(f"--option takes KEY=VALUE, got {item!r}")
        if key not in kind.options:
            have = ", ".join(sorted(kind.options)) or "none"
            raise CloraError(f"base kind '{kind.kind_id}' has no option '{key}' (options: {have})")
        out[key] = value.strip()
    return out


def add_base(
    registry: Registry,
    components: Components,
    name: str,
    path: str | Path,
    kind_id: str | None = None,
    options: list[str] | None = None,
    replace: bool = False,
) -> BaseModelRow:
    """Check a model folder and record it as base ``name``; nothing is written when a check fails."""
    if not BASE_NAME_RE.fullmatch(name) or ".." in name:
        raise CloraError(
            f"invalid base name {name!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a "
            "letter or digit"
        )
    if name in components.ids("backbones"):
        raise CloraError(f"'{name}' is the id of an installed base model plugin; pick another name")
    folder = Path(path).expanduser().resolve()
    read_model_index(folder)
    if kind_id:
        kind = components.get_base_kind(kind_id)
        try:
            detected: BaseKind | None = detect_kind(components, folder)
        except CloraError:
            detected = None  # a pipeline no kind knows: the user says what it is
        if detected is not None and detected.kind_id != kind.kind_id:
            raise CloraError(
                f"{folder} holds a {detected.kind_id} pipeline, not {kind.kind_id}; leave --kind out"
            )
    else:
        kind = detect_kind(components, folder)
    opts = parse_options(kind, options)
    factory = kind.factory(name, folder, opts)  # checks the folder's components and the options
    info = {**factory.info(), "weights": weights_info(folder)}
    return registry.add_base(
        name=name,
        kind=kind.kind_id,
        path=str(folder),
        options=opts,
        fingerprint=factory.fingerprint,
        info=info,
        replace=replace,
    )


def get_factory(components: Components, registry: Registry | None, base_id: str) -> BackboneFactory:
    """The factory of base ``base_id``: a folder recorded in ``registry``, else a plugin's fixed base."""
    row = registry.get_base(base_id) if registry is not None else None
    if row is not None:
        kind = components.get_base_kind(row.kind)
        return kind.factory(row.name, Path(row.path), row.options)
    try:
        return components.get_backbone(base_id)
    except UnknownBackboneError:
        recorded = [b.name for b in registry.list_bases()] if registry is not None else []
        have = ", ".join(components.ids("backbones") + recorded) or "none"
        raise UnknownBackboneError(
            f"no base '{base_id}' (bases: {have}); record a model folder with "
            f"`clora base add {base_id} --path DIR` or see `clora base list`"
        ) from None


def describe_bases(components: Components, registry: Registry | None) -> list[dict[str, Any]]:
    """Every base: the plugins' fixed ones, then the recorded folders (``clora base list --json``)."""
    rows: list[dict[str, Any]] = []
    for backbone_id in components.ids("backbones"):
        factory = components.get_backbone(backbone_id)
        rows.append({"name": backbone_id, "source": "plugin", **factory.info()})
    for row in registry.list_bases() if registry is not None else []:
        rows.append(
            {
                "name": row.name,
                "source": "folder",
                "kind": row.kind,
                "path": row.path,
                "options": row.options,
                "fingerprint": row.fingerprint,
                **{k: v for k, v in row.info.items() if k != "kind"},
                "added_at": row.created_at,
            }
        )
    return rows
