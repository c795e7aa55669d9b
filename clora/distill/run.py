"""``clora distill``: plan a run from the registry, prepare, loop, write the unified LoRA and its collection.

The loop itself is :mod:`clora.distill.loop`; this module is the bookkeeping around it.
"""

from __future__ import annotations

import contextlib
import json
import resource
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from clora.backbone import Backbone
from clora.bases import get_factory
from clora.devices import pick
from clora.distill.adapters import STUDENT, AdapterSet
from clora.distill.config import DistillConfig, read_config
from clora.distill.loop import Distiller, LoopResult, NonFiniteLossError, effect_levels
from clora.distill.plan import EffectPlan, Plan
from clora.distill.prepare import general_data_pairs, prepare
from clora.distill.resolve import BaseDefaults, ParentRun, resolve
from clora.effects import resolve_base
from clora.errors import CloraError, OutputError, RegistryError
from clora.fileio import atomic_path, os_error_message, save_torch, sha256_file
from clora.lora import check_fits, read_lora
from clora.paths import clora_home
from clora.plugins import Components
from clora.registry import RETIRED, Collection, Effect, Registry, Run
from clora.runlock import RunLock
from clora.sampling import few_step_sigmas
from clora.unified import UnifiedHeader, read_header, write_unified

__all__ = ["DistillConfig", "DistillOutcome", "run_distill"]


@dataclass
class DistillOutcome:
    """What a finished (or no-op) run produced."""

    collection: Collection | None
    run_id: str | None
    message: str
    metrics: dict[str, Any]


def state_path(unified: str | Path) -> Path:
    """Where the critic and optimizer state of a collection live, beside its file."""
    p = Path(unified)
    return p.with_name(p.stem + ".state.pt")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def ensure_captions(
    registry: Registry, components: Components, effects: list[Effect], captioner_id: str
) -> None:
    """Fill missing captions with the captioner (so the plan can freeze them)."""
    captioner = None
    for e in effects:
        if not e.caption:
            captioner = captioner or components.get_captioner(captioner_id)
            e.caption = registry.set_caption(e.name, captioner.caption(e)).caption


def _select(registry: Registry, names: list[str] | None) -> list[Effect]:
    if not names:
        return registry.list_effects()
    chosen = [registry.get_effect(n) for n in names]
    for e in chosen:
        if e.status == RETIRED:
            raise CloraError(
                f"effect '{e.name}' was removed (retired); add it back with `clora effect add {e.name}` "
                "to distill it (it keeps its trigger)"
            )
    return chosen


def _base_for(registry: Registry, effects: list[Effect], base: str | None) -> str:
    if base:
        return base
    bases = {e.base_id for e in effects if e.base_id}
    if len(bases) > 1:
        raise CloraError(
            f"the effects are bound to different bases ({', '.join(sorted(bases))}); "
            "pick effects of one base with --effects or pass --base"
        )
    if bases:
        return bases.pop()
    default = resolve_base(registry, None)
    if default:
        return default
    raise CloraError(
        "no base model: effects are unbound and no default is set; pass --base or `clora base use ID`"
    )


def _check_teachers(
    components: Components, chosen: list[Effect], shapes: dict[str, tuple[int, int]], base_id: str
) -> None:
    """Every chosen effect is bound to this base, its file unchanged since it was added, and fits it."""
    for e in chosen:
        if e.base_id and e.base_id != base_id:
            raise CloraError(f"effect '{e.name}' is bound to base '{e.base_id}', not '{base_id}'")
        try:
            lora = read_lora(e.lora_path, components.teacher_providers(), module_names=shapes)
        except CloraError as err:
            if e.status != RETIRED:
                raise
            raise CloraError(
                f"removed effect '{e.name}' of the collection being grown cannot be replayed: {err}; "
                f"add it back with its LoRA (`clora effect add {e.name} --lora FILE --prompt TEXT`)"
            ) from None
        if lora.sha256 != e.lora_sha256:
            record = (
                f"`clora effect add {e.name} --lora {e.lora_path} --prompt TEXT`"
                if e.status == RETIRED
                else f"`clora effect update {e.name} --lora {e.lora_path}`"
            )
            raise CloraError(
                f"the LoRA file of effect '{e.name}' ({e.lora_path}) changed since it was added; if the "
                f"change is meant, record it ({record}; the trigger stays)"
            )
        check_fits(lora.modules, shapes, base_id)


