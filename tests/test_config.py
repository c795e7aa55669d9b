"""The distiller's config: sections, stored configs of every clora version, --set, and the one
resolution step from config + plan + parent + base model to a run's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run

from clora.distill.config import DistillConfig, load_config, read_config
from clora.distill.resolve import BaseDefaults, ParentRun, Resolved, resolve
from clora.errors import CloraError

#: a collection's config as clora stored it before the sections (flat; frozen_rank was a field)
FLAT_STORED = {
    "steps": 700, "steps_per_effect": 375, "steps_per_new_effect": 600, "rank": 16, "alpha": None,
    "target_modules": ["to_q", "to_k"], "few_steps": 4, "shift": 3.0, "p_switch": 0.9, "block_len": 5,
    "effects_per_batch": 8, "incremental_effects_per_batch": 6, "effect_balance": 0.5, "router": "balanced",
    "new_effect_share": 0.5, "gen_every": 1, "anchor_share": 1.0, "critic_warmup": 20,
    "critic_from_student": True, "batch_size": 16, "lr": 0.006, "critic_lr": 0.0005, "lr_schedule": "cosine",
    "lr_final_ratio": 0.01, "incremental_lr_ratio": None, "incremental_grow_rank": 16, "frozen_rank": 0,
    "betas": [0.9, 0.999], "grad_clip": 10.0, "guidance": 1.0, "general_guidance": 0.0, "teacher_steps": 20,
    "sources_per_effect": 16, "general_pool": 128, "general_targets": True, "asymmetric_prompts": True,
    "target_levels": 4,
    "losses": {"level_anchor": {"weight": 1.0, "schedule": "constant", "final_weight": 0.0}},
    "max_resident_teachers": 8, "checkpoint_every": 50, "captioner": "template", "seed": 0, "device": "cpu",
    "dtype": "float32", "a_field_from_the_future": 1,
}  # fmt: skip
TOY = BaseDefaults(
    guidance=1.0, target_modules=["to_q", "img_in"], teacher_steps=4, resolution=32, real=False
)
REAL = BaseDefaults(guidance=4.0, target_modules=["to_q"], teacher_steps=40, resolution=1024, real=True)


def test_a_stored_flat_config_reads_into_sections() -> None:
    cfg = read_config(json.dumps(FLAT_STORED))
    assert cfg.steps == 700 and cfg.student.target_modules == ["to_q", "to_k"]
    assert cfg.anchoring.share == 1.0 and cfg.teachers.steps == 20 and cfg.teachers.guidance == 1.0
    assert cfg.data.sources_per_effect == 16 and cfg.incremental.effects_per_batch == 6
    assert cfg.optimizer.betas == (0.9, 0.999) and cfg.teachers.max_resident == 8
    # retired (frozen_rank) and unknown fields are dropped, fields added since take their defaults, or
    # what the run had where the default changed since (one set of few-step levels for every effect)
    assert cfg.optimizer.grad_accumulation == 1 and cfg.data.general_data is None
    assert cfg.student.on_policy_shift is None and DistillConfig().student.on_policy_shift == 1.0
    # a stored config in sections reads back as itself, also with a field it does not know
    data = cfg.to_json()
    data["student"]["a_retired_field"] = 3
    assert read_config(data) == cfg


def test_config_files_take_sections_and_the_flat_names_and_refuse_typos(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 9, "student": {"rank": 4}, "anchor_share": 0.5}))
    cfg = load_config(
        path, {"batch_size": 2, "data.p_switch": 0.25}, ["optimizer.lr=0.002", "teachers.steps=3"]
    )
    assert (cfg.steps, cfg.student.rank, cfg.anchoring.share) == (9, 4, 0.5)
    assert (cfg.optimizer.batch_size, cfg.data.p_switch, cfg.optimizer.lr, cfg.teachers.steps) == (
        2,
        0.25,
        2e-3,
        3,
    )
    assert cfg.optimizer.model_fields_set >= {"batch_size", "lr"}
    for bad, says in (
        ({"student": {"rnak": 4}}, "student.rnak"),
        ({"rnak": 4}, "rnak"),
        ({"optimizer": {"batch_size": 6, "grad_accumulation": 4}}, "multiple of grad_accumulation"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(CloraError, match=says):
            load_config(path, {})
    with pytest.raises(CloraError, match=r"section\.field=value"):
        load_config(None, {}, ["optimizer.lr"])


def test_resolution_fills_what_the_base_chooses_and_applies_the_run_kind() -> None:
    cfg = DistillConfig()
    full = resolve(cfg, kind="full", n_effects=4, n_new=4, auto_steps=True, base=TOY, dtype="float32")
    c = full.config
    assert c.steps == max(cfg.steps, cfg.steps_per_effect * 4)
    # the targets of the effects that train on-policy are drawn at 20 sampler steps or more (the toy's
    # own sampler takes 4, where its deterministic teachers score best)
    assert (c.teachers.guidance, c.teachers.steps, c.data.resolution) == (1.0, 4, 32)
    assert c.teachers.on_policy_steps == 20
    assert c.student.target_modules == ["to_q", "img_in"] and c.optimizer.gradient_checkpointing is False
    # target simulation never starts from the 4-step sampler's first, pure-noise level
    assert (c.student.few_steps, c.on_policy.target_levels) == (4, 3)
    assert full.frozen_rank == 0 and cfg.teachers.guidance is None and cfg.student.rank is None  # untouched
    real = resolve(
        DistillConfig(teachers={"steps": 8}),
        kind="full",
        n_effects=1,
        n_new=1,
        auto_steps=False,
        base=REAL,
        dtype="bfloat16",
    )
    assert real.config.teachers.steps == 8 and real.config.optimizer.gradient_checkpointing is True
    assert real.config.teachers.on_policy_steps == 20  # 8 asked for the targets, at least 20 for these
    qwen = resolve(cfg, kind="full", n_effects=1, n_new=1, auto_steps=True, base=REAL, dtype="float32")
    assert (qwen.config.teachers.steps, qwen.config.teachers.on_policy_steps) == (40, 40)  # the base's
    assert real.config.dtype == "bfloat16" and real.config.steps == 600
    general = resolve(
        cfg, kind="general-only", n_effects=0, n_new=0, auto_steps=True, base=TOY, dtype="float32"
    )
    assert general.config.data.p_switch == 0.0


def test_resolution_of_an_incremental_run_keeps_the_parents_shape() -> None:
    parent_cfg = resolve(
        DistillConfig(
            student={"rank": 4, "alpha": 8.0, "few_steps": 8, "shift": 2.0, "on_policy_shift": 1.0}
        ),
        kind="full",
        n_effects=2,
        n_new=2,
        auto_steps=False,
        base=TOY,
        dtype="float32",
    ).config
    parent = ParentRun(1, parent_cfg, ["to_q", "to_v"])
    asked = DistillConfig(student={"rank": 32, "shift": 3.0}, incremental={"grow_rank": 2})
    r = resolve(
        asked,
        kind="incremental",
        n_effects=3,
        n_new=1,
        auto_steps=True,
        base=TOY,
        dtype="float32",
        parent=parent,
    )
    s = r.config.student
    assert (s.rank, s.alpha, s.few_steps, s.target_modules) == (6, 6.0, 8, ["to_q", "to_v"])
    assert (s.shift, s.on_policy_shift) == (2.0, 1.0)  # the levels its parent's components learned
    assert (r.frozen_rank, r.parent_lora_scale) == (4, 2.0)
    assert (
        r.config.steps == asked.incremental.steps_per_new_effect * 1 and r.config.data.effects_per_batch == 6
    )
    assert r.config.incremental.lr_ratio == 0.6 and r.config.on_policy.target_levels == 5
    assert r.notes and "ignoring rank 32, shift 3.0" in r.notes[0]
    same = resolve(
        DistillConfig(incremental={"grow_rank": 0}),
        kind="incremental",
        n_effects=3,
        n_new=1,
        auto_steps=False,
        base=TOY,
        dtype="float32",
        parent=parent,
    )
    assert same.frozen_rank == 0 and same.config.student.rank == 4 and same.config.student.alpha == 8.0
    assert same.config.optimizer.lr == pytest.approx(DistillConfig().optimizer.lr * 0.25)


def test_the_rank_follows_the_number_of_effects_and_the_learning_rate_the_rank() -> None:
    """Left out, the rank is the base's rule (toy: 8 per effect in steps of 16, 16 to 128), said in a note,
    and the learning rate falls as sqrt(32 / rank) above 32; an incremental run grows to the rank a full
    run of all its effects would get (by at least 16). What the user sets is kept."""
    lr = DistillConfig().optimizer.lr

    def full(n: int, cfg: DistillConfig | None = None) -> Resolved:
        c = cfg or DistillConfig()
        return resolve(c, kind="full", n_effects=n, n_new=n, auto_steps=False, base=TOY, dtype="float32")

    rules = ((1, 16, lr), (3, 32, lr), (8, 64, lr / 2**0.5), (10, 80, lr * 0.4**0.5), (16, 128, lr / 2))
    for n, rank, rate in rules:
        r = full(n)
        assert (r.config.student.rank, r.config.student.lora_alpha) == (rank, rank)
        assert r.config.optimizer.lr == pytest.approx(rate)
        assert f"student rank {rank} for {n} effect(s)" in r.notes[0]
    assert full(50).config.student.rank == full(180).config.student.rank == 128
    assert full(50).config.optimizer.lr == pytest.approx(lr / 2)
    mine = full(50, DistillConfig(student={"rank": 8}, optimizer={"lr": 1e-3}))
    assert (mine.config.student.rank, mine.config.optimizer.lr, mine.notes) == (8, 1e-3, [])
    assert full(50, DistillConfig(student={"rank": 64})).config.optimizer.lr == pytest.approx(lr / 2**0.5)

    parent = ParentRun(1, full(8).config, ["to_q", "to_v"])
    for n, grown, rate in ((10, 80, lr * 0.6), (9, 80, lr * 0.6), (50, 128, lr * 0.6 / 2**0.5)):
        r = resolve(
            DistillConfig(),
            kind="incremental",
            n_effects=n,
            n_new=n - 8,
            auto_steps=True,
            base=TOY,
            dtype="float32",
            parent=parent,
        )
        s = r.config.student
        assert (s.rank, r.frozen_rank, r.config.incremental.grow_rank) == (grown, 64, grown - 64)
        assert r.config.optimizer.lr == pytest.approx(rate)
        assert f"student rank 64 + {grown - 64} new for {n} effect(s)" in r.notes[0]


def test_set_reaches_any_field_and_a_run_without_an_on_policy_phase_has_no_critic(
    tiny_collection,
    registry_file: Path,  # type: ignore[no-untyped-def]
) -> None:
    import torch

    from clora.paths import clora_home
    from clora.registry import Registry

    pm = tiny_collection
    with Registry(registry_file) as reg:
        col = reg.require_collection(1)
    run_dir = clora_home() / "runs" / str(col.run_id)
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored == json.loads(col.config_json)  # the resolved config, stored once
    state = torch.load(Path(col.file).with_name(Path(col.file).stem + ".state.pt"), weights_only=True)
    assert "critic" not in state and "opt_critic" not in state  # the default run only anchors
    # an incremental run with an on-policy phase, from that parent without a critic, gets one
    assert run(pm, "toy", "teachers", "warm", "--tiny").exit_code == 0
    r = run(
        pm,
        "distill",
        "--incremental",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
        "--json",
        "--set",
        "anchoring.share=0.5",
        "--set",
        "on_policy.critic_warmup=0",
        "--set",
        "teachers.max_resident=1",
    )
    assert r.exit_code == 0, r.output
    config = json.loads(r.stdout)["config"]
    assert config["anchoring"]["share"] == 0.5 and config["teachers"]["max_resident"] == 1
    file = Path(json.loads(r.stdout)["file"])
    assert "critic" in torch.load(file.with_name(file.stem + ".state.pt"), weights_only=True)
    r = run(pm, "distill", "--steps", "2", "--set", "student.rnak=4")
    assert r.exit_code == 1 and "student.rnak" in r.stderr


@pytest.mark.parametrize(
    ("given", "kept"),
    [(" AUTO ", "auto"), ("None", "none"), ("", "none"), (" grain , confetti,", "grain,confetti")],
)
def test_on_policy_effects_are_read_as_users_type_them(given: str, kept: str) -> None:
    """--on-policy takes auto / none in any case and names with blanks around the commas."""
    assert load_config(None, {"on_policy_effects": given}).on_policy.effects == kept
