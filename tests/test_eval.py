"""Metrics on known inputs, the bleeding matrix, routers, and `clora eval --json` on the tiny world."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import plugin_manager, run
from safetensors import safe_open
from safetensors.torch import save_file

from clora.distill.config import DistillConfig
from clora.evaluate import _bleeding
from clora.metrics import nearest, psnr, ssim
from clora.paths import clora_home
from clora.plugins import Components


def test_psnr_and_ssim_on_known_inputs() -> None:
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(psnr(a, a), torch.full((2,), 100.0))
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-5)
    b = (a + 0.1).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(a, b), -10 * torch.log10(mse))
    assert float(ssim(a, torch.rand_like(a)).mean()) < 0.2


def test_bleeding_matrix_by_hand() -> None:
    # three effects whose references are constant images 0.0, 0.5, 1.0
    refs = {n: torch.full((4, 3, 2, 2), v) for n, v in (("a", 0.0), ("b", 0.5), ("c", 1.0))}
    student = {
        "a": torch.tensor([0.1, 0.0, 0.3, 0.6]),  # a, a, b, b
        "b": torch.tensor([0.5, 0.5, 0.5, 0.5]),  # b x4
        "c": torch.tensor([0.9, 1.0, 0.2, 0.8]),  # c, c, a, c
    }
    outputs = {n: {"truth": refs[n], "student": student[n].view(4, 1, 1, 1).expand(4, 3, 2, 2)} for n in refs}
    result = _bleeding(["a", "b", "c"], outputs)
    assert result["reference"] == "truth"
    assert result["matrix"] == [[2, 2, 0], [0, 4, 0], [1, 0, 3]]
    assert result["bleed_rate"] == pytest.approx(3 / 12, abs=1e-4)
    assert "teacher_matrix" not in result  # no teacher outputs to score
    # the teachers scored the same way, next to the student
    teacher = {"a": [0.0, 0.0, 0.0, 0.4], "b": [0.5] * 4, "c": [1.0, 0.8, 1.0, 0.1]}  # a,a,a,b; b x4; c,c,c,a
    for n, values in teacher.items():
        outputs[n]["teacher"] = torch.tensor(values).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    result = _bleeding(["a", "b", "c"], outputs)
    assert result["matrix"] == [[2, 2, 0], [0, 4, 0], [1, 0, 3]]
    assert result["teacher_matrix"] == [[3, 1, 0], [0, 4, 0], [1, 0, 3]]
    assert result["teacher_bleed_rate"] == pytest.approx(2 / 12, abs=1e-4)
    picks = nearest(outputs["a"]["student"], torch.stack([refs["a"], refs["b"], refs["c"]]))
    assert picks.tolist() == [0, 0, 1, 1]


def test_balanced_router_is_balanced_and_favours_new_effects() -> None:
    router = Components.collect(plugin_manager()).get_router("balanced")
    cfg = DistillConfig()
    rng = random.Random(0)
    counts: dict[str, int] = {}
    names = ["a", "b", "c"]
    for _ in range(30):
        pick = router.choose(names, [], counts, cfg, rng)
        counts[pick] = counts.get(pick, 0) + 1
    assert counts == {"a": 10, "b": 10, "c": 10}
    counts = {}
    for _ in range(400):
        pick = router.choose(names, ["c"], counts, cfg, rng)
        counts[pick] = counts.get(pick, 0) + 1
    share = cfg.new_effect_share  # the default, 0.5: the one new effect gets twice an old one's slots
    assert abs(counts["c"] / 400 - share) < 0.1 and counts["c"] > 1.5 * counts["a"]
    assert abs(counts["a"] - counts["b"]) <= 1


def test_eval_json_shape_and_report(tiny_collection, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_collection
    r = run(pm, "eval", "--json", "--n-images", "4", "--no-progress", "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) == {
        "collection",
        "base",
        "n_images",
        "steps",
        "effects",
        "overall",
        "bleeding",
        "retention",
        "cost",
    }
    assert (
        data["collection"] == 1 and data["n_images"] == 4 and data["steps"] == {"student": 4, "teacher": 20}
    )
    assert set(data["effects"]) == {"sepia", "invert"}
    for row in data["effects"].values():
        for key in ("student_vs_teacher", "student_vs_truth", "teacher_vs_truth"):
            assert 0 < row[key]["psnr"] < 100 and -1 <= row[key]["ssim"] <= 1
        assert 0 <= row["bad_case_rate"] <= 1
        assert set(row["merged_vs_truth"]) == {"linear", "ties"}
        for scores in row["merged_vs_truth"].values():
            assert 0 < scores["psnr"] < 100
    assert set(data["overall"]["merged_vs_truth"]) == {"linear", "ties"}
    b = data["bleeding"]
    assert b["reference"] == "truth" and b["labels"] == ["invert", "sepia"]
    assert sum(map(sum, b["matrix"])) == 8 and 0 <= b["bleed_rate"] <= 1
    assert sum(map(sum, b["teacher_matrix"])) == 8 and 0 <= b["teacher_bleed_rate"] <= 1
    assert data["retention"]["prompts"] > 0
    cost = data["cost"]
    assert cost["unified"]["files"] == 1 and cost["per_effect_loras"]["files"] == 2
    assert cost["unified"]["nfe"] == 4 and cost["per_effect_loras"]["nfe"] == 40
    assert cost["unified"]["ms_per_image"] > 0 and cost["per_effect_loras"]["switch_ms"] > 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "bleeding.png" in page and "sheet-sepia.png" in page and "merged-ties vs truth" in page
    assert (tmp_path / "rep" / "bleeding.png").exists()
    # stored on the collection row
    cols = json.loads(run(pm, "collections", "--json").stdout)
    assert cols[0]["metrics"]["eval"]["bleeding"]["matrix"] == b["matrix"]
    r = run(pm, "eval", "--merge", "svd", "--n-images", "2", "--no-progress")
    assert r.exit_code == 1 and "unknown --merge 'svd'" in r.output


def test_eval_reuses_teacher_and_merged_outputs(tiny_collection, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from clora_toy.backbone import ToyBackbone

    pm = tiny_collection
    cache = clora_home() / "cache" / "eval"
    before = set(cache.glob("*.safetensors"))
    args = ("eval", "--json", "--n-images", "2", "--seed", "7", "--no-progress")
    first = json.loads(run(pm, *args).stdout)
    new = set(cache.glob("*.safetensors")) - before
    assert len(new) == 2 + 2 * 2  # each teacher's outputs, and each merge's outputs per effect
    # a second run reads them instead of sampling again: poisoned files show up in its baselines only
    for path in new:
        with safe_open(str(path), framework="pt") as f:
            images, meta = f.get_tensor("images"), f.metadata()
        save_file({"images": torch.zeros_like(images)}, str(path), metadata=meta)
    second = json.loads(run(pm, *args).stdout)
    for name, row in second["effects"].items():
        was = first["effects"][name]
        assert row["student_vs_truth"] == was["student_vs_truth"]
        assert row["teacher_vs_truth"]["psnr"] < was["teacher_vs_truth"]["psnr"] - 3
        for merge, scores in row["merged_vs_truth"].items():
            assert scores["psnr"] != was["merged_vs_truth"][merge]["psnr"]
    # the teachers' time per image is the one measured when their outputs were computed
    teacher_ms = [run_["cost"]["per_effect_loras"]["ms_per_image"] for run_ in (first, second)]
    assert teacher_ms[0] == teacher_ms[1]
    # outputs sampled from other noise than the backbone's are not reused
    monkeypatch.setattr(ToyBackbone, "sampling_noise_id", property(lambda self: "another-noise"))
    third = json.loads(run(pm, *args).stdout)
    for name, row in third["effects"].items():
        assert row["teacher_vs_truth"] == first["effects"][name]["teacher_vs_truth"]


@pytest.mark.parametrize("combination", ["linear", "ties"])
def test_merge_of_one_lora_is_that_lora_and_leaves_other_adapters(  # type: ignore[no-untyped-def]
    combination: str, make_lora, shapes_factory
) -> None:
    from peft import LoraConfig

    from clora.lora import linear_shapes, read_lora
    from clora.merge import merge_teachers

    comps = Components.collect(plugin_manager())
    tr = shapes_factory.model
    tr.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="keep")
    keep = {n: p.clone() for n, p in tr.named_parameters() if ".keep." in n}
    path = make_lora("one", fmt="kohya", rank=4)  # kohya: alpha is in the file
    merge_teachers(tr, comps, [str(path)], combination, "merged", density=1.0)
    try:
        assert set(tr.peft_config) == {"keep", "merged"}  # the loaded inputs are gone again
        assert all(torch.equal(p, keep[n]) for n, p in tr.named_parameters() if ".keep." in n)
        lora = read_lora(str(path), comps.teacher_providers(), module_names=linear_shapes(tr))
        modules = dict(tr.named_modules())
        for name, m in lora.modules.items():
            expected = (m.up @ m.down) * m.scale
            assert torch.allclose(modules[name].get_delta_weight("merged"), expected, atol=1e-5), name
    finally:
        tr.delete_adapters(["keep", "merged"])


def test_merge_errors_are_one_line(make_lora, shapes_factory) -> None:  # type: ignore[no-untyped-def]
    from clora.errors import CloraError
    from clora.merge import merge_teachers

    comps = Components.collect(plugin_manager())
    tr = shapes_factory.model
    a, b = make_lora("a", rank=4), make_lora("b", rank=8, seed=1)
    with pytest.raises(CloraError, match="cannot merge these LoRAs with 'linear'"):
        merge_teachers(tr, comps, [str(a), str(b)], "linear", "merged")
    with pytest.raises(CloraError, match="unknown merge 'svd'"):
        merge_teachers(tr, comps, [str(a)], "svd", "merged")
    assert not getattr(tr, "peft_config", {})  # nothing left behind
