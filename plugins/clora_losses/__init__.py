"""The CollectionLoRA loss terms: DMD, target simulation, trajectory anchoring, the critic's flow matching."""

from __future__ import annotations

from collections.abc import Callable

from clora import hookimpl
from clora.contracts import LossTerm


@hookimpl
def register_loss_terms(register: Callable[[LossTerm], None]) -> None:
    from clora_losses.terms import (
        AnchorTerm,
        CriticFlowMatchingTerm,
        DMDTerm,
        LevelAnchorTerm,
        SimulatedAnchorTerm,
        TargetSimulationTerm,
    )

    terms = (
        DMDTerm(),
        TargetSimulationTerm(),
        AnchorTerm(),
        LevelAnchorTerm(),
        SimulatedAnchorTerm(),
        CriticFlowMatchingTerm(),
    )
    for term in terms:
        register(term)
