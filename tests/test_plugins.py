"""Plugin discovery, blocking, unique ids, `clora plugins`, and the hookspecs' documentation."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ShapesOnlyFactory, ShapesOnlyPlugin
from helpers import plugin_manager, run

from clora import hookimpl, hookspecs
from clora.errors import DuplicateIdError
from clora.plugins import KINDS, Components

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_plugins_load_through_entry_points() -> None:
    pm = plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"clora_toy", "clora_lora_formats"} <= names
    comps = Components.collect(pm)
    assert {"diffusers", "peft", "kohya"} <= set(comps.ids("teacher_providers"))


def test_plugins_json_shape() -> None:
    r = run(plugin_manager(ShapesOnlyPlugin()), "plugins", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name["shapes_only"]) == {"name", "version", "hooks", "registers"}
    assert by_name["shapes_only"]["hooks"] == ["register_backbones"]
    assert by_name["shapes_only"]["registers"] == {"backbones": ["shapes-only"]}
    assert by_name["clora_lora_formats"]["version"]  # versions come from the distribution
    assert "shapes_only" in run(plugin_manager(ShapesOnlyPlugin()), "plugins").stdout


def test_disable_plugins_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLORA_DISABLE_PLUGINS", "clora_lora_formats, other")
    pm = plugin_manager()
    assert pm.get_plugin("clora_lora_formats") is None
    assert "kohya" not in Components.collect(pm).ids("teacher_providers")
    names = [row["name"] for row in json.loads(run(pm, "plugins", "--json").stdout)]
    assert "clora_lora_formats" not in names


class _Dup:
    __name__ = "dup_plugin"

    @hookimpl
    def register_backbones(self, register):  # type: ignore[no-untyped-def]
        register(ShapesOnlyFactory())


def test_duplicate_id_names_both_plugins() -> None:
    pm = plugin_manager(ShapesOnlyPlugin(), _Dup())
    with pytest.raises(DuplicateIdError, match=r"shapes_only.*dup_plugin"):
        Components.collect(pm)
    r = run(pm, "plugins")
    assert r.exit_code != 0


def test_misspelled_hook_fails_at_start() -> None:
    import pluggy

    class Typo:
        @hookimpl
        def register_backbone(self, register):  # type: ignore[no-untyped-def]
            pass

    from clora.plugins import get_plugin_manager

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_third_party_plugin_installed_from_its_package(tmp_path: Path) -> None:
    """The example package, installed by pip, is found through its entry point alone."""
    target = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(target),
        str(ROOT / "examples" / "clora-example-plugin"),
    ]
    subprocess.run(pip, check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-m", "clora", "plugins", "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["clora_example"]["registers"] == {"captioners": ["prompt-copy"]}
    assert rows["clora_example"]["version"] == "0.1.0"


def test_every_hookspec_is_documented() -> None:
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "clora_spec")]
    assert len(specs) == len(KINDS) + 1
    readme = (ROOT / "README.md").read_text()
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert doc.splitlines()[0].endswith("."), spec.__name__
        for param in inspect.signature(spec).parameters:
            assert f":param {param}:" in doc, (spec.__name__, param)
        assert f"`{spec.__name__}" in readme, f"{spec.__name__} missing from README"
    assert {hook for hook, _ in KINDS.values()} < {s.__name__ for s in specs}
