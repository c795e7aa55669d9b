"""Scaling: one unified LoRA for N = 10, 20, 50 effects against their N teachers (the paper's table).

    python benchmarks/scaling.py                                   # N = 10 20 50, default steps
    python benchmarks/scaling.py --n 10 20 --steps-per-effect 150  # a cheaper table
    python benchmarks/scaling.py --n 180 --merge cat --work DIR    # the largest: 17-19 h here
    python benchmarks/scaling.py --tiny --n 10 50 180 --merge cat \
        --results benchmarks/results/scaling-tiny.json            # the tiny world's table: ~1.5 h
    python benchmarks/scaling.py --n 50 --work DIR                 # stopped? the same again continues

For each N: the first N effects of the toy library (the 8 of distill_quality.py, cool and solarize
first, then the library's order), their teachers trained or reused from CLORA_HOME (2-3 min each on this
CPU; 2-3 s on the tiny world), one full distill of the N (max(steps, steps_per_effect x N) steps), then
`clora eval`'s scores on held-out images: student (4 steps, no CFG) and teacher (20 steps + CFG) PSNR vs
the exact truth, the paper's baselines on the same images, each at the best setting of its sweep (one
setting for all effects, by mean PSNR vs truth): each teacher LoRA stacked with an acceleration LoRA, 4
steps, at acceleration strengths 0.25-1 (the cascade); all N teacher LoRAs merged into one with peft,
full sampler (merged: `clora eval --merge`'s sweep), how many effects are within 2 dB of their teacher,
trigger accuracy (nearest truth), and the general edits.
The acceleration LoRA is `clora distill --general-only` of the same base (built here unless
`--accel` names one). Every number is from this run on this machine; compare columns, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from toyworld import (
    World,
    add_work_arg,
    add_world_args,
    merge_types,
    open_work,
    ordered,
    overall,
    summary,
    table,
)

from clora.distill.config import load_config
from clora.distill.run import run_distill
from clora.evaluate import EvalOptions, evaluate
from clora.merge import DEFAULT_MERGES
from clora.registry import Collection
from clora.unified import read_header


def scores_at_best(
    world: World, col: Collection, n_images: int, accel: Path, merges: tuple[str, ...]
) -> dict[str, Any]:
    """``toyworld.scores`` with each baseline at its best: columns ``cascade`` and ``merged`` hold the best
    setting of each sweep (``_best`` names them, ``_sweeps`` has every setting's mean PSNR vs truth)."""
    opts = EvalOptions(n_images=n_images, merges=merges, accel=accel)
    ev = evaluate(world.registry, world.components, col, options=opts, show_progress=False)
    ev.pop("_outputs")
    best = {kind: b["variant"] for kind, b in ev["overall"]["best"].items()}
    out: dict[str, Any] = {}
    for n, r in ev["effects"].items():
        row = {"student": r["student_vs_truth"]["psnr"], "teacher": r["teacher_vs_truth"]["psnr"]}
        if r["cascade_vs_truth"]:
            row["cascade"] = r["cascade_vs_truth"]["psnr"]
        if "merged" in best:
            row["merged"] = r["merged_vs_truth"][best["merged"]]["psnr"]
        out[n] = row
    out["_overall"] = overall(ev)
    out["_best"] = best
    out["_sweeps"] = {
        key: {s: v["psnr"] for s, v in ev["overall"][key].items()}
        for key in ("merged_vs_truth", "cascade_sweep_vs_truth")
        if key in ev["overall"]
    }
    return out


def finished(world: World, names: list[str]) -> Collection | None:
    """A collection of exactly ``names`` distilled from scratch in this registry folder (``--work``, which
    holds the runs of one command's settings)."""
    for col in world.registry.list_collections():
        if col.parent_id is None and sorted(read_header(col.file).effects) == sorted(names):
            return col
    return None


RESULTS = Path(__file__).resolve().parent / "results" / "scaling.json"


def record(path: Path, n: int, result: dict[str, Any]) -> None:
    """Merge one N's result into ``path`` (other N's entries stay), with when, where and how it ran."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[str(n)] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
        **result,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(data.items(), key=lambda kv: int(kv[0]))), indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="*", default=[10, 20, 50], help="effect counts (columns)")
    parser.add_argument(
        "--steps-per-effect", type=int, help="override DistillConfig.steps_per_effect (default: its value)"
    )
    parser.add_argument(
        "--accel",
        type=Path,
        help="acceleration LoRA for the cascade baseline (default: distil one with --general-only here)",
    )
    parser.add_argument(
        "--accel-steps", type=int, default=600, help="steps of that --general-only run (default: 600)"
    )
    parser.add_argument(
        "--merge",
        type=merge_types,
        default=",".join(DEFAULT_MERGES),
        help="merged-LoRA sweeps separated by commas, as `clora eval --merge`: cat, ties, dare_ties, linear, "
        f"all; none: skip (default: {','.join(DEFAULT_MERGES)}); the best variant is reported",
    )
    parser.add_argument(
        "--results",
        help="JSON file each N's result is merged into, keyed by N, with the date, machine and command "
        "(default: benchmarks/results/scaling.json for the full world, none for --tiny; '-': none)",
    )
    add_work_arg(parser)  # a kept folder also keeps the acceleration LoRA a run built in it
    add_world_args(parser)
    args = parser.parse_args()
    merges = args.merge
    results_file: Path | None = RESULTS if args.size == "full" else None
    if args.results:
        results_file = None if args.results == "-" else Path(args.results)
    if args.accel is not None and not args.accel.is_file():
        parser.error(f"--accel {args.accel}: no such file")

    world = open_work(args, "clora-scale-", {"steps_per_effect": args.steps_per_effect})
    largest = ordered(max(args.n))
    t0 = time.perf_counter()
    world.register(largest)  # trains the missing teachers
    ready = time.perf_counter() - t0
    print(f"{len(largest)} teachers ready in {ready:.0f} s; registry: {world.work}", flush=True)
    overrides: dict[str, object] = dict(world.overrides)
    if args.steps_per_effect:
        overrides["steps_per_effect"] = args.steps_per_effect
    accel = args.accel
    kept = world.work / f"accel-{args.accel_steps}.safetensors"
    if accel is None and kept.is_file():
        accel = kept
        print(f"acceleration LoRA: {accel} (built by an earlier run in this folder)")
    if accel is None:
        t0 = time.perf_counter()
        cfg = load_config(args.config, {**overrides, "steps": args.accel_steps})
        out = run_distill(
            world.registry,
            world.components,
            cfg,
            general_only=True,
            show_progress=False,
            out_dir=world.work / "collections",
        )
        assert out.collection is not None, out.message
        accel = Path(out.collection.file)
        shutil.copyfile(accel, kept.with_suffix(".tmp"))
        kept.with_suffix(".tmp").replace(kept)
        print(f"acceleration LoRA ({args.accel_steps} steps) in {time.perf_counter() - t0:.0f} s: {accel}")
    results: dict[str, Any] = {}
    for n in sorted(args.n):
        names = ordered(n)
        cfg = load_config(args.config, overrides)
        col = finished(world, names)
        if col is None:
            out = run_distill(
                world.registry,
                world.components,
                cfg,
                effects=names,
                auto_steps=True,
                show_progress=False,
                out_dir=world.work / "collections",
            )
            assert out.collection is not None, out.message
            col = out.collection
        else:
            print(f"N = {n}: distilled by an earlier run in this folder (collection v{col.version})")
        train = json.loads(col.metrics_json)["train"]
        res = scores_at_best(world, col, args.n_images, accel, merges)
        res["_overall"]["prompt_separation"] = world.separation(col)
        steps, ran = train["steps"], train["steps_run"]
        per_step = train["seconds_loop"] / max(ran, 1)
        # a resumed run: its last process ran part of the steps; the whole at that process's rate
        seconds = train["seconds_total"] if ran == steps else train["seconds_prepare"] + per_step * steps
        best = ", ".join(f"{kind}: {variant}" for kind, variant in res["_best"].items())
        resumed = (
            f" ({ran} of them in its last process, the rest estimated at its rate)" if ran < steps else ""
        )
        table(f"N = {n}: {steps} steps, {seconds:.0f} s{resumed}; best baseline settings: {best}", res)
        results[str(n)] = {
            "steps": steps,
            "seconds": round(seconds, 1),
            "seconds_per_step": round(per_step, 3),
            "steps_resumed": steps - ran,
            "peak_rss_mb": train["peak_rss_mb"],
            "summary": summary(res),
            "best": res.pop("_best"),
            "sweeps": res.pop("_sweeps"),
            "per_effect": res,
        }
        if results_file is not None:
            record(results_file, n, results[str(n)])

    print(f"\n{'':28}" + "".join(f"{'N = ' + k:>12}" for k in results))
    for label, key in (
        ("student dB (4 steps)", "student"),
        ("teachers dB (full sampler)", "teacher"),
        ("cascade dB (4 steps, best)", "cascade"),
        ("merged dB (full sampler, best)", "merged"),
        ("gap dB", "gap"),
        ("within 2 dB of teacher", "within_2db"),
        ("above the cascade", "above_cascade"),
        ("trigger accuracy", "trigger_accuracy"),
        ("teachers, scored alike", "teacher_trigger_accuracy"),
        ("general edits vs base dB", "general_vs_base"),
    ):
        cells = [r["summary"].get(key) for r in results.values()]
        text = ["-" if c is None else f"{c:.1%}" if "accuracy" in key else str(c) for c in cells]
        print(f"{label:28}" + "".join(f"{t:>12}" for t in text))
    for kind in ("cascade", "merged"):
        picks = "; ".join(f"N = {k}: {r['best'][kind]}" for k, r in results.items() if kind in r["best"])
        print(f"{'best ' + kind:28}{picks or '-'}")
    print(f"{'steps':28}" + "".join(f"{r['steps']:>12}" for r in results.values()))
    print(f"{'train s':28}" + "".join(f"{r['seconds']:>12}" for r in results.values()))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
