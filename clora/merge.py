"""The merged-LoRA baseline: every member's LoRA merged into one with peft's ``add_weighted_adapter``.

This is what users try before clora: one file made by weight merging, used with each effect's own prompt
and the full sampler. ``clora eval`` scores a sweep of careful merges next to the student and names the
best: a baseline that loses should lose at its best.

What peft does with each member's A (down) and B (up) matrices (``peft/tuners/lora/model.py``), for
member deltas ``dW_i = s_i B_i A_i`` (``s_i`` = alpha / rank) and weights ``w_i``:

- ``cat`` stacks the ``w_i s_i A_i`` and the ``B_i`` into one LoRA of rank ``sum(r_i)``: its delta is
  exactly ``sum_i w_i dW_i``.
- ``linear``, ``ties`` and ``dare_ties`` combine the A matrices and the B matrices *separately*, each
  scaled by ``sqrt(w_i s_i)``; then ``B A = sum_ij sqrt(w_i s_i w_j s_j) B_i A_j`` holds cross terms
  ``B_i A_j`` of LoRAs trained apart besides the deltas (exact only for one LoRA, or LoRAs sharing A).
- ``ties_svd`` and ``dare_ties_svd`` apply TIES / DARE-TIES to the deltas ``w_i dW_i`` themselves and
  factor the result back into a LoRA with a truncated SVD.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraModel

from clora.errors import CloraError
from clora.lora import attach_teacher
from clora.plugins import Components

_SCRATCH = "clora_merge_scratch"


@dataclass(frozen=True)
class MergeVariant:
    """One merged LoRA of a sweep: a ``--merge`` method at one member weight (and TIES density)."""

    method: str  # a key of METHODS
    weight: str  # every member's weight: "1" or "1/N" (N: the number of members)
    density: float | None = None  # the share of each delta TIES / DARE keeps

    @property
    def label(self) -> str:
        """The variant's name in eval results: ``cat 1/N``, ``ties 1 d0.5``."""
        return f"{self.method} {self.weight}" + ("" if self.density is None else f" d{self.density:g}")

    def weight_for(self, n_members: int) -> float:
        return 1.0 / n_members if self.weight == "1/N" else 1.0

    @property
    def combination(self) -> str:
        """The peft ``combination_type`` that makes it."""
        return METHODS[self.method]


#: ``--merge`` name -> the peft combination it runs. ``cat`` is the exact sum of the deltas. ``ties`` and
#: ``dare_ties`` apply TIES-merging (keep each delta's largest ``density`` share, elect each weight's sign,
#: average the members that agree) and DARE-TIES (keep a random ``density`` share, rescaled, instead) to the
#: deltas, as the methods are published; peft's own ``ties`` and ``dare_ties`` merge A and B apart, with the
#: cross terms of unrelated LoRAs, and at their best stayed under these on the toy's first ten effects (11.3
#: vs 11.5 dB for TIES, 11.3 vs 13.0 for DARE-TIES; 8 images per effect, the base without LoRA: 10.2).
#: ``linear`` is peft's linear merge of A and B at weight 1, the baseline before this sweep (8.1 dB there,
#: under the base): kept to reproduce old tables, never run by default.
METHODS = {"cat": "cat", "ties": "ties_svd", "dare_ties": "dare_ties_svd", "linear": "linear"}

#: What each ``--merge`` name sweeps. At weight 1/N each effect is applied at 1/N of its strength (the sum
#: of deltas at 1/N is their mean); at weight 1 the sum adds every effect in full, while TIES averages the
#: agreeing members of each weight, so TIES at 1 keeps an effect's full strength where it alone changes a
#: weight. Which wins depends on N (on the toy, weight 1 with 2 effects, 1/N with 10). Densities: 0.2 is
#: TIES' published default and DARE's best on the toy, 0.5 the middle; towards 1 TIES at weight 1 nears
#: the mean of the deltas, which ``cat 1/N`` covers (0.8 was never the best on the toy, so it costs no pass).
SWEEPS: dict[str, tuple[MergeVariant, ...]] = {
    "cat": (MergeVariant("cat", "1/N"), MergeVariant("cat", "1")),
    "ties": tuple(MergeVariant("ties", w, d) for d in (0.2, 0.5) for w in ("1/N", "1")),
    "dare_ties": tuple(MergeVariant("dare_ties", w, d) for d in (0.2, 0.5) for w in ("1/N", "1")),
    "linear": (MergeVariant("linear", "1"),),
}

