"""Where a unified LoRA's error comes from: its few-step sampler vs one step from an oracle input.

    python benchmarks/student_error.py COLLECTION.safetensors [--n-images 32] [--threads 1]

For each effect of the file (toy bases only: it needs the truth), on held-out sources and on the
first N sources the distiller trained on (seed 0, the default; it trains on 32), prints the PSNR
vs truth of the few-step sampler and of a single student step from the truth noised to each of the
sampler's levels. If the sampler is no better than its first level, the later steps do not
refine; if the oracle step at the last level is much better than the sampler, the student leans on
an input its own earlier steps cannot give it; the train/held-out difference is how much it
overfits its training sources.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clora.distill.prepare import effect_seed
from clora.generate import UnifiedModel
from clora.metrics import psnr
from clora.plugins import Components, get_plugin_manager
from clora.sampling import add_noise, few_step_sample, x0_from_velocity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a unified LoRA (collections/<run>.safetensors)")
    parser.add_argument("--n-images", type=int, default=32, help="sources per effect and set")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = UnifiedModel.load(Components.collect(get_plugin_manager()), args.file)
    bb = model.backbone
    model.activate()
    print(
        "levels", " ".join(f"{float(s):.3f}" for s in model.sigmas(None)), "(an effect's own: after its name)"
    )
    print(f"{'effect':14} {'sources':9} {'sampler':>8}  one step from the truth at each level")
    for name in model.effects:
        levels = model.sigmas(None, [name])
        if not torch.equal(levels, model.sigmas(None)):
            print(name, "levels", " ".join(f"{float(s):.3f}" for s in levels))
        sets = {
            "held-out": bb.sample_sources(args.n_images, effect_seed("clora-eval", 0)),
            "train": bb.sample_sources(args.n_images, effect_seed(name, 0)),
        }
        for label, images in sets.items():
            truth = bb.ground_truth(name, images)
            if truth is None:
                raise SystemExit(f"base '{bb.base_id}' has no ground truth for '{name}'")
            source, target = bb.encode_images(images), bb.encode_images(truth)
            prompts = bb.encode_prompts([model.effect_prompt(name)] * len(images))
            g = torch.Generator().manual_seed(0)
            sampled = bb.decode_latents(few_step_sample(bb, source, prompts, levels, g))
            oracle = []
            with torch.no_grad():
                for s in levels:
                    noisy = add_noise(target, torch.randn(target.shape, generator=g).to(target), s)
                    x0 = x0_from_velocity(noisy, bb.predict_velocity(noisy, s, source, prompts), s)
                    oracle.append(float(psnr(bb.decode_latents(x0), truth).mean()))
            print(
                f"{name:14} {label:9} {float(psnr(sampled, truth).mean()):8.2f}  "
                + " ".join(f"{v:6.2f}" for v in oracle),
                flush=True,
            )


if __name__ == "__main__":
    main()
