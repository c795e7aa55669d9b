"""Hook specifications: what a clora plugin can implement.

A plugin is a module or object with functions named like these hooks, each decorated with
``clora.hookimpl``. Register a plugin package under the ``clora`` entry-point group::

    [project.entry-points.clora]
    my_plugin = "my_plugin"

Each ``register_*`` hook receives a ``register`` callable; call it once per object. Every
object carries a unique id attribute (named in each hook); registering an id that another
plugin already registered is an error naming both plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

hookspec = pluggy.HookspecMarker("clora")
hookimpl = pluggy.HookimplMarker("clora")


@hookspec
def register_backbones(register: Callable[[Any], None]) -> None:
    """Register base models.

    :param register: call with a :class:`clora.backbone.BackboneFactory`; its ``backbone_id``
        is the base model id that effects and collections are bound to.
    """


@hookspec
def register_base_kinds(register: Callable[[Any], None]) -> None:
    """Register kinds of local model folders that ``clora base add NAME --path DIR`` can record.

    :param register: call with a :class:`clora.backbone.BaseKind`; its ``kind_id`` is stored on each
        base added with it, and its ``detect(model_index)`` lets ``clora base add`` find the kind of a
        folder from its ``model_index.json``.
    """


@hookspec
def register_teacher_providers(register: Callable[[Any], None]) -> None:
    """Register readers that turn an effect's teacher (a LoRA file in some format) into an adapter.

    :param register: call with a :class:`clora.lora.TeacherProvider`; its ``format_id`` names
        the format (``peft``, ``diffusers``, ``kohya``, ...) and is stored on each effect.
    """


@hookspec
def register_captioners(register: Callable[[Any], None]) -> None:
    """Register captioners that write the student caption of an effect.

    :param register: call with an object that has a ``captioner_id`` and a method
        ``caption(effect) -> str`` (the effect's name, teacher prompt and example images are
        available on the argument).
    """


@hookspec
def register_routers(register: Callable[[Any], None]) -> None:
    """Register routers that choose the stream and effect for each block of distillation steps.

    :param register: call with an object that has a ``router_id``; the distiller's config
        picks one by id.
    """


@hookspec
def register_loss_terms(register: Callable[[Any], None]) -> None:
    """Register named generator or critic loss terms.

    :param register: call with an object that has a ``loss_id``, a ``role`` (``"generator"``,
        the default, or ``"critic"``) and optionally ``off_policy = True`` (a generator term that
        needs no student sample, so it also trains in the anchoring phase); it is called with a
        :class:`clora.distill.losses.LossContext`. The distiller's config picks terms by id and
        gives each a weight. A term returns ``dict[str, Tensor]`` of named losses.
    """


@hookspec
def register_metrics(register: Callable[[Any], None]) -> None:
    """Register evaluation metrics.

    :param register: call with an object that has a ``metric_id`` and ``higher_is_better``, and
        is called as ``metric(images, reference)`` on ``[B,3,H,W]`` tensors in [0,1], returning one
        value per image. A metric that needs files (model weights) may add ``unavailable()``:
        None when it can run, else a one-line note of what is missing, which ``clora eval``
        reports before it starts.
    """


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add commands or command groups to the ``clora`` CLI.

    :param app: the root :class:`typer.Typer`; add commands with ``@app.command()`` or
        sub-groups with ``app.add_typer(...)``.
    """
