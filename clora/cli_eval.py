"""``clora eval``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from clora.cli_common import DeviceOption, DtypeOption, console, state

# the options of this command
CollectionOption = Annotated[
    int | None, typer.Option("--collection", help="Collection version (default: latest).")
]
EffectsOption = Annotated[
    list[str] | None, typer.Option("--effects", help="Effects to score, comma-separated or repeated.")
]
ImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--images",
        help="Folder of held-out source images, scored as centre crops at the collection's "
        "resolution (default: the base's own; real bases: the effects' example images).",
    ),
]
NImagesOption = Annotated[int, typer.Option("--n-images", help="Held-out images per effect.")]
AccelOption = Annotated[
    Path | None,
    typer.Option(
        "--accel",
        help="Acceleration LoRA (`clora distill --general-only`) for the cascade baseline: each "
        "effect's LoRA stacked with it, few steps, at acceleration strengths 0.25, 0.5, 0.75 and "
        "1 (cheap: few-step passes, cached); the best on average is reported.",
    ),
]
MergeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--merge",
        help="Merged-LoRA baselines: every member's LoRA merged into one (peft "
        "add_weighted_adapter), each name a sweep: cat (the exact sum of the deltas, each at "
        "weight 1/N or 1), ties and dare_ties (TIES / DARE-TIES of the deltas, density 0.2 or "
        "0.5, weight 1/N or 1), linear (peft's merge of A and B apart at weight 1: the old, "
        "unfair baseline); 'all', or 'none' to skip. Each variant costs one full-sampler pass "
        "per effect (cached); the best on average is reported. Default: cat,ties,dare_ties "
        "(10 variants).",
    ),
]
MetricsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--metrics",
        help="Metrics to score with, comma-separated or repeated (see `clora plugins`): psnr, "
        "ssim, and, when their weights are on disk, lpips, clip and dreamsim (README: Learned "
        "metrics). "
        "psnr is always scored (bad cases use it). Default: psnr, ssim.",
    ),
]
MarginOption = Annotated[float, typer.Option("--margin", help="Bad case: this many dB below the teacher.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the images and noise.")]
DrawsOption = Annotated[
    int,
    typer.Option(
        "--draws",
        min=2,
        help="Effects whose truth is a distribution (film grain, confetti, ...): true draws per image, and "
        "seeds per image for each way's diversity.",
    ),
]
AsJsonOption = Annotated[bool, typer.Option("--json", help="Print the results as JSON.")]
ReportOption = Annotated[
    Path | None,
    typer.Option("--report", help="Write an HTML report (tables, sheets, heat map) here."),
]
NoProgressOption = Annotated[bool, typer.Option("--no-progress", help="Do not draw a progress bar.")]


def cmd_eval(
    ctx: typer.Context,
    collection: CollectionOption = None,
    effects: EffectsOption = None,
    images: ImagesOption = None,
    n_images: NImagesOption = 16,
    accel: AccelOption = None,
    merge: MergeOption = None,
    metrics: MetricsOption = None,
    margin: MarginOption = 1.0,
    seed: SeedOption = 0,
    draws: DrawsOption = 4,
    as_json: AsJsonOption = False,
    report: ReportOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    no_progress: NoProgressOption = False,
) -> None:
    """Score a collection against its teachers and the truth, with bleeding and cost (kept on the row)."""
    from clora.cli_distill import _names
    from clora.evaluate import EvalOptions, evaluate, merge_eval
    from clora.report import write_report

    st = state(ctx)
    with st.open_registry(create=False) as reg:
        col = reg.require_collection(collection)
        opts = EvalOptions(
            n_images=n_images,
            seed=seed,
            draws=draws,
            margin_db=margin,
            accel=accel,
            images_dir=images,
            merges=parse_merges(merge),
            metrics=parse_metrics(metrics),
        )
        result = evaluate(reg, st.components, col, _names(effects), opts, device, not no_progress, dtype)
        outputs = result.pop("_outputs")
        for warning in result["warnings"]:
            typer.echo(f"Warning: {warning}", err=True)
        if report:
            page = write_report(result, outputs, report)
            typer.echo(f"report: {page}", err=as_json)
        # stored once everything above succeeded; a subset of the effects updates their rows only
        stored = json.loads(col.metrics_json or "{}").get("eval")
        reg.update_collection_metrics(col.version, {"eval": merge_eval(stored, result)})
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    print_result(result)


def print_result(result: dict[str, Any]) -> None:
    """The evaluation as tables and lines for a terminal."""
    from clora.evaluate import COMPARISONS

    # the baselines' columns: the best setting of each sweep (every setting's mean: the lines below)
    best = result["overall"]["best"]
    baselines = [(kind, best[kind]["variant"]) for kind in ("cascade", "merged") if kind in best]
    table = Table(
        "effect",
        "student",
        "teacher",
        *(f"{kind}\n{variant}" for kind, variant in baselines),
        "student vs teacher",
        "bad cases",
        title="PSNR in dB against the truth (student, cascade: few steps; teacher, merged: full sampler)",
    )
    for name, r in result["effects"].items():
        table.add_row(
            name,
            *(_db(r[k]) for k in ("student_vs_truth", "teacher_vs_truth")),
            *(
                _db(r["cascade_vs_truth"] if kind == "cascade" else (r["merged_vs_truth"] or {}).get(v))
                for kind, v in baselines
            ),
            _db(r["student_vs_teacher"]),
            "-" if r["bad_case_rate"] is None else f"{r['bad_case_rate']:.0%}",
        )
    console.print(table)
    for name, r in result["effects"].items():
        if r.get("distribution"):
            ways = "; ".join(
                f"{way} HF {m['hf_ratio']:.2f}x, diversity {m['diversity_ratio']:.2f}x, MMD {m['mmd']:.4f}"
                for way, m in r["distribution"].items()
            )
            typer.echo(
                textwrap.fill(
                    f"{name} (a distribution, vs true draws): {ways}",
                    width=max(console.width, 60),
                    subsequent_indent="  ",
                )
            )
    for line in sweep_lines(result["overall"]):
        typer.echo(textwrap.fill(line, width=max(console.width, 60), subsequent_indent="  "))
    for key, label in COMPARISONS.items():
        scores = result["overall"].get(key)
        if scores:
            typer.echo(f"mean {label}: " + ", ".join(f"{m} {v:.4g}" for m, v in scores.items()))
    b = result["bleeding"]
    teachers = f", the teachers' own: {b['teacher_bleed_rate']}" if "teacher_bleed_rate" in b else ""
    ret = result["retention"]
    kept = "-"
    if ret:
        worst = ret["worst_prompt"]
        kept = (
            f"{ret['student_vs_base_psnr']:.2f} dB vs the base on {ret['prompts']} general edits "
            f"(the worst instruction: '{worst}' {ret['by_prompt'][worst]:.2f} dB)"
        )
    typer.echo(f"bleed rate: {b['bleed_rate']} (nearest {b['reference']}{teachers}); retention: {kept}")
    c = result["cost"]
    typer.echo(
        f"unified: {c['unified']['files']} file, {c['unified']['bytes']} bytes, switch "
        f"{c['unified']['switch_ms']} ms, {c['unified']['ms_per_image']} ms/image; per-effect LoRAs: "
        f"{c['per_effect_loras']['files']} files, {c['per_effect_loras']['bytes']} bytes, switch "
        f"{c['per_effect_loras']['switch_ms']} ms, {c['per_effect_loras']['ms_per_image']} ms/image"
    )


def add_commands(app: typer.Typer) -> None:
    app.command("eval")(cmd_eval)


def _db(scores: dict[str, float] | None) -> str:
    return "-" if not scores or "psnr" not in scores else f"{scores['psnr']:.2f}"


def parse_metrics(values: list[str] | None) -> tuple[str, ...]:
    """``--metrics`` values (comma-separated or repeated), with psnr first; none given: psnr, ssim."""
    from clora.cli_distill import _names

    names = _names(values) or ["ssim"]
    return tuple(dict.fromkeys(["psnr", *names]))


def sweep_lines(overall: dict[str, Any]) -> list[str]:
    """One line per baseline sweep: every setting's mean PSNR, and the best."""
    lines = []
    for kind, key, label in (("merged", "merged", "merged LoRAs"), ("cascade", "cascade_sweep", "cascade")):
        best = overall["best"].get(kind)
        if best:
            ref = best["by"].removeprefix("psnr vs ")
            scores = ", ".join(f"{s} {v['psnr']:.2f}" for s, v in overall[f"{key}_vs_{ref}"].items())
            lines.append(f"{label}, mean PSNR vs {ref} (best: {best['variant']}): {scores}")
    return lines


def parse_merges(values: list[str] | None) -> tuple[str, ...]:
    """``--merge`` values (comma-separated or repeated): names of ``clora.merge.SWEEPS``; none given: the
    default sweeps; 'all': every sweep; 'none': no merges."""
    from clora.cli_distill import _names
    from clora.errors import CloraError
    from clora.merge import DEFAULT_MERGES, SWEEPS

    names = _names(values)
    if names is None:
        return DEFAULT_MERGES
    if names == ["none"]:
        return ()
    if names == ["all"]:
        return tuple(SWEEPS)
    for n in names:
        if n not in SWEEPS:
            raise CloraError(f"unknown --merge '{n}'; choose from {', '.join(SWEEPS)}, 'all' or 'none'")
    return tuple(dict.fromkeys(names))
