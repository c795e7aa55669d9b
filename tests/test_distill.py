"""`clora distill` on the tiny toy world: the saved file, resume, NaN handling, and each loss term."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from clora_routers import GapRouter, ProgressRouter
from clora_toy.data import make_sources
from clora_toy.effects import get_effect
from helpers import plugin_manager, run
from safetensors import safe_open

from clora import hookimpl
from clora.distill.config import DistillConfig, LossSpec
from clora.distill.loop import Group, balance_weights, general_block
from clora.distill.losses import LossContext, dmd_gradient, dmd_loss, flow_matching_loss
from clora.distill.prepare import seed_spread
from clora.generate import UnifiedModel, sample_few_steps
from clora.paths import clora_home
from clora.plugins import Components
from clora.registry import Registry
from clora.sampling import few_step_sigmas, renoise_rollout

TINY_EFFECTS = ("sepia", "invert")
FAST = ["--steps", "6", "--batch-size", "4", "--no-progress"]


@pytest.fixture
def tiny_world(registry_file: Path):  # type: ignore[no-untyped-def]
    """The tiny base and two teachers (built once per session, cached), registered in this test's registry."""
    pm = plugin_manager()
    r = run(pm, "toy", "build-base", "--tiny")
    assert r.exit_code == 0, r.output
    r = run(pm, "toy", "teachers", *TINY_EFFECTS, "--tiny")
    assert r.exit_code == 0, r.output
    return pm


def _config_file(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(fields))
    return path


def test_smoke_distill_writes_a_loadable_unified_lora(tiny_world, registry_file: Path) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_world
    r = run(pm, "distill", *FAST, "--json")
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    assert col["version"] == 1 and col["parent_version"] is None and col["base"] == "toy-tiny"
    assert {m["effect"] for m in col["members"]} == set(TINY_EFFECTS)
    assert col["config"]["steps"] == 6
    assert col["metrics"]["train"]["peak_rss_mb"] > 0
    roles = col["metrics"]["train"]["seconds_by_role"]
    assert set(roles) == {"simulation", "teacher", "critic_score", "generator", "critic"}
    # the default run anchors throughout: only student updates (all roles: the anchoring-phase test)
    assert roles["generator"] > 0 and roles["simulation"] == roles["teacher"] == 0, roles
    assert sum(roles.values()) <= col["metrics"]["train"]["seconds_loop"] + 0.1

    path = Path(col["file"])
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    header = json.loads(meta["clora"])
    assert header["base_id"] == "toy-tiny"
    assert len(header["few_step_sigmas"]) == 4 and header["few_step_sigmas"][0] == pytest.approx(1.0)
    with Registry(registry_file) as reg:
        triggers = {e.name: e.trigger for e in reg.list_effects()}
    assert {k: v["trigger"] for k, v in header["effects"].items()} == triggers
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    # the effect LoRAs' modules and the wider ones the toy base adds for a unified LoRA
    targets = ("attn.to_q", "attn.to_out.0", "attn.add_k_proj", "img_mlp.net.2", "txt_mlp.net.2", "img_in")
    for target in targets:
        assert any(f"{target}.lora_B.weight" in k for k in keys), target
    assert path.with_name(path.stem + ".state.pt").exists()

    # loads with diffusers' load_lora_adapter, and each trigger gives a different edit
    comps = Components.collect(pm)
    model = UnifiedModel.load(comps, path)
    assert model.prompt(["sepia"]) == f"{triggers['sepia']} {header['effects']['sepia']['caption']}"
    images = model.backbone.sample_sources(4, 123)
    a = model.edit(images, ["sepia"], seed=1)
    b = model.edit(images, ["invert"], seed=1)
    model.backbone.transformer.disable_adapters()
    assert (a - b).abs().mean() > 1e-4
    assert a.shape == images.shape and float(a.min()) >= 0 and float(a.max()) <= 1


