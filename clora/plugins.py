"""The plugin manager and the registries of what plugins provide.

Plugins come in through one door: the ``clora`` entry-point group. ``CLORA_DISABLE_PLUGINS``
(comma-separated plugin names) blocks plugins; ``CLORA_TRACE_PLUGINS=1`` prints every hook call to
stderr, each ``register`` argument naming the plugin it was given to.
"""

from __future__ import annotations

import os
import sys
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple

import pluggy

from clora import hookspecs
from clora.contracts import (
    BackboneFactory,
    BaseKind,
    Captioner,
    LossTerm,
    Metric,
    Router,
    TeacherProvider,
)
from clora.errors import DuplicateIdError, UnknownBackboneError, UnknownComponentError


class Kind(NamedTuple):
    """One kind of object plugins register."""

    #: the ``register_*`` hook that registers it
    hook: str
    #: the attribute holding its unique id
    id_attr: str
    #: the contract class in :mod:`clora.contracts`
    contract: type
    #: the members every object must have besides its id: its contract's methods without a default
    #: and attributes without a class default
    needs: tuple[str, ...]


KINDS: dict[str, Kind] = {
    "backbones": Kind("register_backbones", "backbone_id", BackboneFactory, ("load", "module_shapes")),
    "base_kinds": Kind("register_base_kinds", "kind_id", BaseKind, ("detect", "factory")),
    "teacher_providers": Kind("register_teacher_providers", "format_id", TeacherProvider, ("sniff", "parse")),
    "captioners": Kind("register_captioners", "captioner_id", Captioner, ("caption",)),
    "routers": Kind("register_routers", "router_id", Router, ("choose",)),
    "loss_terms": Kind("register_loss_terms", "loss_id", LossTerm, ("__call__",)),
    "metrics": Kind("register_metrics", "metric_id", Metric, ("__call__", "higher_is_better")),
}


def contract_problems(kind: str, obj: object) -> list[str]:
    """What keeps ``obj`` from being a ``kind`` (``"routers"``, ...): missing members and attributes of
    the wrong type, one short phrase each; empty when it fits its contract."""
    spec = KINDS[kind]
    if isinstance(obj, type):
        return [f"it is the class {obj.__name__}, not an object; register {obj.__name__}()"]
    problems = []
    obj_id = getattr(obj, spec.id_attr, None)
    if not isinstance(obj_id, str) or not obj_id:
        problems.append(f"no string {spec.id_attr}")
    for name in spec.needs:
        if callable(getattr(spec.contract, name, None)):
            if not callable(obj if name == "__call__" else getattr(obj, name, None)):
                problems.append(f"no method {name}()")
        elif not hasattr(obj, name):
            problems.append(f"no {name}")
    for name, allowed in _typed_attributes(spec.contract).items():
        value = getattr(obj, name, None)
        if name != spec.id_attr and value is not None and not _fits(value, allowed):
            problems.append(f"{name} is {value!r}, not {_describe(allowed)}")
    return problems


@cache
def _typed_attributes(contract: type) -> dict[str, Any]:
    """The contract's attributes annotated ``str``, ``bool`` or a ``Literal``: their values are checked."""
    return {
        name: hint
        for name, hint in typing.get_type_hints(contract).items()
        if hint in (str, bool) or typing.get_origin(hint) is typing.Literal
    }


def _fits(value: object, allowed: Any) -> bool:
    if typing.get_origin(allowed) is typing.Literal:
        return value in typing.get_args(allowed)
    return isinstance(value, allowed)


def _describe(allowed: Any) -> str:
    if typing.get_origin(allowed) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(allowed))
    return f"a {allowed.__name__}"


def disabled_plugins() -> set[str]:
    return {p.strip() for p in os.environ.get("CLORA_DISABLE_PLUGINS", "").split(",") if p.strip()}


