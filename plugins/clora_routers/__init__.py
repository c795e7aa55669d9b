"""Routers: which effect each effect-stream block of distillation steps trains.

A router (:class:`clora.contracts.Router`) has a ``router_id`` and ``choose(effects, new_effects, counts,
config, rng) -> str``: an effect of the next effect block, given every effect's pick count so far. With
``effects_per_batch`` k > 1 the loop asks k times, leaving out the effects already picked. Whether a block is
an effect or a general block is the loop's coin flip (``p_switch``), not the router's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from clora import hookimpl
from clora.contracts import Router

if TYPE_CHECKING:
    from clora.distill.config import DistillConfig


def _least_used(names: Sequence[str], counts: Mapping[str, int], rng: random.Random) -> str:
    low = min(counts.get(n, 0) for n in names)
    return rng.choice([n for n in names if counts.get(n, 0) == low])


class BalancedRouter(Router):
    """Each effect gets the same number of blocks; in incremental runs new effects get a fixed share."""

    router_id = "balanced"

    def choose(
        self,
        effects: Sequence[str],
        new_effects: Sequence[str],
        counts: Mapping[str, int],
        config: DistillConfig,
        rng: random.Random,
    ) -> str:
        old = [e for e in effects if e not in set(new_effects)]
        if new_effects and old:
            pool = list(new_effects) if rng.random() < config.incremental.new_effect_share else old
        else:
            pool = list(effects)
        return _least_used(pool, counts, rng)


class FileOrderRouter(Router):
    """Effects in registry order, round robin (the reference implementation's behaviour)."""

    router_id = "file-order"

    def choose(
        self,
        effects: Sequence[str],
        new_effects: Sequence[str],
        counts: Mapping[str, int],
        config: DistillConfig,
        rng: random.Random,
    ) -> str:
        return effects[sum(counts.values()) % len(effects)]


@hookimpl
def register_routers(register: Callable[[Router], None]) -> None:
    register(BalancedRouter())
    register(FileOrderRouter())
