"""Routers: which effect each effect-stream block of distillation steps trains.

A router (:class:`clora.contracts.Router`) has a ``router_id`` and ``choose(effects, new_effects, counts,
config, rng) -> str``: an effect of the next effect block, given every effect's pick count so far. With
``effects_per_batch`` k > 1 the loop asks k times, leaving out the effects already picked. Whether a block is
an effect or a general block is the loop's choice (``p_switch``, evenly spaced), not the router's. A router
with ``uses_probe`` is also told each effect's PSNR against its teacher at the loop's latest probes.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from clora import hookimpl
from clora.contracts import Router

if TYPE_CHECKING:
    from clora.distill.config import DistillConfig


def _least_used(names: Sequence[str], counts: Mapping[str, int], rng: random.Random) -> str:
    low = min(counts.get(n, 0) for n in names)
    return rng.choice([n for n in names if counts.get(n, 0) == low])


def _pool(
    effects: Sequence[str], new_effects: Sequence[str], config: DistillConfig, rng: random.Random
) -> list[str]:
    """The effects to pick from: in an incremental run the new ones with probability
    ``incremental.new_effect_share``, else the old ones; otherwise all."""
    old = [e for e in effects if e not in set(new_effects)]
    if new_effects and old:
        return list(new_effects) if rng.random() < config.incremental.new_effect_share else old
    return list(effects)


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
        return _least_used(_pool(effects, new_effects, config, rng), counts, rng)


class _ProbeRouter(Router):
    """A router that weighs the effects of its pool by the probes: subclasses give :meth:`pick`."""

    uses_probe = True

    def choose(
        self,
        effects: Sequence[str],
        new_effects: Sequence[str],
        counts: Mapping[str, int],
        config: DistillConfig,
        rng: random.Random,
        probe_db: Mapping[str, float] | None = None,
        probe_history: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    ) -> str:
        pool = _pool(effects, new_effects, config, rng)
        return self.pick(pool, counts, config, rng, probe_db or {}, probe_history or {})

    @abstractmethod
    def pick(
        self,
        pool: list[str],
        counts: Mapping[str, int],
        config: DistillConfig,
        rng: random.Random,
        db: Mapping[str, float],
        history: Mapping[str, Sequence[tuple[float, float]]],
    ) -> str:
        """The next effect of ``pool`` (``_pool``'s), given each effect's latest probe PSNR ``db`` and its
        last probes ``history`` (as :meth:`clora.contracts.Router.choose` is given them)."""


class GapRouter(_ProbeRouter):
    """Effects furthest from their teachers train most: an effect is picked with probability in proportion
    to the RMS error of its latest probe (10^(-dB/20)); one not probed yet counts as the worst probed.
    With ``data.target_db`` the loop leaves out the effects already there."""

    router_id = "gap"

    def pick(
        self,
        pool: list[str],
        counts: Mapping[str, int],
        config: DistillConfig,
        rng: random.Random,
        db: Mapping[str, float],
        history: Mapping[str, Sequence[tuple[float, float]]],
    ) -> str:
        error = {n: 10 ** (-db[n] / 20) for n in pool if n in db}
        worst = max(error.values(), default=1.0)
        return rng.choices(pool, weights=[error.get(n, worst) for n in pool])[0]


def _gain(history: Sequence[tuple[float, float]]) -> float | None:
    """dB gained per time chosen: the least-squares slope of probe PSNR against the times the effect was
    chosen, over ``history``; None when it was not chosen between its probes (or probed once)."""
    if len(history) < 2:
        return None
    xs, ys = [h[0] for h in history], [h[1] for h in history]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


class ProgressRouter(_ProbeRouter):
    """Effects still gaining train most: an effect is picked in proportion to the dB its probe PSNR rose
    per time it was chosen over its last probes (a fall counts as 0), so effects that have levelled off
    stop taking steps from those still climbing; an effect without that estimate yet counts as the fastest.
    ``data.router_floor`` of the picks go to the least-chosen effect instead, so none starves."""

    router_id = "progress"

    def pick(
        self,
        pool: list[str],
        counts: Mapping[str, int],
        config: DistillConfig,
        rng: random.Random,
        db: Mapping[str, float],
        history: Mapping[str, Sequence[tuple[float, float]]],
    ) -> str:
        if rng.random() < config.data.router_floor:
            return _least_used(pool, counts, rng)
        gain = {n: _gain(history.get(n, ())) for n in pool}
        fastest = max((g for g in gain.values() if g is not None and g > 0), default=1.0)
        weights = [fastest if g is None else max(g, 0.0) for g in gain.values()]
        if sum(weights) <= 0:  # every effect has levelled off or is falling
            return _least_used(pool, counts, rng)
        return rng.choices(pool, weights=weights)[0]


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
    register(GapRouter())
    register(ProgressRouter())
    register(FileOrderRouter())
