"""Train toy base variants side by side and print each one's PSNR per general edit and its training time.

    python benchmarks/base_recipes.py                       # the shipped recipe and the alternatives
    python benchmarks/base_recipes.py --only velocity       # one of them
    python benchmarks/base_recipes.py --variant mine '{"model": {"width": 96}, "base": {"steps": 900}}'

A variant is a JSON object of overrides on the full toy recipe (`clora_toy.config.TOY`): "model" and
"base" hold ModelConfig and BaseTrainConfig fields. Nothing is written to the cache; each variant
trains from scratch (4-10 minutes each on 2 idle cores; patch 4 is the fast one). Scored like
`clora toy build-base`: 20 Euler steps, no CFG, 32 held-out images.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from clora_toy.build import evaluate_base
from clora_toy.config import TOY, ToyConfig
from clora_toy.factory import ToyBackboneFactory
from clora_toy.train import train_base

#: the recipe shipped until 2026-12: the transformer outputs the velocity, and knows positions only by RoPE
VELOCITY: dict[str, object] = {"prediction": "velocity", "position_frequencies": 0, "clip_clean": False}

VARIANTS: dict[str, dict[str, dict[str, object]]] = {
    "shipped": {},
    "velocity": {"model": VELOCITY, "base": {"edit_weights": {}, "steps": 1300, "lr": 1e-3}},
    # without the clip of the clean image, a colour matrix cannot saturate (contrast, brighten)
    "no-clip": {"model": {"clip_clean": False}},
    # RoPE gives attention only relative positions; a mirror needs absolute ones
    "no-positions": {"model": {"position_frequencies": 0}, "base": {"edit_weights": {}}},
    # the velocity recipe with position channels; 4x4-pixel patches (a quarter of the tokens); the
    # transformer outputting the edit (clean image minus source), fitted in image space
    "velocity-positions": {
        "model": {**VELOCITY, "position_frequencies": 8},
        "base": {"steps": 1300, "lr": 1e-3, "edit_weights": {"flip": 2.0}},
    },
    "patch4": {
        "model": {**VELOCITY, "patch_size": 4, "position_frequencies": 4},
        "base": {"steps": 1600, "lr": 2e-3, "edit_weights": {"flip": 2.0}},
    },
    "patch4-edit": {
        "model": {**VELOCITY, "patch_size": 4, "position_frequencies": 4, "prediction": "edit"},
        "base": {
            "steps": 1700,
            "lr": 3e-3,
            "shifted_sigma_frac": 0.2,
            "edit_weights": {"flip": 2.0, "contrast": 2.0, "grayscale": 1.5},
        },
    },
}


def variant_config(overrides: dict[str, dict[str, object]]) -> ToyConfig:
    """The full toy recipe with ``overrides`` ({"model": {...}, "base": {...}}) applied."""
    unknown = set(overrides) - {"model", "base"}
    if unknown:
        raise SystemExit(f"variant keys must be 'model' and/or 'base', not {sorted(unknown)}")
    return ToyConfig(
        model=TOY.model.model_validate({**TOY.model.model_dump(), **overrides.get("model", {})}),
        base=TOY.base.model_validate({**TOY.base.model_dump(), **overrides.get("base", {})}),
        teacher=TOY.teacher,
        eval=TOY.eval,
    )


def run_variant(name: str, cfg: ToyConfig) -> dict[str, object]:
    factory = ToyBackboneFactory("toy", cfg, "benchmarks/base_recipes.py", name)
    backbone = factory.fresh()
    stats = train_base(backbone, cfg.base)
    psnrs, _ = evaluate_base(backbone, factory)
    step_seconds = stats["train_seconds"] / cfg.base.steps
    return {"variant": name, "psnr": psnrs, "step_seconds": step_seconds, **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="built-in variants to run")
    parser.add_argument(
        "--variant", nargs=2, action="append", metavar=("NAME", "JSON"), default=[], help="an extra variant"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", dest="json_out", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    chosen = {k: VARIANTS[k] for k in (args.only if args.only is not None else VARIANTS)}
    chosen.update({name: json.loads(text) for name, text in args.variant})
    rows = []
    for name, overrides in chosen.items():
        start = time.perf_counter()
        rows.append(run_variant(name, variant_config(overrides)))
        print(
            f"{name}: {json.dumps(rows[-1])} ({time.perf_counter() - start:.0f} s with scoring)", flush=True
        )

    edits = list(rows[0]["psnr"]) if rows else []  # type: ignore[call-overload]
    print(f"\n{'variant':12}" + "".join(f"{e:>10}" for e in edits) + f"{'train s':>9}{'s/step':>8}")
    for r in rows:
        psnr = r["psnr"]
        assert isinstance(psnr, dict)
        cells = "".join(f"{psnr[e]:10.2f}" for e in edits)
        print(f"{r['variant']:12}{cells}{r['train_seconds']:9.0f}{r['step_seconds']:8.3f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
