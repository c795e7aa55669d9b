"""The embedded default base model: a tiny Qwen-Image-Edit world built from nothing on a CPU.

Registers the backbones ``toy`` and ``toy-tiny`` and the ``clora toy`` commands. Importing this
package stays cheap (no torch); models, data and training load on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from clora import hookimpl

if TYPE_CHECKING:
    import typer


@hookimpl
def register_backbones(register: Callable[[Any], None]) -> None:
    from clora_toy.factory import FACTORIES

    for factory in FACTORIES:
        register(factory)


@hookimpl
def register_commands(app: typer.Typer) -> None:
    from clora_toy.cli import toy_app

    app.add_typer(toy_app(), name="toy", help="Build the embedded toy base model and its teacher LoRAs.")