#: what ``clora eval`` sweeps unless ``--merge`` says otherwise: 10 variants, each one full-sampler pass
#: over the held-out images per effect (cached by content)
DEFAULT_MERGES = ("cat", "ties", "dare_ties")


def sweep(methods: Iterable[str]) -> list[MergeVariant]:
    """Every variant of the ``--merge`` ``methods``, in their order."""
    out: list[MergeVariant] = []
    for m in methods:
        if m not in SWEEPS:
            raise CloraError(f"unknown merge '{m}'; choose from {', '.join(SWEEPS)}")
        out += [v for v in SWEEPS[m] if v not in out]
    return out


def merge_teachers(
    transformer: Any,
    components: Components,
    lora_paths: Sequence[str],
    variant: MergeVariant,
    adapter_name: str,
    seed: int = 0,
) -> None:
    """Add ``adapter_name`` to ``transformer``: the LoRAs at ``lora_paths`` merged as ``variant``.

    The teachers are loaded as temporary adapters and removed again; only the merged one stays. The SVD
    of ``ties`` and ``dare_ties`` keeps rank ``sum(r_i)``, the size of the exact ``cat`` merge (full rank
    moved the toy's scores by under 0.05 dB); DARE's random drops follow ``seed`` (another seed: 0.16 dB).
    """
    if variant.method not in METHODS:
        raise CloraError(f"unknown merge '{variant.method}'; choose from {', '.join(METHODS)}")
    if not lora_paths:
        raise CloraError("nothing to merge: no effect LoRA files")
    names: list[str] = []
    try:
        for i, path in enumerate(lora_paths):
            names.append(f"clora_merge_in{i}")
            attach_teacher(transformer, components.teacher_providers(), path, names[-1])
        # peft's tuner re-initialises the adapter it is created for, so create it for a scratch adapter
        # and hand it every existing adapter's config; then the loaded teachers stay as they are.
        configs = {**transformer.peft_config, _SCRATCH: transformer.peft_config[names[0]]}
        with warnings.catch_warnings():  # "Already found a peft_config attribute": intended here
            warnings.simplefilter("ignore", UserWarning)
            tuner = LoraModel(transformer, configs, _SCRATCH)
        tuner.delete_adapter(_SCRATCH)
        ranks = [_rank(transformer.peft_config[n]) for n in names]
        svd = variant.combination.endswith("_svd")
        dtype = _lora_dtype(transformer, names[0])
        if svd:  # torch's SVD takes no half precision; the inputs are scratch copies anyway
            _cast_adapters(transformer, names, torch.float32)
        weight = variant.weight_for(len(names))
        devices = [transformer.device] if getattr(transformer.device, "type", "cpu") == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                tuner.add_weighted_adapter(
                    names,
                    [weight] * len(names),
                    adapter_name,
                    combination_type=variant.combination,  # type: ignore[arg-type]
                    density=variant.density,
                    svd_rank=sum(ranks) if svd else None,
                    svd_full_matrices=False,
                )
        except ValueError as e:  # e.g. "linear" over LoRAs of different ranks
            raise CloraError(f"peft cannot merge these LoRAs as '{variant.label}': {e}") from e
        if svd:
            _cast_adapters(transformer, [adapter_name], dtype)
    finally:
        present = [n for n in names if n in transformer.peft_config]
        if present:
            transformer.delete_adapters(present)


def _rank(config: Any) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else int(config.r)


def _lora_dtype(transformer: Any, adapter: str) -> torch.dtype:
    return next(p.dtype for n, p in transformer.named_parameters() if f".{adapter}." in n)


def _cast_adapters(transformer: Any, adapters: list[str], dtype: torch.dtype) -> None:
    for n, p in transformer.named_parameters():
        if any(f".{a}." in n for a in adapters):
            p.data = p.data.to(dtype)
