"""Build (or reuse) the toy base and teacher LoRAs and print their PSNR against exact ground truth.

    python benchmarks/toy_quality.py                     # base + the default teacher set
    python benchmarks/toy_quality.py --tiny              # the test-size world, in seconds
    python benchmarks/toy_quality.py --effects sepia invert --sweep-guidance
    python benchmarks/toy_quality.py --compare-noise      # the toy's sampling noise vs standard normal

Run one at a time on a small machine: every number here is wall-clock on the cores you have.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator

import torch
from clora_toy.backbone import ToyBackbone
from clora_toy.build import apply_lora, build_base, build_teacher, evaluate_base, score
from clora_toy.data import held_out_sources
from clora_toy.effects import get_effect
from clora_toy.factory import ToyBackboneFactory, get_factory

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
    """Sample from standard normal noise instead of the backbone's own."""

    def draw(shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    setattr(backbone, "sampling_noise", draw)  # noqa: B010 (an instance override of a method)
    try:
        yield
    finally:
        delattr(backbone, "sampling_noise")


def compare_noise(
    backbone: ToyBackbone, factory: ToyBackboneFactory, effects: list[str], size: str
) -> dict[str, object]:
    """The base edits and each teacher scored with the backbone's sampling noise and with standard
    normal noise, on the same weights (as the build scores them: 20 steps, 32 held-out images)."""
    cfg = factory.config.eval
    base: dict[str, dict[str, float]] = {}
    teachers: dict[str, dict[str, float]] = {}
    sources = held_out_sources(cfg.num_images, backbone.image_size[0], seed=1)
    for label, noise in (
        ("backbone", contextlib.nullcontext()),
        ("standard normal", standard_normal(backbone)),
    ):
        with noise:
            base[label], _ = evaluate_base(backbone, factory)
            for name in effects:
                effect = get_effect(name)
                path = build_teacher(name, size=size).path
                apply_lora(backbone, path, "compare")
                try:
                    value = score(
                        backbone, effect.apply, effect.prompt, sources, cfg.steps, cfg.teacher_guidance
                    )[0]
                finally:
                    backbone.transformer.delete_adapters("compare")
                teachers.setdefault(name, {})[label] = round(value, 2)
    print(f"\nnoise: the backbone's ({backbone.sampling_noise_id}) vs standard normal, same weights")
    for edit, value in base["backbone"].items():
        print(f"{edit:16} {value:8.2f} {base['standard normal'][edit]:8.2f}")
    for name, row in teachers.items():
        print(f"{name:16} {row['backbone']:8.2f} {row['standard normal']:8.2f}")
    return {"base": base, "teachers": teachers}


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

    rows = []
    print(f"\n{'effect':16} {'teacher dB':>10} {'base dB':>8} {'train s':>8}")
    for name in args.effects:
        r = build_teacher(name, size=args.size, force=args.force, backbone=backbone).report
        rows.append(r)
        print(f"{name:16} {r['psnr']:10.2f} {r['base_psnr']:8.2f} {r['train_seconds']:8.1f}")
    noise = compare_noise(backbone, factory, args.effects, args.size) if args.compare_noise else {}
    print(f"\ntotal wall seconds: {time.perf_counter() - start:.0f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            out = {"base": base.report, "guidance_sweep": sweep, "teachers": rows, "noise": noise}
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
