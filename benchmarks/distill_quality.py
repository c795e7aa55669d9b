"""Distill toy teachers into one LoRA and score it: per-effect PSNR vs truth, trigger accuracy, retention.

    python benchmarks/distill_quality.py                       # 8 effects, full method
    python benchmarks/distill_quality.py --ablations           # + without routing / asym. prompts / ...
    python benchmarks/distill_quality.py --ablations full on-policy --on-policy-share 0.1   # some of them
    python benchmarks/distill_quality.py --tiny --steps 60     # the test-size world, a smoke run
    python benchmarks/distill_quality.py --first 16 --steps 3000 --ablations full gap-router progress-router
        # uniform against probe-guided effect sampling (the gap and progress routers), equal steps
    python benchmarks/distill_quality.py --effects sepia invert warm blur grain confetti palette-tint streak \
        --ablations full paper-1-dmd paper-2-routing paper-3-prompts paper-4-target-sim paper-5-anchoring
        # the paper's component ablation, deterministic and stochastic effects together
    python benchmarks/distill_quality.py --table a.json b.json   # one table of rows run in two processes

Uses CLORA_HOME for the toy base and teachers (built if missing) and a fresh registry in a temp folder
(`--work DIR`: kept; the same command again skips the rows its --json file has and continues a
distillation it stopped part-way).
Every number is measured in this run on this machine; compare columns, not runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from clora_toy.data import general_batch, general_edits
from toyworld import EFFECTS, add_work_arg, add_world_args, merge_types, open_work, ordered, trigger_accuracy

from clora.distill.config import load_config
from clora.distill.run import run_distill
from clora.evaluate import EvalOptions, evaluate
from clora.generate import UnifiedModel, unfuse
from clora.metrics import means_by, psnr
from clora.plugins import Components, get_plugin_manager
from clora.sampling import euler_sample, few_step_sample

#: the toy effects whose truth is a distribution, for the component ablation
STOCHASTIC = ["grain", "confetti", "palette-tint", "streak"]
ON_POLICY = {"dmd": {"weight": 0.1}, "target_sim": {"weight": 0.1}, "critic_fm": {}}
DMD_ONLY = {"dmd": {"weight": 0.1}, "critic_fm": {}}
#: the paper's component ablation, rows (1)-(5): each on-policy throughout (no anchoring phase), adding one
#: component to the row before: multi-teacher DMD, routing (PDSR), asymmetric prompts (AOP), target
#: simulation (TS), trajectory anchoring (TA-FM)
PAPER_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "paper-1-dmd": (
        "(1) multi-teacher DMD (effect stream only, teacher prompts)",
        {"anchor_share": 0.0, "p_switch": 1.0, "asymmetric_prompts": False, "losses": DMD_ONLY},
    ),
    "paper-2-routing": (
        "(2) + routing (PDSR)",
        {"anchor_share": 0.0, "asymmetric_prompts": False, "losses": DMD_ONLY},
    ),
    "paper-3-prompts": ("(3) + asymmetric prompts (AOP)", {"anchor_share": 0.0, "losses": DMD_ONLY}),
    "paper-4-target-sim": ("(4) + target simulation (TS)", {"anchor_share": 0.0, "losses": ON_POLICY}),
    "paper-5-anchoring": (
        "(5) + trajectory anchoring (TA-FM): every term, on-policy throughout",
        {"anchor_share": 0.0},
    ),
}


def ablations(on_policy_share: float) -> dict[str, tuple[str, dict[str, Any]]]:
    """Ablation id -> (label, config overrides); "full" is the default every other row is read against."""
    tail = 1.0 - on_policy_share  # anchor_share: the on-policy terms train over the last part of the run
    return {
        "full": ("the default (anchoring; effects whose teacher varies with the seed also on-policy)", {}),
        "anchoring-only": ("anchoring alone, every effect", {"on_policy.effects": "none"}),
        "stochastic-on-policy": (
            "anchoring; the four stochastic effects also on-policy",
            {"on_policy.effects": ",".join(STOCHASTIC)},
        ),
        "on-policy-no-anchor-rows": (
            "the default, without anchoring on the on-policy effects' rows",
            {"on_policy.anchor_weight": 0.0},
        ),
        "on-policy": (
            f"+ on-policy last {on_policy_share:.0%} (DMD, target simulation)",
            {"anchor_share": tail},
        ),
        "gap-router": (
            "gap router (effects furthest from their teachers at the probe train most)",
            {"data.router": "gap"},
        ),
        "progress-router": (
            "progress router (effects whose probe PSNR rises fastest per block train most)",
            {"data.router": "progress"},
        ),
        "no-routing": ("no routing (effect stream only)", {"p_switch": 1.0}),
        "no-asymmetric-prompts": ("no asymmetric prompts", {"asymmetric_prompts": False}),
        "on-policy-no-target-sim": (
            f"+ on-policy last {on_policy_share:.0%} without target simulation",
            {"anchor_share": tail, "losses": {"level_anchor": {}, "dmd": {"weight": 0.1}, "critic_fm": {}}},
        ),
        "no-anchoring": ("no anchoring (on-policy throughout)", {"anchor_share": 0.0, "losses": ON_POLICY}),
        **PAPER_ROWS,
    }


def retention(model: UnifiedModel, n: int, steps: int) -> dict[str, Any]:
    """PSNR vs truth of the general edits: base alone (full sampler) and with the unified LoRA (few steps)."""
    bb = model.backbone
    assert bb.image_size is not None, "a toy-world benchmark"
    sources, truth, prompts = general_batch(n, bb.image_size[0], seed=424242)
    src = bb.encode_images(sources)
    tr = bb.transformer
    unfuse(tr)
    tr.disable_adapters()
    base = bb.decode_latents(
        euler_sample(bb, src, prompts, steps=steps, generator=torch.Generator().manual_seed(0))
    )
    model.activate()
    sig = torch.tensor(model.header.few_step_sigmas)
    student = bb.decode_latents(few_step_sample(bb, src, prompts, sig, torch.Generator().manual_seed(0)))
    name = {e.prompt: e.name for e in general_edits()}
    edits = [name[q] for q in prompts]
    out: dict[str, Any] = {}
    for who, images in (("base", base), ("student", student)):
        scores = psnr(images, truth)
        out[f"{who}_psnr"] = float(scores.mean())
        # per edit: the LoRA can keep most of the base's edits and spoil one (the flip, a spatial one)
        out[f"{who}_by_edit"] = {n: round(v, 2) for n, v in sorted(means_by(scores, edits).items())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--effects", nargs="*", default=EFFECTS)
    parser.add_argument(
        "--first", type=int, metavar="N", help="instead of --effects: the first N of scaling.py's order"
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument(
        "--ablations",
        nargs="*",
        metavar="ID",
        help="run these ablations, in this order (same steps; none named: all): " + ", ".join(ablations(0.5)),
    )
    parser.add_argument(
        "--on-policy-share",
        type=float,
        default=0.5,
        help="share of the steps the on-policy ablations train with DMD (+ target simulation) at the end",
    )
    parser.add_argument(
        "--merge",
        type=merge_types,
        default="linear,ties",
        help="merged-LoRA baselines for the full run (none: skip them)",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="print the ablation table of earlier runs' --json files (rows run in several processes, "
        "in the order given; a variant already in an earlier file is named by its file) and exit",
    )
    parser.add_argument(
        "--retention",
        nargs="+",
        type=Path,
        metavar="LORA",
        help="print the general edits, per edit, of these unified LoRA files (a row's collection, kept in "
        "its --work folder under collections/) against the truth, beside the base's at its default teacher "
        "steps, and exit",
    )
    add_work_arg(parser)
    add_world_args(parser)
    args = parser.parse_args()
    if args.retention:
        torch.set_num_threads(args.threads or 2)
        comps = Components.collect(get_plugin_manager())
        for path in args.retention:
            model = UnifiedModel.load(comps, path, backbone=None)
            ret = retention(model, 32, model.backbone.default_teacher_steps)
            print(f"{path}: general edits {ret['student_psnr']:.2f} dB (base {ret['base_psnr']:.2f})")
            print_by_edit(ret)
        return
    if args.table:
        merged: dict[str, Any] = {}
        for path in args.table:
            for key, row in json.loads(path.read_text()).items():
                if key in merged:  # the same variant run with another --config: named by its file
                    key, row = f"{key} [{path.stem}]", {**row, "label": f"{row['label']} [{path.stem}]"}
                merged[key] = row
        print_ablation(merged)
        return

    if args.first:
        args.effects = ordered(args.first)
    world = open_work(
        args,
        "clora-bench-",
        {
            "effects": args.effects,
            "steps": args.steps,
            "n_images": args.n_images,
            "on_policy_share": args.on_policy_share,
            "merge": list(args.merge),
        },
    )
    world.register(args.effects)
    reg, comps, work = world.registry, world.components, world.work

    table = ablations(args.on_policy_share)
    if args.ablations is None:
        variants = {"full": table["full"]}
    else:
        unknown = sorted(set(args.ablations) - set(table))
        if unknown:
            parser.error(f"unknown ablation(s) {', '.join(unknown)}; pick from {', '.join(table)}")
        variants = {k: table[k] for k in args.ablations or table}  # in the order given
    results: dict[str, Any] = {}
    if args.work is not None and args.json_out is not None and args.json_out.is_file():
        # the same command again: the rows an earlier run finished are kept, not run again
        results = {k: v for k, v in json.loads(args.json_out.read_text()).items() if k in variants}
        if results:
            print(f"rows done by an earlier run ({args.json_out}): {', '.join(results)}")
    for key, (label, overrides) in variants.items():
        if key in results:
            continue
        cfg = load_config(
            args.config,
            {"steps": args.steps, **world.overrides, **overrides},
        )
        t0 = time.perf_counter()
        outcome = run_distill(reg, comps, cfg, show_progress=False, out_dir=work / "collections")
        seconds = time.perf_counter() - t0
        col = outcome.collection
        assert col is not None
        opts = EvalOptions(n_images=args.n_images, merges=args.merge if key == "full" else ())
        ev = evaluate(reg, comps, col, options=opts, show_progress=False)
        outputs = ev.pop("_outputs")
        model = UnifiedModel.load(comps, col.file, backbone=None)
        ret = retention(model, 32, cfg.teachers.steps or model.backbone.default_teacher_steps)
        labels = ev["bleeding"]["labels"]
        m = ev["bleeding"]["matrix"]
        results[key] = {
            "label": label,
            "seconds": round(seconds, 1),
            "peak_rss_mb": outcome.metrics["train"]["peak_rss_mb"],
            "steps": outcome.metrics["train"]["steps"],
            "seconds_by_role": outcome.metrics["train"]["seconds_by_role"],
            "base_mb": outcome.metrics["train"]["base_mb"],
            "per_effect": {n: effect_scores(ev["effects"][n]) for n in labels},
            "trigger_accuracy": round(trigger_accuracy(m), 4),
            "retention": ret,
            "probe_db": outcome.metrics["train"].get("probe_db"),
        }
        del outputs
        print_variant(label, results[key])
        if args.json_out:  # after each row: a run stopped later keeps the rows it finished
            args.json_out.write_text(json.dumps(results, indent=2))
    if args.ablations is not None and len(results) > 1:
        print_ablation(results)


def effect_scores(r: dict[str, Any]) -> dict[str, Any]:
    """One effect's row of an eval: PSNR vs truth (deterministic), or the distribution metrics of the
    student and the teacher (an effect whose truth is a distribution)."""
    if r["distribution"]:
        return {"distribution": {w: r["distribution"][w] for w in ("student", "teacher")}}
    return {
        "student": r["student_vs_truth"]["psnr"],
        "teacher": r["teacher_vs_truth"]["psnr"],
        **{f"merged-{m}": v["psnr"] for m, v in (r["merged_vs_truth"] or {}).items() if v},
    }


def _psnr_rows(r: dict[str, Any]) -> dict[str, Any]:
    return {n: v for n, v in r["per_effect"].items() if "student" in v}


def _dist_means(r: dict[str, Any], way: str = "student") -> dict[str, float] | None:
    """Means over the stochastic effects of one way's distribution metrics."""
    rows = [v["distribution"][way] for v in r["per_effect"].values() if "distribution" in v]
    if not rows:
        return None
    return {k: sum(x[k] for x in rows) / len(rows) for k in rows[0]}


