"""What every command shares: the app state on ``ctx.obj``, JSON printing and error handling."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pluggy
import typer
from rich.console import Console
from typer.core import TyperGroup

from clora.errors import CloraError
from clora.plugins import Components
from clora.registry import Registry

console = Console()

#: ``--device`` and ``--dtype`` of the commands that run a base model
DeviceOption = Annotated[str, typer.Option("--device", help="Torch device: cpu, cuda, cuda:1 ...")]
DtypeOption = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="float32, bfloat16 or float16 for the base model (default: bfloat16 for real bases on CUDA, "
        "else float32; trained LoRAs stay float32).",
    ),
]


class CloraGroup(TyperGroup):
    """Turns any :class:`CloraError`, and an option value out of range or of the wrong type, into a
    one-line ``Error: ...`` and exit code 1 (a missing or unknown option stays click's usage error)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CloraError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(1) from None
        except typer.BadParameter as e:
            if any(c.__name__ == "MissingParameter" for c in type(e).__mro__):
                raise
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            typer.echo(f"Error: {e.format_message()}{where}", err=True)
            raise typer.Exit(1) from None


@dataclass
class AppState:
    """What every command can reach through ``ctx.obj``."""

    pm: pluggy.PluginManager
    registry_file: Path
    _components: Components | None = field(default=None, repr=False)

    @property
    def components(self) -> Components:
        if self._components is None:
            self._components = Components.collect(self.pm)
        return self._components

    @contextlib.contextmanager
    def open_registry(self, create: bool = True) -> Iterator[Registry]:
        """The registry file; with ``create=False`` a missing file is an error instead of a new one."""
        reg = Registry(self.registry_file, create=create)
        try:
            yield reg
        finally:
            reg.close()

    def registry_exists(self) -> bool:
        return self.registry_file.exists()


def state(ctx: typer.Context) -> AppState:
    obj = ctx.find_root().obj
    assert isinstance(obj, AppState)
    return obj


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))