def test_a_student_trained_without_asymmetric_prompts_is_prompted_as_trained(  # type: ignore[no-untyped-def]
    tiny_world, tmp_path: Path
) -> None:
    # the ablation trains the student on each teacher's own prompt; generate and eval must use it,
    # not a trigger the student never saw
    cfg = _config_file(tmp_path, steps=2, batch_size=4, asymmetric_prompts=False)
    r = run(tiny_world, "distill", "--config", cfg, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    model = UnifiedModel.load(Components.collect(tiny_world), Path(json.loads(r.stdout)["file"]))
    teacher_prompts = {n: e["teacher_prompt"] for n, e in model.header.effects.items()}
    assert model.prompt(["invert"]) == teacher_prompts["invert"]
    assert model.prompt(["sepia"], extra="softly") == f"{teacher_prompts['sepia']}, softly"


def _final_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_general_stream_learns_the_base_without_cfg(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The general stream's targets are the base model's own unguided outputs (as `clora eval` scores
    its retention), even when the effects' teachers sample with CFG."""
    from safetensors.torch import load_file

    from clora.sampling import euler_sample

    pm = tiny_world
    fields = {"steps": 2, "batch_size": 3, "general_pool": 3, "guidance": 2.0, "teacher_steps": 4, "seed": 5}
    r = run(pm, "distill", "--config", _config_file(tmp_path, **fields), "--no-progress")
    assert r.exit_code == 0, r.output
    cached = [load_file(str(p))["targets"] for p in (clora_home() / "cache" / "targets").glob("general-*")]
    (targets,) = [t for t in cached if t.shape[0] == 3]
    bb = Components.collect(pm).get_backbone("toy-tiny").load("cpu")
    images, prompts = bb.general_edits(3, 5)
    src = bb.encode_images(images)

    def sample(guidance: float) -> torch.Tensor:
        return euler_sample(bb, src, prompts, 4, guidance, torch.Generator().manual_seed(5 + 2))

    assert torch.allclose(targets, sample(0.0), atol=1e-5)
    assert not torch.allclose(targets, sample(2.0), atol=1e-3)


def test_the_general_stream_takes_its_share_of_the_blocks_evenly(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`p_switch` is the effect blocks' share, the rest general blocks spaced evenly: every run, and
    every stretch of one, gets the general stream's share (a coin per block gave 600-step toy runs at 0.9
    from 40 to 80 general steps, and their retention moved with the count)."""
    for p_switch, n in ((0.9, 12), (0.75, 30), (1.0, 0), (0.0, 120)):
        assert sum(general_block(b, p_switch) for b in range(120)) == n
    assert all(sum(general_block(b, 0.9) for b in range(s, s + 10)) == 1 for s in range(111))
    pm = tiny_world
    cfg = _config_file(tmp_path, steps=6, batch_size=4, p_switch=0.5, block_len=1)
    r = run(pm, "distill", "--config", cfg, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    run_id = json.loads(r.stdout)["run_id"]
    log = [json.loads(line) for line in (clora_home() / "runs" / run_id / "log.jsonl").open()]
    assert [row["stream"] for row in log] == ["effect", "general"] * 3


def test_mixed_batches_train_several_effects_per_step(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_world
    # half on-policy, so the teachers also run on mixed batches (each group of rows with its own)
    cfg = _config_file(
        tmp_path,
        steps=8,
        batch_size=4,
        block_len=1,
        p_switch=1.0,
        effects_per_batch=2,
        anchor_share=0.5,
        critic_warmup=0,
    )
    r = run(pm, "distill", "--config", cfg, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    log = clora_home() / "runs" / col["run_id"] / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 8
    assert all(sorted(row["effect"].split(",")) == sorted(TINY_EFFECTS) for row in rows)
    assert all("loss/level_anchor" in row for row in rows)
    assert all("loss/dmd" in row for row in rows[4:])


def test_the_probe_scores_held_out_sources_and_ends_the_run_at_the_target(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_world
    common = ["--batch-size", "4", "--no-progress", "--json", "--set", "data.probe_every=4"]
    # a target no student reaches: every step trains, the probe runs every 4 steps and at the end, and
    # the run names each effect under its target
    # (routed by the progress router, which reads the probes' history)
    r = run(
        pm, "distill", "--steps", "10", *common, "--set", "data.target_db=99", "--set", "data.router=progress"
    )
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    train = col["metrics"]["train"]
    assert train["steps"] == 10 and not train["stopped_early"]
    assert set(train["probe_db"]) == set(TINY_EFFECTS) and all(5 < v < 99 for v in train["probe_db"].values())
    assert "2 of 2 under the target (99 dB)" in r.stderr
    log = clora_home() / "runs" / col["run_id"] / "log.jsonl"
    probes = [row for row in map(json.loads, log.read_text().splitlines()) if "probe" in row]
    assert [row["step"] for row in probes] == [0, 4, 8, 10]
    assert probes[-1]["probe"] == train["probe_db"]
    # the checkpoint keeps each effect's probes with the times it was chosen by then (the probe after the
    # last step is not in it)
    ck = torch.load(clora_home() / "runs" / col["run_id"] / "checkpoint.pt", weights_only=True)
    for name in TINY_EFFECTS:
        history = ck["probe_history"][name]
        assert [db for _, db in history] == [row["probe"][name] for row in probes[:3]]
        chosen = [n for n, _ in history]
        assert chosen[0] == 0 and chosen == sorted(chosen) and chosen[-1] == ck["counts"][name] > 0
    # a target the untrained student already meets ends the run at its first probe: nothing trains
    r = run(pm, "distill", "--steps", "10", *common, "--set", "data.target_db=1", "--fresh")
    assert r.exit_code == 0, r.output
    train = json.loads(r.stdout)["metrics"]["train"]
    assert train["steps"] == 0 and train["stopped_early"]
    assert "every effect within its target (1 dB); ended early at step 0 of 10" in r.stderr


def test_the_gap_router_picks_effects_in_proportion_to_their_probe_error() -> None:
    router, cfg, rng = GapRouter(), DistillConfig(), random.Random(0)
    picks = [
        router.choose(["a", "b"], [], {}, cfg, rng, probe_db={"a": 20.0, "b": 40.0}) for _ in range(2000)
    ]
    # RMS errors 0.1 and 0.01: a is picked 10 times as often as b
    assert 0.88 < picks.count("a") / len(picks) < 0.94
    # an effect not probed yet counts as the worst probed one
    picks = [router.choose(["a", "c"], [], {}, cfg, rng, probe_db={"a": 20.0}) for _ in range(2000)]
    assert 0.45 < picks.count("c") / len(picks) < 0.55
    # an incremental run still gives the new effects their share, however far the old ones are
    cfg.incremental.new_effect_share = 0.5
    picks = [
        router.choose(["a", "n"], ["n"], {}, cfg, rng, probe_db={"a": 10.0, "n": 50.0}) for _ in range(2000)
    ]
    assert 0.45 < picks.count("n") / len(picks) < 0.55


def test_the_progress_router_picks_effects_in_proportion_to_their_recent_gain() -> None:
    router, cfg, rng = ProgressRouter(), DistillConfig(), random.Random(0)
    cfg.data.router_floor = 0.0
    climbing = [(0.0, 20.0), (10.0, 25.0), (20.0, 30.0)]  # 0.5 dB per time chosen
    levelled = [(0.0, 30.0), (10.0, 30.5), (20.0, 31.0), (30.0, 31.5)]  # 0.05
    falling = [(0.0, 30.0), (10.0, 29.0)]

    def share(name: str, history: dict[str, list[tuple[float, float]]], counts: dict[str, int]) -> float:
        names = sorted(history) if "new" not in counts else [*sorted(history), "new"]
        picks = [router.choose(names, [], counts, cfg, rng, probe_history=history) for _ in range(2000)]
        return picks.count(name) / len(picks)

    # in proportion to the slope of the probe PSNR against the times chosen: 10 to 1
    assert 0.88 < share("a", {"a": climbing, "b": levelled}, {}) < 0.94
    # a falling effect gets no picks beyond the floor; one without a slope yet counts as the fastest
    assert share("c", {"a": climbing, "c": falling}, {}) == 0.0
    assert 0.45 < share("new", {"a": climbing}, {"new": 0}) < 0.55
    # the floor gives the least-chosen effect its share however flat it is
    cfg.data.router_floor = 0.5
    assert 0.52 < share("b", {"a": climbing, "b": levelled}, {"a": 9, "b": 3}) < 0.57


def test_anchoring_phase_trains_off_policy_terms_then_the_full_method(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_world
    cfg = _config_file(
        tmp_path, steps=12, batch_size=4, anchor_share=0.5, critic_warmup=1, p_switch=1.0, block_len=1
    )
    r = run(pm, "distill", "--config", cfg, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    rows = [json.loads(ln) for ln in (clora_home() / "runs" / col["run_id"] / "log.jsonl").open()]
    losses = [{k for k in row if k.startswith("loss/")} for row in rows]
    # steps 0-5: anchoring alone; step 6: the critic warms up on student samples; then everything
    assert losses[:6] == [{"loss/level_anchor"}] * 6
    assert losses[6] == {"loss/critic_fm"}
    full = {"loss/level_anchor", "loss/dmd", "loss/target_sim", "loss/critic_fm"}
    assert all(x == full for x in losses[7:])
    roles = col["metrics"]["train"]["seconds_by_role"]
    assert all(v > 0 for v in roles.values()), roles


def test_the_seed_spread_counts_texture_not_a_colour_drawn_for_the_whole_image() -> None:
    """On the toy's true draws: film grain, confetti and a random-direction streak change with the seed
    in their texture and are picked; a tint drawn from a palette changes only each image's colour (the
    student learns no more of it on-policy, and its rows cost the colour edits), and sepia not at all."""
    sources = make_sources(4, 32, 7)
    names = ("grain", "confetti", "streak", "palette-tint", "sepia")
    pairs = {n: get_effect(n).draws(sources, 2, seed=3) for n in names}
    spread = {n: seed_spread(a, b, sources) for n, (a, b) in pairs.items()}
    assert min(spread["grain"], spread["confetti"], spread["streak"]) > 0.05, spread
    assert max(spread["palette-tint"], spread["sepia"]) < 0.01, spread
    # the whole difference, mean included, would have picked the tint
    a, b = pairs["palette-tint"]
    assert (a - b).pow(2).mean() / (2 * (a - sources).pow(2).mean()) > 0.05


def test_effects_whose_teacher_varies_with_the_seed_also_train_on_policy(  # type: ignore[no-untyped-def]
    registry_file, tmp_path, monkeypatch
) -> None:
    """The default run anchors every effect; grain, whose teacher's result changes with the seed, is
    found by its spread and its rows also train on-policy (a critic; DMD after the warm-up), while
    sepia's rows only anchor. Grain's targets are drawn with 20 sampler steps, sepia's and the general
    edits' with the toy's 4. Naming the effects, or none, overrides the measurement."""
    import clora.distill.prepare as prepare

    pm = plugin_manager()
    for args in (["build-base", "--tiny"], ["teachers", "sepia", "grain", "--tiny"]):
        r = run(pm, "toy", *args)
        assert r.exit_code == 0, r.output
    sampled: list[tuple[int, int]] = []  # (rows, steps) of each full-sampler call
    full_sampler = prepare._full_sampler

    def recording(backbone, rows, cfg, generator, guidance, advance=lambda _: None, steps=None):  # type: ignore[no-untyped-def]
        sampled.append((len(rows), steps or cfg.teachers.steps))
        return full_sampler(backbone, rows, cfg, generator, guidance, advance, steps)

    monkeypatch.setattr(prepare, "_full_sampler", recording)
    cfg = _config_file(tmp_path, steps=10, batch_size=4, critic_warmup=2, p_switch=1.0, block_len=1)
    sizes = [
        "--set",
        "data.sources_per_effect=6",
        "--set",
        "data.general_pool=5",
        "--set",
        "teachers.batch_size=8",
    ]
    r = run(
        pm, "distill", "--config", cfg, "--set", "data.effects_per_batch=1", *sizes, "--no-progress", "--json"
    )
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    train = col["metrics"]["train"]
    assert train["seed_spread"]["grain"] > 0.05 > train["seed_spread"]["sepia"], train["seed_spread"]
    assert train["on_policy_effects"] == ["grain"]
    # the spread (4 sources, two seeds, each effect) at 20 steps, then the targets: sepia's 6 at the
    # toy's 4 steps, grain's 6 at 20 (p_switch 1: no general edits)
    assert sorted(sampled) == sorted([(4, 20)] * 4 + [(6, 4), (6, 20)]), sampled
    assert col["config"]["teachers"]["on_policy_steps"] == 20
    assert "on-policy too" in r.stderr and "grain" in r.stderr
    rows = [json.loads(ln) for ln in (clora_home() / "runs" / col["run_id"] / "log.jsonl").open()]
    losses = {(row["step"], row["effect"]): {k for k in row if k.startswith("loss/")} for row in rows}
    assert {e for _, e in losses} == {"sepia", "grain"}
    for (step, effect), names in losses.items():
        if effect == "sepia":
            assert names == {"loss/level_anchor"}
        elif step < 2:  # the critic's warm-up: the student only anchors
            assert names == {"loss/level_anchor", "loss/critic_fm"}
        else:
            assert names == {"loss/level_anchor", "loss/dmd", "loss/target_sim", "loss/critic_fm"}
    state = torch.load(Path(col["file"]).with_suffix(".state.pt"), weights_only=True)
    assert "critic" in state

    r = run(pm, "distill", "--config", cfg, "--on-policy", "none", "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    assert col["metrics"]["train"]["on_policy_effects"] == []
    assert "critic" not in torch.load(Path(col["file"]).with_suffix(".state.pt"), weights_only=True)
    r = run(pm, "distill", "--config", cfg, "--on-policy", "sepia,glitter", "--no-progress")
    assert r.exit_code != 0 and "glitter" in r.output and "Traceback" not in r.output


def test_effects_trained_on_policy_can_sample_with_levels_of_their_own(registry_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``student.on_policy_shift`` (1 by default): grain (on-policy, its result varies with the seed)
    trains and samples with the levels of shift 1, sepia with the collection's (shift 3); batches that
    mix them carry a level set per row. The file records grain's levels, `clora generate`'s sampler uses them
    for a prompt with grain, and the export card lists them."""
    pm = plugin_manager()
    for args in (["build-base", "--tiny"], ["teachers", "sepia", "grain", "--tiny"]):
        r = run(pm, "toy", *args)
        assert r.exit_code == 0, r.output
    cfg = _config_file(tmp_path, steps=8, batch_size=4, critic_warmup=2, p_switch=1.0, block_len=1)
    own = ["--set", "data.effects_per_batch=2"]  # on_policy_shift left at its default
    r = run(pm, "distill", "--config", cfg, *own, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    assert col["metrics"]["train"]["on_policy_effects"] == ["grain"]
    rows = [json.loads(ln) for ln in (clora_home() / "runs" / col["run_id"] / "log.jsonl").open()]
    assert any("loss/dmd" in row and "," in row["effect"] for row in rows)  # mixed batches went on-policy
    model = UnifiedModel.load(Components.collect(pm), Path(col["file"]))
    grain, collection = few_step_sigmas(4, 1.0), few_step_sigmas(4, 3.0)
    assert model.header.effects["grain"]["few_step_sigmas"] == pytest.approx(grain.tolist())
    assert model.header.effects["grain"]["shift"] == 1.0 and "shift" not in model.header.effects["sepia"]
    torch.testing.assert_close(model.sigmas(None), collection)
    torch.testing.assert_close(model.sigmas(None, ["sepia"]), collection)
    torch.testing.assert_close(model.sigmas(None, ["sepia", "grain"]), grain)
    torch.testing.assert_close(model.sigmas(8, ["grain"]), few_step_sigmas(8, 1.0))
    images = model.backbone.sample_sources(2, 5)
    edited = model.edit(images, ["grain"], seed=3)
    prompt = [model.prompt(["grain"])] * 2
    torch.testing.assert_close(edited, sample_few_steps(model.backbone, images, prompt, grain, 3))
    assert not torch.allclose(edited, sample_few_steps(model.backbone, images, prompt, collection, 3))
    r = run(pm, "export", "--format", "diffusers", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "out" / "README.md").read_text()
    levels = ", ".join(f"{s:.6g}" for s in grain.tolist())
    assert f"- grain (their result varies with the seed): shift 1, sigmas [{levels}]" in card


def test_rows_with_levels_of_their_own_draw_and_sample_from_them() -> None:
    """A batch whose rows have their own level sets ``[B, L]``: the regression terms draw each row's
    level from its own set, and the sampler steps each row through its own levels."""
    per_row = torch.stack([few_step_sigmas(4, 3.0), few_step_sigmas(4, 1.0)]).repeat_interleave(8, 0)
    ctx = _ctx(torch.zeros(16, 2))
    ctx.few_step_sigmas = per_row
    drawn = torch.stack([ctx.sampler_levels() for _ in range(20)], 1)  # [16, 20]
    for row, levels in zip(drawn, per_row, strict=True):
        assert set(row.tolist()) <= set(levels.tolist())
    assert set(drawn[8:].flatten().tolist()) == set(per_row[8].tolist())  # every level, rows' own
    late = torch.stack([ctx.sampler_levels(2) for _ in range(20)], 1)
    assert set(late[:8].flatten().tolist()) == set(per_row[0, -2:].tolist())
    seen: list[torch.Tensor] = []

    def x0_at(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        seen.append(s)
        return torch.zeros_like(x)

    out = renoise_rollout(x0_at, torch.zeros(16, 2), per_row, 3, lambda x0: torch.ones_like(x0))
    torch.testing.assert_close(torch.stack(seen, 1), per_row[:, :3])
    torch.testing.assert_close(out, per_row[:, 3:4].expand(16, 2))  # re-noised to each row's level 3


@pytest.mark.parametrize("copy", [True, False])
def test_critic_starts_as_the_student_when_anchoring_ends(tiny_world, tmp_path: Path, copy: bool) -> None:  # type: ignore[no-untyped-def]
    # learning rates so small that neither adapter moves: what is left is how each one started
    cfg = _config_file(
        tmp_path,
        steps=6,
        batch_size=4,
        anchor_share=0.5,
        critic_warmup=1,
        lr=1e-30,
        critic_lr=1e-30,
        critic_from_student=copy,
    )
    r = run(tiny_world, "distill", "--config", cfg, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    state = torch.load(Path(json.loads(r.stdout)["file"]).with_suffix(".state.pt"), weights_only=True)
    a_keys = [k for k in state["student"] if "lora_A" in k]
    same = all(torch.allclose(state["student"][k], state["critic"][k], atol=1e-6) for k in a_keys)
    assert same is copy


def test_resume_after_interrupt_matches_uninterrupted(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_world
    cfg = _config_file(
        tmp_path,
        checkpoint_every=4,
        steps=40,
        batch_size=4,
        block_len=3,
        critic_warmup=2,
        gen_every=2,
        effects_per_batch=2,
        anchor_share=0.25,
        effect_balance=1.0,  # its running losses must survive the kill too
    )
    r = run(pm, "distill", "--config", cfg, "--no-progress", "--json", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    straight = _final_state(Path(json.loads(r.stdout)["file"]))

    # the same run, killed with SIGKILL after its first checkpoint, then resumed
    env = {**os.environ, "CLORA_REGISTRY": str(tmp_path / "registry.db")}
    cmd = [
        sys.executable,
        "-m",
        "clora",
        "distill",
        "--config",
        str(cfg),
        "--no-progress",
        "--out",
        str(tmp_path / "b"),
    ]
    killed_at = None
    # stderr goes to a file, so a chatty child can never block on a full pipe
    with open(tmp_path / "stderr.txt", "w") as errors:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with Registry(tmp_path / "registry.db") as reg:
                latest = reg.get_run(unfinished=True)
            if latest is not None and latest.step >= 4:
                proc.send_signal(signal.SIGKILL)
                killed_at = latest.step
                break
            time.sleep(0.05)
        proc.wait(30)
    assert killed_at is not None, (tmp_path / "stderr.txt").read_text()
    with Registry(tmp_path / "registry.db") as reg:
        # its process is gone: the run lock is free, so it shows as interrupted
        assert reg.get_run(unfinished=True).status == "interrupted"  # type: ignore[union-attr]

    r = run(pm, "distill", "--resume", "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    resumed = _final_state(Path(json.loads(r.stdout)["file"]))
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-4, atol=1e-6)


class NanAtStep:
    """A loss term that returns NaN from its second call: the run must stop cleanly."""

    __name__ = "nan_plugin"
    loss_id = "nan_after_1"
    role = "critic"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        self.calls += 1
        value = torch.tensor(float("nan")) if self.calls > 4 else ctx.sample.sum() * 0
        return {"nan_after_1": value}

    @hookimpl
    def register_loss_terms(self, register):  # type: ignore[no-untyped-def]
        register(self)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_world, tmp_path, registry_file) -> None:  # type: ignore[no-untyped-def]
    pm = plugin_manager(NanAtStep())
    cfg = _config_file(
        tmp_path,
        steps=10,
        batch_size=4,
        checkpoint_every=2,
        anchor_share=0.0,  # on-policy from the start, so the NaN term (a critic term) runs every step
        losses={"dmd": {}, "critic_fm": {}, "nan_after_1": {}},
    )
    r = run(pm, "distill", "--config", cfg, "--no-progress")
    assert r.exit_code == 1
    assert "became nan at step 4" in r.stderr and "last good checkpoint (step 4)" in r.stderr
    with Registry(registry_file) as reg:
        assert reg.list_collections() == []
        failed = reg.get_run(unfinished=True)
        assert failed is not None and failed.status == "failed" and failed.step == 4
    ck = torch.load(Path(failed.run_dir) / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4


def test_bad_options_are_one_line_errors(tiny_world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_world
    r = run(pm, "distill", "--few-steps", "5")
    assert r.exit_code == 1 and "few_steps" in r.stderr and r.stderr.count("\n") == 1
    r = run(pm, "distill", "--effects", "nosuch", "--no-progress")
    assert r.exit_code == 1 and "no effect 'nosuch'" in r.stderr
    r = run(pm, "distill", "--config", _config_file(tmp_path, stepz=3))
    assert r.exit_code == 1 and "stepz" in r.stderr
    r = run(pm, "distill", "--config", _config_file(tmp_path, target_modules=[]))
    assert r.exit_code == 1 and "target_modules" in r.stderr
    r = run(
        pm,
        "distill",
        "--config",
        _config_file(tmp_path, target_modules=["to_q", "nosuch_proj"]),
        "--no-progress",
    )
    assert r.exit_code == 1 and "['nosuch_proj'] name no layer" in r.stderr and r.stderr.count("\n") == 1
    r = run(pm, "distill", "--resume")
    assert r.exit_code == 1 and "no distill run to resume" in r.stderr
    assert "--few-steps" in run(pm, "distill", "--help").stdout


# ---- loss terms against hand-computed values ---------------------------------------------------


def _ctx(sample: torch.Tensor, targets: torch.Tensor | None = None, seed: int = 0, **calls) -> LossContext:  # type: ignore[no-untyped-def]
    zeros = lambda x, t: torch.zeros_like(x)  # noqa: E731
    cfg = DistillConfig(student={"few_steps": 4})
    return LossContext(
        sample=sample,
        stream="effect",
        targets=targets,
        few_step_sigmas=torch.tensor([1.0, 0.9, 0.75, 0.5]),
        config=cfg,
        generator=torch.Generator().manual_seed(seed),
        teacher_x0=calls.get("teacher_x0", zeros),
        critic_x0=calls.get("critic_x0", zeros),
        student_x0=calls.get("student_x0", zeros),
        student_velocity=calls.get("student_velocity", zeros),
        critic_velocity=calls.get("critic_velocity", zeros),
        sampling_noise=lambda shape, g: torch.randn(shape, generator=g),
    )


def test_dmd_math_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    real, fake = torch.zeros(1, 2), torch.ones(1, 2)
    # grad = (fake - real) / mean|x - real| = [1, 1] / 1.5
    torch.testing.assert_close(dmd_gradient(x.detach(), real, fake), torch.tensor([[2 / 3, 2 / 3]]))
    loss = dmd_loss(x, real, fake)
    assert float(loss) == pytest.approx(0.5 * (2 / 3) ** 2)
    loss.backward()
    # d/dx 0.5*mean((x - stopgrad(x - g))^2) = g / numel
    torch.testing.assert_close(x.grad, torch.tensor([[1 / 3, 1 / 3]]))


def test_flow_matching_by_hand() -> None:
    v, x0, eps = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0]), torch.tensor([1.0, 2.0])
    # target eps - x0 = [0.5, 2.0]; mse = ((0.5)^2 + (1)^2) / 2
    assert float(flow_matching_loss(v, x0, eps)) == pytest.approx(0.625)


def test_each_builtin_term_by_hand() -> None:
    comps = Components.collect(plugin_manager())
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    ones = lambda n, t: torch.ones_like(n)  # noqa: E731
    # DMD with teacher -> 0 and critic -> 1: same numbers as the hand computation above
    out = comps.get_loss_term("dmd")(_ctx(x, critic_x0=ones))
    assert float(out["dmd"]) == pytest.approx(0.5 * (2 / 3) ** 2)
    # critic flow matching with a critic velocity of 0: mse(0, eps - x0) = mean((eps - x0)^2)
    ctx = _ctx(x.detach(), critic_velocity=lambda n, t: torch.zeros_like(n))
    eps = torch.randn((1, 2), generator=torch.Generator().manual_seed(0))
    # the term draws its level first, then its noise, from the context's generator
    gen = torch.Generator().manual_seed(0)
    torch.rand(1, generator=gen)
    eps = torch.randn((1, 2), generator=gen)
    out = comps.get_loss_term("critic_fm")(ctx)
    assert float(out["critic_fm"]) == pytest.approx(float(((eps - x.detach()) ** 2).mean()), rel=1e-5)
    # anchoring with a student velocity equal to the exact target (eps - y) is zero; target terms skip
    # batches without teacher targets
    assert comps.get_loss_term("anchor")(_ctx(x)) == {}
    assert comps.get_loss_term("target_sim")(_ctx(x)) == {}
    y = torch.tensor([[0.2, -0.4]])
    captured = {}

    def exact_velocity(noisy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # x_s = (1-s) y + s eps  =>  eps - y = (x_s - y) / s
        captured["s"] = s
        return (noisy - y) / s.view(-1, 1)

    out = comps.get_loss_term("anchor")(_ctx(x, targets=y, student_velocity=exact_velocity))
    assert float(out["anchor"]) == pytest.approx(0.0, abs=1e-10)
    # target simulation scores the one-step output from a late level with DMD (teacher 0, critic 1)
    out = comps.get_loss_term("target_sim")(
        _ctx(x, targets=y, critic_x0=ones, student_x0=lambda n, t: torch.full_like(n, 3.0))
    )
    # x0 = [3, 3]; grad = 1 / mean|3 - 0| = 1/3; loss = 0.5 * (1/3)^2
    assert float(out["target_sim"]) == pytest.approx(0.5 / 9)


def test_level_anchor_regresses_at_the_samplers_own_levels() -> None:
    comps = Components.collect(plugin_manager())
    term = comps.get_loss_term("level_anchor")
    assert term.off_policy and term.role == "generator"
    x = torch.zeros(3, 2)
    assert term(_ctx(x)) == {}  # no teacher targets (a general batch without base targets)
    y = torch.tensor([[0.2, -0.4], [0.0, 1.0], [-1.0, 0.5]])
    seen = []

    def exact_velocity(noisy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        seen.append(s)
        return (noisy - y) / s.view(-1, 1)

    out = term(_ctx(x, targets=y, student_velocity=exact_velocity))
    assert float(out["level_anchor"]) == pytest.approx(0.0, abs=1e-10)
    # every level drawn is one the few-step sampler visits
    assert all(torch.isclose(torch.tensor([1.0, 0.9, 0.75, 0.5]), s).any() for s in seen[0])
    # a student velocity of 0 costs mean((eps - y)^2), with the level drawn before the noise
    gen = torch.Generator().manual_seed(0)
    torch.randint(4, (3,), generator=gen)
    eps = torch.randn((3, 2), generator=gen)
    out = term(_ctx(x, targets=y))
    assert float(out["level_anchor"]) == pytest.approx(float(((eps - y) ** 2).mean()), rel=1e-5)


def test_effect_balance_weighs_each_effects_rows_by_its_running_loss() -> None:
    groups = [Group("a.safetensors", 0, 2, "a"), Group("b.safetensors", 2, 4, "b")]
    running = {"a": 0.04, "b": 0.01}
    assert balance_weights(groups, running, 0.0) is None  # off
    assert balance_weights(groups[:1], running, 1.0) is None  # one effect: nothing to balance
    # power 1: 1/0.04 = 25 and 1/0.01 = 100, over their mean 62.5
    torch.testing.assert_close(balance_weights(groups, running, 1.0), torch.tensor([0.4, 0.4, 1.6, 1.6]))
    # power 0.5: 5 and 10, over 7.5
    half = balance_weights(groups, running, 0.5)
    torch.testing.assert_close(half, torch.tensor([2 / 3, 2 / 3, 4 / 3, 4 / 3]))
    # an effect without a running loss yet counts as the mean of the others (0.025 -> 40)
    w = balance_weights([*groups, Group("c.safetensors", 4, 6, "c")], running, 1.0)
    torch.testing.assert_close(w, torch.tensor([25, 25, 100, 100, 40, 40]) / 55)

    # the regression terms reduce their rows with the weights, and record the rows for the loop
    term = Components.collect(plugin_manager()).get_loss_term("level_anchor")
    y = torch.tensor([[0.2, -0.4], [0.0, 1.0], [-1.0, 0.5], [0.3, 0.3]])
    ctx = _ctx(torch.zeros(4, 2), targets=y)
    ctx.row_weights = torch.tensor([0.4, 0.4, 1.6, 1.6])
    out = term(ctx)
    gen = torch.Generator().manual_seed(0)
    torch.randint(4, (4,), generator=gen)
    rows = ((torch.randn((4, 2), generator=gen) - y) ** 2).mean(1)  # a velocity of 0: mse(0, eps - y)
    assert float(out["level_anchor"]) == pytest.approx(float((rows * ctx.row_weights).mean()), rel=1e-5)
    torch.testing.assert_close(ctx.row_losses[0], rows)


def test_student_lr_schedule() -> None:
    cfg = DistillConfig(steps=11, optimizer={"lr": 2e-3, "lr_final_ratio": 0.1})
    lrs = [cfg.lr_at(i) for i in range(11)]
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-4)
    assert lrs[5] == pytest.approx(1.1e-3) and all(a > b for a, b in itertools.pairwise(lrs))
    flat = DistillConfig(steps=11, optimizer={"lr": 2e-3, "lr_schedule": "constant"})
    assert {flat.lr_at(i) for i in range(11)} == {2e-3}


def test_loss_weight_schedules() -> None:
    assert LossSpec(weight=2.0).at(5, 10) == 2.0
    assert LossSpec(weight=1.0, schedule="linear", final_weight=0.0).at(0, 11) == 1.0
    assert LossSpec(weight=1.0, schedule="linear", final_weight=0.0).at(5, 11) == pytest.approx(0.5)
    assert LossSpec(weight=1.0, schedule="cosine", final_weight=0.0).at(10, 11) == pytest.approx(0.0)


def test_sim_anchor_regresses_the_step_after_the_students_own_sampler() -> None:
    comps = Components.collect(plugin_manager())
    term = comps.get_loss_term("sim_anchor")
    assert term.off_policy and term.role == "generator"
    x = torch.zeros(3, 2)
    assert term(_ctx(x)) == {}
    y = torch.tensor([[0.2, -0.4], [0.0, 1.0], [-1.0, 0.5]])
    levels = torch.tensor([1.0, 0.9, 0.75, 0.5])
    calls: list[tuple[float, bool]] = []

    def student_x0(noisy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append((float(s[0]), torch.is_grad_enabled()))
        return torch.full_like(noisy, 3.0)

    def velocity(noisy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append((float(s[0]), torch.is_grad_enabled()))
        return torch.zeros_like(noisy)

    seen = set()
    for seed in range(6):  # seeds 0..5 draw k = 0, 1, 0, 2, 2, 3
        calls.clear()
        out = term(_ctx(x, targets=y, seed=seed, student_x0=student_x0, student_velocity=velocity))
        # the same draws by hand: the level, the starting noise, then fresh noise per simulated step
        gen = torch.Generator().manual_seed(seed)
        k = int(torch.randint(4, (1,), generator=gen))
        seen.add(k)
        xt = torch.randn((3, 2), generator=gen)
        for i in range(k):
            xt = (1 - levels[i + 1]) * 3.0 + levels[i + 1] * torch.randn((3, 2), generator=gen)
        # k steps of the student's sampler without grad, then one step with grad at level k
        assert calls == [(pytest.approx(float(levels[i])), False) for i in range(k)] + [
            (pytest.approx(float(levels[k])), True)
        ]
        # a velocity of 0 misses the one that lands on the target, (x_k - y) / s_k
        expected = float((((xt - y) / levels[k]) ** 2).mean())
        assert float(out["sim_anchor"]) == pytest.approx(expected, rel=1e-5)
    assert seen == {0, 1, 2, 3}

    def exact(noisy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (noisy - y) / s.view(-1, 1)

    out = term(_ctx(x, targets=y, student_x0=student_x0, student_velocity=exact))
    assert float(out["sim_anchor"]) == pytest.approx(0.0, abs=1e-10)


def test_bfloat16_distill_on_cpu_keeps_float32_loras(tiny_world, tmp_path: Path, registry_file: Path) -> None:  # type: ignore[no-untyped-def]
    """A bfloat16 base trains float32 LoRAs (student and critic, and their optimizer state), also on the
    on-policy rows; the collection records the dtype and generates in bfloat16."""
    pm = tiny_world
    on_policy = ["--on-policy", "sepia", "--set", "on_policy.critic_warmup=1"]
    r = run(pm, "distill", *FAST, *on_policy, "--dtype", "bfloat16", "--json")
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    assert col["config"]["dtype"] == "bfloat16"
    assert math.isfinite(col["metrics"]["train"]["final_losses"]["loss/dmd"])
    with safe_open(col["file"], framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    state = torch.load(Path(col["file"]).with_name(Path(col["file"]).stem + ".state.pt"), weights_only=True)
    for role in ("student", "critic"):
        assert {t.dtype for t in state[role].values()} == {torch.float32}
        moments = [s["exp_avg"] for s in state[f"opt_{role}"]["state"].values()]
        assert moments and {m.dtype for m in moments} == {torch.float32}
    images = tmp_path / "in"
    assert run(pm, "toy", "sources", "--out", images, "-n", "2", "--size", "tiny").exit_code == 0
    r = run(
        pm,
        "generate",
        "--effect",
        "sepia",
        "--image",
        images,
        "--out",
        tmp_path / "out",
        "--dtype",
        "bfloat16",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    # grown in bfloat16: the parent's components stay as they were (float32, their alpha/rank folded
    # into B) and new float32 ones train beside them
    assert run(pm, "toy", "teachers", "warm", "--tiny").exit_code == 0
    r = run(pm, "distill", "--incremental", *FAST, "--dtype", "bfloat16", "--json")
    assert r.exit_code == 0, r.output
    grown = json.loads(r.stdout)

    def scale(c: dict[str, Any]) -> float:
        student = c["config"]["student"]
        return float(student["alpha"] or student["rank"]) / student["rank"]  # alpha None: = rank

    trained = 0.0
    with safe_open(col["file"], framework="pt") as f1, safe_open(grown["file"], framework="pt") as f2:
        for k in f1.keys():  # noqa: SIM118
            old, new = f1.get_tensor(k), f2.get_tensor(k)
            assert new.dtype == torch.float32
            if ".lora_A." in k:
                assert torch.equal(new[: old.shape[0]], old)
            else:
                torch.testing.assert_close(new[:, : old.shape[1]] * scale(grown), old * scale(col))
                trained += float(new[:, old.shape[1] :].abs().sum())
    assert trained > 0


def test_unavailable_device_or_dtype_is_one_line_and_records_no_run(tiny_world, registry_file: Path) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_world
    for args, says in (
        (["--device", "cuda"], "CUDA is not available"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "float8"], "dtype"),
    ):
        r = run(pm, "distill", *FAST, *args)
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and says in r.stderr, (args, r.output)
        assert len(r.stderr.strip().splitlines()) == 1
    with Registry(registry_file) as reg:
        assert reg.list_runs() == [] and reg.list_collections() == []


def test_bfloat16_is_refused_on_a_gpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from clora.devices import resolve_dtype
    from clora.errors import CloraError

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(CloraError, match="bfloat16 is not supported on cuda"):
        resolve_dtype("bfloat16", torch.device("cuda"))
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_gradient_accumulation_splits_batches_into_rebased_groups() -> None:
    from clora.backbone import PromptEmbeds
    from clora.distill.loop import Batch

    def embeds(n: int) -> PromptEmbeds:
        return PromptEmbeds(torch.arange(n, dtype=torch.float32).view(n, 1, 1), torch.ones(n, 1))

    batch = Batch(
        "effect",
        [Group("a", 0, 3, "a"), Group("b", 3, 8, "b")],
        torch.arange(8.0).view(8, 1),
        embeds(8),
        embeds(8),
        embeds(8),
        torch.arange(8.0).view(8, 1) + 10,
        (1,),
    )
    parts = batch.split(2)
    assert [len(p) for p in parts] == [4, 4]
    assert [(g.name, g.start, g.stop) for g in parts[0].groups] == [("a", 0, 3), ("b", 3, 4)]
    assert [(g.name, g.start, g.stop) for g in parts[1].groups] == [("b", 0, 4)]
    assert parts[1].source.flatten().tolist() == [4, 5, 6, 7] and parts[1].targets is not None
    assert parts[1].student_prompt.embeds.flatten().tolist() == [4, 5, 6, 7]


def test_gradient_accumulation_trains_the_whole_batch(tiny_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A step in micro-batches updates the student on every group of rows, once per step."""
    pm = tiny_world
    cfg = _config_file(
        tmp_path, steps=2, batch_size=4, grad_accumulation=2, anchor_share=0.5, critic_warmup=0
    )
    r = run(pm, "distill", "--config", cfg, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    log = [json.loads(line) for line in (clora_home() / "runs" / col["run_id"] / "log.jsonl").open()]
    assert len(log) == 2
    assert "loss/level_anchor" in log[0] and "loss/critic_fm" in log[1] and "loss/dmd" in log[1]
    assert all(v == v and abs(v) < 1e6 for row in log for k, v in row.items() if k.startswith("loss/"))
    with safe_open(col["file"], framework="pt") as f:
        assert any(f.get_tensor(k).abs().max() > 0 for k in f.keys() if ".lora_B." in k)  # noqa: SIM118