def _replayed(registry: Registry, parent: Collection, chosen: list[Effect]) -> list[Effect]:
    """The parent's members an incremental run replays besides the chosen effects (retired ones too:
    their rows keep the teacher)."""
    missing = [m.effect_name for m in parent.members if m.effect_name not in {e.name for e in chosen}]
    by_name = {e.name: e for e in registry.list_effects(retired=True)}
    gone = [n for n in missing if n not in by_name]
    if gone:
        raise CloraError(
            f"effect(s) {', '.join(gone)} of collection v{parent.version} were deleted from the registry "
            "(before clora kept removed members), so their teachers are unknown; re-add them with "
            "`clora effect add` (they get their triggers back) so they can be replayed"
        )
    return [by_name[n] for n in missing]


def plan_run(
    registry: Registry,
    components: Components,
    cfg: DistillConfig,
    *,
    effects: list[str] | None,
    base: str | None,
    incremental: bool,
    general_only: bool,
    out_dir: Path,
) -> Plan | str:
    """A new run's plan, or a message when there is nothing to do."""
    parent: Collection | None = registry.get_collection() if incremental else None
    if incremental and parent is None:
        raise CloraError("no collection to grow yet; run `clora distill` first")
    if general_only:
        chosen: list[Effect] = []
        base_id = _base_for(registry, registry.list_effects(), base)
    else:
        chosen = _select(registry, effects)
        if not chosen:
            raise CloraError("no effects to distill; add some with `clora effect add`")
        base_id = _base_for(registry, chosen, base)
    if parent is not None and parent.base_id != base_id:
        raise CloraError(f"collection v{parent.version} is for base '{parent.base_id}', not '{base_id}'")

    factory = get_factory(components, registry, base_id)
    if parent is not None and read_header(parent.file).base_fingerprint != factory.fingerprint:
        raise CloraError(
            f"collection v{parent.version} was distilled on other weights of base '{base_id}' than the "
            "ones installed, so it cannot be grown; run `clora distill` without --incremental"
        )
    old_members = {m.effect_name: m for m in parent.members} if parent else {}
    if parent is not None:
        if all(e.name in old_members for e in chosen):
            return f"nothing new: collection v{parent.version} already has every selected effect"
        chosen = chosen + _replayed(registry, parent, chosen)
    _check_teachers(components, chosen, factory.module_shapes(), base_id)
    ensure_captions(
        registry, components, [e for e in chosen if e.name not in old_members], cfg.student.captioner
    )

    plans = []
    for e in chosen:
        member = old_members.get(e.name)
        plans.append(
            EffectPlan(
                name=e.name,
                trigger=e.trigger,
                caption=member.caption if member else (e.caption or ""),
                teacher_prompt=e.teacher_prompt,
                lora_path=e.lora_path,
                lora_sha256=e.lora_sha256,
                new=member is None,
            )
        )
    run_id = new_run_id()
    kind = "general-only" if general_only else ("incremental" if parent else "full")
    return Plan(
        run_id=run_id,
        kind=kind,
        base_id=base_id,
        effects=plans,
        parent_version=parent.version if parent else None,
        parent_id=parent.id if parent else None,
        parent_state=str(state_path(parent.file)) if parent else None,
        out_file=str(out_dir / f"{run_id}.safetensors"),
        extra={"examples": {e.name: e.examples_dir for e in chosen}},
    )