def print_variant(label: str, r: dict[str, Any]) -> None:
    print(f"\n== {label}: {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB (base weights {r['base_mb']} MB)")
    roles = r["seconds_by_role"]
    total = sum(roles.values()) or 1.0
    print(
        f"{r['steps']} steps, {total / r['steps']:.2f} s/step; by role: "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in roles.items())
    )
    rows = _psnr_rows(r)
    merges = [k for k in next(iter(rows.values())) if k.startswith("merged-")] if rows else []
    print(f"{'effect':14} {'student':>15} {'teacher':>15} {'gap':>7}" + "".join(f" {m:>14}" for m in merges))
    gaps = []
    for n, v in rows.items():
        gaps.append(v["teacher"] - v["student"])
        print(
            f"{n:14} {v['student']:15.2f} {v['teacher']:15.2f} {gaps[-1]:7.2f}"
            + "".join(f" {v[m]:14.2f}" for m in merges)
        )
    if gaps:
        s = sum(v["student"] for v in rows.values()) / len(gaps)
        t = sum(v["teacher"] for v in rows.values()) / len(gaps)
        print(
            f"{'mean':14} {s:15.2f} {t:15.2f} {t - s:7.2f}   "
            f"(within 2 dB: {sum(g <= 2 for g in gaps)}/{len(gaps)})"
        )
    for n, v in r["per_effect"].items():
        if "distribution" in v:
            print(
                f"{n:14} (vs true draws) "
                + "; ".join(
                    f"{way}: HF {m['hf_ratio']:.2f}x, diversity {m['diversity_ratio']:.2f}x, "
                    f"MMD {m['mmd']:.3f}"
                    for way, m in v["distribution"].items()
                )
            )
    ret = r["retention"]
    print(
        f"trigger accuracy {r['trigger_accuracy']:.1%}; general edits vs truth: "
        f"base {ret['base_psnr']:.2f} dB, "
        f"with unified LoRA {ret['student_psnr']:.2f} dB"
    )
    print_by_edit(ret)


