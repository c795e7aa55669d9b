"""What a plugin registers: one typed contract per kind of object, all importable from here.

Each ``register_*`` hook (:mod:`clora.hookspecs`) is given a ``register`` callable; a plugin calls it
once per object, and every object meets its kind's contract:

================================  ============================  ==================
hook                              contract                      unique id attribute
================================  ============================  ==================
``register_backbones``            :class:`BackboneFactory`      ``backbone_id``
``register_base_kinds``           :class:`BaseKind`             ``kind_id``
``register_teacher_providers``    :class:`TeacherProvider`      ``format_id``
``register_captioners``           :class:`Captioner`            ``captioner_id``
``register_routers``              :class:`Router`               ``router_id``
``register_loss_terms``           :class:`LossTerm`             ``loss_id``
``register_metrics``              :class:`Metric`               ``metric_id``
================================  ============================  ==================

Subclass the contract: its abstract methods must then be written before the class can be made, and the
optional members get their defaults. An object with the same members that does not subclass it is
accepted too. Either way clora checks each object when it is registered (a string id, every required
method and attribute, ``role`` and the flags of the right type; see
:func:`clora.plugins.contract_problems`) and fails with one line naming the plugin and what is missing.
An id must be unique within its kind across every installed plugin.

:class:`Captioner`, :class:`Router`, :class:`LossTerm` and :class:`Metric` are :class:`typing.Protocol`
classes, so a type checker accepts a matching object that does not subclass them. They are not
``runtime_checkable``: ``isinstance`` would demand the optional members too; use
:func:`~clora.plugins.contract_problems`.

:class:`BackboneFactory`, :class:`Backbone` and :class:`BaseKind` (ABCs, in :mod:`clora.backbone`) and
:class:`TeacherProvider` (a Protocol, in :mod:`clora.lora`) live beside the code that drives them and are
re-exported here.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from clora.backbone import Backbone, BackboneFactory, BaseKind, PromptEmbeds, RankRule
from clora.lora import LoraModule, TeacherProvider

if TYPE_CHECKING:
    import random

    import torch

    from clora.distill.config import DistillConfig
    from clora.distill.losses import LossContext
    from clora.registry.models import Effect

__all__ = [
    "Backbone",
    "BackboneFactory",
    "BaseKind",
    "Captioner",
    "LoraModule",
    "LossTerm",
    "Metric",
    "PromptEmbeds",
    "RankRule",
    "Role",
    "Router",
    "TeacherProvider",
]

#: which optimizer a loss term's gradients go to: the student's or the critic's
Role = Literal["generator", "critic"]


class Captioner(Protocol):
    """Writes the student caption of an effect (``register_captioners``).

    The student learns each effect under the prompt ``<trigger> <caption>``; the caption is stored on
    the effect and frozen into each run's plan. ``clora caption --captioner ID`` calls it, and so does
    ``clora distill`` for effects without a caption (its config's ``captioner`` field picks the id).
    """

    #: unique id (``template``, ...), the value of ``--captioner``
    captioner_id: str

    @abstractmethod
    def caption(self, effect: Effect) -> str:
        """The caption of ``effect``: one line describing the edited image, not the instruction.

        ``effect`` is a registry row; read ``effect.name``, ``effect.teacher_prompt`` (the instruction
        the effect's LoRA was trained with) and ``effect.examples_dir`` (a folder of source images, or
        None). The caption must not contain any effect's trigger word (the registry refuses it with
        a one-line error); raise ``clora.errors.CloraError`` with a next step when it cannot caption.
        """


class Router(Protocol):
    """Chooses which effects each effect block of distillation steps trains (``register_routers``).

    The loop decides by the config's ``p_switch`` whether a block is an effect block or a general-edit
    block (a ``1 - p_switch`` share of the blocks, evenly spaced, are general); for an effect block it
    calls :meth:`choose` once per effect the batch holds (``effects_per_batch``), each time leaving out
    the effects already chosen. The distill config's ``router`` field picks a router by id.
    """

    #: unique id (``balanced``, ``file-order``, ``gap``, ...), the value of the distill config's ``router``
    router_id: str
    #: True: the loop probes the student during training (``data.probe_every``) and passes each effect's
    #: latest probe PSNR to :meth:`choose` as ``probe_db``, its last few as ``probe_history``
    uses_probe: bool = False

    @abstractmethod
    def choose(
        self,
        effects: Sequence[str],
        new_effects: Sequence[str],
        counts: Mapping[str, int],
        config: DistillConfig,
        rng: random.Random,
    ) -> str:
        """The name of the next effect to train; must be one of ``effects``.

        :param effects: the effects that may be chosen now, in registry order (never empty).
        :param new_effects: those of ``effects`` that are new in an incremental run (empty otherwise).
        :param counts: how many times each effect was chosen so far in the run (absent: never).
        :param config: the run's :class:`~clora.distill.config.DistillConfig` (read only).
        :param rng: the run's seeded random generator; draw every random choice from it, so a run
            and its ``--resume`` choose alike.

        A router with ``uses_probe`` is also given ``probe_db=``: effect -> PSNR (dB) of the student's
        few-step samples against its teacher's outputs on the effect's held-out sources at the latest
        probe (absent: not probed yet); and ``probe_history=``: effect -> its last few probes, oldest
        first, each ``(times the effect was chosen by then, PSNR)``.
        """


class LossTerm(Protocol):
    """A named generator or critic loss (``register_loss_terms``).

    The config's ``losses`` maps loss ids to weights (``{"dmd": {"weight": 0.1}}``); each step the loop
    calls every picked term of the turn's role with a :class:`~clora.distill.losses.LossContext` (the
    step's sample, targets, model calls and config, and the shared math such as ``ctx.dmd_levels()``),
    weighs what it returns, and logs each name as ``loss/<name>``.
    """

    #: unique id, the key in the config's ``losses``
    loss_id: str
    #: ``"generator"``: its gradients train the student; ``"critic"``: they train the critic
    role: Role = "generator"
    #: True for a generator term that reads no student sample (only ``ctx.targets``), so it also trains
    #: in the anchoring phase on every row; the other terms run there only on the on-policy effects' rows
    off_policy: bool = False

    @abstractmethod
    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        """Named scalar losses of this batch (``{}`` when the term does not apply to it, e.g. a term
        that needs ``ctx.targets`` on a batch without them); each keeps its graph for backward."""


class Metric(Protocol):
    """An image metric ``clora eval`` scores with (``register_metrics``; ``clora eval --metrics ID``)."""

    #: unique id (``psnr``, ``lpips``, ...), the value of ``--metric`` and the key in the results
    metric_id: str
    #: True for similarities (PSNR, SSIM, CLIP), False for distances (LPIPS, DreamSim)
    higher_is_better: bool

    @abstractmethod
    def __call__(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """One value per image ``[B]`` comparing ``images`` with ``reference``: two ``[B, 3, H, W]``
        float tensors in ``[0, 1]`` of one size, on one device."""

    def unavailable(self) -> str | None:
        """None when the metric can run, else a one-line note of what is missing and where it goes
        (model weights are never downloaded); ``clora eval`` asks before it loads any model."""
        return None
