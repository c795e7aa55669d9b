"""Metrics on known inputs, the bleeding matrix, routers, and `clora eval --json` on the tiny world."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from clora_toy.data import general_edits
from helpers import plugin_manager, run
from safetensors import safe_open
from safetensors.torch import save_file

from clora.distill.config import DistillConfig
from clora.evaluate import _bleeding
from clora.merge import SWEEPS, MergeVariant, sweep
from clora.metrics import means_by, nearest, psnr, ssim
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
    # per-instruction means, in the order the instructions first occur
    by = means_by(torch.tensor([1.0, 2.0, 4.0, 8.0]), ["flip", "tint", "flip", "flip"])
    assert list(by) == ["flip", "tint"] and by == pytest.approx({"flip": 13 / 3, "tint": 2.0})


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
    # the default, 0.6: the one new effect gets three times an old one's slots (0.2 each)
    share = cfg.incremental.new_effect_share
    assert abs(counts["c"] / 400 - share) < 0.1 and counts["c"] > 1.5 * counts["a"]
    assert abs(counts["a"] - counts["b"]) <= 1


def test_eval_json_shape_and_report(tiny_collection, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_collection
    # the collection's own file stands in for an acceleration LoRA: it has the header and the few-step sigmas
    accel = json.loads(run(pm, "collections", "--json").stdout)[0]["file"]
    args = ("eval", "--json", "--n-images", "4", "--no-progress", "--merge", "cat,ties", "--accel", accel)
    r = run(pm, *args, "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) == {
        "collection",
        "base",
        "n_images",
        "steps",
        "teacher_guidance",
        "effects",
        "overall",
        "bleeding",
        "retention",
        "cost",
        "warnings",
    }
    assert data["warnings"] == []  # every teacher file is the one the collection was distilled from
    assert data["collection"] == 1 and data["n_images"] == 4 and data["steps"] == {"student": 4, "teacher": 4}
    assert set(data["effects"]) == {"sepia", "invert"}
    variants = [v.label for v in sweep(["cat", "ties"])]
    assert variants[:2] == ["cat 1/N", "cat 1"] and len(variants) == 6  # ties: 2 densities x 2 weights
    strengths = ["accel 0.25", "accel 0.5", "accel 0.75", "accel 1"]
    for row in data["effects"].values():
        for key in ("student_vs_teacher", "student_vs_truth", "teacher_vs_truth", "cascade_vs_truth"):
            assert 0 < row[key]["psnr"] < 100 and -1 <= row[key]["ssim"] <= 1
        assert 0 <= row["bad_case_rate"] <= 1
        for key, settings in (("merged", variants), ("cascade_sweep", strengths)):
            for ref in ("truth", "teacher"):
                assert list(row[f"{key}_vs_{ref}"]) == settings
                assert all(0 < s["psnr"] <= 100 for s in row[f"{key}_vs_{ref}"].values())
    # every setting's mean; the best is the highest mean PSNR against the truth, one setting for all effects
    overall, best = data["overall"], data["overall"]["best"]
    for kind, key, settings in (("merged", "merged", variants), ("cascade", "cascade_sweep", strengths)):
        means = overall[f"{key}_vs_truth"]
        assert list(means) == settings and list(overall[f"{key}_vs_teacher"]) == settings
        for s in settings:
            rows = [r[f"{key}_vs_truth"][s]["psnr"] for r in data["effects"].values()]
            assert means[s]["psnr"] == pytest.approx(sum(rows) / len(rows), abs=1e-3)
        top = max(means.values(), key=lambda v: v["psnr"])["psnr"]
        assert best[kind]["by"] == "psnr vs truth" and best[kind]["psnr"] == top
        assert means[best[kind]["variant"]]["psnr"] == top
    for row in data["effects"].values():  # the cascade column is the best strength's
        assert row["cascade_vs_truth"] == row["cascade_sweep_vs_truth"][best["cascade"]["variant"]]
    assert (
        overall["cascade_vs_truth"]["psnr"]
        == overall["cascade_sweep_vs_truth"][best["cascade"]["variant"]]["psnr"]
    )
    b = data["bleeding"]
    assert b["reference"] == "truth" and b["labels"] == ["invert", "sepia"]
    assert sum(map(sum, b["matrix"])) == 8 and 0 <= b["bleed_rate"] <= 1
    assert sum(map(sum, b["teacher_matrix"])) == 8 and 0 <= b["teacher_bleed_rate"] <= 1
    ret = data["retention"]
    assert ret["prompts"] > 0
    # each of the base's own instructions is scored on its own; the worst one is named
    assert set(ret["by_prompt"]) <= {e.prompt for e in general_edits()} and len(ret["by_prompt"]) > 1
    assert ret["by_prompt"][ret["worst_prompt"]] == min(ret["by_prompt"].values())
    assert min(ret["by_prompt"].values()) <= ret["student_vs_base_psnr"] <= max(ret["by_prompt"].values())
    cost = data["cost"]
    assert cost["unified"]["files"] == 1 and cost["per_effect_loras"]["files"] == 2
    assert (
        cost["unified"]["nfe"] == 4 and cost["per_effect_loras"]["nfe"] == 4 and cost["cascade"]["nfe"] == 4
    )
    assert cost["unified"]["ms_per_image"] > 0 and cost["per_effect_loras"]["switch_ms"] > 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "bleeding.png" in page and "sheet-sepia.png" in page
    assert data["teacher_guidance"] == 0.0 and "teacher 4 steps without CFG" in page  # the toy's sampler
    assert (
        f"merged ({best['merged']['variant']}) vs truth" in page
        and f"{best['merged']['variant']} (best)" in page
    )
    assert all(v in page for v in variants + strengths)
    assert (tmp_path / "rep" / "bleeding.png").exists()
    # stored on the collection row; the collections table names the best merge
    cols = json.loads(run(pm, "collections", "--json").stdout)
    assert cols[0]["metrics"]["eval"]["bleeding"]["matrix"] == b["matrix"]
    monkeypatch.setenv("COLUMNS", "200")
    assert f"({best['merged']['variant']})" in run(pm, "collections").stdout
    # the table shows each baseline at its best, and a line per sweep with every setting
    r = run(pm, "eval", "--n-images", "4", "--no-progress", "--merge", "cat,ties", "--accel", accel)
    assert r.exit_code == 0, r.output
    for kind, label in (("merged", "merged LoRAs"), ("cascade", "cascade")):
        assert f"{label}, mean PSNR vs truth (best: {best[kind]['variant']}): " in r.stdout
    r = run(pm, "eval", "--merge", "svd", "--n-images", "2", "--no-progress")
    assert r.exit_code == 1 and "unknown --merge 'svd'" in r.output


def test_merge_names_expand_to_their_sweeps() -> None:
    from clora.cli_eval import parse_merges
    from clora.errors import CloraError

    assert parse_merges(None) == ("cat", "ties", "dare_ties")
    assert [v.label for v in sweep(parse_merges(None))] == [
        "cat 1/N",
        "cat 1",
        *(f"{m} {w} d{d}" for m in ("ties", "dare_ties") for d in (0.2, 0.5) for w in ("1/N", "1")),
    ]
    assert parse_merges(["ties,cat", "ties"]) == ("ties", "cat") and parse_merges(["none"]) == ()
    assert parse_merges(["all"]) == tuple(SWEEPS) and [v.label for v in sweep(["linear"])] == ["linear 1"]
    with pytest.raises(CloraError, match="unknown --merge 'svd'; choose from cat, ties, dare_ties, linear"):
        parse_merges(["svd"])


def test_merge_none_skips_merging(tiny_collection, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("merged with --merge none")

    monkeypatch.setattr("clora.evaluate.merge_teachers", refuse)
    r = run(tiny_collection, "eval", "--json", "--n-images", "2", "--no-progress", "--merge", "none")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for row in data["effects"].values():
        assert row["merged_vs_truth"] is None and row["merged_vs_teacher"] is None
    assert data["overall"]["best"] == {} and "merged_vs_truth" not in data["overall"]


def test_eval_reuses_teacher_and_merged_outputs(tiny_collection, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from clora_toy.backbone import ToyBackbone

    pm = tiny_collection
    cache = clora_home() / "cache" / "eval"
    shutil.rmtree(cache, ignore_errors=True)  # outputs are pure: a kept CLORA_TEST_HOME may hold these
    accel = json.loads(run(pm, "collections", "--json").stdout)[0]["file"]
    args = (
        "eval",
        "--json",
        "--n-images",
        "2",
        "--seed",
        "7",
        "--no-progress",
        "--merge",
        "cat",
        "--accel",
        accel,
    )
    first = json.loads(run(pm, *args).stdout)
    new = set(cache.glob("*.safetensors"))
    # each teacher's outputs, each merge's per effect, each cascade strength's per effect
    assert len(new) == 2 + 2 * 2 + 4 * 2
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
        for key in ("merged_vs_truth", "cascade_sweep_vs_truth"):
            for setting, scores in row[key].items():
                assert scores["psnr"] != was[key][setting]["psnr"]
    # the teachers' time per image is the one measured when their outputs were computed
    teacher_ms = [run_["cost"]["per_effect_loras"]["ms_per_image"] for run_ in (first, second)]
    assert teacher_ms[0] == teacher_ms[1]
    # outputs sampled from other noise than the backbone's are not reused
    monkeypatch.setattr(ToyBackbone, "sampling_noise_id", property(lambda self: "another-noise"))
    third = json.loads(run(pm, *args).stdout)
    for name, row in third["effects"].items():
        assert row["teacher_vs_truth"] == first["effects"][name]["teacher_vs_truth"]


def _forward(tr) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The shapes-only test transformer's output on fixed inputs, with whichever adapter is active."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return tr(  # type: ignore[no-any-return]
            hidden_states=torch.randn(2, 4, 24, generator=g),
            encoder_hidden_states=torch.randn(2, 3, 32, generator=g),
            encoder_hidden_states_mask=torch.ones(2, 3),
            timestep=torch.tensor([0.3, 0.8]),
            img_shapes=[[(1, 2, 2)]] * 2,
            return_dict=False,
        )[0]


def _deltas(path: Path, tr) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    from clora.lora import linear_shapes, read_lora

    lora = read_lora(str(path), Components.collect(plugin_manager()).teacher_providers(), linear_shapes(tr))
    return {name: (m.up @ m.down) * m.scale for name, m in lora.modules.items()}


@pytest.mark.parametrize("variant", [v for v in sweep(SWEEPS) if v.weight == "1"], ids=lambda v: v.label)
def test_merge_of_one_lora_is_that_lora_and_leaves_other_adapters(  # type: ignore[no-untyped-def]
    variant: MergeVariant, make_lora, shapes_factory
) -> None:
    import copy

    from peft import LoraConfig

    from clora.lora import add_lora_adapter, linear_shapes, read_lora
    from clora.merge import merge_teachers

    comps = Components.collect(plugin_manager())
    tr = copy.deepcopy(shapes_factory.model).eval()
    tr.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="keep")
    keep = {n: p.clone() for n, p in tr.named_parameters() if ".keep." in n}
    path = make_lora("one", fmt="kohya", rank=4)  # kohya: alpha is in the file
    merge_teachers(tr, comps, [str(path)], variant, "merged")
    assert set(tr.peft_config) == {"keep", "merged"}  # the loaded inputs are gone again
    assert all(torch.equal(p, keep[n]) for n, p in tr.named_parameters() if ".keep." in n)
    modules = dict(tr.named_modules())
    for name, delta in _deltas(path, tr).items():
        assert torch.allclose(modules[name].get_delta_weight("merged"), delta, atol=1e-6), name
    # the transformer's outputs: the merged adapter is the LoRA loaded the one way teachers load
    add_lora_adapter(tr, read_lora(str(path), comps.teacher_providers(), linear_shapes(tr)).modules, "lora")
    tr.set_adapter("lora")
    want = _forward(tr)
    tr.set_adapter("merged")
    torch.testing.assert_close(_forward(tr), want, rtol=0, atol=1e-6)
    tr.disable_adapters()
    assert not torch.allclose(_forward(tr), want, atol=1e-3)  # the LoRA changes the output


def test_sum_of_deltas_is_their_mean_at_1_over_n_and_their_sum_at_1(make_lora, shapes_factory) -> None:  # type: ignore[no-untyped-def]
    import copy

    from clora.generate import load_teacher
    from clora.merge import merge_teachers

    comps = Components.collect(plugin_manager())
    tr = copy.deepcopy(shapes_factory.model).eval()
    # ranks differ: the exact merge stacks A and B, whatever the ranks
    paths = [
        make_lora("a", rank=4),
        make_lora("b", fmt="kohya", rank=8, seed=1),
        make_lora("c", rank=2, seed=2),
    ]
    merge_teachers(tr, comps, [str(p) for p in paths], MergeVariant("cat", "1/N"), "mean")
    merge_teachers(tr, comps, [str(p) for p in paths], MergeVariant("cat", "1"), "sum")
    deltas = [_deltas(p, tr) for p in paths]
    modules = dict(tr.named_modules())
    for name in deltas[0]:
        mean = sum(d[name] for d in deltas) / 3
        torch.testing.assert_close(modules[name].get_delta_weight("mean"), mean, rtol=0, atol=1e-6)
    # at weight 1 the merged LoRA is every LoRA at once, as three adapters active together
    bb = type("Backbone", (), {"transformer": tr})()
    for i, p in enumerate(paths):
        load_teacher(bb, comps, str(p), f"t{i}")  # type: ignore[arg-type]
    tr.set_adapters(["t0", "t1", "t2"])
    want = _forward(tr)
    tr.set_adapters("sum")
    torch.testing.assert_close(_forward(tr), want, rtol=0, atol=1e-5)


def test_ties_merges_the_deltas_and_dare_follows_the_seed(make_lora, shapes_factory) -> None:  # type: ignore[no-untyped-def]
    import copy

    from peft.utils.merge_utils import ties

    from clora.merge import merge_teachers

    comps = Components.collect(plugin_manager())
    tr = copy.deepcopy(shapes_factory.model).eval().to(torch.bfloat16)  # torch's SVD refuses bf16
    paths = [str(make_lora("a", rank=4)), str(make_lora("b", rank=4, seed=1))]
    merge_teachers(tr, comps, paths, MergeVariant("ties", "1", 0.5), "ties")
    dare = MergeVariant("dare_ties", "1", 0.5)
    for name, seed in (("dare0", 0), ("dare0_again", 0), ("dare1", 1)):
        merge_teachers(tr, comps, paths, dare, name, seed=seed)
    assert {p.dtype for n, p in tr.named_parameters() if "lora_" in n} == {torch.bfloat16}
    deltas = [_deltas(Path(p), tr) for p in paths]
    modules = dict(tr.named_modules())
    name = next(iter(deltas[0]))
    m = modules[name]
    # TIES of the deltas themselves (not of A and B apart), at rank 4 + 4
    want = ties([d[name] for d in deltas], torch.ones(2), 0.5)
    u, sv, vh = torch.linalg.svd(want)
    want = (u[:, :8] * sv[:8]) @ vh[:8]
    torch.testing.assert_close(m.get_delta_weight("ties").float(), want, rtol=0.05, atol=2e-3)
    assert torch.equal(m.get_delta_weight("dare0"), m.get_delta_weight("dare0_again"))
    assert not torch.equal(m.get_delta_weight("dare0"), m.get_delta_weight("dare1"))


def test_merge_errors_are_one_line(make_lora, shapes_factory) -> None:  # type: ignore[no-untyped-def]
    from clora.errors import CloraError
    from clora.merge import merge_teachers

    comps = Components.collect(plugin_manager())
    tr = shapes_factory.model
    a, b = make_lora("a", rank=4), make_lora("b", rank=8, seed=1)
    with pytest.raises(CloraError, match="cannot merge these LoRAs as 'linear 1'"):
        merge_teachers(tr, comps, [str(a), str(b)], MergeVariant("linear", "1"), "merged")
    with pytest.raises(CloraError, match="unknown merge 'svd'"):
        merge_teachers(tr, comps, [str(a)], MergeVariant("svd", "1"), "merged")
    assert not getattr(tr, "peft_config", {})  # nothing left behind


def test_an_eval_of_some_effects_updates_their_rows_of_the_stored_one(tiny_collection) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_collection
    fast = ["--n-images", "2", "--merge", "none", "--no-progress"]
    r = run(pm, "eval", *fast)
    assert r.exit_code == 0, r.output
    kept = r.stdout.split("retention: ")[1].splitlines()[0]
    assert "{" not in kept and "the worst instruction: '" in kept
    stored = json.loads(run(pm, "collections", "--json").stdout)[0]["metrics"]["eval"]
    assert set(stored["effects"]) == {"sepia", "invert"}
    r = run(pm, "eval", *fast, "--effects", "invert", "--seed", "3")
    assert r.exit_code == 0, r.output
    again = json.loads(run(pm, "collections", "--json").stdout)[0]["metrics"]["eval"]
    assert set(again["effects"]) == {"sepia", "invert"}
    assert again["effects"]["sepia"] == stored["effects"]["sepia"]
    assert again["effects"]["invert"] != stored["effects"]["invert"]  # another seed: new scores


def test_eval_leaves_out_a_teacher_whose_file_changed_or_is_gone(tiny_collection, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from safetensors.torch import load_file, save_file

    from clora.registry import Registry

    pm = tiny_collection
    with Registry(tmp_path / "registry.db") as reg:
        copies = {}
        for name in ("sepia", "invert"):  # copies, so the shared toy teachers stay as they are
            e = reg.get_effect(name)
            copies[name] = tmp_path / f"{name}.safetensors"
            shutil.copy(e.lora_path, copies[name])
            reg.replace_lora(name, lora_path=str(copies[name]))
    tensors = load_file(str(copies["sepia"]))
    save_file({k: v * 2 for k, v in tensors.items()}, str(copies["sepia"]))
    copies["invert"].unlink()
    r = run(pm, "eval", "--n-images", "2", "--merge", "none", "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 2 and "effect 'sepia'" in r.stderr and "changed since collection v1" in r.stderr
    assert (
        "effect 'invert'" in r.stderr and "is gone" in r.stderr and "clora effect update invert" in r.stderr
    )
    result = json.loads(r.stdout)
    for name in ("sepia", "invert"):
        assert result["effects"][name]["teacher_vs_truth"] is None
        assert result["effects"][name]["student_vs_truth"]["psnr"] > 0
    assert run(pm, "toy", "sources", "--out", tmp_path / "in", "-n", "1", "--size", "tiny").exit_code == 0
    r = run(
        pm, "generate", "--effect", "sepia", "--teacher", "--image", tmp_path / "in", "--out", tmp_path / "o"
    )
    assert r.exit_code == 1 and "changed since it was added" in r.stderr and "effect update sepia" in r.stderr


def test_distribution_metrics_tell_averaged_modes_from_the_true_distribution() -> None:
    """What `clora eval` reports for an effect whose truth is a distribution: a tint drawn from two colours
    with film grain. Draws from it score MMD near 0, HF and diversity ratios near 1; their mean (what
    regression onto one answer gives: modes averaged, grain smoothed) scores a large MMD and ratios near 0."""
    from clora.metrics import diversity, high_frequency_energy, kernel_distance

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(16, 3, 4, 4, generator=g) * 0.5
    sources = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")  # smooth, like photos

    def draw(n: int) -> torch.Tensor:
        tint = torch.tensor([[0.4, 0.0, 0.0], [0.0, 0.0, 0.4]])[torch.randint(0, 2, (n, 16), generator=g)]
        grain = 0.08 * torch.randn(n, 16, 1, 16, 16, generator=g)
        return (sources + tint[..., None, None] + grain).clamp(0, 1)  # [n, 16, 3, 16, 16]

    truth, fair, averaged = draw(8), draw(4), draw(64).mean(0, keepdim=True).expand(4, -1, -1, -1, -1)
    kid_fair, kid_avg = (
        kernel_distance(fair[0], truth, sources),
        kernel_distance(averaged[0], truth, sources),
    )
    assert abs(kid_fair) < 0.2 * kid_avg
    hf = high_frequency_energy
    assert 0.8 < float(hf(fair[0]).mean() / hf(truth.flatten(0, 1)).mean()) < 1.2
    assert float(hf(averaged[0]).mean() / hf(truth.flatten(0, 1)).mean()) < 0.5
    assert 0.8 < float(diversity(fair).mean() / diversity(truth).mean()) < 1.2
    assert float(diversity(averaged).mean()) == 0.0


def test_kernel_distance_ranks_grain_by_how_far_it_is_from_the_truth() -> None:
    """Film grain, whose pooled features barely vary between draws: outputs with slightly weak grain score
    near 0; no grain and triple grain both score far (triple is twice as far from the truth as none, so it
    must not look closer), and so does no better a set whose strength is scattered from none to triple."""
    from clora.metrics import kernel_distance

    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(16, 3, 4, 4, generator=g) * 0.5
    sources = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")

    def grain(strength: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(strength).reshape(-1, 1, 1, 1)
        return (sources + s * torch.randn(16, 1, 16, 16, generator=g)).clamp(0, 1)

    truth = torch.stack([grain(0.08) for _ in range(8)])
    score = {
        name: kernel_distance(out, truth, sources)
        for name, out in {
            "slightly weak": grain(0.072),
            "none": sources,
            "triple": grain(0.24),
            "scattered": grain(torch.rand(16, generator=g) * 0.24),
        }.items()
    }
    assert score["slightly weak"] < 0.1, score
    assert score["none"] > 0.8 and score["triple"] > 0.8, score
    assert score["scattered"] > 2 * score["slightly weak"], score


def test_eval_scores_a_stochastic_effect_by_its_distribution(tmp_path: Path) -> None:
    """A collection with a deterministic effect (sepia) and one whose truth is a distribution (grain):
    sepia keeps its PSNR against the truth; grain has none and instead every way (student, teacher,
    cascade and merged at their best settings) gets HF-energy and diversity ratios and an MMD against
    true draws, in the JSON, the terminal table, the HTML report and the collections summary."""
    pm = plugin_manager()
    for args in (["build-base", "--tiny"], ["teachers", "sepia", "grain", "--tiny"]):
        r = run(pm, "toy", *args)
        assert r.exit_code == 0, r.output
    r = run(pm, "distill", "--steps", "6", "--batch-size", "4", "--no-progress")
    assert r.exit_code == 0, r.output
    accel = json.loads(run(pm, "collections", "--json").stdout)[0]["file"]
    args = ("eval", "--n-images", "4", "--no-progress", "--merge", "cat", "--accel", accel, "--draws", "3")
    r = run(pm, *args, "--json", "--report", tmp_path / "report")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    sepia, grain = ev["effects"]["sepia"], ev["effects"]["grain"]
    assert sepia["student_vs_truth"]["psnr"] > 0 and sepia["distribution"] is None
    assert grain["student_vs_truth"] is None and grain["teacher_vs_truth"] is None
    assert set(grain["distribution"]) == {"student", "teacher", "cascade", "merged"}
    for metrics in grain["distribution"].values():
        assert set(metrics) == {"hf_ratio", "diversity_ratio", "mmd"}
        assert metrics["hf_ratio"] > 0 and metrics["diversity_ratio"] >= 0
    assert (
        grain["distribution"]["cascade"]
        == grain["cascade_sweep_distribution"][ev["overall"]["best"]["cascade"]["variant"]]
    )
    assert ev["overall"]["distribution"]["student"] == pytest.approx(
        grain["distribution"]["student"], abs=1e-4
    )
    assert ev["bleeding"]["reference"] == "truth"  # grain's is one true draw
    assert "Effects whose truth is a distribution" in (tmp_path / "report" / "index.html").read_text()
    r = run(pm, *args)
    assert "grain (a distribution, vs true draws): student HF" in r.stdout.replace("\n  ", " ")
    assert "HF " in run(pm, "collections").stdout
