"""Build (or reuse from the cache) the toy base and its teachers, score them, draw contact sheets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from clora.errors import CloraError
from clora.fileio import atomic_path, save_safetensors
from clora.images import contact_sheet
from clora.metrics import diversity, high_frequency_energy, psnr
from clora.sampling import euler_sample
from clora_toy import store
from clora_toy.backbone import EFFECT_LORA_MODULES, ToyBackbone, base_metadata
from clora_toy.config import ToyConfig
from clora_toy.data import general_edits, held_out_sources
from clora_toy.effects import Effect, get_effect
from clora_toy.factory import ToyBackboneFactory, get_factory
from clora_toy.train import lora_metadata, save_lora, train_base, train_teacher


@dataclass
class BuildResult:
    """What a build produced (or found in the cache)."""

    path: Path
    sheet: Path
    report: dict[str, object]
    cached: bool
    #: installed from the files shipped with the package (see ``store.install_shipped``)
    shipped: bool = False


@torch.no_grad()
def sample_edit(
    backbone: ToyBackbone, sources: torch.Tensor, prompt: str, steps: int, guidance: float, seed: int = 0
) -> torch.Tensor:
    """Edit images ``[B,3,H,W]`` with one prompt by Euler sampling; returns images in ``[0, 1]``."""
    g = torch.Generator().manual_seed(seed)
    src = backbone.encode_images(sources)
    out = euler_sample(backbone, src, [prompt] * len(sources), steps=steps, guidance=guidance, generator=g)
    return backbone.decode_latents(out)


def score(
    backbone: ToyBackbone, apply: object, prompt: str, sources: torch.Tensor, steps: int, guidance: float
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean PSNR (dB) of sampled edits against ground truth; also the truth and outputs."""
    truth = apply(sources)  # type: ignore[operator]
    out = sample_edit(backbone, sources, prompt, steps, guidance)
    return float(psnr(out, truth).mean()), truth, out


#: seeds per source a stochastic effect's edits are sampled at, and true draws per source they are scored
#: against
SCORE_DRAWS = 4


def score_draws(
    backbone: ToyBackbone,
    effect: Effect,
    prompt: str,
    sources: torch.Tensor,
    steps: int,
    guidance: float,
    draws: int = SCORE_DRAWS,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """A stochastic effect's edits sampled at seeds ``0..draws-1`` against as many true draws (seed 0):
    PSNR (dB) of the edits' mean over seeds against the draws' mean, and for edits and truth alike the mean
    per-pixel std across seeds (diversity) and mean squared Laplacian (fine detail, e.g. grain). Also the
    true draws and the edits, both ``[draws, B, 3, H, W]``."""
    truth = effect.draws(sources, draws, seed=0)
    out = torch.stack([sample_edit(backbone, sources, prompt, steps, guidance, seed=k) for k in range(draws)])
    scores = {
        "psnr": float(psnr(out.mean(0), truth.mean(0)).mean()),
        "diversity": float(diversity(out).mean()),
        "truth_diversity": float(diversity(truth).mean()),
        "hf_energy": float(high_frequency_energy(out.flatten(0, 1)).mean()),
        "truth_hf_energy": float(high_frequency_energy(truth.flatten(0, 1)).mean()),
    }
    return scores, truth, out


def _sheet_rows(
    sources: torch.Tensor, truth: torch.Tensor, out: torch.Tensor, k: int
) -> list[tuple[torch.Tensor, ...]]:
    return [(sources[i], truth[i], out[i]) for i in range(min(k, len(sources)))]


def _write_json(path: Path, data: dict[str, object]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))


