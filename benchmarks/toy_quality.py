"""Build (or reuse) the toy base and teacher LoRAs and print their PSNR against exact ground truth.

    python benchmarks/toy_quality.py                     # base + the default teacher set
    python benchmarks/toy_quality.py --tiny              # the test-size world, in seconds
    python benchmarks/toy_quality.py --effects sepia invert --sweep-guidance
    python benchmarks/toy_quality.py --compare-noise      # the toy's sampling noise vs standard normal
    python benchmarks/toy_quality.py --sweep-steps 2 4 8 20 50   # each teacher at several Euler step counts

Run one at a time on a small machine: every number here is wall-clock on the cores you have.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from clora_toy.backbone import ToyBackbone
from clora_toy.build import apply_lora, build_base, build_teacher, evaluate_base, score, teacher_eval_sources
from clora_toy.effects import get_effect
from clora_toy.factory import ToyBackboneFactory, get_factory

from clora.backbone import Backbone

DEFAULT_EFFECTS = [
    "sepia",
    "invert",
    "hue-120",
    "channel-swap",
    "warm",
    "cool",
    "tint-teal",
    "vignette",
    "blur",
    "pixelate",
    "posterize",
    "edges",
]


@contextlib.contextmanager
def standard_normal(backbone: ToyBackbone) -> Iterator[None]:
    """Sample from the default backbone noise (standard normal) instead of the toy's own."""
    setattr(backbone, "sampling_noise", functools.partial(Backbone.sampling_noise, backbone))  # noqa: B010
    try:
        yield
    finally:
        delattr(backbone, "sampling_noise")


def compare_noise(
    backbone: ToyBackbone, factory: ToyBackboneFactory, teachers: dict[str, Path]
) -> dict[str, dict[str, dict[str, float]]]:
    """The base edits and each teacher (effect name -> LoRA file) scored with the toy's sampling
    noise and with standard normal noise, on the same weights, the way the builds score them."""
    cfg = factory.config
    noises: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "toy": contextlib.nullcontext,
        "standard normal": lambda: standard_normal(backbone),
    }
    base: dict[str, dict[str, float]] = {}
    for label, noise in noises.items():
        with noise():
            base[label], _ = evaluate_base(backbone, factory)
    scores: dict[str, dict[str, float]] = {}
    sources = teacher_eval_sources(backbone, cfg)
    for name, path in teachers.items():
        effect = get_effect(name)
        apply_lora(backbone, path, "compare")
        try:
            for label, noise in noises.items():
                with noise():
                    value = score(
                        backbone,
                        effect.apply,
                        effect.prompt,
                        sources,
                        cfg.eval.teacher_steps,
                        cfg.eval.teacher_guidance,
                    )[0]
                scores.setdefault(name, {})[label] = round(value, 2)
        finally:
            backbone.transformer.delete_adapters("compare")
    print(f"\n{'noise: toy / standard normal':28} (same weights)")
    for edit, value in base["toy"].items():
        print(f"{edit:16} {value:8.2f} {base['standard normal'][edit]:8.2f}")
    for name, row in scores.items():
        print(f"{name:16} {row['toy']:8.2f} {row['standard normal']:8.2f}")
    return {"base": base, "teachers": scores}


