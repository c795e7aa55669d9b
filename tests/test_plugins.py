"""Plugin discovery, blocking, unique ids, contracts, tracing, `clora plugins`, and the plugin docs."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from conftest import ShapesOnlyFactory, ShapesOnlyPlugin
from helpers import plugin_manager, run

from clora import contracts, hookimpl, hookspecs
from clora.errors import DuplicateIdError, UnknownComponentError
from clora.plugins import KINDS, Components, contract_problems

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


def test_trace_plugins_shows_every_register_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLORA_TRACE_PLUGINS", "1")
    Components.collect(plugin_manager(ShapesOnlyPlugin()))
    err = capsys.readouterr().err
    assert "register_routers [hook]" in err
    assert "register: <register routers of plugin 'clora_routers'>" in err
    # one traced call per plugin, so two plugins' backbones are two calls, each naming its plugin
    assert "<register backbones of plugin 'clora_toy'>" in err
    assert "<register backbones of plugin 'shapes_only'>" in err


class _Registers:
    """A plugin named ``bad_plugin`` that registers ``obj`` as a ``kind``."""

    __name__ = "bad_plugin"

    def __init__(self, kind: str, obj: object) -> None:
        setattr(self, KINDS[kind].hook, hookimpl(lambda register: register(obj)))


class _NoChoose:
    router_id = "lazy"


class _TypoRole:
    loss_id = "typo"
    role = "critc"

    def __call__(self, ctx):  # type: ignore[no-untyped-def]
        return {}


class _DuckRouter:
    """Fits the Router contract without subclassing it."""

    router_id = "duck"

    def choose(self, effects, new_effects, counts, config, rng):  # type: ignore[no-untyped-def]
        return effects[0]


@pytest.mark.parametrize(
    ("kind", "obj", "problem"),
    [
        (
            "routers",
            _NoChoose(),
            r"a router 'lazy' \(_NoChoose\) that does not fit clora\.contracts\.Router: "
            r"no method choose\(\);",
        ),
        ("loss_terms", _TypoRole(), r"LossTerm: role is 'critc', not one of 'generator', 'critic';"),
        ("metrics", object(), r"Metric: no string metric_id; no method __call__\(\); no higher_is_better;"),
        ("routers", _DuckRouter, r"it is the class _DuckRouter, not an object; register _DuckRouter\(\)"),
    ],
)
def test_registration_checks_the_contract(kind: str, obj: object, problem: str) -> None:
    pm = plugin_manager(_Registers(kind, obj))
    with pytest.raises(UnknownComponentError, match=r"^plugin 'bad_plugin' registered .*" + problem) as e:
        Components.collect(pm)
    assert str(e.value).endswith("fix the plugin or block it with CLORA_DISABLE_PLUGINS=bad_plugin")
    r = run(pm, "plugins")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "bad_plugin" in r.stderr


def test_an_object_with_the_contracts_members_fits_without_subclassing() -> None:
    assert contract_problems("routers", _DuckRouter()) == []
    router = Components.collect(plugin_manager(_Registers("routers", _DuckRouter()))).get_router("duck")
    assert router.choose(["a", "b"], [], {}, None, None) == "a"  # type: ignore[arg-type]


def test_builtin_objects_subclass_their_contracts() -> None:
    comps = Components.collect(plugin_manager())
    for kind in ("backbones", "base_kinds", "captioners", "routers", "loss_terms", "metrics"):
        assert comps.items[kind]
        for reg in comps.items[kind].values():
            assert KINDS[kind].contract in type(reg.obj).__mro__, (kind, reg.id)


def test_kinds_list_every_required_member_of_their_contract() -> None:
    for kind, spec in KINDS.items():
        assert spec.contract.__name__ in contracts.__all__, kind
        hints = typing.get_type_hints(spec.contract)
        assert spec.id_attr in hints, kind
        assert getattr(spec.contract, "__abstractmethods__", frozenset()) <= set(spec.needs), kind
        for name in spec.needs:
            assert hasattr(spec.contract, name) or name in hints, (kind, name)


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
    guide = (ROOT / "docs" / "plugins.md").read_text()
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert doc.splitlines()[0].endswith("."), spec.__name__
        for param in inspect.signature(spec).parameters:
            assert f":param {param}:" in doc, (spec.__name__, param)
        assert f"`{spec.__name__}" in guide, f"{spec.__name__} missing from docs/plugins.md"
    for kind in KINDS.values():
        contract = kind.contract.__name__
        assert f"clora.contracts.{contract}`" in (inspect.getdoc(getattr(hookspecs, kind.hook)) or "")
        assert f"`{contract}`" in guide and f"`{kind.id_attr}`" in guide, kind
    assert {kind.hook for kind in KINDS.values()} < {s.__name__ for s in specs}


def test_the_plugin_guide_sketches_register() -> None:
    """Every plugin sketch in docs/plugins.md registers as it stands (all together: their ids are unique)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "plugins.md").read_text(), re.S)
    sketches = []
    for i, code in enumerate(b for b in blocks if "@hookimpl" in b):
        module = types.ModuleType(f"docs_sketch_{i}")
        exec(compile(code, module.__name__, "exec"), module.__dict__)
        sketches.append(module)
    pm = plugin_manager(*sketches)
    comps = Components.collect(pm)
    mine = {
        kind: sorted(r.id for r in by_id.values() if r.plugin.startswith("docs_sketch"))
        for kind, by_id in comps.items.items()
    }
    assert all(mine.values()), mine  # a sketch for every kind
    assert run(pm, "hello", "--name", "Ada").stdout == "hello Ada\n"
