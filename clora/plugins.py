"""The plugin manager and the registries of what plugins provide.

Plugins come in through one door: the ``clora`` entry-point group. ``CLORA_DISABLE_PLUGINS``
(comma-separated plugin names) blocks plugins; ``CLORA_TRACE_PLUGINS=1`` prints every hook call.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from clora import hookspecs
from clora.errors import DuplicateIdError, UnknownBackboneError, UnknownComponentError

#: kind -> (hook name, id attribute)
KINDS: dict[str, tuple[str, str]] = {
    "backbones": ("register_backbones", "backbone_id"),
    "base_kinds": ("register_base_kinds", "kind_id"),
    "teacher_providers": ("register_teacher_providers", "format_id"),
    "captioners": ("register_captioners", "captioner_id"),
    "routers": ("register_routers", "router_id"),
    "loss_terms": ("register_loss_terms", "loss_id"),
    "metrics": ("register_metrics", "metric_id"),
}


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
class Components:
    """Everything the loaded plugins registered, by kind and id."""

    pm: pluggy.PluginManager
    items: dict[str, dict[str, Registered]] = field(default_factory=dict)

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> Components:
        """Call every ``register_*`` hook, one plugin at a time, so each id knows its plugin."""
        comps = cls(pm)
        for kind, (hook_name, id_attr) in KINDS.items():
            found: dict[str, Registered] = {}
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                impl.function(register=comps._registrar(kind, id_attr, impl.plugin_name, found))
            comps.items[kind] = found
        return comps

    @staticmethod
    def _registrar(
        kind: str, id_attr: str, plugin: str, found: dict[str, Registered]
    ) -> Callable[[Any], None]:
        def register(obj: Any) -> None:
            obj_id = getattr(obj, id_attr, None)
            if not isinstance(obj_id, str) or not obj_id:
                raise UnknownComponentError(
                    f"plugin '{plugin}' registered a {kind[:-1].replace('_', ' ')} without a string "
                    f"'{id_attr}'"
                )
            if obj_id in found:
                raise DuplicateIdError(
                    f"{id_attr} '{obj_id}' is registered by both plugin '{found[obj_id].plugin}' and "
                    f"plugin '{plugin}'; uninstall one or block it with CLORA_DISABLE_PLUGINS={plugin}"
                )
            found[obj_id] = Registered(kind, obj_id, plugin, obj)

        return register

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

    def get_backbone(self, backbone_id: str) -> Any:
        return self.get("backbones", backbone_id)

    def get_base_kind(self, kind_id: str) -> Any:
        return self.get("base_kinds", kind_id)

    def get_router(self, router_id: str) -> Any:
        return self.get("routers", router_id)

    def get_captioner(self, captioner_id: str) -> Any:
        return self.get("captioners", captioner_id)

    def get_loss_term(self, loss_id: str) -> Any:
        return self.get("loss_terms", loss_id)

    def get_metric(self, metric_id: str) -> Any:
        return self.get("metrics", metric_id)

    def teacher_providers(self) -> list[Any]:
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
