"""``clora eval``: is one unified LoRA as good as the N teachers, and what does it save?

Every effect is scored on one shared set of held-out source images, so outputs of different
effects can be compared (concept bleeding). Where the base knows an effect's exact result
(``Backbone.ground_truth``, e.g. the toy base) outputs are also scored against the truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clora.backbone import Backbone
from clora.distill.config import DistillConfig, read_config
from clora.distill.prepare import NEUTRAL_INSTRUCTIONS, digest, effect_seed, tensor_digest
from clora.effects import list_images
from clora.errors import CloraError
from clora.fileio import save_safetensors, sha256_file
from clora.generate import (
    UnifiedModel,
    cascade_edit,
    drop_adapters,
    full_edit,
    load_teacher,
    sample_few_steps,
    sample_full,
    teacher_edit,
    unfuse,
)
from clora.images import read_image
from clora.merge import DEFAULT_MERGES, merge_teachers, sweep
from clora.metrics import distribution_scores, nearest
from clora.paths import clora_home
from clora.plugins import Components
from clora.progress import progress_bar
from clora.registry import Collection, Registry
from clora.sampling import noise_key

#: what each per-effect row compares, scored with every metric (result key -> label)
COMPARISONS = {
    "student_vs_truth": "student vs truth",
    "teacher_vs_truth": "teacher vs truth",
    "cascade_vs_truth": "cascade vs truth",
    "student_vs_teacher": "student vs teacher",
}
#: what the baseline sweeps are scored against; the best setting of a sweep is picked by mean PSNR against
#: the first of these every effect has
REFERENCES = ("truth", "teacher")
#: the sampling roles whose seconds ``cost`` reports
ROLES = ("student", "teacher", "cascade")


@dataclass
class EvalOptions:
    """How an evaluation runs."""

    n_images: int = 16
    seed: int = 0
    margin_db: float = 1.0  # bad case: student more than this many dB below its teacher (vs truth)
    metrics: tuple[str, ...] = ("psnr", "ssim")
    accel: Path | None = None  # acceleration LoRA for the cascade baseline
    images_dir: Path | None = None
    general_prompts: int = 16
    merges: tuple[str, ...] = DEFAULT_MERGES  # merged-LoRA sweeps (clora.merge.SWEEPS names)
    #: (effect, acceleration) LoRA strengths the cascade baseline is sampled at, the best reported: few-step
    #: passes, so a sweep is cheap. On the tiny toy world a weaker acceleration LoRA spoils the effect less
    #: (0.25 and 0.5 best), while an effect strength other than 1 lost 1.8-2.8 dB on average.
    cascade_strengths: tuple[tuple[float, float], ...] = ((1.0, 0.25), (1.0, 0.5), (1.0, 0.75), (1.0, 1.0))
    #: effects whose truth is a distribution (``Backbone.truth_draws``): true draws per source, and seeds
    #: per source (on the first ``DIVERSITY_IMAGES``) for each way's diversity
    draws: int = 4


#: source images whose outputs are drawn at ``EvalOptions.draws`` seeds to measure diversity
DIVERSITY_IMAGES = 4


def _mean(t: torch.Tensor) -> float:
    return round(float(t.float().mean()), 4)


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class OutputCache:
    """Full-sampler outputs (teacher, merged baselines) are fixed by their inputs, so a re-evaluation
    reuses them from ``CLORA_HOME/cache/eval``, with the wall seconds they took when computed."""

    def __init__(self, bb: Backbone, cfg: DistillConfig, sources: torch.Tensor, seed: int) -> None:
        self.root = clora_home() / "cache" / "eval"
        #: the guidance scale and steps of every full-sampler baseline
        teachers = cfg.teachers
        self.guidance = teachers.guidance if teachers.guidance is not None else bb.default_guidance
        self.steps: int = teachers.steps or bb.default_teacher_steps
        self.common = {
            "base": bb.fingerprint,
            "images": tensor_digest(sources),
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": seed,
            "device": str(bb.device),
            "dtype": str(bb.dtype),
            **noise_key(bb),
        }

    def path(self, **key: Any) -> Path:
        return self.root / f"{digest({**self.common, **key})}.safetensors"

    def load(self, path: Path) -> tuple[torch.Tensor, float] | None:
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("images"), float((f.metadata() or {}).get("seconds", "nan"))

    def get(self, path: Path, compute: Any) -> tuple[torch.Tensor, float]:
        """The cached ``(images, seconds)`` at ``path``, or ``compute()`` timed and stored there."""
        hit = self.load(path)
        if hit is not None:
            return hit
        images, seconds = _timed(compute)
        save_safetensors({"images": images}, path, metadata={"seconds": repr(seconds)})
        return images, seconds


@dataclass
class _Scoring:
    """What one evaluation samples and scores with, and the sampling seconds it spent by role."""

    bb: Backbone
    components: Components
    opt: EvalOptions
    sources: torch.Tensor
    cache: OutputCache
    metrics: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))
    #: a stochastic effect's student outputs at ``extra_seeds``
    student_extra: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    truths: dict[str, torch.Tensor | None] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    def score(self, a: torch.Tensor, b: torch.Tensor | None) -> dict[str, float] | None:
        return None if b is None else {m: _mean(fn(a, b)) for m, fn in self.metrics.items()}

    def digest(self, path: str | Path) -> str:
        """The sha256 of a LoRA file, read once per evaluation (it keys the cached outputs)."""
        key = str(path)
        if key not in self.digests:
            self.digests[key] = sha256_file(path)
        return self.digests[key]

    def truth_draws(self, name: str) -> torch.Tensor | None:
        """``[draws, B, ...]`` true results of a stochastic effect on the sources (None: deterministic)."""
        if name not in self.truths:
            draws = self.bb.truth_draws(name, self.sources, self.opt.draws, self.opt.seed)
            self.truths[name] = None if draws is None else draws.to(self.sources)
        return self.truths[name]

    @property
    def extra_seeds(self) -> list[int]:
        """The seeds besides ``opt.seed`` that each way samples a stochastic effect at, for diversity."""
        return [self.opt.seed + k for k in range(1, max(self.opt.draws, 2))]

    @property
    def few(self) -> torch.Tensor:
        return self.sources[:DIVERSITY_IMAGES]

    def distribution(self, name: str, outputs: torch.Tensor, extra: list[torch.Tensor]) -> dict[str, float]:
        """A stochastic effect's outputs against its true draws (:func:`clora.metrics.distribution_scores`),
        diversity over the first sources at every seed."""
        truth = self.truth_draws(name)
        assert truth is not None
        seeds = torch.stack([outputs[: len(self.few)], *(x.to(outputs) for x in extra)])
        return distribution_scores(outputs, seeds, truth, self.sources)

    def students(self, model: UnifiedModel, names: list[str], step: Any) -> dict[str, torch.Tensor]:
        """Every student output first: the unified LoRA is fused into the base once, then the teacher and
        cascade runs unfuse it once (in low precision each fuse/unfuse rounds the weights). A stochastic
        effect is also drawn at the extra seeds (``student_extra``)."""
        out = {}
        for name in names:
            out[name], dt = _timed(lambda name=name: model.edit(self.sources, [name], seed=self.opt.seed))
            self.seconds["student"] += dt
            if self.truth_draws(name) is not None:
                self.student_extra[name] = [model.edit(self.few, [name], seed=s) for s in self.extra_seeds]
            step(f"student {name}")
        return out

    def effect(
        self, name: str, student: torch.Tensor, teacher: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, tuple[Path, float]]]:
        """One effect's outputs (student, teacher and truth where known), its row of scores with the
        cascade sweep (and, for a stochastic effect, each way's distribution metrics), and the cascade's
        cached outputs by setting."""
        out = {"student": student}
        draws = self.truth_draws(name)
        stochastic = draws is not None
        dist: dict[str, Any] = {}
        if stochastic:
            dist["student"] = self.distribution(name, student, self.student_extra[name])
        if teacher is not None:
            out["teacher"] = self.teacher_edit(teacher).to(student)
            if stochastic:
                extra = [self.teacher_edit(teacher, s) for s in self.extra_seeds]
                dist["teacher"] = self.distribution(name, out["teacher"], extra)
        truth = self.bb.ground_truth(name, self.sources)
        if truth is not None:
            out["truth"] = truth.to(student)
        if draws is not None:
            out["truth draw"] = draws[0]
        row = _effect_row(out, self.score, self.metrics, self.opt.margin_db)
        row["distribution"] = dist or None
        if not self.opt.accel or teacher is None:
            return out, row, {}
        runs = _cascade(self, teacher, stochastic)
        for ref in REFERENCES:
            row[f"cascade_sweep_vs_{ref}"] = {
                s: self.score(images.to(student), out.get(ref)) for s, (images, *_) in runs.items()
            }
        if stochastic:
            row["cascade_sweep_distribution"] = {
                s: self.distribution(name, images.to(student), extra)
                for s, (images, _, _, extra) in runs.items()
            }
        return out, row, {s: (path, dt) for s, (_, path, dt, _) in runs.items()}

    def teacher_edit(self, effect: Any, seed: int | None = None) -> torch.Tensor:
        """The teacher's outputs on the sources (cached, timed), or on the first few at another ``seed``."""
        images = self.sources if seed is None else self.few
        key = {"teacher": self.digest(effect.lora_path), "prompt": effect.teacher_prompt}
        out, dt = self.cache.get(
            self.cache.path(**key, **_draw_key(seed, self)),
            lambda: teacher_edit(
                self.bb,
                self.components,
                effect.lora_path,
                effect.teacher_prompt,
                images,
                steps=self.cache.steps,
                guidance=self.cache.guidance,
                seed=self.opt.seed if seed is None else seed,
            ),
        )
        if seed is None:
            self.seconds["teacher"] += dt
        return out


def evaluate(
    registry: Registry,
    components: Components,
    collection: Collection,
    effects: list[str] | None = None,
    options: EvalOptions | None = None,
    device: str = "cpu",
    show_progress: bool = True,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Score ``collection`` against its teachers (and the truth, where known); see README for the shape."""
    opt = options or EvalOptions()
    cfg = read_config(collection.config_json)
    metrics = available_metrics(components, opt.metrics)
    model = UnifiedModel.load(components, collection.file, device=device, dtype=dtype, registry=registry)
    bb = model.backbone
    names = effects or model.effects
    for n in names:
        model.check_effect(n)
    registered = {e.name: e for e in registry.list_effects()}
    teachers, warnings = usable_teachers(collection, registered, names)
    cfg.teachers.steps = cfg.teachers.steps or bb.default_teacher_steps
    examples = [registered[n].examples_dir for n in names if n in registered]
    sources = eval_sources(bb, opt, cfg.data.resolution, examples)
    ctx = _Scoring(bb, components, opt, sources, OutputCache(bb, cfg, sources, opt.seed), metrics)
    per: dict[str, Any] = {}
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    cascades: dict[str, dict[str, tuple[Path, float]]] = {}  # effect -> setting -> (cached outputs, s)
    with progress_bar(show_progress) as bar:
        task = bar.add_task("eval", total=2 * len(names), info="")
        students = ctx.students(model, names, lambda info: bar.update(task, advance=1, info=info))
        for name in names:
            outputs[name], per[name], cascades[name] = ctx.effect(name, students[name], teachers.get(name))
            bar.update(task, advance=1, info=name)
        merged = _merged(
            ctx,
            [teachers[n] for n in model.effects if n in teachers],
            [n for n in names if n in teachers],
            bar,
            lambda n, images, extra: {
                **{ref: ctx.score(images, outputs[n].get(ref)) for ref in REFERENCES},
                "distribution": ctx.distribution(n, images, extra) if extra else None,
            },
        )
    for name, by_variant in merged.items():
        for ref in REFERENCES:
            per[name][f"merged_vs_{ref}"] = {v: scores[ref] for v, (scores, _) in by_variant.items()}
        per[name]["merged_distribution"] = {
            v: scores["distribution"] for v, (scores, _) in by_variant.items()
        }
    overall = _overall(per)
    _best_outputs(ctx, outputs, overall["best"], merged, cascades)
    return {
        "collection": collection.version,
        "base": collection.base_id,
        "n_images": len(sources),
        "steps": {"student": len(model.header.few_step_sigmas), "teacher": cfg.teachers.steps},
        "teacher_guidance": ctx.cache.guidance,
        "effects": per,
        "overall": overall,
        "bleeding": _bleeding(names, outputs),
        "retention": _retention(model, opt, cfg, sources),
        "cost": _cost(ctx, model, [Path(teachers[n].lora_path) for n in names if n in teachers], names, cfg),
        "warnings": warnings,
        "_outputs": {"sources": sources, "per_effect": outputs},
    }


def _best_outputs(
    ctx: _Scoring,
    outputs: dict[str, dict[str, torch.Tensor]],
    best: dict[str, Any],
    merged: dict[str, dict[str, tuple[Any, Path]]],
    cascades: dict[str, dict[str, tuple[Path, float]]],
) -> None:
    """The report shows the best setting of each sweep: its outputs, read back from the cache, join each
    effect's ``outputs`` (and the best cascade's sampling time joins ``ctx.seconds``)."""
    for name, out in outputs.items():
        if "merged" in best and name in merged:
            variant = best["merged"]["variant"]
            out[f"merged-{variant}"] = _read_back(ctx.cache, merged[name][variant][1], ctx.sources)
        if "cascade" in best and cascades.get(name):
            path, dt = cascades[name][best["cascade"]["variant"]]
            out["cascade"] = _read_back(ctx.cache, path, ctx.sources)
            ctx.seconds["cascade"] += dt


def _effect_row(
    out: dict[str, torch.Tensor], score: Any, metrics: dict[str, Any], margin_db: float
) -> dict[str, Any]:
    """One effect's scores from its outputs (``student``, and ``teacher``, ``truth`` where known); the
    baselines' sweeps are filled in later."""
    student = out["student"]
    row: dict[str, Any] = {
        "student_vs_teacher": score(student, out.get("teacher")),
        "student_vs_truth": score(student, out.get("truth")),
        "teacher_vs_truth": score(out["teacher"], out.get("truth")) if "teacher" in out else None,
        "cascade_vs_truth": None,  # the best cascade setting's, once every effect is scored
        "bad_case_rate": None,
        # baseline sweeps, {setting: scores}
        "merged_vs_truth": None,
        "merged_vs_teacher": None,
        "cascade_sweep_vs_truth": None,
        "cascade_sweep_vs_teacher": None,
        # a stochastic effect's distribution metrics: {way: metrics}, and the sweeps' {setting: metrics}
        "distribution": None,
        "merged_distribution": None,
        "cascade_sweep_distribution": None,
    }
    if "truth" in out and "teacher" in out and "psnr" in metrics:
        gap = metrics["psnr"](out["teacher"], out["truth"]) - metrics["psnr"](student, out["truth"])
        row["bad_case_rate"] = _mean((gap > margin_db).float())
    return row


def available_metrics(components: Components, ids: tuple[str, ...]) -> dict[str, Any]:
    """The metrics ``ids``; a learned one whose weights are missing says so before any model loads."""
    metrics = {m: components.get_metric(m) for m in ids}
    for metric_id, metric in metrics.items():
        problem = metric.unavailable() if hasattr(metric, "unavailable") else None
        if problem:
            raise CloraError(f"metric '{metric_id}' is not available: {problem}")
    return metrics


def usable_teachers(
    collection: Collection, registered: dict[str, Any], names: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """The effects whose teacher file is the one the collection was distilled from (by its recorded
    sha256), and a warning for each other one: its teacher, merged and cascade columns are left out
    rather than scored against another LoRA."""
    recorded = {m.effect_name: m.teacher_sha256 for m in collection.members}
    usable, warnings = {}, []
    for n in names:
        e = registered.get(n)
        if e is None:
            continue
        path = Path(e.lora_path)
        if not path.is_file():
            why = f"its teacher file {path} is gone"
        elif sha256_file(path) != recorded.get(n, e.lora_sha256):
            why = f"its teacher file {path} changed since collection v{collection.version} was distilled"
        else:
            usable[n] = e
            continue
        warnings.append(
            f"effect '{n}': {why}; its teacher, merged and cascade columns are left out (to score against "
            f"a new teacher, `clora effect update {n} --lora FILE` and distill again)"
        )
    return usable, warnings


def eval_sources(
    bb: Backbone, opt: EvalOptions, resolution: int | None, examples: list[str | None]
) -> torch.Tensor:
    """The held-out images every effect is scored on, one size for all (square crops at the
    collection's resolution): ``--images``, else the base's built-in sources, else the effects' examples."""
    size = bb.image_size_for(1, 1, resolution)
    if opt.images_dir:
        files = list_images(opt.images_dir)
    else:
        try:
            return bb.sample_sources(opt.n_images, effect_seed("clora-eval", opt.seed)).to(
                bb.device, bb.dtype
            )
        except CloraError:
            files = [p for d in sorted({e for e in examples if e}) for p in list_images(d)]
            if not files:
                raise CloraError(
                    f"base '{bb.base_id}' has no built-in images and the effects have no examples; "
                    "pass --images DIR"
                ) from None
    images = [read_image(f, size, crop=True) for f in files[: opt.n_images]]
    return torch.stack(images).to(bb.device, bb.dtype)


def _read_back(cache: OutputCache, path: Path, like: torch.Tensor) -> torch.Tensor:
    hit = cache.load(path)
    if hit is None:
        raise CloraError(
            f"eval outputs vanished from the cache ({path}) during the run; run clora eval again"
        )
    return hit[0].to(like)


def _cascade(
    ctx: _Scoring, effect: Any, stochastic: bool
) -> dict[str, tuple[torch.Tensor, Path, float, list[torch.Tensor]]]:
    """The paper's baseline, ``effect``'s LoRA stacked with the acceleration LoRA (few steps), at each of
    ``opt.cascade_strengths``: ``{setting: (images, cached file, seconds, draws at the extra seeds of a
    stochastic effect)}``. Like the teachers' outputs these are fixed by their inputs, so they are cached
    and timed once."""
    accel = ctx.opt.accel
    assert accel is not None
    accel_key, lora_key = ctx.digest(accel), ctx.digest(effect.lora_path)
    out = {}
    for strengths in ctx.opt.cascade_strengths:

        def draw(seed: int | None, strengths: tuple[float, float] = strengths) -> tuple[Any, Path, float]:
            images = ctx.sources if seed is None else ctx.few
            path = ctx.cache.path(
                cascade=lora_key,
                accel=accel_key,
                strengths=list(strengths),
                prompt=effect.teacher_prompt,
                **_draw_key(seed, ctx),
            )
            result, seconds = ctx.cache.get(
                path,
                lambda: cascade_edit(
                    ctx.bb,
                    ctx.components,
                    effect.lora_path,
                    effect.teacher_prompt,
                    accel,
                    images,
                    seed=ctx.opt.seed if seed is None else seed,
                    strength=strengths[0],
                    accel_strength=strengths[1],
                ),
            )
            return result, path, seconds

        images, path, seconds = draw(None)
        extra = [draw(seed)[0] for seed in ctx.extra_seeds] if stochastic else []
        out[_cascade_label(*strengths)] = (images, path, seconds, extra)
    return out


def _cascade_label(effect_strength: float, accel_strength: float) -> str:
    """A cascade setting's name in eval results: ``accel 0.75``, or ``effect 1.2 accel 0.75``."""
    accel = f"accel {accel_strength:g}"
    return accel if effect_strength == 1 else f"effect {effect_strength:g} {accel}"


def _merged(
    ctx: _Scoring, members: list[Any], names: list[str], bar: Any, score: Any
) -> dict[str, dict[str, tuple[Any, Path]]]:
    """Each effect of ``names`` sampled with every one of the ``members``' LoRAs merged into one (its own
    prompt, full sampler), for every variant of the ``opt.merges`` sweeps: ``{effect: {variant:
    (score(effect, images), cached file)}}``. Outputs are scored as they come and kept in the cache only:
    a sweep over real-size images would not fit in memory."""
    bb, cache, sources, seed = ctx.bb, ctx.cache, ctx.sources, ctx.opt.seed
    paths = [m.lora_path for m in members]
    variants = sweep(ctx.opt.merges)
    if not variants or not paths or not names:
        return {}
    prompts = {m.name: m.teacher_prompt for m in members}
    out: dict[str, dict[str, tuple[Any, Path]]] = {n: {} for n in names}
    members_key = [ctx.digest(p) for p in paths]
    task = bar.add_task("merged baselines", total=len(variants) * len(names), info="")
    adapter = "merged_baseline"
    for variant in variants:
        spec = {
            "combination": variant.combination,
            "weight": variant.weight_for(len(paths)),
            "density": variant.density,
            "svd_rank": "sum of ranks",
        }
        # each effect's outputs on the sources, and a stochastic effect's on the first few at the extra seeds
        jobs = {
            n: [
                (draw, cache.path(merge=spec, members=members_key, prompt=prompts[n], **_draw_key(draw, ctx)))
                for draw in [None, *(ctx.extra_seeds if ctx.truth_draws(n) is not None else [])]
            ]
            for n in names
        }
        if not all(p.exists() for js in jobs.values() for _, p in js):  # build the merged adapter
            unfuse(bb.transformer)
            merge_teachers(bb.transformer, ctx.components, paths, variant, adapter, seed=seed)
        try:
            for n in names:
                got = [
                    cache.get(
                        path,
                        lambda n=n, draw=draw: full_edit(
                            bb,
                            adapter,
                            prompts[n],
                            sources if draw is None else ctx.few,
                            cache.steps,
                            cache.guidance,
                            seed=seed if draw is None else draw,
                        ),
                    )[0].to(sources)
                    for draw, path in jobs[n]
                ]
                out[n][variant.label] = (score(n, got[0], got[1:]), jobs[n][0][1])
                bar.update(task, advance=1, info=f"{variant.label}: {n}")
        finally:
            drop_adapters(bb.transformer, [adapter])
    return out


def _draw_key(seed: int | None, ctx: _Scoring) -> dict[str, Any]:
    """The cache key's part for outputs at an extra seed (on the first few sources)."""
    return {} if seed is None else {"draw_seed": seed, "images": len(ctx.few)}


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    return {m: round(sum(r[m] for r in rows) / len(rows), 4) for m in rows[0]}


def merge_eval(stored: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The evaluation to keep on a collection after ``new``: an evaluation of some of its effects updates
    those effects' rows of the ``stored`` one (same collection, number of images and steps) and its
    means, instead of replacing the whole result."""
    same = stored is not None and all(
        stored.get(k) == new.get(k) for k in ("n_images", "steps", "collection")
    )
    if not same or stored is None:
        return new
    effects = {**stored.get("effects", {}), **new["effects"]}
    return {**new, "effects": effects, "overall": _overall(effects)}


def _overall(per: dict[str, Any]) -> dict[str, Any]:
    """Means over the effects of every comparison and of every setting of each baseline sweep, and the
    best setting of each sweep (``best``). One setting is best for all effects, as one merged file serves
    them all; each effect's ``cascade_vs_truth`` becomes the best cascade setting's scores."""
    sweeps: dict[str, Any] = {}
    for kind in ("merged", "cascade_sweep"):
        for ref in REFERENCES:
            key = f"{kind}_vs_{ref}"
            labels = dict.fromkeys(s for r in per.values() for s, v in (r.get(key) or {}).items() if v)
            if labels:
                sweeps[key] = {
                    s: _means([r[key][s] for r in per.values() if (r.get(key) or {}).get(s)]) for s in labels
                }
    best = {}
    for kind, sweep_key in (("merged", "merged"), ("cascade", "cascade_sweep")):
        pick = _best(sweeps, sweep_key)
        if pick:
            best[kind] = pick
    if "cascade" in best:
        for r in per.values():
            r["cascade_vs_truth"] = (r.get("cascade_sweep_vs_truth") or {}).get(best["cascade"]["variant"])
    for kind, sweep_key in (("merged", "merged_distribution"), ("cascade", "cascade_sweep_distribution")):
        for r in per.values():
            at_best = (r.get(sweep_key) or {}).get(best[kind]["variant"]) if kind in best else None
            if r.get("distribution") and at_best:
                r["distribution"][kind] = at_best
    out: dict[str, Any] = {}
    for key in COMPARISONS:
        rows = [r[key] for r in per.values() if r[key]]
        if rows:
            out[key] = _means(rows)
    ways = dict.fromkeys(w for r in per.values() for w in r.get("distribution") or {})
    if ways:  # means over the stochastic effects
        out["distribution"] = {
            w: _means([r["distribution"][w] for r in per.values() if w in (r.get("distribution") or {})])
            for w in ways
        }
    out.update(sweeps)
    out["best"] = best
    bad = [r["bad_case_rate"] for r in per.values() if r["bad_case_rate"] is not None]
    out["bad_case_rate"] = round(sum(bad) / len(bad), 4) if bad else None
    return out


def _best(sweeps: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The setting of sweep ``kind`` with the highest mean PSNR against the truth, else the teacher."""
    for ref in REFERENCES:
        scored = {s: v["psnr"] for s, v in (sweeps.get(f"{kind}_vs_{ref}") or {}).items() if "psnr" in v}
        if scored:
            pick = max(scored, key=scored.__getitem__)
            return {"variant": pick, "by": f"psnr vs {ref}", "psnr": scored[pick]}
    return None


def _bleeding(names: list[str], outputs: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Confusion matrix: for each effect's student outputs, which effect's reference each is nearest to.

    Against the truth, the teachers' own outputs are scored the same way (``teacher_matrix``), so a
    bleed rate can be read against what the N teachers themselves do (similar effects, weak teachers).
    """
    # a stochastic effect's truth here is one true draw
    truths = [outputs[n].get("truth", outputs[n].get("truth draw")) for n in names]
    kind = "truth" if all(t is not None for t in truths) else "teacher"
    candidates = truths if kind == "truth" else [outputs[n].get("teacher") for n in names]
    references = [r for r in candidates if r is not None]
    if len(references) != len(names):
        return {"reference": None, "labels": names, "matrix": [], "bleed_rate": None}
    refs = torch.stack(references)

    def confusion(role: str) -> tuple[list[list[int]], float | None]:
        matrix = []
        for n in names:
            picks = nearest(outputs[n][role], refs)
            matrix.append([int((picks == j).sum()) for j in range(len(names))])
        total = sum(sum(r) for r in matrix)
        correct = sum(matrix[i][i] for i in range(len(names)))
        return matrix, round(1 - correct / total, 4) if total else None

    matrix, rate = confusion("student")
    out: dict[str, Any] = {"reference": kind, "labels": names, "matrix": matrix, "bleed_rate": rate}
    if kind == "truth" and all("teacher" in outputs[n] for n in names):
        out["teacher_matrix"], out["teacher_bleed_rate"] = confusion("teacher")
    return out


def _retention(
    model: UnifiedModel, opt: EvalOptions, cfg: DistillConfig, sources: torch.Tensor
) -> dict[str, Any] | None:
    """General edits with the unified LoRA (few steps) vs the base model alone (full sampler, no
    guidance): the base's built-in general edits, else the held-out images with neutral instructions."""
    bb = model.backbone
    try:
        images, prompts = bb.general_edits(opt.general_prompts, effect_seed("clora-eval-general", opt.seed))
    except CloraError:
        images = sources[: opt.general_prompts]
        prompts = [NEUTRAL_INSTRUCTIONS[i % len(NEUTRAL_INSTRUCTIONS)] for i in range(len(images))]
    from clora.metrics import means_by, psnr

    steps = cfg.teachers.steps
    assert steps is not None
    tr = bb.transformer
    unfuse(tr)
    tr.disable_adapters()
    base = sample_full(bb, images, prompts, steps, 0.0, seed=opt.seed)
    model.activate()
    student = sample_few_steps(bb, images, prompts, model.sigmas(None), opt.seed)
    scores = psnr(student, base)
    # per instruction: a LoRA can keep most of the base's edits and spoil one (e.g. a spatial one)
    by_prompt = {p: round(v, 4) for p, v in means_by(scores, prompts).items()}
    return {
        "prompts": len(prompts),
        "student_vs_base_psnr": _mean(scores),
        "by_prompt": by_prompt,
        "worst_prompt": min(by_prompt, key=by_prompt.__getitem__),
    }


def _cost(
    ctx: _Scoring, model: UnifiedModel, teacher_files: list[Path], names: list[str], cfg: DistillConfig
) -> dict[str, Any]:
    """Files, bytes, effect-switch latency, NFE and wall time per image: unified vs one LoRA per effect."""
    bb, sources, seconds = ctx.bb, ctx.sources, ctx.seconds
    tr = bb.transformer
    unfuse(tr)
    # unified: switching effects is building and encoding a new prompt (with its image, where the prompt
    # encoder sees it)
    n_images = len(sources)
    t0 = time.perf_counter()
    for i, n in enumerate(names):
        bb.encode_prompts([model.prompt([n], extra=f"request {i}")], sources[:1])
    unified_switch = (time.perf_counter() - t0) / max(len(names), 1)
    # one LoRA per effect: read the effect's file (its own format), load it into the model, activate it
    t0 = time.perf_counter()
    for i, f in enumerate(teacher_files):
        name = f"switch{i}"
        load_teacher(bb, ctx.components, str(f), name)
        tr.set_adapter(name)
        tr.delete_adapters([name])
    per_file_switch = (time.perf_counter() - t0) / max(len(teacher_files), 1)
    student_steps = len(model.header.few_step_sigmas)
    n_calls = max(len(names), 1) * n_images
    out: dict[str, Any] = {
        "unified": {
            "files": 1,
            "bytes": model.file.stat().st_size,
            "switch_ms": round(unified_switch * 1e3, 3),
            "nfe": student_steps,
            "ms_per_image": round(seconds["student"] / n_calls * 1e3, 3),
        },
        "per_effect_loras": {
            "files": len(teacher_files),
            "bytes": sum(f.stat().st_size for f in teacher_files),
            "switch_ms": round(per_file_switch * 1e3, 3),
            # one pass a step, two where the teachers' guidance needs the unconditional one
            "nfe": ctx.cache.steps * (2 if bb.guidance_active(ctx.cache.guidance) else 1),
            "ms_per_image": round(seconds["teacher"] / n_calls * 1e3, 3),
        },
    }
    if ctx.opt.accel:
        out["cascade"] = {"nfe": student_steps, "ms_per_image": round(seconds["cascade"] / n_calls * 1e3, 3)}
    return out