def sweep_steps(
    backbone: ToyBackbone,
    factory: ToyBackboneFactory,
    teachers: dict[str, Path],
    counts: list[int],
    guidances: list[float],
) -> dict[str, dict[str, float]]:
    """Each teacher (effect name -> LoRA file) scored against the truth with its full Euler sampler at
    each of ``counts`` steps and ``guidances`` CFG scales (the builds' sources): which sampler gives
    its best outputs. Keys are ``"<steps> steps, CFG <g>"``."""
    cfg = factory.config
    sources = teacher_eval_sources(backbone, cfg)
    cells = [(n, g) for g in guidances for n in counts]
    label = {c: f"{c[0]} steps, CFG {c[1]:g}" for c in cells}
    out: dict[str, dict[str, float]] = {}
    header = "".join(f"{f'{n}/{g:g}':>10}" for n, g in cells)
    print(f"\n{'teacher PSNR dB at':18}{header}   (steps/CFG)")
    for name, path in teachers.items():
        effect = get_effect(name)
        apply_lora(backbone, path, "steps")
        try:
            out[name] = {
                label[(n, g)]: round(score(backbone, effect.apply, effect.prompt, sources, n, g)[0], 2)
                for n, g in cells
            }
        finally:
            backbone.transformer.delete_adapters("steps")
        print(f"{name:18}" + "".join(f"{out[name][label[c]]:10.2f}" for c in cells), flush=True)
    means = {label[c]: round(sum(r[label[c]] for r in out.values()) / len(out), 2) for c in cells}
    print(f"{'mean':18}" + "".join(f"{means[label[c]]:10.2f}" for c in cells))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="toy world size")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="= --size tiny")
    parser.add_argument("--effects", nargs="*", default=DEFAULT_EFFECTS, help="teachers to build and score")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--sweep-guidance", action="store_true", help="score the base at several CFG scales")
    parser.add_argument(
        "--compare-noise",
        action="store_true",
        help="score the base and teachers again with the toy's sampling noise and with standard normal",
    )
    parser.add_argument(
        "--sweep-steps",
        type=int,
        nargs="*",
        metavar="N",
        help="score each teacher with its Euler sampler at these step counts",
    )
    parser.add_argument(
        "--sweep-cfg",
        type=float,
        nargs="*",
        metavar="G",
        help="with --sweep-steps: the CFG scales to score at (default: the build's teacher guidance)",
    )
    parser.add_argument("--json", dest="json_out", help="also write the numbers to this JSON file")
    parser.add_argument("--threads", type=int, help="torch threads (default 2; 1 with --tiny)")
    args = parser.parse_args()
    # two threads on a busy two-core machine stall each other; the tiny model gains nothing from them
    torch.set_num_threads(args.threads or (1 if args.size == "tiny" else 2))

    start = time.perf_counter()
    base = build_base(size=args.size, force=args.force)
    base_seconds = base.report.get("train_seconds")
    print(f"\nbase {'(cached) ' if base.cached else ''}{base.path}")
    print(f"base training seconds: {base_seconds:.0f}" if base_seconds else "")
    print(f"{'edit':12} {'PSNR dB':>8}")
    psnr = base.report.get("psnr")
    for name, value in (psnr if isinstance(psnr, dict) else {}).items():
        print(f"{name:12} {value:8.2f}")

    factory = get_factory(size=args.size)
    backbone = factory.load()
    sweep = {}
    if args.sweep_guidance:
        for g in (0.0, 0.5, 1.0, 4.0):
            sweep[g], _ = evaluate_base(backbone, factory, guidance=g)
            print(f"base guidance {g}: {sweep[g]}")

    rows, paths = [], {}
    # a teacher's score is the one its build stored, at the sampler the build scored with
    print(f"\n{'effect':16} {'teacher dB':>10} {'base dB':>8} {'train s':>8}  scored at")
    for name in args.effects:
        built = build_teacher(name, size=args.size, force=args.force, backbone=backbone)
        r, paths[name] = built.report, built.path
        rows.append(r)
        at = f"{r.get('eval_steps', '?')} steps, CFG {r.get('eval_guidance', '?')}"
        print(f"{name:16} {r['psnr']:10.2f} {r['base_psnr']:8.2f} {r['train_seconds']:8.1f}  {at}")
    noise = compare_noise(backbone, factory, paths) if args.compare_noise else {}
    guidances = args.sweep_cfg or [factory.config.eval.teacher_guidance]
    steps = sweep_steps(backbone, factory, paths, args.sweep_steps, guidances) if args.sweep_steps else {}
    print(f"\ntotal wall seconds: {time.perf_counter() - start:.0f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            out = {
                "base": base.report,
                "guidance_sweep": sweep,
                "teachers": rows,
                "noise": noise,
                "steps_sweep": steps,
            }
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
