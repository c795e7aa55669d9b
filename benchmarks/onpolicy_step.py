"""Wall time of a distill step: anchoring against on-policy (DMD + target simulation + critic), by role.

    OMP_NUM_THREADS=1 python benchmarks/onpolicy_step.py                # 10 + 10 timed steps, 1 thread
    python benchmarks/onpolicy_step.py --against /path/to/other/checkout --rounds 2
    python benchmarks/onpolicy_step.py --set gen_every=5               # config overrides, both runs

Two runs on the full toy world (8 shipped teachers, a fresh registry in a temp folder): one that anchors
throughout (``anchor_share`` 1) and one on-policy throughout (``anchor_share`` 0, no critic warm-up, the
default loss terms: level_anchor, dmd, target_sim, critic_fm). Each runs ``--warmup`` untimed steps, then
``--steps`` timed ones; a step's time runs from one batch to the next (checkpoints fall outside). The
on-policy step is split by the loop's own role timer: simulation (the student's rollout and step), teacher and
critic scoring (no-grad calls in the generator's losses), student update (its forwards with grad,
backward, optimizer) and critic update, plus what is left (batching, logging).

``--against DIR`` times another checkout's ``clora`` (and ``plugins/`` packages found there) in the same
run, in a subprocess, alternating rounds with this one; the toy base and teachers are shared. Prints
ms/step, the on-policy/anchoring ratio and the split, all measured in this one run on this machine
(shared cores are noisy: compare within a run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EFFECTS = ["sepia", "invert", "hue-120", "channel-swap", "warm", "tint-teal", "vignette", "blur"]
ROLES = ("simulation", "teacher", "critic_score", "generator", "critic")
LABELS = {
    "simulation": "simulation",
    "teacher": "teacher calls",
    "critic_score": "critic scoring",
    "generator": "student update",
    "critic": "critic update",
    "other": "other",
}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """ms per step of an anchoring run and an on-policy run (and the on-policy split by role)."""
    import torch
    from toyworld import World

    import clora
    import clora.distill.loop as loop
    from clora.distill.config import load_config
    from clora.distill.run import run_distill

    marks: list[tuple[float, dict[str, float]]] = []
    make_batch = loop.Distiller.make_batch

    def marked(self: Any, *a: Any, **k: Any) -> Any:  # one mark at the start of every step
        marks.append((time.perf_counter(), dict(self.timer.seconds)))
        return make_batch(self, *a, **k)

    loop.Distiller.make_batch = marked  # type: ignore[method-assign]
    world = World.open("full", "clora-onpolicy-", args.threads)
    world.register(args.effects)
    out: dict[str, Any] = {"clora": str(Path(clora.__file__).parent), "threads": torch.get_num_threads()}
    for phase, share in (("anchoring", 1.0), ("on_policy", 0.0)):
        marks.clear()
        overrides = {
            "steps": args.warmup + args.steps + 1,
            "anchor_share": share,
            "critic_warmup": 0,
            "checkpoint_every": 10**6,
            "sources_per_effect": args.sources,
            "general_pool": args.sources,
            "seed": args.seed,
        }
        if args.batch_size:
            overrides["batch_size"] = args.batch_size
        cfg = load_config(None, overrides, settings=args.set)
        run_distill(world.registry, world.components, cfg, show_progress=False, out_dir=world.work / phase)
        (t0, r0), (t1, r1) = marks[args.warmup], marks[args.warmup + args.steps]
        roles = {k: (r1[k] - r0[k]) * 1e3 / args.steps for k in ROLES}
        roles["generator"] -= roles["teacher"] + roles["critic_score"]
        total = (t1 - t0) * 1e3 / args.steps
        roles["other"] = total - sum(roles.values())
        out[phase] = {"ms_per_step": total, "roles": roles}
    world.registry.close()
    shutil.rmtree(world.work, ignore_errors=True)  # the temp registry and collections
    return out


def worker(args: argparse.Namespace, checkout: Path | None) -> dict[str, Any]:
    """:func:`measure` in a subprocess, with ``checkout``'s clora first on the path (None: this one)."""
    env = dict(os.environ)
    if checkout is not None:
        paths = [str(checkout), str(checkout / "plugins"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [sys.executable, __file__, "--worker", *_forwarded(args)]
    done = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The measuring options, for a worker's command line."""
    out = ["--effects", *args.effects, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out += ["--sources", str(args.sources), "--seed", str(args.seed), "--threads", str(args.threads)]
    out += [f"--set={item}" for item in args.set]
    return out + (["--batch-size", str(args.batch_size)] if args.batch_size else [])


def mean_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over rounds of each ms figure."""
    out: dict[str, Any] = {"clora": runs[0]["clora"]}
    for phase in ("anchoring", "on_policy"):
        roles = {k: sum(r[phase]["roles"][k] for r in runs) / len(runs) for k in runs[0][phase]["roles"]}
        out[phase] = {"ms_per_step": sum(r[phase]["ms_per_step"] for r in runs) / len(runs), "roles": roles}
    return out


def report(results: dict[str, dict[str, Any]]) -> None:
    """ms/step and ratio per code version, then the on-policy split by role."""
    print(f"\n{'code':10} {'anchoring ms':>13} {'on-policy ms':>13} {'ratio':>6}   clora")
    for name, r in results.items():
        a, o = r["anchoring"]["ms_per_step"], r["on_policy"]["ms_per_step"]
        print(f"{name:10} {a:13.0f} {o:13.0f} {o / a:6.2f}   {r['clora']}")
    print(f"\non-policy step by role, ms (share){'':4}" + "".join(f" {n:>16}" for n in results))
    for role, label in LABELS.items():
        cells = []
        for r in results.values():
            ms, total = r["on_policy"]["roles"][role], r["on_policy"]["ms_per_step"]
            cells.append(f"{ms:8.0f} ({ms / total:4.0%})")
        print(f"{label:38}" + "".join(f" {c:>16}" for c in cells))
    if len(results) == 2:
        (na, ra), (nb, rb) = results.items()
        for phase in ("anchoring", "on_policy"):
            ratio = rb[phase]["ms_per_step"] / ra[phase]["ms_per_step"]
            print(f"{phase.replace('_', '-')}: {nb} / {na} = {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--effects", nargs="*", default=EFFECTS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (teacher loads)")
    parser.add_argument("--batch-size", type=int, help="optimizer.batch_size (default: the config's, 16)")
    parser.add_argument(
        "--sources", type=int, default=16, help="source images per effect and general pairs (fewer: faster)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a distill config override for both runs (as `clora distill --set`; the benchmark's own "
        "steps, anchor_share, critic_warmup and checkpoint_every are overridden too)",
    )
    parser.add_argument("--against", type=Path, help="another checkout to time in the same run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each code version, alternating")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return
    versions: dict[str, Path | None] = {"this": None}
    if args.against:
        versions = {"against": args.against.resolve(), "this": None}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in versions}
    for i in range(args.rounds):
        for name, checkout in versions.items():
            print(f"round {i + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            runs[name].append(worker(args, checkout))
    results = {name: mean_results(r) for name, r in runs.items()}
    report(results)
    if args.json_out:
        args.json_out.write_text(json.dumps({"results": results, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
