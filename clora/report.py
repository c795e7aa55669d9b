"""``clora eval --report DIR``: one offline HTML page: tables, contact sheets, a bleeding heat map."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from clora.evaluate import COMPARISONS
from clora.fileio import atomic_path
from clora.images import contact_sheet

#: columns of a contact sheet, after the input; merged baselines follow
ORDER = ("truth", "truth draw", "teacher", "cascade", "student")


def heatmap(labels: list[str], matrix: list[list[int]], path: Path, cell: int = 28) -> None:
    """The confusion matrix as a PNG heat map (rows: requested effect, columns: nearest effect)."""
    n = len(labels)
    margin = 8 * max((len(x) for x in labels), default=1) + 10
    im = Image.new("RGB", (margin + n * cell + 4, margin + n * cell + 4), "white")
    draw = ImageDraw.Draw(im)
    for i, row in enumerate(matrix):
        total = max(sum(row), 1)
        for j, count in enumerate(row):
            v = count / total
            colour = (
                (int(255 * (1 - v)), int(255 * (1 - 0.6 * v)), 255)
                if i == j
                else (255, int(255 * (1 - v)), int(255 * (1 - v)))
            )
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(200, 200, 200))
            draw.text((x + 4, y + 8), str(count), fill="black")
    for i, label in enumerate(labels):
        draw.text((2, margin + i * cell + 8), label, fill="black")
        draw.text((margin + i * cell + 2, 2 + (i % 2) * 12), label[:4], fill="black")
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def _table(rows: list[list[Any]], head: list[str]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else html.escape(f"{v:.2f}" if isinstance(v, float) else str(v))

    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


#: the baseline sweeps: (key in ``overall["best"]``, result key prefix, heading)
SWEEPS = (
    ("merged", "merged", "Merged LoRA (one file for every effect; full sampler)"),
    ("cascade", "cascade_sweep", "Cascade (effect LoRA + acceleration LoRA; few steps), by LoRA strength"),
)


def _sweep_table(result: dict[str, Any], kind: str, key: str, heading: str) -> str:
    """Every setting of one baseline sweep: mean PSNR against each reference, and per effect."""
    best = result["overall"]["best"].get(kind)
    if not best:
        return ""
    ref = best["by"].removeprefix("psnr vs ")
    means = {r: result["overall"].get(f"{key}_vs_{r}") or {} for r in ("truth", "teacher")}
    effects = result["effects"]
    rows = [
        [
            f"{s} (best)" if s == best["variant"] else s,
            (means["truth"].get(s) or {}).get("psnr"),
            (means["teacher"].get(s) or {}).get("psnr"),
            *(((r[f"{key}_vs_{ref}"] or {}).get(s) or {}).get("psnr") for r in effects.values()),
        ]
        for s in means[ref]
    ]
    head = ["setting", "mean vs truth (dB)", "mean vs teacher (dB)", *(f"{n} vs {ref}" for n in effects)]
    return f"<h3>{html.escape(heading)}</h3>" + _table(rows, head)


def _sheets(outputs: dict[str, Any], folder: Path) -> list[tuple[str, str, str]]:
    """One contact sheet per effect (input, then each way's outputs, for up to four images):
    ``(effect, file, column labels)``."""
    sources: torch.Tensor = outputs["sources"]
    sheets = []
    for name, out in outputs["per_effect"].items():
        kinds = [k for k in ORDER if k in out] + sorted(k for k in out if k.startswith("merged-"))
        cols = [sources] + [out[k] for k in kinds]
        rows = [[c[i] for c in cols] for i in range(min(4, len(sources)))]
        file = f"sheet-{name}.png"
        contact_sheet(rows, folder / file)
        sheets.append((name, file, " | ".join(["input", *kinds])))
    return sheets


def _fidelity_table(result: dict[str, Any]) -> str:
    """Per effect: student, teacher and each baseline (at its best setting) against the truth."""
    best = result["overall"]["best"]
    merged = best["merged"]["variant"] if "merged" in best else None
    cascade = best["cascade"]["variant"] if "cascade" in best else None
    rows = [
        [
            n,
            (r["student_vs_truth"] or {}).get("psnr"),
            (r["teacher_vs_truth"] or {}).get("psnr"),
            (r["cascade_vs_truth"] or {}).get("psnr"),
            ((r["merged_vs_truth"] or {}).get(merged) or {}).get("psnr") if merged else None,
            (r["student_vs_teacher"] or {}).get("psnr"),
            (r["student_vs_teacher"] or {}).get("ssim"),
            r["bad_case_rate"],
        ]
        for n, r in result["effects"].items()
    ]
    head = [
        "effect",
        "student vs truth (dB)",
        "teacher vs truth",
        f"cascade ({cascade}) vs truth" if cascade else "cascade vs truth",
        f"merged ({merged}) vs truth" if merged else "merged vs truth",
        "student vs teacher (dB)",
        "SSIM vs teacher",
        "bad-case rate",
    ]
    return _table(rows, head)


def _metrics_table(effects: dict[str, Any]) -> str:
    """Every comparison that has scores, with every metric."""
    comparisons = [k for k in COMPARISONS if any(r.get(k) for r in effects.values())]
    metric_ids = list(dict.fromkeys(m for r in effects.values() for k in comparisons for m in r[k] or {}))
    return _table(
        [[n, *((r[k] or {}).get(m) for k in comparisons for m in metric_ids)] for n, r in effects.items()],
        ["effect", *(f"{COMPARISONS[k]}: {m}" for k in comparisons for m in metric_ids)],
    )


def _guidance(scale: float | None) -> str:
    """How the teachers were guided, for the report's header (older results lack the scale)."""
    if scale is None:
        return "with their guidance"
    return f"with CFG {scale:g}" if scale else "without CFG"


def _distribution_table(effects: dict[str, Any]) -> str:
    """The stochastic effects: each way's distribution metrics against the true draws ("" if none)."""
    rows = [
        [f"{n}: {way}", m.get("hf_ratio"), m.get("diversity_ratio"), m.get("mmd")]
        for n, r in effects.items()
        for way, m in (r.get("distribution") or {}).items()
    ]
    if not rows:
        return ""
    explain = """<h2>Effects whose truth is a distribution</h2><p>Each way's outputs against draws from
the true result: high-frequency energy and diversity across seeds as ratios to the truth's (1 is right;
below 1 is smoother or less varied, the mark of averaged modes), and MMD between small features (0 is
the same distribution).</p>"""
    return explain + _table(rows, ["effect: way", "HF energy ratio", "diversity ratio", "MMD"])


def _cost_table(cost: dict[str, Any]) -> str:
    keys = ("files", "bytes", "switch_ms", "nfe", "ms_per_image")
    return _table(
        [[k, *(v.get(key) for key in keys)] for k, v in cost.items()],
        ["way", "files", "bytes", "switch ms", "NFE", "ms / image"],
    )


def _bleeding_section(bleed: dict[str, Any]) -> str:
    teachers = bleed.get("teacher_bleed_rate")
    also = f"; the teachers' outputs scored the same way: {teachers}" if teachers is not None else ""
    image = '<img src="bleeding.png" alt="bleeding heat map">' if bleed["matrix"] else ""
    return f"<p>bleed rate {bleed['bleed_rate']} (nearest {bleed['reference']}){also}</p>\n{image}"


def write_report(result: dict[str, Any], outputs: dict[str, Any], folder: Path) -> Path:
    """Write ``index.html`` (+ PNGs and ``eval.json``) into ``folder``; returns the page's path."""
    folder.mkdir(parents=True, exist_ok=True)
    sheets = _sheets(outputs, folder)
    bleed = result["bleeding"]
    if bleed["matrix"]:
        heatmap(bleed["labels"], bleed["matrix"], folder / "bleeding.png")
    baselines = "".join(_sweep_table(result, kind, key, label) for kind, key, label in SWEEPS)
    if baselines:
        baselines = f"""<h2>Baselines, every setting</h2><p>A baseline that loses should lose at its best:
each is swept, and the setting with the best mean PSNR (against the truth, else the teacher) is the one in
the table above and in the contact sheets.</p>{baselines}"""
    title = f"clora eval: collection v{result['collection']}"
    body = f"""<!doctype html><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}
table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}
img{{image-rendering:pixelated}}</style>
<h1>Collection v{result["collection"]} on base {html.escape(result["base"])}</h1>
<p>{result["n_images"]} held-out images per effect; student {result["steps"]["student"]} steps,
teacher {result["steps"]["teacher"]} steps {_guidance(result.get("teacher_guidance"))}.</p>
<h2>Fidelity</h2>{_fidelity_table(result)}
{_distribution_table(result["effects"])}
{baselines}
<h2>Every metric</h2><p>PSNR in dB; SSIM and CLIP similarity: higher is more alike; LPIPS and
DreamSim: lower is more alike.</p>{_metrics_table(result["effects"])}
<h2>Concept bleeding</h2>{_bleeding_section(bleed)}
<h2>Retention of general edits</h2><pre>{html.escape(json.dumps(result["retention"]))}</pre>
<h2>Deployment cost</h2>{_cost_table(result["cost"])}
<h2>Contact sheets</h2>
""" + "\n".join(
        f"<h3>{html.escape(n)}</h3><p>{html.escape(k)}</p><img src='{f}' alt='{html.escape(n)}'>"
        for n, f, k in sheets
    )
    with atomic_path(folder / "eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    page = folder / "index.html"
    with atomic_path(page) as tmp:
        tmp.write_text(body)
    return page
