"""What the distill benchmarks share: the toy world's options and a fresh registry of its teachers."""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from clora_toy.build import build_base, build_teacher
from clora_toy.effects import effects_library, get_effect
from clora_toy.factory import get_factory

from clora.cli_eval import parse_merges
from clora.effects import add_effect
from clora.errors import CloraError
from clora.evaluate import EvalOptions, evaluate
from clora.plugins import Components, get_plugin_manager
from clora.registry import Collection, Registry
from clora.separation import prompt_separation
from clora.unified import read_header

#: the default collection of the distill benchmarks: the toy's eight shipped teachers
EFFECTS = ["sepia", "invert", "hue-120", "channel-swap", "warm", "tint-teal", "vignette", "blur"]
#: the effects the larger benchmarks add first (the demo's incremental pair), then the library's order
NEXT = ["cool", "solarize"]


def ordered(n: int) -> list[str]:
    """The first ``n`` effects of the benchmarks: EFFECTS, NEXT, then the toy library's order."""
    first = EFFECTS + NEXT
    names = first + [e.name for e in effects_library() if e.name not in first]
    if n > len(names):
        raise SystemExit(f"the toy library has {len(names)} effects; pick N <= {len(names)}")
    return names[:n]


def merge_types(text: str) -> tuple[str, ...]:
    """An argparse ``type`` for ``--merge``: `clora eval`'s parsing (comma-separated; 'none': no merges)."""
    try:
        return parse_merges([text])
    except CloraError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_world_args(parser: argparse.ArgumentParser) -> None:
    """``--size/--tiny``, ``--n-images``, ``--config`` and ``--json``."""
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="toy world size")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="= --size tiny")
    parser.add_argument("--n-images", type=int, default=16, help="held-out images per effect")
    parser.add_argument("--config", type=Path, help="DistillConfig JSON applied to every run")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the results here")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: 1 on the tiny world, 2 on the full one)"
    )


def add_work_arg(parser: argparse.ArgumentParser) -> None:
    """``--work``: a registry folder kept between runs of a long benchmark."""
    parser.add_argument(
        "--work",
        type=Path,
        help="registry folder to keep (default: a new temp folder); run the same command with the same "
        "folder again and a distillation it stopped part-way continues from its last checkpoint",
    )


def open_work(args: argparse.Namespace, prefix: str, settings: dict[str, Any]) -> World:
    """The world of ``args`` (``add_world_args``, ``add_work_arg``) in its kept folder or a new one. A kept
    folder holds what its first command ran with (``settings``, the size and the --config file's text)
    and refuses another: what an earlier run left there is reused, so it must be the same runs."""
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        config = args.config.read_text() if args.config else None
        wanted = {"benchmark": prefix, "size": args.size, "config": config, **settings}
        kept = args.work / "benchmark.json"
        if kept.is_file():
            held = json.loads(kept.read_text())
            differ = sorted(k for k in set(held) | set(wanted) if held.get(k) != wanted.get(k))
            if differ:
                raise SystemExit(
                    f"--work {args.work} holds runs of other settings ({', '.join(differ)} differ); "
                    "pass another folder"
                )
        else:
            kept.write_text(json.dumps(wanted, indent=2) + "\n")
    return World.open(args.size, prefix, args.threads, work=args.work)


@dataclass
class World:
    """The built toy base of one size, its plugins, and a registry in a fresh temp folder."""

    size: str
    base_id: str
    components: Components
    registry: Registry
    work: Path

    @classmethod
    def open(cls, size: str, prefix: str, threads: int | None = None, work: Path | None = None) -> World:
        """The world of ``size`` with the registry in ``work`` (default: a new temp folder)."""
        # the tiny model gains nothing from two threads
        torch.set_num_threads(threads or (1 if size == "tiny" else 2))
        build_base(size=size, show_progress=False)
        work = work or Path(tempfile.mkdtemp(prefix=prefix))
        return cls(
            size,
            get_factory(size=size).backbone_id,
            Components.collect(get_plugin_manager()),
            Registry(work / "registry.db"),
            work,
        )

    def build(self, names: list[str]) -> None:
        """Train (or reuse) the teachers of ``names``."""
        for name in names:
            build_teacher(get_effect(name), size=self.size, show_progress=False)

    def register(self, names: list[str]) -> None:
        """Train (or reuse) and register the teachers of ``names`` (those the registry has already, as
        in a folder an earlier run left, keep their registration and trigger)."""
        registered = {e.name for e in self.registry.list_effects()}
        for name in names:
            if name in registered:
                continue
            t = build_teacher(get_effect(name), size=self.size, show_progress=False)
            effect = get_effect(name)
            add_effect(
                self.registry,
                self.components,
                name=name,
                lora_path=t.path,
                prompt=effect.prompt,
                base=self.base_id,
            )

    def separation(self, col: Collection) -> dict[str, Any]:
        """How distinct the prompts the student learned ``col``'s effects under are (the base's prompt
        encodings, :func:`clora.separation.prompt_separation`)."""
        factory = get_factory(size=self.size)
        prompts = {n: e["prompt"] for n, e in read_header(col.file).effects.items()}
        return prompt_separation(factory.load("cpu", torch.float32), prompts)

    @property
    def overrides(self) -> dict[str, object]:
        """Config overrides for this size (the tiny world trains on batches of 4)."""
        return {"batch_size": 4} if self.size == "tiny" else {}


def trigger_accuracy(matrix: list[list[int]]) -> float:
    """Share of triggered outputs nearest their own effect's truth (the bleeding matrix's diagonal)."""
    return sum(matrix[i][i] for i in range(len(matrix))) / max(sum(map(sum, matrix)), 1)


