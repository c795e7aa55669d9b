"""``clora distill``, ``clora caption``, ``clora collections`` and ``clora runs``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from clora.cli_common import DtypeOption, console, print_json, state


def _names(values: list[str] | None) -> list[str] | None:
    """``--effects a,b --effects c`` -> ``[a, b, c]``."""
    if not values:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _eval_summary(ev: dict[str, Any] | None) -> str:
    """One cell: mean PSNR vs truth of student / teacher / the best merged LoRA, bleed rate, speed-up."""
    if not ev:
        return "-"
    o = ev["overall"]
    parts = []
    for label, key in (("student", "student_vs_truth"), ("teacher", "teacher_vs_truth")):
        if key in o:
            parts.append(f"{label} {o[key]['psnr']:.1f} dB")
    merged = o.get("best", {}).get("merged")
    if merged is None and o.get("merged_vs_truth"):  # stored before the sweeps named their best
        scores = {m: v["psnr"] for m, v in o["merged_vs_truth"].items()}
        pick = max(scores, key=scores.__getitem__)
        merged = {"variant": pick, "by": "psnr vs truth", "psnr": scores[pick]}
    if merged and merged["by"] == "psnr vs truth":
        parts.append(f"merged {merged['psnr']:.1f} dB ({merged['variant']})")
    student = o.get("distribution", {}).get("student")
    if student:  # the effects whose truth is a distribution
        parts.append(f"HF {student['hf_ratio']:.2f}x")
    if ev["bleeding"]["bleed_rate"] is not None:
        parts.append(f"bleed {ev['bleeding']['bleed_rate']:.0%}")
    cost = ev["cost"]
    if cost["unified"]["ms_per_image"]:
        speedup = cost["per_effect_loras"]["ms_per_image"] / cost["unified"]["ms_per_image"]
        parts.append(f"{speedup:.1f}x faster")
    return ", ".join(parts)


# the options of `clora distill`
EffectsOption = Annotated[
    list[str] | None,
    typer.Option("--effects", help="Effects to distill, comma-separated or repeated (default: all)."),
]
StepsOption = Annotated[
    int | None,
    typer.Option(
        "--steps",
        min=1,
        help="Training steps (default: max(600, 375 per effect); incremental: 700 per new effect).",
    ),
]
AnchorShareOption = Annotated[
    float | None,
    typer.Option(
        "--anchor-share",
        help="Share of the steps, at the start, spent on the cheap anchoring phase "
        "(regression onto the teachers' outputs at the sampler's noise levels) before an "
        "on-policy phase with DMD and target simulation for every effect (default 1: the whole run "
        "anchors, with --on-policy effects also on-policy; on the toy, on-policy training of "
        "deterministic effects costs PSNR: benchmarks/README.md, Ablations).",
    ),
]
OnPolicyOption = Annotated[
    str | None,
    typer.Option(
        "--on-policy",
        help="Effects whose rows also train on-policy (DMD on the student's own samples, target "
        "simulation, a critic) while the rest anchor: auto (default: those whose teacher's texture changes "
        "with the seed by 5% of the edit or more, such as film grain or sparkles at random places, "
        "measured on 4 sources before training; a colour drawn for the whole image does not count; "
        "anchoring alone averages such results into one smooth image), none, or names, comma-separated. "
        "Their targets are drawn with 20 teacher sampler steps or more (teachers.on_policy_steps). "
        "They train and sample with few-step levels of their own, down to 0.25 (student.on_policy_shift 1; "
        "--set student.on_policy_shift=null gives them the collection's). On the toy at the default "
        "budget this brings their textures' MMD to the truth from 0.28 to 0.11, the deterministic effects "
        "0.1 dB under anchoring alone, and costs the base's own edits 1.3 dB; none keeps those "
        "(benchmarks/README.md).",
    ),
]
RankOption = Annotated[
    int | None,
    typer.Option(
        "--rank",
        min=1,
        help="LoRA rank of the unified LoRA. Default: from the number of effects, by the base model's rule "
        "(the toy's: 8 per effect, rounded up to a multiple of 16, 16 to 128; 64 for 8 effects, 128 from 16 "
        "on). Above rank 32 the learning rate falls as sqrt(32 / rank) unless optimizer.lr is set (--set, "
        "--config).",
    ),
]
FewStepsOption = Annotated[
    int | None,
    typer.Option("--few-steps", help="Sampling steps of the unified LoRA: 4 or 8 (default 4)."),
]
PSwitchOption = Annotated[
    float | None,
    typer.Option(
        "--p-switch",
        help="Share of the blocks that train effects; the rest, evenly spaced, train general edits "
        "(default 0.9).",
    ),
]
BatchSizeOption = Annotated[int | None, typer.Option("--batch-size", help="Images per step (default 16).")]
BaseOption = Annotated[
    str | None,
    typer.Option("--base", help="Base model id (default: the effects' base or the default)."),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="JSON file with any config fields, in sections (clora/distill/config.py); --set and the "
        "options here override it.",
    ),
]
SettingsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Set any config field: section.field=value (JSON value or text), repeatable, e.g. "
        "--set optimizer.lr=0.002 --set teachers.steps=20; --set data.router=gap trains the effects "
        "furthest from their teachers most, --set data.target_db=38 ends the run once every effect's "
        "samples score 38 dB PSNR against its teacher's. Every field is described in "
        "clora/distill/config.py.",
    ),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="Torch device: cpu, cuda, cuda:1 ... (default cpu).")
]
ResolutionOption = Annotated[
    int | None,
    typer.Option(
        "--resolution",
        help="Resize sources to about this many pixels squared, keeping each one's aspect "
        "(default: the base's own, 1024 for Qwen-Image-Edit; the toy ignores it).",
    ),
]
GeneralDataOption = Annotated[
    Path | None,
    typer.Option(
        "--general-data",
        help='Folder of general-stream images with prompts.jsonl (one {"image", "prompt"} per '
        "line) or prompt.txt (one instruction for all). Default: the base's built-in general "
        "edits; real bases: the effects' example images with a built-in list of neutral "
        "instructions (keep it as it is, slightly brighter, a little more contrast, ...).",
    ),
]
IncrementalOption = Annotated[
    bool,
    typer.Option("--incremental", help="Grow the latest collection with the registered effects it lacks."),
]
GrowRankOption = Annotated[
    int | None,
    typer.Option(
        "--grow-rank",
        min=0,
        help="With --incremental: new LoRA components for the new effects; the parent's stay "
        "fixed, so the file's rank grows by this much. Default: up to the rank a full run of all the "
        "effects would pick (see --rank), by at least 16. 0: retrain the parent's components (fixed "
        "size; old effects drift).",
    ),
]
GeneralOnlyOption = Annotated[
    bool,
    typer.Option("--general-only", help="Distill only few-step sampling of the base (an acceleration LoRA)."),
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue the last unfinished run from its last checkpoint.")
]
RunIdOption = Annotated[str | None, typer.Option("--run", help="With --resume: the run id to continue.")]
FreshOption = Annotated[
    bool,
    typer.Option(
        "--fresh",
        help="Start a new run even when an unfinished one has the same plan and settings (by default "
        "that one continues from its last checkpoint).",
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Folder for the unified LoRA (default: 'collections' beside the registry)."),
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Seed of routing, noise and data order (0).")]
NoProgressOption = Annotated[bool, typer.Option("--no-progress", help="Do not draw progress bars.")]
AsJsonOption = Annotated[bool, typer.Option("--json", help="Print the new collection as JSON.")]


def cmd_distill(
    ctx: typer.Context,
    effects: EffectsOption = None,
    steps: StepsOption = None,
    anchor_share: AnchorShareOption = None,
    on_policy: OnPolicyOption = None,
    rank: RankOption = None,
    few_steps: FewStepsOption = None,
    p_switch: PSwitchOption = None,
    batch_size: BatchSizeOption = None,
    base: BaseOption = None,
    config: ConfigOption = None,
    settings: SettingsOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    resolution: ResolutionOption = None,
    general_data: GeneralDataOption = None,
    incremental: IncrementalOption = False,
    grow_rank: GrowRankOption = None,
    general_only: GeneralOnlyOption = False,
    resume: ResumeOption = False,
    run_id: RunIdOption = None,
    fresh: FreshOption = False,
    out: OutOption = None,
    seed: SeedOption = None,
    no_progress: NoProgressOption = False,
    as_json: AsJsonOption = False,
) -> None:
    """Distill effect LoRAs and few-step sampling into one unified LoRA (a new collection version)."""
    from clora.distill.config import load_config
    from clora.distill.run import run_distill
    from clora.errors import CloraError

    st = state(ctx)
    if fresh and resume:
        raise CloraError("--fresh starts a new run and --resume continues one; pass one of them")
    overrides: dict[str, Any] = {
        "steps": steps,
        "anchor_share": anchor_share,
        "on_policy_effects": on_policy,
        "rank": rank,
        "few_steps": few_steps,
        "p_switch": p_switch,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "resolution": resolution,
        "general_data": str(general_data.resolve()) if general_data else None,
        "seed": seed,
        "incremental_grow_rank": grow_rank,
    }
    cfg = load_config(config, overrides, settings)
    with st.open_registry(create=False) as reg:
        outcome = run_distill(
            reg,
            st.components,
            cfg,
            effects=_names(effects),
            base=base,
            incremental=incremental,
            general_only=general_only,
            resume=resume,
            run_id=run_id,
            fresh=fresh,
            out_dir=out,
            show_progress=not no_progress,
            auto_steps="steps" not in cfg.model_fields_set,
        )
        version = None
        if outcome.collection is not None:
            c = outcome.collection
            version = reg.collection_version(c.parent_id)
    if as_json and outcome.collection is not None:
        print_json(outcome.collection.to_dict(parent_version=version))
    else:
        typer.echo(outcome.message)


def cmd_caption(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Effects to caption (default: all).")] = None,
    captioner: Annotated[str, typer.Option("--captioner", help="Captioner plugin id.")] = "template",
    force: Annotated[bool, typer.Option("--force", help="Replace existing captions too.")] = False,
) -> None:
    """Write the student caption of effects that have none (or all, with --force)."""
    st = state(ctx)
    cap = st.components.get_captioner(captioner)
    with st.open_registry(create=False) as reg:
        effects = [reg.get_effect(n) for n in names] if names else reg.list_effects()
        for e in effects:
            if e.caption and not force:
                continue
            text = cap.caption(e)
            reg.set_caption(e.name, text)
            typer.echo(f"{e.name}: {text}")


def cmd_collections(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List unified LoRA versions (collections), newest last."""
    st = state(ctx)
    rows: list[dict[str, Any]] = []
    if st.registry_exists():
        with st.open_registry(create=False) as reg:
            cs = reg.list_collections()
            by_id = {c.id: c.version for c in cs}
            rows = [c.to_dict(parent_version=by_id.get(c.parent_id) if c.parent_id else None) for c in cs]
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no collections yet; run `clora distill`")
        return
    # narrow enough for an 80-column terminal: triggers and files are in --json
    table = Table("", "from", "base", "effects", "last eval", box=None, padding=(0, 1))
    for r in rows:
        table.add_row(
            f"v{r['version']}",
            f"v{r['parent_version']}" if r["parent_version"] else "-",
            r["base"],
            f"{len(r['members'])}: " + ", ".join(m["effect"] for m in r["members"]),
            _eval_summary(r["metrics"].get("eval")),
        )
    console.print(table)
    typer.echo("triggers, files and every score: clora collections --json")


def cmd_runs(ctx: typer.Context) -> None:
    """List distill runs with their status and progress."""
    st = state(ctx)
    if not st.registry_exists():
        typer.echo("no runs yet")
        return
    with st.open_registry(create=False) as reg:
        all_runs = reg.list_runs()
    table = Table("run", "kind", "status", "step", "started", "message")
    for r in all_runs:
        table.add_row(r.id, r.kind, r.status, f"{r.step}/{r.total_steps}", r.started_at, r.message or "")
    console.print(table)


def add_commands(app: typer.Typer) -> None:
    app.command("distill")(cmd_distill)
    app.command("caption")(cmd_caption)
    app.command("collections")(cmd_collections)
    app.command("runs")(cmd_runs)