def run_distill(
    registry: Registry,
    components: Components,
    cfg: DistillConfig,
    *,
    effects: list[str] | None = None,
    base: str | None = None,
    incremental: bool = False,
    general_only: bool = False,
    resume: bool = False,
    run_id: str | None = None,
    fresh: bool = False,
    out_dir: Path | None = None,
    show_progress: bool = True,
    auto_steps: bool = False,
    log: Any = None,
) -> DistillOutcome:
    """Plan (or reload) a run, prepare, loop, and record a new collection version.

    ``auto_steps`` (no explicit step count): an incremental run trains ``steps_per_new_effect`` per new
    effect instead of ``steps``; a full run trains ``max(steps, steps_per_effect x effects)``. A new plan
    that an unfinished run already has (same base, effects, teachers, parent and resolved config)
    continues that run, unless ``fresh``. The run holds its lock (:mod:`clora.runlock`) while it runs.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    t_start = time.monotonic()
    backbone = None
    if resume:
        plan, cfg, run_dir, lock = _reopen(registry, run_id)
    else:
        out = out_dir or registry.path.resolve().parent / "collections"
        planned = plan_run(
            registry,
            components,
            cfg,
            effects=effects,
            base=base,
            incremental=incremental,
            general_only=general_only,
            out_dir=out,
        )
        if isinstance(planned, str):
            return DistillOutcome(None, None, planned, {})
        backbone, cfg = _resolve(registry, components, cfg, planned, auto_steps, say)
        twin = None if fresh else _unfinished_twin(registry, planned, cfg, say)
        if twin is not None:
            plan, cfg, run_dir, lock = _reopen(registry, twin.id)
            say(
                f"run {twin.id} of the same effects and settings stopped at step {twin.step} of "
                f"{twin.total_steps} ({twin.status}); continuing it (`clora distill --fresh` starts over)"
            )
        else:
            plan = planned
            run_dir, lock = _record(registry, plan, cfg)

    try:
        return _execute(registry, components, cfg, plan, run_dir, show_progress, say, backbone, t_start)
    except (NonFiniteLossError, CloraError) as e:
        _stopped(registry, plan.run_id, "failed", str(e))
        raise
    except KeyboardInterrupt:
        _stopped(registry, plan.run_id, "interrupted", "interrupted; `clora distill --resume` continues it")
        raise
    except (torch.OutOfMemoryError, MemoryError) as e:
        message = (
            f"out of memory on {cfg.device} ({_first_line(e)}); the run keeps its last checkpoint: lower "
            "--batch-size or --resolution and start again (`clora distill --fresh`), or free memory and "
            "`clora distill --resume`"
        )
        _stopped(registry, plan.run_id, "failed", message)
        raise CloraError(message) from None
    except Exception as e:
        _stopped(registry, plan.run_id, "failed", f"crashed: {e.__class__.__name__}: {_first_line(e)}")
        raise
    finally:
        lock.release()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0]


def _stopped(registry: Registry, run_id: str, status: str, message: str) -> None:
    """Record why a run stopped; a registry that cannot take it (a full disk) must not hide the cause."""
    with contextlib.suppress(RegistryError):
        registry.update_run(run_id, status=status, message=message)


def _identity(plan: Plan) -> dict[str, Any]:
    """What makes two plans the same run: everything but the run id (the output folder counts)."""
    data = asdict(plan)
    del data["run_id"]
    data["out_file"] = str(Path(plan.out_file).parent)
    return data


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """``steps 40 -> 6`` for each (nested) field that differs."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key} {x} -> {y}")
    return out