def _read_report(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_base(
    tiny: bool = False,
    device: str = "cpu",
    force: bool = False,
    show_progress: bool = True,
    size: str | None = None,
) -> BuildResult:
    """Train, score and save the toy base of ``size`` (or tiny), unless the cache holds this recipe."""
    factory = get_factory(tiny, size)
    folder = store.base_dir(factory.backbone_id, factory.config)
    weights, sheet, report_path = (
        folder / store.BASE_WEIGHTS,
        folder / store.BASE_SHEET,
        folder / store.BASE_REPORT,
    )
    if not force:
        shipped = not weights.exists() and store.install_shipped(folder, store.BASE_FILES)
        if weights.exists():
            return BuildResult(weights, sheet, _read_report(report_path), cached=True, shipped=shipped)
    cfg = factory.config
    backbone = factory.fresh(device)
    stats = train_base(backbone, cfg.base, show_progress)
    psnrs, rows = evaluate_base(backbone, factory)
    report: dict[str, object] = {
        "backbone_id": factory.backbone_id,
        "config": cfg.model_dump(),
        "psnr": psnrs,
        "eval_steps": cfg.eval.steps,
        "eval_guidance": cfg.eval.base_guidance,
        **stats,
    }
    tensors = {f"transformer.{k}": v for k, v in backbone.transformer.state_dict().items()}
    assert backbone.text_encoder is not None  # a fresh backbone keeps its text encoder
    tensors.update({f"text_encoder.{k}": v for k, v in backbone.text_encoder.state_dict().items()})
    save_safetensors(tensors, weights, base_metadata(backbone, cfg, {"psnr": psnrs, **stats}))
    contact_sheet(rows, sheet)
    _write_json(report_path, report)
    return BuildResult(weights, sheet, report, cached=False)


def evaluate_base(
    backbone: ToyBackbone,
    factory: ToyBackboneFactory,
    guidance: float | None = None,
    steps: int | None = None,
) -> tuple[dict[str, float], list[tuple[torch.Tensor, ...]]]:
    """PSNR per general edit on held-out images, and contact-sheet rows."""
    cfg = factory.config.eval
    sources = held_out_sources(cfg.num_images, backbone.image_size[0])
    psnrs, rows = {}, []
    for k, edit in enumerate(general_edits()):
        value, truth, out = score(
            backbone,
            edit.apply,
            edit.prompt,
            sources,
            steps or cfg.steps,
            cfg.base_guidance if guidance is None else guidance,
        )
        psnrs[edit.name] = round(value, 2)
        # different example images per edit, so the sheet shows more of the held-out set
        pick = slice(2 * k % len(sources), 2 * k % len(sources) + 2)
        rows += _sheet_rows(sources[pick], truth[pick], out[pick], 2)
    return psnrs, rows


def load_teacher_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a teacher LoRA file."""
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CloraError(
            f"cannot read teacher LoRA {path} ({exc}); rebuild it with `clora toy teachers --force`"
        ) from exc


def apply_lora(backbone: ToyBackbone, path: Path, adapter_name: str) -> None:
    """Load a teacher LoRA file onto the backbone's transformer as an active adapter."""
    backbone.transformer.load_lora_adapter(str(path), prefix="transformer", adapter_name=adapter_name)
    backbone.transformer.set_adapter(adapter_name)


def teacher_eval_sources(backbone: ToyBackbone, cfg: ToyConfig) -> torch.Tensor:
    """The held-out images teachers are scored on (another set than the base's)."""
    return held_out_sources(cfg.eval.num_images, backbone.image_size[0], seed=1)


def _score_effect(
    backbone: ToyBackbone, effect: Effect, sources: torch.Tensor, cfg: ToyConfig
) -> tuple[float, dict[str, float], list[tuple[torch.Tensor, ...]]]:
    """How the backbone (with its active adapter) edits ``effect`` at the teacher's guidance: PSNR (dB)
    against the truth, for a stochastic effect :func:`score_draws`' distribution scores, and contact-sheet
    rows (source | truth | output; a stochastic effect's: source | two true draws | two seeds' outputs)."""
    steps, guidance = cfg.eval.teacher_steps, cfg.eval.teacher_guidance
    if not effect.stochastic:
        value, truth, out = score(backbone, effect.apply, effect.prompt, sources, steps, guidance)
        return value, {}, _sheet_rows(sources, truth, out, 6)
    scores, truth, outs = score_draws(backbone, effect, effect.prompt, sources, steps, guidance)
    rows: list[tuple[torch.Tensor, ...]] = [
        (x, truth[0, i], truth[1, i], outs[0, i], outs[1, i]) for i, x in enumerate(sources[:6])
    ]
    return scores.pop("psnr"), scores, rows


def build_teacher(
    effect: Effect | str,
    tiny: bool = False,
    device: str = "cpu",
    force: bool = False,
    backbone: ToyBackbone | None = None,
    show_progress: bool = True,
    size: str | None = None,
) -> BuildResult:
    """Train, score and save one effect's teacher LoRA on the built base (cached by recipe)."""
    effect = get_effect(effect) if isinstance(effect, str) else effect
    factory = get_factory(tiny, size)
    cfg = factory.config
    folder = store.teacher_dir(factory.backbone_id, cfg, effect.name)
    weights, sheet, report_path = (
        folder / store.TEACHER_WEIGHTS,
        folder / store.TEACHER_SHEET,
        folder / store.TEACHER_REPORT,
    )
    if not force:
        shipped = not weights.exists() and store.install_shipped(folder, store.TEACHER_FILES)
        if weights.exists():
            report = _read_report(report_path)
            if (report.get("eval_steps"), report.get("eval_guidance")) != (
                cfg.eval.teacher_steps,
                cfg.eval.teacher_guidance,
            ):
                # scored with another sampler than the recipe's (an older clora): the weights stand
                backbone = backbone or factory.load(device)
                report = {
                    **report,
                    **_score_teacher(backbone, effect, weights, sheet, cfg, factory.backbone_id),
                }
                _write_json(report_path, report)
            return BuildResult(weights, sheet, report, cached=True, shipped=shipped)
    backbone = backbone or factory.load(device)
    state, stats = train_teacher(backbone, effect, cfg.teacher, show_progress=show_progress)
    meta = lora_metadata(
        rank=cfg.teacher.rank,
        alpha=cfg.teacher.alpha,
        target_modules=EFFECT_LORA_MODULES,
        base_id=factory.backbone_id,
        prompt=effect.prompt,
        effect_name=effect.name,
        extra={"base_hash": cfg.base_hash(), "teacher_config": cfg.teacher.model_dump(), **stats},
    )
    save_lora(weights, state, meta)
    report = {**_score_teacher(backbone, effect, weights, sheet, cfg, factory.backbone_id), **stats}
    _write_json(report_path, report)
    return BuildResult(weights, sheet, report, cached=False)


def _score_teacher(
    backbone: ToyBackbone, effect: Effect, weights: Path, sheet: Path, cfg: ToyConfig, backbone_id: str
) -> dict[str, object]:
    """A teacher's report (without its training stats) at the recipe's eval sampler, and its contact
    sheet: PSNR with and without the LoRA, a stochastic effect's distribution scores."""
    sources = teacher_eval_sources(backbone, cfg)
    base_psnr, base_scores, _ = _score_effect(backbone, effect, sources, cfg)
    apply_lora(backbone, weights, "toy_eval")
    try:
        teacher_psnr, scores, rows = _score_effect(backbone, effect, sources, cfg)
    finally:
        backbone.transformer.delete_adapters("toy_eval")
    distribution: dict[str, object] = {}
    if effect.stochastic:
        distribution = {
            "stochastic": True,
            "score_draws": SCORE_DRAWS,
            **{k: round(v, 6) for k, v in scores.items()},
            "base_diversity": round(base_scores["diversity"], 6),
        }
    contact_sheet(rows, sheet)
    return {
        "effect": effect.name,
        "prompt": effect.prompt,
        "backbone_id": backbone_id,
        # a stochastic effect's: of the mean over SCORE_DRAWS seeds against the mean of as many true draws
        "psnr": round(teacher_psnr, 2),
        "base_psnr": round(base_psnr, 2),
        "eval_steps": cfg.eval.teacher_steps,
        "eval_guidance": cfg.eval.teacher_guidance,
        **distribution,
    }
