"""Per-image latency and NFE (unified few-step vs teacher vs cascade) and effect-switch latency vs N.

    python benchmarks/speed.py            # toy base size (timing does not depend on trained weights)
    python benchmarks/speed.py --tiny
    python benchmarks/speed.py --teacher-steps 40 --teacher-guidance 4   # a Qwen-Image-Edit-like sampler

The teachers sample as the toy's do (its default steps and guidance) unless told otherwise.

Prints ratios measured in this one run; the machine is shared and noisy, so compare within a run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from clora_toy.factory import get_factory

from clora.fileio import save_safetensors
from clora.lora import linear_shapes
from clora.sampling import euler_sample, few_step_sample, few_step_sigmas


def random_lora(shapes: dict[str, tuple[int, int]], targets: list[str], rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fan_in, fan_out) in shapes.items():
        if name.endswith(tuple(targets)):
            out[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.01
            out[f"transformer.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    return out


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="toy world size")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="= --size tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--teacher-steps", type=int, help="teacher Euler steps (default: the base's own)")
    parser.add_argument(
        "--teacher-guidance", type=float, help="teacher CFG scale, 0 for none (default: the base's own)"
    )
    parser.add_argument("--few-steps", type=int, default=4)
    parser.add_argument("--n", type=int, nargs="*", default=[10, 20, 50], help="effect counts for switching")
    args = parser.parse_args()
    torch.set_num_threads(2)

    bb = get_factory(size=args.size).fresh()
    steps = args.teacher_steps or bb.default_teacher_steps
    guidance = bb.default_guidance if args.teacher_guidance is None else args.teacher_guidance
    teacher_nfe = steps * (2 if bb.guidance_active(guidance) else 1)
    tr = bb.transformer.requires_grad_(False).eval()
    shapes = linear_shapes(tr)
    work = Path(tempfile.mkdtemp(prefix="clora-speed-"))
    files = []
    for i in range(max(args.n)):
        path = work / f"effect{i}.safetensors"
        save_safetensors(random_lora(shapes, bb.lora_target_modules, 8, i), path)
        files.append(path)
    unified = work / "unified.safetensors"
    save_safetensors(random_lora(shapes, bb.lora_target_modules, 16, 999), unified)

    images = bb.sample_sources(args.batch, 1)
    src = bb.encode_images(images)
    prompt = ["zovexa the image with a sepia tone"] * args.batch
    tr.load_lora_adapter(str(unified), prefix="transformer", adapter_name="unified", use_safetensors=True)
    tr.load_lora_adapter(str(files[0]), prefix="transformer", adapter_name="effect", use_safetensors=True)
    tr.load_lora_adapter(str(files[1]), prefix="transformer", adapter_name="accel", use_safetensors=True)
    sig = few_step_sigmas(args.few_steps)

    def few() -> None:
        few_step_sample(bb, src, prompt, sig, torch.Generator().manual_seed(0))

    def full() -> None:
        euler_sample(bb, src, prompt, steps=steps, guidance=guidance, generator=torch.Generator())

    def way(adapters: list[str], sample, fuse: bool = False):
        def call() -> None:
            tr.set_adapters(adapters, [1.0] * len(adapters))
            if fuse:  # merge the LoRA into the base weights (and restore them after: counted)
                tr.fuse_lora(adapter_names=adapters)
            try:
                sample()
            finally:
                if fuse:
                    tr.unfuse_lora()

        return call

    rows = [
        ("unified, fused (clora generate)", way(["unified"], few, fuse=True), args.few_steps),
        ("unified, LoRA unfused", way(["unified"], few), args.few_steps),
        ("teacher, LoRA unfused (--teacher)", way(["effect"], full), teacher_nfe),
        ("teacher, LoRA fused", way(["effect"], full, fuse=True), teacher_nfe),
        ("cascade (effect + accel), few steps", way(["effect", "accel"], few), args.few_steps),
    ]
    times = [(label, timed(fn), nfe) for label, fn, nfe in rows]
    n, first = args.batch, times[0][1]
    print(f"{'way':34} {'NFE':>5} {'ms/image':>10} {'vs unified, fused':>18}")
    for label, t, nfe in times:
        print(f"{label:34} {nfe:5d} {t / n * 1e3:10.2f} {t / first:17.1f}x")
    print("(fused timings include merging the LoRA into the base weights and restoring them)")

    print(f"\n{'N effects':>10} {'unified switch ms':>18} {'load+activate ms':>17} {'ratio':>7}")
    for count in args.n:
        t0 = time.perf_counter()
        for i in range(count):
            bb.encode_prompts([f"trig{i} the image with effect number {i}"])
        uni = (time.perf_counter() - t0) / count
        t0 = time.perf_counter()
        for i in range(count):
            tr.load_lora_adapter(
                str(files[i]), prefix="transformer", adapter_name=f"s{i}", use_safetensors=True
            )
            tr.set_adapter(f"s{i}")
        per = (time.perf_counter() - t0) / count
        tr.delete_adapters([f"s{i}" for i in range(count)])
        print(f"{count:10d} {uni * 1e3:18.3f} {per * 1e3:17.2f} {per / uni:6.0f}x")


if __name__ == "__main__":
    main()