def print_by_edit(ret: dict[str, Any]) -> None:
    if "student_by_edit" in ret:  # rows run before the per-edit scores have none
        print(
            "  by edit, with unified LoRA (base): "
            + ", ".join(
                f"{n} {v:.2f} ({ret['base_by_edit'][n]:.2f})" for n, v in ret["student_by_edit"].items()
            )
        )


def print_ablation(results: dict[str, Any]) -> None:
    def mean(r: dict[str, Any]) -> float:
        rows = _psnr_rows(r)
        return sum(v["student"] for v in rows.values()) / max(len(rows), 1)

    def per_step(r: dict[str, Any]) -> float:
        return sum(r["seconds_by_role"].values()) / r["steps"]

    ref_key = "full" if "full" in results else next(iter(results))
    full = mean(results[ref_key])
    vs = f"vs {ref_key}"[:16]
    print(
        f"\n{'variant':52} {'PSNR dB':>8} {vs:>16} {'HF ratio':>9} {'div. ratio':>10} {'MMD':>7} "
        f"{'trigger acc':>12} {'retention dB':>13} {'s/step':>7}"
    )
    for r in results.values():
        d = _dist_means(r)
        dist = "" if d is None else f"{d['hf_ratio']:9.2f} {d['diversity_ratio']:10.2f} {d['mmd']:7.3f}"
        print(
            f"{r['label']:52} {mean(r):8.2f} {mean(r) - full:16.2f} {dist or '-':>28} "
            f"{r['trigger_accuracy']:12.1%} {r['retention']['student_psnr']:13.2f} {per_step(r):7.2f}"
        )
    teachers = _dist_means(next(iter(results.values())), "teacher")
    if teachers:
        print(
            f"teachers on the stochastic effects: HF {teachers['hf_ratio']:.2f}x, diversity "
            f"{teachers['diversity_ratio']:.2f}x, MMD {teachers['mmd']:.3f}"
        )


if __name__ == "__main__":
    main()