def scores(
    reg: Registry,
    comps: Components,
    col: Collection,
    n_images: int,
    accel: Path | None = None,
    merges: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Per effect: student and teacher PSNR vs truth (dB), and the cascade (teacher LoRA + ``accel``, few
    steps) and merged-LoRA baselines when asked; trigger accuracy and retention overall."""
    opts = EvalOptions(n_images=n_images, merges=merges, accel=accel)
    ev = evaluate(reg, comps, col, options=opts, show_progress=False)
    ev.pop("_outputs")
    out: dict[str, Any] = {}
    for n, r in ev["effects"].items():
        row = {"student": r["student_vs_truth"]["psnr"], "teacher": r["teacher_vs_truth"]["psnr"]}
        if r.get("cascade_vs_truth"):
            row["cascade"] = r["cascade_vs_truth"]["psnr"]
        for m, v in (r.get("merged_vs_truth") or {}).items():
            if v:
                row[f"merged-{m}"] = v["psnr"]
        out[n] = row
    out["_overall"] = overall(ev)
    return out


def confusions(labels: list[str], matrix: list[list[int]], top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` most frequent confusions of a bleeding matrix: effect asked for, effect whose truth the
    output was nearest, and the share of the asked effect's outputs that went there."""
    pairs: list[dict[str, Any]] = [
        {"effect": labels[i], "looks_like": labels[j], "share": round(c / max(sum(row), 1), 4)}
        for i, row in enumerate(matrix)
        for j, c in enumerate(row)
        if i != j and j < len(labels) and c
    ]
    return sorted(pairs, key=lambda p: -p["share"])[:top]


def overall(ev: dict[str, Any]) -> dict[str, Any]:
    """An eval's overall figures the benchmarks report: trigger accuracy of the student and of the
    teachers' outputs, the student's top confusions, and the general edits against the base."""
    bleeding = ev["bleeding"]
    teachers = bleeding.get("teacher_matrix")
    return {
        "trigger_accuracy": trigger_accuracy(bleeding["matrix"]),
        "teacher_trigger_accuracy": None if teachers is None else trigger_accuracy(teachers),
        "confusions": confusions(bleeding["labels"], bleeding["matrix"]),
        "student_vs_base_general_psnr": (ev["retention"] or {}).get("student_vs_base_psnr"),
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Means over the effects of a ``scores`` result, effects within 2 dB of their teacher, overall."""
    rows = [r for n, r in result.items() if not n.startswith("_")]
    student = sum(r["student"] for r in rows) / len(rows)
    teacher = sum(r["teacher"] for r in rows) / len(rows)
    general = result["_overall"]["student_vs_base_general_psnr"]
    baselines = {k: round(sum(r[k] for r in rows) / len(rows), 2) for k in _baselines(rows)}
    above = (
        {"above_cascade": sum(r["student"] > r["cascade"] for r in rows)} if "cascade" in baselines else {}
    )
    return {
        "student": round(student, 2),
        "teacher": round(teacher, 2),
        **baselines,
        "gap": round(teacher - student, 2),
        "within_2db": sum(r["teacher"] - r["student"] <= 2 for r in rows),
        **above,
        "trigger_accuracy": result["_overall"]["trigger_accuracy"],
        # older result files lack it
        "teacher_trigger_accuracy": result["_overall"].get("teacher_trigger_accuracy"),
        "general_vs_base": None if general is None else round(general, 2),
    }


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def _baselines(rows: list[dict[str, Any]]) -> list[str]:
    """The baseline columns (cascade, merged-*) every row has."""
    return [k for k in rows[0] if k not in ("student", "teacher") and all(k in r for r in rows)]


def table(label: str, result: dict[str, Any]) -> None:
    rows = {n: r for n, r in result.items() if not n.startswith("_")}
    extra = _baselines(list(rows.values()))
    print(
        f"\n{label}\n{'effect':20} {'student':>8} {'teacher':>8} {'gap':>6}"
        + "".join(f" {k:>14}" for k in extra)
    )
    for n, r in rows.items():
        print(
            f"{n:20} {r['student']:8.2f} {r['teacher']:8.2f} {r['teacher'] - r['student']:6.2f}"
            + "".join(f" {r[k]:14.2f}" for k in extra)
        )
    m = summary(result)
    print(
        f"{'mean':20} {m['student']:8.2f} {m['teacher']:8.2f} {m['gap']:6.2f}"
        + "".join(f" {m[k]:14.2f}" for k in extra)
    )
    above = f", above the cascade on {m['above_cascade']}" if "above_cascade" in m else ""
    print(f"{m['within_2db']} of {len(rows)} within 2 dB of their teacher{above}")
    print(
        f"trigger accuracy {m['trigger_accuracy']:.1%} (teachers' outputs: "
        f"{_percent(m['teacher_trigger_accuracy'])}); general edits, student (few steps) vs base "
        f"(full sampler): {m['general_vs_base']} dB PSNR",
        flush=True,
    )
    confused = result["_overall"].get("confusions") or []
    if confused:
        print(
            "most confused (asked -> nearest truth, share): "
            + ", ".join(f"{c['effect']} -> {c['looks_like']} {c['share']:.0%}" for c in confused)
        )
    sep = result["_overall"].get("prompt_separation")
    if sep and sep["closest"]:
        print(
            f"student prompts, cosine of their encodings: mean {sep['mean_cosine']:.3f}, closest "
            + ", ".join(f"{'/'.join(c['effects'])} {c['cosine']:.3f}" for c in sep["closest"])
        )