def _unfinished_twin(registry: Registry, plan: Plan, cfg: DistillConfig, say: Any) -> Run | None:
    """The unfinished run (interrupted or failed) a new run would repeat: same plan and resolved config.

    Only runs newer than the last completed run of the same effects count. An unfinished one of the same
    effects that differs gets a note saying what differs and how to continue it; one of the same plan
    that is running now is an error (two processes would train the same thing)."""
    names = sorted(e.name for e in plan.effects)
    wanted, config = _identity(plan), json.loads(cfg.model_dump_json())
    for run in reversed(registry.list_runs()):
        try:
            other = Plan.load(Path(run.run_dir) / "plan.json")
            stored = json.loads((Path(run.run_dir) / "config.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if sorted(e.name for e in other.effects) != names or other.base_id != plan.base_id:
            continue
        if run.status == "completed":
            return None
        same_plan = _identity(other) == wanted
        if run.status == "running":
            if same_plan:
                raise CloraError(
                    f"run {run.id} of the same effects is running now; wait for it, or pass --fresh to "
                    "start another run"
                )
            continue
        if same_plan and stored == config:
            return run
        changed = [e.name for e in plan.effects if e not in other.effects]
        why = (
            f"its settings differ ({', '.join(_differences(stored, config)[:3])})"
            if same_plan
            else f"{', '.join(changed)} changed since"
            if changed
            else "its parent, examples or output folder differ"
        )
        say(
            f"note: run {run.id} of these effects stopped at step {run.step} of {run.total_steps} "
            f"({run.status}), but {why}; starting a new run (`clora distill --resume --run {run.id}` "
            "continues that one as it was)"
        )
        return None
    return None


def _reopen(registry: Registry, run_id: str | None) -> tuple[Plan, DistillConfig, Path, RunLock]:
    """An unfinished run's plan, resolved config, folder and lock (``run_id`` None: the latest
    unfinished); its teachers must be the files it started with."""
    run = registry.get_run(run_id) if run_id else registry.get_run(unfinished=True)
    if run is None:
        raise CloraError(
            f"no run {run_id!r} to resume; see `clora runs`" if run_id else "no distill run to resume"
        )
    if run.status == "completed":
        raise CloraError(
            f"run {run.id} already completed (collection v{registry.collection_version(run.collection_id)})"
        )
    run_dir = Path(run.run_dir)
    lock = RunLock(run_dir, run.id)  # another process running it: an error
    try:
        plan = Plan.load(run_dir / "plan.json")
        stored = json.loads((run_dir / "config.json").read_text())
        _check_planned_teachers(plan)
        _sweep_temp_files(run_dir, plan)
        # runs from before the plan kept the fixed components had them in the config
        plan.frozen_rank = plan.frozen_rank or int(stored.get("frozen_rank", 0))
        registry.update_run(run.id, status="running", message=None)
    except BaseException:
        lock.release()
        raise
    return plan, read_config(stored), run_dir, lock


def _check_planned_teachers(plan: Plan) -> None:
    """Each teacher file of a run is the one its plan recorded (a resumed run must not mix teachers)."""
    for e in plan.effects:
        try:
            digest = sha256_file(e.lora_path)
        except OSError as err:
            raise CloraError(
                f"{os_error_message('read the LoRA of effect ' + repr(e.name), e.lora_path, err)}; run "
                f"{plan.run_id} needs the file it started with"
            ) from None
        if digest != e.lora_sha256:
            raise CloraError(
                f"the LoRA file of effect '{e.name}' ({e.lora_path}) changed since run {plan.run_id} "
                "started; put the old file back to continue it, or start over with the new one "
                "(`clora distill --fresh`)"
            )


def _sweep_temp_files(run_dir: Path, plan: Plan) -> None:
    """Remove the temp files a killed write of this run left (never read: only a rename publishes one)."""
    out = Path(plan.out_file)
    leftovers = [*run_dir.glob(".*.tmp"), *out.parent.glob(f".{out.stem}.*.tmp")]
    for path in leftovers:
        with contextlib.suppress(OSError):
            path.unlink()


def _resolve(
    registry: Registry, components: Components, cfg: DistillConfig, plan: Plan, auto_steps: bool, say: Any
) -> tuple[Backbone, DistillConfig]:
    """Check the request, load the base and resolve the run's config (the fixed components and the
    parent's scale go into ``plan``); nothing is recorded yet, so a failure leaves nothing behind."""
    factory = get_factory(components, registry, plan.base_id)
    device, dtype, dtype_name = pick(cfg.device, cfg.dtype, factory.default_dtype(cfg.device))
    if cfg.data.general_data is not None:
        general_data_pairs(Path(cfg.data.general_data), cfg.data.general_pool)
    if cfg.student.target_modules is not None:
        layers = factory.module_shapes()
        asked = cfg.student.target_modules
        missing = [m for m in asked if not any(n == m or n.endswith("." + m) for n in layers)]
        if missing:
            raise CloraError(
                f"target_modules {missing} name no layer of base '{plan.base_id}'; leave the field "
                "out for the base model's own choice"
            )
    parent = None
    if plan.parent_version is not None:
        parent_col = registry.require_collection(plan.parent_version)
        # the modules come from the file's header, which records them also for collections made
        # before target_modules was a config field
        modules = read_header(parent_col.file).target_modules
        parent = ParentRun(parent_col.version, read_config(parent_col.config_json), modules)
    backbone = factory.load(device, dtype)
    resolved = resolve(
        cfg,
        kind=plan.kind,  # type: ignore[arg-type]
        n_effects=len(plan.effects),
        n_new=len(plan.new_effects),
        auto_steps=auto_steps,
        base=BaseDefaults.of(backbone),
        dtype=dtype_name,
        parent=parent,
    )
    for note in resolved.notes:
        say(note)
    plan.frozen_rank, plan.parent_lora_scale = resolved.frozen_rank, resolved.parent_lora_scale
    return backbone, resolved.config


def _record(registry: Registry, plan: Plan, cfg: DistillConfig) -> tuple[Path, RunLock]:
    """The run's folder (plan and resolved config), its lock (taken before the row says "running") and
    its registry row."""
    run_dir = clora_home() / "runs" / plan.run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir, plan.run_id)
    except OSError as e:
        raise OutputError(os_error_message("create the run folder", run_dir, e)) from None
    try:
        plan.save(run_dir / "plan.json")
        with atomic_path(run_dir / "config.json") as tmp:
            tmp.write_text(cfg.model_dump_json(indent=2))
        registry.create_run(
            run_id=plan.run_id,
            kind=plan.kind,
            config=cfg.to_json(),
            total_steps=cfg.steps,
            run_dir=str(run_dir),
        )
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def _execute(
    registry: Registry,
    components: Components,
    cfg: DistillConfig,
    plan: Plan,
    run_dir: Path,
    show_progress: bool,
    say: Any,
    backbone: Backbone | None,
    t_start: float,
) -> DistillOutcome:
    torch.manual_seed(cfg.seed)
    if backbone is None:  # a resumed run
        factory = get_factory(components, registry, plan.base_id)
        device, dtype, _ = pick(cfg.device, cfg.dtype, factory.default_dtype(cfg.device))
        backbone = factory.load(device, dtype)
    student = cfg.student
    modules = list(student.target_modules or [])
    if cfg.optimizer.gradient_checkpointing:
        backbone.transformer.enable_gradient_checkpointing()
    base_bytes = sum(p.numel() * p.element_size() for p in backbone.transformer.parameters())
    adapters = AdapterSet(
        backbone,
        student.lora_rank,
        student.lora_alpha,
        modules,
        cfg.teachers.max_resident,
        components,
        with_critic=cfg.uses_critic,
        frozen_rank=plan.frozen_rank,
    )
    adapters.expected_sha256 = {e.lora_path: e.lora_sha256 for e in plan.effects}
    say(
        f"run {plan.run_id}: {plan.kind}, {len(plan.effects)} effect(s) ({len(plan.new_effects)} new), "
        f"{cfg.steps} steps, base {plan.base_id}"
    )
    prepared = prepare(backbone, adapters, plan, cfg, plan.extra.get("examples", {}), show_progress)
    t_prepared = time.monotonic()
    distiller = Distiller(backbone, adapters, prepared, plan, cfg, components, run_dir)
    if prepared.spread or distiller.on_policy_effects:
        say(on_policy_line(prepared.spread, distiller.on_policy_effects, cfg))
    if distiller.load_checkpoint():
        say(f"resuming run {plan.run_id} at step {distiller.state.step}")
    elif plan.parent_state:
        distiller.init_from(
            torch.load(plan.parent_state, weights_only=True, map_location="cpu"),
            scale=plan.parent_lora_scale / (student.lora_alpha / student.lora_rank),
        )
    result = distiller.run(
        show_progress, on_checkpoint=lambda step: registry.update_run(plan.run_id, step=step)
    )
    if result.probe_db:
        say(probe_summary(result, distiller.state.step, cfg))

    timing = {
        "seconds_total": round(time.monotonic() - t_start, 2),
        "seconds_prepare": round(t_prepared - t_start, 2),
    }
    return _write_collection(registry, plan, cfg, backbone, distiller, result, timing, base_bytes)


def _write_collection(
    registry: Registry,
    plan: Plan,
    cfg: DistillConfig,
    backbone: Backbone,
    distiller: Distiller,
    result: LoopResult,
    timing: dict[str, float],
    base_bytes: int,
) -> DistillOutcome:
    """The unified LoRA file, its training state beside it, and the new collection row."""
    student = cfg.student
    # the header fields of the effects sampled with levels of their own (student.on_policy_shift)
    own = {
        name: {"few_step_sigmas": levels.tolist(), "shift": student.on_policy_shift}
        for name, levels in effect_levels(cfg, distiller.on_policy_effects).items()
    }
    header = UnifiedHeader(
        base_id=plan.base_id,
        base_fingerprint=backbone.fingerprint,
        effects={
            e.name: {
                "trigger": e.trigger,
                "caption": e.caption,
                "teacher_prompt": e.teacher_prompt,
                "prompt": e.trained_prompt(student.asymmetric_prompts),
                **own.get(e.name, {}),
            }
            for e in plan.effects
        },
        few_step_sigmas=few_step_sigmas(student.few_steps, student.shift).tolist(),
        shift=student.shift,
        rank=student.lora_rank,
        alpha=student.lora_alpha,
        target_modules=list(student.target_modules or []),
        run_id=plan.run_id,
        parent_version=plan.parent_version,
        resolution=cfg.data.resolution,
    )
    out = Path(plan.out_file)
    write_unified(out, distiller.adapters.state_dict(STUDENT), header)
    save_torch(distiller.training_state(), state_path(out))
    steps = distiller.state.step
    metrics = {
        "train": {
            "steps": steps,
            # fewer than steps when this process resumed the run
            "steps_run": result.steps,
            **timing,
            "seconds_loop": round(result.seconds, 2),
            "final_losses": {k: v for k, v in result.final_losses.items() if k.startswith("loss/")},
            "teacher_loads": result.teacher_loads,
            "seconds_by_role": result.seconds_by_role,
            "peak_rss_mb": round(peak_memory_mb(cfg.device), 1),
            "base_mb": round(base_bytes / 2**20, 2),
        }
    }
    if distiller.data.spread:
        metrics["train"]["seed_spread"] = distiller.data.spread
    metrics["train"]["on_policy_effects"] = sorted(distiller.on_policy_effects)
    if result.probe_db:
        metrics["train"]["probe_db"] = result.probe_db
        metrics["train"]["stopped_early"] = result.stopped_early
    collection = registry.add_collection(
        file=str(out),
        sha256=sha256_file(out),
        parent_id=plan.parent_id,
        base_id=plan.base_id,
        run_id=plan.run_id,
        config=cfg.to_json(),
        metrics=metrics,
        members=[
            {
                "effect_name": e.name,
                "trigger": e.trigger,
                "caption": e.caption,
                "teacher_sha256": e.lora_sha256,
            }
            for e in plan.effects
        ],
    )
    registry.update_run(plan.run_id, status="completed", step=steps, collection_id=collection.id)
    return DistillOutcome(
        collection, plan.run_id, f"collection v{collection.version} written to {out}", metrics
    )


def on_policy_line(spread: dict[str, float], chosen: set[str], cfg: DistillConfig) -> str:
    """One line on which effects train on-policy in the anchoring phase, and why."""
    if not chosen:
        top = max(spread, key=spread.__getitem__)
        return (
            f"every effect anchors: no teacher's texture changes with the seed by {cfg.on_policy.spread:g} "
            f"of its edit or more (the most: {top} {spread[top]:.2f})"
        )
    how = (
        f"their teacher's texture changes with the seed (spread >= {cfg.on_policy.spread:g})"
        if cfg.on_policy.effects == "auto"
        else "on_policy.effects"
    )
    named = ", ".join(f"{n} {spread[n]:.2f}" if n in spread else n for n in sorted(chosen))
    return f"on-policy too (DMD, target simulation), as {how}: {named}"


def probe_summary(result: LoopResult, step: int, cfg: DistillConfig) -> str:
    """One line on the last probe: mean PSNR against the teachers, and the effects under ``target_db``."""
    db = result.probe_db
    line = f"probe at step {step}: student vs teachers {sum(db.values()) / len(db):.2f} dB on average"
    target = cfg.data.target_db
    if target is None:
        low = sorted(db, key=db.__getitem__)[:3]
        return line + "; lowest " + ", ".join(f"{n} {db[n]:.2f}" for n in low)
    missed = sorted((n for n in db if db[n] < target), key=db.__getitem__)
    if not missed:
        ended = f"; ended early at step {step} of {cfg.steps}" if result.stopped_early else ""
        return line + f"; every effect within its target ({target:g} dB){ended}"
    return (
        line
        + f"; {len(missed)} of {len(db)} under the target ({target:g} dB): "
        + ", ".join(f"{n} {db[n]:.2f}" for n in missed)
    )


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
