"""The CollectionLoRA loss terms: DMD, target simulation, trajectory anchoring, the critic's flow matching."""

from __future__ import annotations

from typing import Any

from clora import hookimpl


@hookimpl
def register_loss_terms(register: Any) -> None:
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
