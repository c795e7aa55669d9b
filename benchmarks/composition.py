"""Zero-shot composition: one prompt naming two effects vs each effect alone, vs the composed truth.

    python benchmarks/composition.py COLLECTION.safetensors --first sepia --then tint-teal

Needs a unified LoRA distilled on the toy base (whose effects have exact ground truth).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from clora_toy.data import held_out_sources
from clora_toy.effects import get_effect

from clora.generate import UnifiedModel
from clora.metrics import psnr
from clora.plugins import Components, get_plugin_manager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("collection", type=Path)
    parser.add_argument("--first", default="sepia")
    parser.add_argument("--then", default="tint-teal")
    parser.add_argument("--n-images", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = UnifiedModel.load(Components.collect(get_plugin_manager()), args.collection)
    assert model.backbone.image_size is not None, "a toy-world benchmark"
    images = held_out_sources(args.n_images, model.backbone.image_size[0], seed=7)
    truth = get_effect(args.then).apply(get_effect(args.first).apply(images))
    rows = {
        f"composed ({args.first} then {args.then})": model.edit(images, [args.first, args.then]),
        f"{args.first} alone": model.edit(images, [args.first]),
        f"{args.then} alone": model.edit(images, [args.then]),
    }
    print(f"prompt: {model.prompt([args.first, args.then])!r}")
    print(f"{'output':40} {'PSNR vs composed truth (dB)':>28}")
    for label, out in rows.items():
        print(f"{label:40} {float(psnr(out, truth).mean()):28.2f}")


if __name__ == "__main__":
    main()
