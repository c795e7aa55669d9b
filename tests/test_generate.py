"""`clora generate` and `clora distill --incremental` on the tiny toy world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import file_digest, plugin_manager, run
from PIL import Image
from safetensors import safe_open

from clora.paths import clora_home
from clora.registry import Registry
from clora.unified import read_header

FAST = ["--steps", "6", "--batch-size", "4", "--no-progress"]


@pytest.fixture
def distilled(registry_file: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Tiny base, teachers sepia and invert, one collection; returns (pm, input folder)."""
    pm = plugin_manager()
    assert run(pm, "toy", "build-base", "--tiny").exit_code == 0
    r = run(pm, "toy", "teachers", "sepia", "invert", "--tiny")
    assert r.exit_code == 0, r.output
    r = run(pm, "distill", *FAST)
    assert r.exit_code == 0, r.output
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 90), (20, 40, 220)]):
        Image.new("RGB", (20, 20), colour).save(inputs / f"img{i}.png")
    return pm, inputs


def test_generate_one_effect_and_a_folder(distilled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm, inputs = distilled
    out = tmp_path / "single.png"
    r = run(
        pm, "generate", "--effect", "sepia", "--image", inputs / "img0.png", "--out", out, "--no-progress"
    )
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size == (16, 16)
    r = run(
        pm,
        "generate",
        "--effect",
        "sepia",
        "--effect",
        "invert",
        "--image",
        inputs,
        "--out",
        tmp_path / "many",
        "--grid",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert files == [
        "grid.sepia+invert.png",
        "img0.sepia+invert.png",
        "img1.sepia+invert.png",
        "img2.sepia+invert.png",
    ]
    with Image.open(tmp_path / "many" / "grid.sepia+invert.png") as grid:
        assert grid.width > grid.height  # 4 columns (input | sepia | invert | composed), 3 rows


def test_generate_is_deterministic_and_trigger_dependent(distilled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm, inputs = distilled
    outs = {}
    for tag, effect, seed in (("a", "sepia", "1"), ("b", "sepia", "1"), ("c", "invert", "1")):
        r = run(
            pm,
            "generate",
            "--effect",
            effect,
            "--image",
            inputs / "img1.png",
            "--seed",
            seed,
            "--out",
            tmp_path / f"{tag}.png",
            "--no-progress",
        )
        assert r.exit_code == 0, r.output
        outs[tag] = file_digest(tmp_path / f"{tag}.png")
    assert outs["a"] == outs["b"]
    assert outs["a"] != outs["c"]


def test_fused_unified_lora_matches_unfused_and_restores_the_base(distilled, registry_file: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from clora.generate import UnifiedModel, fused_adapters, teacher_edit
    from clora.plugins import Components

    pm, _ = distilled
    comps = Components.collect(pm)
    with Registry(registry_file) as reg:
        col = reg.require_collection()
        effect = reg.get_effect("invert")
    model = UnifiedModel.load(comps, col.file, fuse=False)
    bb, tr = model.backbone, model.backbone.transformer
    images = bb.sample_sources(3, 5)
    weights = {n: p.clone() for n, p in tr.named_parameters() if "base_layer" in n}
    plain = model.edit(images, ["sepia"], seed=2)
    teacher = teacher_edit(bb, comps, effect.lora_path, effect.teacher_prompt, images, steps=3)
    assert fused_adapters(tr) == set()
    model.fuse = True
    fused = model.edit(images, ["sepia"], seed=2)
    assert fused_adapters(tr) == {"unified"}
    assert torch.allclose(fused, plain, atol=1e-5)
    assert not all(torch.equal(p, weights[n]) for n, p in tr.named_parameters() if n in weights)
    # another adapter on the same transformer first restores the base weights
    again = teacher_edit(bb, comps, effect.lora_path, effect.teacher_prompt, images, steps=3)
    assert fused_adapters(tr) == set()
    assert torch.allclose(again, teacher, atol=1e-5)
    assert all(torch.allclose(p, weights[n], atol=1e-6) for n, p in tr.named_parameters() if n in weights)


def test_teacher_mode(distilled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm, inputs = distilled
    r = run(
        pm,
        "generate",
        "--effect",
        "invert",
        "--teacher",
        "--image",
        inputs / "img0.png",
        "--out",
        tmp_path / "t.png",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "t.png").exists()


def test_generate_bad_input(distilled, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm, inputs = distilled
    img = inputs / "img0.png"
    r = run(pm, "generate", "--effect", "sepai", "--image", img)
    assert r.exit_code == 1 and "did you mean 'sepia'" in r.stderr
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = run(pm, "generate", "--effect", "sepia", "--image", bad, "--no-progress")
    assert r.exit_code == 1 and "cannot read image" in r.stderr
    r = run(pm, "generate", "--effect", "sepia", "--image", tmp_path / "missing.png")
    assert r.exit_code == 1 and "image not found" in r.stderr
    r = run(pm, "generate", "--effect", "sepia", "--image", img, "--collection", "9")
    assert r.exit_code == 1 and "no collection v9" in r.stderr
    # registered but not distilled yet
    assert run(pm, "toy", "teachers", "posterize", "--tiny").exit_code == 0
    r = run(pm, "generate", "--effect", "posterize", "--image", img)
    assert r.exit_code == 1 and "needs a distill" in r.stderr


def test_no_collection_yet(registry_file: Path, tmp_path: Path) -> None:
    pm = plugin_manager()
    assert run(pm, "toy", "build-base", "--tiny").exit_code == 0
    assert run(pm, "toy", "teachers", "sepia", "--tiny").exit_code == 0
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    r = run(pm, "generate", "--effect", "sepia", "--image", img)
    assert r.exit_code == 1 and "no collection yet" in r.stderr


def test_incremental_grows_the_collection(distilled, registry_file: Path) -> None:  # type: ignore[no-untyped-def]
    pm, _ = distilled
    r = run(pm, "distill", "--incremental", "--no-progress")
    assert r.exit_code == 0 and "nothing new" in r.stdout
    with Registry(registry_file) as reg:
        v1 = reg.get_collection(1)
        triggers_before = {e.name: e.trigger for e in reg.list_effects()}
    assert v1 is not None
    v1_digest = file_digest(Path(v1.file))

    assert run(pm, "toy", "teachers", "posterize", "--tiny").exit_code == 0
    r = run(pm, "distill", "--incremental", "--batch-size", "4", "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    v2 = json.loads(r.stdout)
    assert v2["version"] == 2 and v2["parent_version"] == 1
    assert {m["effect"] for m in v2["members"]} == {"sepia", "invert", "posterize"}
    c2 = v2["config"]
    assert c2["steps"] == c2["incremental"]["steps_per_new_effect"] * 1
    v1_lr = json.loads(v1.config_json)["optimizer"]["lr"]
    assert c2["optimizer"]["lr"] == pytest.approx(v1_lr * c2["incremental"]["lr_ratio"])
    assert c2["data"]["effects_per_batch"] == c2["incremental"]["effects_per_batch"]
    for m in v2["members"]:
        if m["effect"] in triggers_before:
            assert m["trigger"] == triggers_before[m["effect"]]
    assert file_digest(Path(v1.file)) == v1_digest  # the parent is never modified
    # the new effect is usable from the new collection
    r = run(
        pm, "generate", "--effect", "posterize", "--image", _an_image(registry_file.parent), "--no-progress"
    )
    assert r.exit_code == 0, r.output


def test_a_collection_of_other_base_weights_is_refused(  # type: ignore[no-untyped-def]
    distilled, registry_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the base's weights change (a new clora's toy recipe), the old collection is neither used
    nor grown, with one line saying what to do, and nothing is added to the registry."""
    from clora_toy.factory import ToyBackboneFactory

    pm, inputs = distilled
    monkeypatch.setattr(ToyBackboneFactory, "fingerprint", property(lambda self: "toy-tiny-retrained"))
    r = run(pm, "generate", "--effect", "sepia", "--image", inputs / "img0.png", "--no-progress")
    assert r.exit_code == 1 and "distilled on other weights" in r.stderr, r.output
    assert run(pm, "toy", "teachers", "posterize", "--tiny").exit_code == 0
    r = run(pm, "distill", "--incremental", *FAST)
    assert r.exit_code == 1, r.output
    assert "other weights" in r.stderr and "without --incremental" in r.stderr
    with Registry(registry_file) as reg:
        assert reg.get_collection().version == 1  # type: ignore[union-attr]
        assert len(reg.list_runs()) == 1


def _an_image(folder: Path) -> Path:
    path = folder / "in" / "img0.png"
    assert path.exists()
    return path


def test_incremental_keeps_the_parents_lora_shape(registry_file: Path, tmp_path: Path) -> None:
    """A parent adapting fewer modules (as collections made before the wider default do) is grown
    with its own modules, rank and alpha, whatever the defaults are now."""
    pm = plugin_manager()
    assert run(pm, "toy", "build-base", "--tiny").exit_code == 0
    assert run(pm, "toy", "teachers", "sepia", "--tiny").exit_code == 0
    narrow = ["to_q", "to_k", "to_v", "to_out.0"]
    cfg = tmp_path / "narrow.json"
    cfg.write_text(json.dumps({"target_modules": narrow, "rank": 4}))
    r = run(pm, "distill", "--config", cfg, *FAST)
    assert r.exit_code == 0, r.output
    assert run(pm, "toy", "teachers", "invert", "--tiny").exit_code == 0
    r = run(pm, "distill", "--incremental", *FAST, "--json")
    assert r.exit_code == 0, r.output
    v2 = json.loads(r.stdout)
    # the parent's rank 4, grown by the default incremental_grow_rank
    assert v2["config"]["student"]["target_modules"] == narrow and v2["config"]["student"]["rank"] == 4 + 16
    with Registry(registry_file) as reg:
        v2_file = Path(reg.get_collection(2).file)  # type: ignore[union-attr]
    assert read_header(v2_file).target_modules == narrow
    with safe_open(str(v2_file), framework="pt") as f:
        keys = list(f.keys())
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in keys}
    assert modules and all(m.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for m in modules)


def test_incremental_growth_keeps_the_parents_components(registry_file: Path, tmp_path: Path) -> None:
    """With incremental_grow_rank the child LoRA is the parent's components, unchanged (its alpha/rank
    folded into B), plus new trained ones."""
    pm = plugin_manager()
    assert run(pm, "toy", "build-base", "--tiny").exit_code == 0
    assert run(pm, "toy", "teachers", "sepia", "--tiny").exit_code == 0
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rank": 4, "alpha": 8}))
    assert run(pm, "distill", "--config", cfg, *FAST).exit_code == 0
    assert run(pm, "toy", "teachers", "invert", "--tiny").exit_code == 0
    r = run(pm, "distill", "--incremental", "--grow-rank", "2", "--config", cfg, *FAST, "--json")
    assert r.exit_code == 0, r.output
    v2 = json.loads(r.stdout)
    student = v2["config"]["student"]
    plan = json.loads((clora_home() / "runs" / v2["run_id"] / "plan.json").read_text())
    assert (student["rank"], student["alpha"], plan["frozen_rank"]) == (6, 6.0, 4)
    assert "ignoring rank 4, alpha 8.0" in r.stderr  # the config's own shape is the parent's, grown
    with Registry(registry_file) as reg:
        files = [Path(reg.get_collection(v).file) for v in (1, 2)]  # type: ignore[union-attr]
    assert (read_header(files[1]).rank, read_header(files[1]).alpha) == (6, 6.0)
    with safe_open(str(files[0]), framework="pt") as f1, safe_open(str(files[1]), framework="pt") as f2:
        keys = list(f1.keys())
        assert set(keys) == set(f2.keys())
        grown = 0.0
        for k in keys:
            old, new = f1.get_tensor(k), f2.get_tensor(k)
            if ".lora_A." in k:
                assert torch.equal(new[:4], old)
            else:
                assert torch.allclose(new[:, :4], old * 2.0)  # parent's scale 8/4 over the child's 6/6
                grown += float(new[:, 4:].abs().sum())
    assert grown > 0  # the new components trained
