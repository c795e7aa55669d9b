"""Incremental vs full distillation: wall time, and fidelity of the new and the old effects.

    python benchmarks/incremental.py                     # 8 effects, +2 incrementally, vs all 10 from scratch
    python benchmarks/incremental.py --tiny              # the test-size world, a smoke run
    python benchmarks/incremental.py --from DIR --no-scratch   # grow a collection an earlier run made

Runs, in one fresh registry: (1) a full distill of the first effects (default step count),
(2) `--incremental` with the added effects (default: steps_per_new_effect per new effect),
(3) a full distill of all effects from scratch. Prints wall-time ratio (2)/(3), each new effect's
student-vs-truth gap to its teacher, and each old effect's change from (1) to (2).
Uses CLORA_HOME for the toy base and teachers (built if missing). Numbers are from this run only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from toyworld import EFFECTS, NEXT, World, add_world_args, scores, table

from clora.distill.config import load_config
from clora.distill.run import run_distill
from clora.registry import Collection, Registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", nargs="*", default=EFFECTS, help="effects of the first full distill")
    parser.add_argument("--more", nargs="*", default=NEXT, help="effects added with --incremental")
    parser.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        help="a folder of an earlier benchmark run (registry.db, collections/) whose latest collection "
        "holds the --first effects: it is (1), and is not distilled again",
    )
    parser.add_argument(
        "--no-scratch", action="store_true", help="skip (3), the from-scratch run (no wall-time ratio)"
    )
    add_world_args(parser)  # --config: no "steps" in it, the runs use their default step counts
    args = parser.parse_args()

    world = World.open(args.size, "clora-incr-", args.threads, work=args.from_dir)
    world.build(args.first + args.more)
    reg, comps, work, register = world.registry, world.components, world.work, world.register

    def distill(**kw: Any) -> tuple[Collection, float, int]:
        cfg = load_config(args.config, world.overrides)
        t0 = time.perf_counter()
        out = run_distill(
            reg, comps, cfg, show_progress=False, out_dir=work / "collections", auto_steps=True, **kw
        )
        assert out.collection is not None, out.message
        return out.collection, time.perf_counter() - t0, out.metrics["train"]["steps"]

    print(f"registry and collections: {work}", flush=True)
    if args.from_dir:
        v1, t1, s1 = _earlier(reg, args.first)
    else:
        register(args.first)
        v1, t1, s1 = distill()
    before = scores(reg, comps, v1, args.n_images)
    table(f"full {len(args.first)} (v1): {s1} steps, {t1:.0f} s", before)
    register(args.more)
    v2, t2, s2 = distill(incremental=True)
    after = scores(reg, comps, v2, args.n_images)
    table(f"incremental +{len(args.more)} (v2): {s2} steps, {t2:.0f} s", after)
    scratch: dict[str, Any] = {}
    t3 = s3 = p2 = 0.0
    if not args.no_scratch:
        v3, t3, s3 = distill(effects=args.first + args.more)
        scratch = scores(reg, comps, v3, args.n_images)
        table(f"full {len(args.first) + len(args.more)} from scratch (v3): {s3} steps, {t3:.0f} s", scratch)
        print(f"\nincremental / full-from-scratch wall time: {t2 / t3:.1%} ({t2:.0f} s / {t3:.0f} s)")
        # (3) found the new effects' teacher targets in the cache, because (2) computed them; a user who
        # distils all of them from scratch instead computes them there
        p2 = float(json.loads(v2.metrics_json or "{}").get("train", {}).get("seconds_prepare", 0.0))
        print(
            f"the same, with (3) charged the {p2:.0f} s that (2) spent preparing them: "
            f"{t2 / (t3 + p2):.1%} ({t2:.0f} s / {t3 + p2:.0f} s)"
        )
    print(f"\n{'new effect':14} {'incremental':>12} {'scratch':>9} {'teacher':>9} {'gap':>6}")
    for n in args.more:
        a = after[n]
        s = f"{scratch[n]['student']:9.2f}" if scratch else f"{'-':>9}"
        gap = a["teacher"] - a["student"]
        print(f"{n:14} {a['student']:12.2f} {s} {a['teacher']:9.2f} {gap:6.2f}")
    print(f"\n{'old effect':14} {'before':>9} {'after':>9} {'change':>8}")
    for n in args.first:
        b, a = before[n]["student"], after[n]["student"]
        print(f"{n:14} {b:9.2f} {a:9.2f} {a - b:8.2f}")
    grown = growth(before, after, scratch, args.first, args.more)
    print(
        f"\nold effects against v1: mean {grown['old_change_mean']:+.2f} dB, worst "
        f"{grown['old_change_worst']:+.2f} ({grown['old_worst']}), {grown['old_losing_over_0.5db']} of "
        f"{len(args.first)} lose more than 0.5 dB"
    )
    for group in ("old", "new", "all"):
        m = grown[group]
        vs = f", from scratch {m['scratch']:.2f}" if "scratch" in m else ""
        print(f"{group} effects, mean dB: grown {m['grown']:.2f}{vs}, teachers {m['teacher']:.2f}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "summary": grown,
                    "seconds": {
                        "full_first": t1,
                        "incremental": t2,
                        "full_all": t3,
                        "prepare_incremental": p2,
                    },
                    "steps": {"full_first": s1, "incremental": s2, "full_all": s3},
                    "before": before,
                    "after": after,
                    "scratch": scratch,
                },
                indent=2,
            )
        )


def growth(
    before: dict[str, Any], after: dict[str, Any], scratch: dict[str, Any], first: list[str], more: list[str]
) -> dict[str, Any]:
    """What growing cost the old effects (each one's change from v1 to v2) and the mean student dB of the
    old, new and all effects grown, from scratch (when run) and of their teachers."""
    change = {n: after[n]["student"] - before[n]["student"] for n in first}
    worst = min(change, key=change.__getitem__)

    def means(names: list[str]) -> dict[str, float]:
        cols = {"grown": after, "teacher": after, **({"scratch": scratch} if scratch else {})}
        key = {"grown": "student", "scratch": "student", "teacher": "teacher"}
        return {c: round(sum(r[n][key[c]] for n in names) / len(names), 2) for c, r in cols.items()}

    return {
        "old_change_mean": round(sum(change.values()) / len(change), 2),
        "old_change_worst": round(change[worst], 2),
        "old_worst": worst,
        "old_losing_over_0.5db": sum(c < -0.5 for c in change.values()),
        "old": means(first),
        "new": means(more),
        "all": means(first + more),
    }


def _earlier(reg: Registry, first: list[str]) -> tuple[Collection, float, int]:
    """The latest collection of an earlier run's registry, checked to hold exactly ``first``."""
    col = reg.get_collection()
    if col is None or {m.effect_name for m in col.members} != set(first):
        raise SystemExit(f"--from: the latest collection in {reg.path} must hold exactly {' '.join(first)}")
    train = json.loads(col.metrics_json or "{}").get("train", {})
    return col, float(train.get("seconds_total", 0.0)), int(train.get("steps", 0))


if __name__ == "__main__":
    main()
