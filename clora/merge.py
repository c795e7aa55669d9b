"""The merged-LoRA baseline: the effects' own LoRAs merged into one with peft's ``add_weighted_adapter``.

This is what users try before clora: one file made by weight merging (``linear`` or ``ties``), used
with each effect's own prompt and the full sampler. ``clora eval`` scores it next to the student.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from peft.tuners.lora import LoraModel

from clora.errors import CloraError
from clora.lora import add_lora_adapter, linear_shapes, read_lora
from clora.plugins import Components

#: peft combination types offered as baselines; ``ties`` keeps the top ``density`` share of each delta
MERGE_TYPES = ("linear", "ties")
_SCRATCH = "clora_merge_scratch"


def merge_teachers(
    transformer: Any,
    components: Components,
    lora_paths: Sequence[str],
    combination: str,
    adapter_name: str,
    weight: float = 1.0,
    density: float = 0.5,
) -> None:
    """Add ``adapter_name`` to ``transformer``: the LoRAs at ``lora_paths`` merged by ``combination``.

    The teachers are loaded as temporary adapters and removed again; only the merged one stays.
    """
    if combination not in MERGE_TYPES:
        raise CloraError(f"unknown merge '{combination}'; choose from {', '.join(MERGE_TYPES)}")
    if not lora_paths:
        raise CloraError("nothing to merge: no effect LoRA files")
    shapes = linear_shapes(transformer)
    names = []
    try:
        for i, path in enumerate(lora_paths):
            lora = read_lora(path, components.teacher_providers(), module_names=shapes)
            names.append(f"clora_merge_in{i}")
            add_lora_adapter(transformer, lora.modules, names[-1])
        # peft's tuner re-initialises the adapter it is created for, so create it for a scratch adapter
        # and hand it every existing adapter's config; then the loaded teachers stay as they are.
        configs = {**transformer.peft_config, _SCRATCH: transformer.peft_config[names[0]]}
        with warnings.catch_warnings():  # "Already found a peft_config attribute": intended here
            warnings.simplefilter("ignore", UserWarning)
            tuner = LoraModel(transformer, configs, _SCRATCH)
        tuner.delete_adapter(_SCRATCH)
        try:
            tuner.add_weighted_adapter(
                names,
                [weight] * len(names),
                adapter_name,
                combination_type=combination,  # type: ignore[arg-type]
                density=density if combination == "ties" else None,
            )
        except ValueError as e:  # e.g. "linear" over LoRAs of different ranks
            raise CloraError(f"peft cannot merge these LoRAs with '{combination}': {e}") from e
    finally:
        present = [n for n in names if n in transformer.peft_config]
        if present:
            transformer.delete_adapters(present)