def get_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs added and (by default) every installed plugin loaded."""
    pm = pluggy.PluginManager("clora")
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins():
        pm.set_blocked(name)
    if load_entrypoints:
        pm.load_setuptools_entrypoints("clora")
    # A misspelled hook name in a plugin fails here, at start-up, not silently later.
    pm.check_pending()
    if os.environ.get("CLORA_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    return pm


@dataclass
class Registered:
    """One object a plugin registered."""

    kind: str
    id: str
    plugin: str
    obj: Any


@dataclass
class Registrar:
    """The ``register`` callable one plugin's ``register_*`` hook is given: checks each object against
    its kind's contract and its id against the ids registered before it."""

    kind: str
    plugin: str
    found: dict[str, Registered]

    def __call__(self, obj: Any) -> None:
        spec = KINDS[self.kind]
        problems = contract_problems(self.kind, obj)
        if problems:
            obj_id = getattr(obj, spec.id_attr, None)
            named = f"'{obj_id}' " if isinstance(obj_id, str) and obj_id else ""
            what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
            raise UnknownComponentError(
                f"plugin '{self.plugin}' registered a {self.kind[:-1].replace('_', ' ')} {named}({what}) "
                f"that does not fit clora.contracts.{spec.contract.__name__}: {'; '.join(problems)}; "
                f"fix the plugin or block it with CLORA_DISABLE_PLUGINS={self.plugin}"
            )
        obj_id = getattr(obj, spec.id_attr)
        if obj_id in self.found:
            raise DuplicateIdError(
                f"{spec.id_attr} '{obj_id}' is registered by both plugin '{self.found[obj_id].plugin}' and "
                f"plugin '{self.plugin}'; uninstall one or block it with CLORA_DISABLE_PLUGINS={self.plugin}"
            )
        self.found[obj_id] = Registered(self.kind, obj_id, self.plugin, obj)

    def __repr__(self) -> str:  # the hook argument CLORA_TRACE_PLUGINS prints
        return f"<register {self.kind} of plugin '{self.plugin}'>"


@dataclass
class Components:
    """Everything the loaded plugins registered, by kind and id."""

    pm: pluggy.PluginManager
    items: dict[str, dict[str, Registered]] = field(default_factory=dict)

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> Components:
        """Call every ``register_*`` hook through pluggy, one plugin at a time, so each id knows its
        plugin (and ``CLORA_TRACE_PLUGINS`` shows each call)."""
        comps = cls(pm)
        for kind, spec in KINDS.items():
            found: dict[str, Registered] = {}
            impls = getattr(pm.hook, spec.hook).get_hookimpls()
            for impl in impls:
                others = [other.plugin for other in impls if other is not impl]
                only_this = pm.subset_hook_caller(spec.hook, remove_plugins=others)
                only_this(register=Registrar(kind, impl.plugin_name, found))
            comps.items[kind] = found
        return comps

    def ids(self, kind: str) -> list[str]:
        return sorted(self.items.get(kind, {}))

    def get(self, kind: str, obj_id: str) -> Any:
        """The object of ``kind`` with ``obj_id``, or an error listing what is installed."""
        try:
            return self.items[kind][obj_id].obj
        except KeyError:
            have = ", ".join(self.ids(kind)) or "none"
            label = kind[:-1].replace("_", " ")
            err = UnknownBackboneError if kind == "backbones" else UnknownComponentError
            raise err(
                f"no {label} '{obj_id}' is installed (installed: {have}); see `clora plugins`"
            ) from None

    def get_backbone(self, backbone_id: str) -> BackboneFactory:
        return self.get("backbones", backbone_id)

    def get_base_kind(self, kind_id: str) -> BaseKind:
        return self.get("base_kinds", kind_id)

    def get_router(self, router_id: str) -> Router:
        return self.get("routers", router_id)

    def get_captioner(self, captioner_id: str) -> Captioner:
        return self.get("captioners", captioner_id)

    def get_loss_term(self, loss_id: str) -> LossTerm:
        return self.get("loss_terms", loss_id)

    def get_metric(self, metric_id: str) -> Metric:
        return self.get("metrics", metric_id)

    def teacher_providers(self) -> list[TeacherProvider]:
        return [r.obj for r in self.items.get("teacher_providers", {}).values()]


def plugin_version(pm: pluggy.PluginManager, plugin: object) -> str | None:
    for dist_plugin, dist in pm.list_plugin_distinfo():
        if dist_plugin is plugin:
            return str(dist.version)
    return None


def describe_plugins(pm: pluggy.PluginManager, comps: Components) -> list[dict[str, Any]]:
    """The ``clora plugins --json`` shape: one dict per plugin, sorted by name."""
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda x: x[0]):
        if plugin is None:  # blocked
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        registers: dict[str, list[str]] = {}
        for kind, by_id in comps.items.items():
            mine = sorted(r.id for r in by_id.values() if r.plugin == name)
            if mine:
                registers[kind] = mine
        out.append(
            {"name": name, "version": plugin_version(pm, plugin), "hooks": hooks, "registers": registers}
        )
    return out
