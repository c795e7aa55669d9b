"""How much of a stochastic effect's spread a sampler can carry: each teacher under several samplers.

    python benchmarks/sampler_spread.py                                   # grain, confetti, streak
    python benchmarks/sampler_spread.py --effects grain --few 4:3 4:1 8:3 --euler 4 20

For each toy effect whose truth is a distribution, its teacher LoRA (trained or reused from CLORA_HOME)
samples the same held-out sources under several seeds with Euler ODE steps (the teacher's sampler) and
with the student's few-step sampler (predict x0, re-noise with fresh noise) at `steps:shift` level
sets; each row is scored against true draws as `clora eval` scores the stochastic effects: HF energy
and diversity across seeds as ratios to the truth's, and MMD. A student trained to match its teacher
through one of these samplers is bounded by what the teacher's own denoiser reaches through it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from clora_toy.build import build_base, build_teacher
from clora_toy.effects import get_effect
from clora_toy.factory import get_factory

from clora.distill.prepare import effect_seed
from clora.lora import attach_teacher
from clora.metrics import distribution_scores
from clora.plugins import Components, get_plugin_manager
from clora.sampling import euler_sample, few_step_sample, few_step_sigmas


def level_set(text: str) -> tuple[int, float]:
    """``steps:shift`` -> (steps, shift)."""
    try:
        steps, shift = text.split(":")
        return int(steps), float(shift)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected steps:shift, as 4:3") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--effects", nargs="+", default=["grain", "confetti", "streak"])
    parser.add_argument("--euler", type=int, nargs="*", default=[4, 20], help="Euler step counts")
    parser.add_argument(
        "--few",
        type=level_set,
        nargs="*",
        default=[(4, 3.0), (4, 1.0), (4, 0.5), (8, 3.0)],
        help="few-step level sets as steps:shift (the student's default: 4:3)",
    )
    parser.add_argument("--n-images", type=int, default=8, help="held-out sources per effect")
    parser.add_argument("--seeds", type=int, default=4, help="samples per source (and true draws)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build_base(size="full", show_progress=False)
    comps = Components.collect(get_plugin_manager())
    bb = get_factory(size="full").load("cpu", torch.float32)
    images = bb.sample_sources(args.n_images, effect_seed("clora-eval", 0))
    source = bb.encode_images(images)
    results: dict[str, Any] = {}
    for name in args.effects:
        effect = get_effect(name)
        truth = bb.truth_draws(name, images, args.seeds, 0)
        if truth is None:
            raise SystemExit(f"'{name}' is deterministic: pick effects whose truth is a distribution")
        teacher = build_teacher(effect, size="full", show_progress=False)
        attach_teacher(bb.transformer, comps.teacher_providers(), str(teacher.path), name)
        bb.transformer.set_adapter(name)
        prompts = bb.encode_prompts([effect.prompt] * len(images))
        samplers: dict[str, Callable[..., torch.Tensor]] = {}
        for steps in args.euler:
            samplers[f"Euler, {steps} steps"] = partial(euler_sample, bb, source, prompts, steps=steps)
        for steps, shift in args.few:
            levels = few_step_sigmas(steps, shift)
            label = f"few-step {steps}, shift {shift:g} (last level {float(levels[-1]):.2f})"
            samplers[label] = partial(few_step_sample, bb, source, prompts, levels)
        results[name] = {}
        print(f"\n{name}: teacher {teacher.path.parent.name}, {args.n_images} sources x {args.seeds} seeds")
        print(f"{'sampler':44} {'HF ratio':>9} {'div. ratio':>11} {'MMD':>7}")
        for label, sample in samplers.items():
            with torch.no_grad():
                outs = torch.stack(
                    [
                        bb.decode_latents(sample(generator=torch.Generator().manual_seed(100 + k)))
                        for k in range(args.seeds)
                    ]
                )
            row = distribution_scores(outs[0], outs, truth, images)
            results[name][label] = row
            print(
                f"{label:44} {row['hf_ratio']:9.2f} {row['diversity_ratio']:11.2f} {row['mmd']:7.3f}",
                flush=True,
            )
        bb.transformer.delete_adapters([name])
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
