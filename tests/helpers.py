"""Test helpers: a plugin manager with chosen extra plugins, and a CLI runner."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pluggy
from typer.testing import CliRunner

from clora.cli import make_app
from clora.plugins import get_plugin_manager


def plugin_manager(*extra: object, entrypoints: bool = True) -> pluggy.PluginManager:
    pm = get_plugin_manager(load_entrypoints=entrypoints)
    for plugin in extra:
        pm.register(plugin, name=getattr(plugin, "__name__", None))
    return pm


def run(pm: pluggy.PluginManager, *args: str):  # type: ignore[no-untyped-def]
    """Invoke the CLI built from ``pm`` with ``args``; returns click's Result."""
    return CliRunner().invoke(make_app(pm), [str(a) for a in args])


def file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def add_bare_effect(reg, name: str, prompt: str = "apply the effect"):  # type: ignore[no-untyped-def]
    """Insert an effect row directly (registry-level tests that need no LoRA file)."""
    return reg.add_effect(
        trigger=None,
        name=name,
        lora_path="/x",
        lora_sha256="0" * 64,
        lora_size=1,
        lora_format="peft",
        rank=4,
        alpha=4.0,
        target_modules_json="[]",
        base_id=None,
        teacher_prompt=prompt,
        caption=None,
        examples_dir=None,
    )
