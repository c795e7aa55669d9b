"""Hook specifications: what a clora plugin can implement.

A plugin is a module or object with functions named like these hooks, each decorated with
``clora.hookimpl``. Register a plugin package under the ``clora`` entry-point group::

    [project.entry-points.clora]
    my_plugin = "my_plugin"

Each ``register_*`` hook receives a ``register`` callable; call it once per object. Every object meets
its kind's contract in :mod:`clora.contracts` (checked when it is registered) and carries a unique id
attribute named there; registering an id that another plugin already registered is an error naming
both plugins. ``docs/plugins.md`` walks through writing a plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import typer

    from clora.contracts import (
        BackboneFactory,
        BaseKind,
        Captioner,
        LossTerm,
        Metric,
        Router,
        TeacherProvider,
    )

hookspec = pluggy.HookspecMarker("clora")
hookimpl = pluggy.HookimplMarker("clora")


@hookspec
def register_backbones(register: Callable[[BackboneFactory], None]) -> None:
    """Register base models.

    :param register: call with a :class:`clora.contracts.BackboneFactory`; its ``backbone_id`` is the
        base model id that effects and collections are bound to, and its ``load(device, dtype)``
        returns a :class:`clora.contracts.Backbone`.
    """


@hookspec
def register_base_kinds(register: Callable[[BaseKind], None]) -> None:
    """Register kinds of local model folders that ``clora base add NAME --path DIR`` can record.

    :param register: call with a :class:`clora.contracts.BaseKind`; its ``kind_id`` is stored on each
        base added with it, and its ``detect(model_index)`` lets ``clora base add`` find the kind of a
        folder from its ``model_index.json``.
    """


@hookspec
def register_teacher_providers(register: Callable[[TeacherProvider], None]) -> None:
    """Register readers that turn an effect's teacher (a LoRA file in some format) into an adapter.

    :param register: call with a :class:`clora.contracts.TeacherProvider` (defined in
        :mod:`clora.lora`); its ``format_id`` names the format (``peft``, ``diffusers``, ``kohya``,
        ...) and is stored on each effect.
    """


@hookspec
def register_captioners(register: Callable[[Captioner], None]) -> None:
    """Register captioners that write the student caption of an effect.

    :param register: call with a :class:`clora.contracts.Captioner`: a ``captioner_id`` and
        ``caption(effect) -> str`` (the effect's name, teacher prompt and example images are
        available on the argument).
    """


@hookspec
def register_routers(register: Callable[[Router], None]) -> None:
    """Register routers that choose the effects of each effect block of distillation steps.

    :param register: call with a :class:`clora.contracts.Router`: a ``router_id``, which the distill
        config picks, and ``choose(effects, new_effects, counts, config, rng) -> str``.
    """


@hookspec
def register_loss_terms(register: Callable[[LossTerm], None]) -> None:
    """Register named generator or critic loss terms.

    :param register: call with a :class:`clora.contracts.LossTerm`: a ``loss_id``, a ``role``
        (``"generator"``, the default, or ``"critic"``) and optionally ``off_policy = True`` (a
        generator term that needs no student sample, so it also trains in the anchoring phase); it
        is called with a :class:`clora.distill.losses.LossContext` and returns ``dict[str, Tensor]``
        of named losses. The distill config picks terms by id and gives each a weight.
    """


@hookspec
def register_metrics(register: Callable[[Metric], None]) -> None:
    """Register evaluation metrics.

    :param register: call with a :class:`clora.contracts.Metric`: a ``metric_id`` and
        ``higher_is_better``, called as ``metric(images, reference)`` on ``[B,3,H,W]`` tensors in
        [0,1] and returning one value per image. A metric that needs files (model weights) overrides
        ``unavailable()``: None when it can run, else a one-line note of what is missing, which
        ``clora eval`` reports before it starts.
    """


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add commands or command groups to the ``clora`` CLI.

    :param app: the root :class:`typer.Typer`; add commands with ``@app.command()`` or
        sub-groups with ``app.add_typer(...)``.
    """
