"""The real-model path on tiny random-weight Qwen-Image-Edit(-Plus) pipelines saved as diffusers folders:
``base add``, ``effect add`` in each LoRA layout users have, distill, incremental, generate, eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import plugin_manager, run
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_qwen import build_tiny_qwen_edit

from clora.bases import get_factory
from clora.paths import clora_home
from clora.plugins import Components
from clora.registry import Registry
from clora.unified import read_header

#: small image areas for the tiny pipelines (the real ones resize sources to 1024x1024 for the VAE)
OPTIONS = ["--option", "vae_area=4096", "--option", "condition_area=3136"]
#: 4 teacher steps and small batches keep a distill a few seconds on the tiny model
FAST_CONFIG = {
    "teacher_steps": 4,
    "batch_size": 2,
    "effects_per_batch": 2,
    "general_pool": 4,
    "resolution": 128,
}


@pytest.fixture(scope="session")
def qwen_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen")
    return {
        "plus": build_tiny_qwen_edit(root / "Qwen-Image-Edit-2509", plus=True),
        "edit": build_tiny_qwen_edit(root / "Qwen-Image-Edit", plus=False),
    }


def write_photos(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """PNG photos of the given (width, height), smooth random colours."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        small = g.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(folder / f"photo{i}.png")
    return folder


def lora_file(path: Path, shapes: dict[str, tuple[int, int]], fmt: str, seed: int) -> Path:
    """A LoRA on the attention projections, written as diffusers, kohya (alpha != rank) or a peft folder
    with a rank_pattern."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(n for n in shapes if n.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")))
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        fan_in, fan_out = shapes[name]
        rank = 2 if (fmt == "peft" and name.endswith("to_q")) else 4
        down, up = torch.randn(rank, fan_in, generator=g) * 0.3, torch.randn(fan_out, rank, generator=g) * 0.3
        if fmt == "diffusers":
            tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = (
                down,
                up,
            )
        elif fmt == "kohya":
            flat = "lora_unet_" + name.replace(".", "_")
            tensors[f"{flat}.lora_down.weight"], tensors[f"{flat}.lora_up.weight"] = down, up
            tensors[f"{flat}.alpha"] = torch.tensor(2.0)
        else:
            tensors[f"base_model.model.{name}.lora_A.weight"] = down
            tensors[f"base_model.model.{name}.lora_B.weight"] = up
    if fmt == "peft":
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"to_q": 2},
            "alpha_pattern": {"to_q": 2},
            "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
        }
        (path / "adapter_config.json").write_text(json.dumps(config))
        return path
    save_file(tensors, str(path))
    return path


@pytest.fixture
def qwen_world(qwen_folders: dict[str, Path], tmp_path: Path, registry_file: Path):  # type: ignore[no-untyped-def]
    """The Plus base recorded as 'qe' and three effects, one per LoRA layout, with example photos."""
    pm = plugin_manager()
    r = run(pm, "base", "add", "qe", "--path", qwen_folders["plus"], *OPTIONS, "--json")
    assert r.exit_code == 0, r.output
    with Registry(registry_file) as reg:
        shapes = get_factory(Components.collect(pm), reg, "qe").module_shapes()
    photos = write_photos(tmp_path / "photos", [(160, 96), (96, 160), (128, 128), (150, 100)])
    for name, fmt, seed in (("ghibli", "diffusers", 1), ("plush", "kohya", 2), ("neon", "peft", 3)):
        path = lora_file(tmp_path / f"{name}.{fmt}.safetensors", shapes, fmt, seed)
        r = run(
            pm,
            "effect",
            "add",
            name,
            "--lora",
            path,
            "--prompt",
            f"turn it into {name} art",
            "--base",
            "qe",
            "--examples",
            photos,
        )
        assert r.exit_code == 0, r.output
    (tmp_path / "cfg.json").write_text(json.dumps(FAST_CONFIG))
    return pm


def test_base_add_detects_the_kind_and_lists_it(qwen_folders: dict[str, Path], registry_file: Path) -> None:
    pm = plugin_manager()
    r = run(pm, "base", "add", "qe", "--path", qwen_folders["plus"], "--json")
    assert r.exit_code == 0, r.output
    added = json.loads(r.stdout)
    assert added["kind"] == "qwen-image-edit-plus" and added["weights"]["transformer"]["dtype"] == "float32"
    r = run(pm, "base", "add", "old", "--path", qwen_folders["edit"])
    assert r.exit_code == 0 and "qwen-image-edit," in r.stdout, r.output
    rows = {b["name"]: b for b in json.loads(run(pm, "base", "list", "--json").stdout)}
    assert {"toy", "toy-tiny", "qe", "old"} <= set(rows)
    assert rows["old"]["kind"] == "qwen-image-edit" and rows["toy"]["kind"] == "toy"
    shown = json.loads(run(pm, "base", "show", "qe").stdout)
    assert shown["fingerprint"] == added["fingerprint"] and shown["path"] == str(qwen_folders["plus"])
    # the fingerprint reads configs and safetensors headers: another copy of the folder has the same one
    assert run(pm, "base", "remove", "old").exit_code == 0
    assert "old" not in {b["name"] for b in json.loads(run(pm, "base", "list", "--json").stdout)}


def test_bad_base_folders_are_one_line_errors(tmp_path: Path, registry_file: Path) -> None:
    pm = plugin_manager()
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cases = [
        (tmp_path / "missing", "not found"),
        (tmp_path, "no model_index.json"),
        (other, "StableDiffusionPipeline pipeline, which clora cannot load"),
    ]
    for folder, says in cases:
        r = run(pm, "base", "add", "x", "--path", folder)
        assert r.exit_code == 1 and r.stderr.startswith("Error: ") and says in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1
    r = run(pm, "base", "add", "toy", "--path", other)
    assert r.exit_code == 1 and "installed base model plugin" in r.stderr
    assert not registry_file.exists() or Registry(registry_file).list_bases() == []


def test_distill_generate_eval_and_grow_on_a_real_pipeline(
    qwen_world, tmp_path: Path, registry_file: Path
) -> None:  # type: ignore[no-untyped-def]
    pm = qwen_world
    effects = {e["name"]: e for e in json.loads(run(pm, "effect", "list", "--json").stdout)}
    assert {n: e["lora"]["format"] for n, e in effects.items()} == {
        "ghibli": "diffusers",
        "plush": "kohya",
        "neon": "peft",
    }
    assert effects["plush"]["lora"]["alpha"] == 2.0 and effects["neon"]["lora"]["rank"] == 4

    r = run(
        pm,
        "distill",
        "--effects",
        "ghibli,plush",
        "--steps",
        "3",
        "--config",
        tmp_path / "cfg.json",
        "--no-progress",
        "--json",
    )
    assert r.exit_code == 0, r.output
    col = json.loads(r.stdout)
    config = col["config"]
    assert col["base"] == "qe" and config["data"]["resolution"] == 128 and config["dtype"] == "float32"
    assert config["optimizer"]["gradient_checkpointing"] is True and config["teachers"]["guidance"] == 4.0
    spread = col["metrics"]["train"]["seed_spread"]
    assert set(spread) == {"ghibli", "plush"} and all(v >= 0 for v in spread.values()), spread

    # grow it with the peft effect, routed by the probe (the VAE decodes during training); its rows
    # also train on-policy: the student's sampler, the teacher with CFG and the critic on a real pipeline
    r = run(
        pm,
        "distill",
        "--incremental",
        "--steps",
        "2",
        "--config",
        tmp_path / "cfg.json",
        "--set",
        "data.router=gap",
        "--set",
        "data.probe_every=1",
        "--set",
        "on_policy.critic_warmup=0",
        "--on-policy",
        "neon",
        "--no-progress",
        "--json",
    )
    assert r.exit_code == 0, r.output
    v2 = json.loads(r.stdout)
    assert v2["metrics"]["train"]["on_policy_effects"] == ["neon"]
    logged = [json.loads(ln) for ln in (clora_home() / "runs" / v2["run_id"] / "log.jsonl").open()]
    assert any("loss/dmd" in row for row in logged if "neon" in (row.get("effect") or ""))
    assert v2["parent_version"] == 1 and {m["effect"] for m in v2["members"]} == {"ghibli", "plush", "neon"}
    assert set(v2["metrics"]["train"]["probe_db"]) == {"ghibli", "plush", "neon"}

    # generate keeps the input's aspect (edited at the collection's resolution)
    me = write_photos(tmp_path / "me", [(300, 200)], seed=9) / "photo0.png"
    r = run(
        pm, "generate", "--effect", "neon", "--image", me, "--out", tmp_path / "neon.png", "--no-progress"
    )
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "neon.png") as out:
        assert abs(out.width / out.height - 1.5) < 0.02, out.size
    r = run(
        pm,
        "generate",
        "--effect",
        "plush",
        "--teacher",
        "--image",
        me,
        "--out",
        tmp_path / "t.png",
        "--steps",
        "2",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output

    # eval scores on the effects' example photos (no built-in images), teachers from their own layouts
    r = run(pm, "eval", "--n-images", "2", "--merge", "none", "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert set(result["effects"]) == {"ghibli", "plush", "neon"}
    assert result["effects"]["plush"]["student_vs_teacher"]["psnr"] > 0
    assert result["cost"]["per_effect_loras"]["files"] == 3 and result["retention"]["prompts"] > 0


def test_gradient_checkpointing_trains_on_policy_as_without_it(qwen_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """On-policy steps run teachers and the critic between the student's forward and its backward pass;
    with gradient checkpointing (on by default for real bases) that forward is recomputed in the backward
    pass, and must be recomputed with the student: the LoRA is the one a run without it trains."""
    files = []
    for checkpointing in ("true", "false"):
        r = run(
            qwen_world,
            "distill",
            "--steps",
            "3",
            "--config",
            tmp_path / "cfg.json",
            "--on-policy",
            "neon",
            "--set",
            "on_policy.critic_warmup=0",
            "--set",
            "student.on_policy_shift=1",  # neon's rows sample at levels of their own
            "--set",
            f"optimizer.gradient_checkpointing={checkpointing}",
            "--no-progress",
            "--json",
        )
        assert r.exit_code == 0, r.output
        col = json.loads(r.stdout)
        assert col["config"]["optimizer"]["gradient_checkpointing"] is (checkpointing == "true")
        assert col["metrics"]["train"]["on_policy_effects"] == ["neon"]
        assert read_header(col["file"]).effects["neon"]["shift"] == 1.0
        files.append(load_file(col["file"]))
    assert files[0].keys() == files[1].keys()
    a, b = (torch.cat([f[k].flatten() for k in sorted(f)]) for f in files)
    # the recomputed forward sums in another order: equal to float32 rounding, not bit for bit (2e-6
    # here; recomputed with the critic or a teacher active, 7e-3)
    assert float((a - b).norm() / b.norm()) < 1e-4


def test_the_first_qwen_image_edit_release_distills_and_generates(  # type: ignore[no-untyped-def]
    qwen_folders: dict[str, Path], tmp_path: Path, registry_file: Path
) -> None:
    pm = plugin_manager()
    assert run(pm, "base", "add", "edit", "--path", qwen_folders["edit"], *OPTIONS).exit_code == 0
    with Registry(registry_file) as reg:
        shapes = get_factory(Components.collect(pm), reg, "edit").module_shapes()
    photos = write_photos(tmp_path / "photos", [(128, 128), (160, 96)])
    lora = lora_file(tmp_path / "a.safetensors", shapes, "diffusers", 4)
    r = run(
        pm,
        "effect",
        "add",
        "a",
        "--lora",
        lora,
        "--prompt",
        "make it a watercolor",
        "--base",
        "edit",
        "--examples",
        photos,
    )
    assert r.exit_code == 0, r.output
    (tmp_path / "cfg.json").write_text(json.dumps({**FAST_CONFIG, "p_switch": 1.0}))
    r = run(pm, "distill", "--steps", "2", "--config", tmp_path / "cfg.json", "--no-progress")
    assert r.exit_code == 0, r.output
    r = run(pm, "generate", "--effect", "a", "--image", photos, "--out", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_a_lora_for_another_model_is_refused(  # type: ignore[no-untyped-def]
    qwen_world, qwen_folders: dict[str, Path], tmp_path: Path, registry_file: Path
) -> None:
    pm = qwen_world
    flux = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4),
    }
    save_file(flux, str(tmp_path / "flux.safetensors"))
    before = json.loads(run(pm, "effect", "list", "--json").stdout)
    r = run(
        pm, "effect", "add", "f", "--lora", tmp_path / "flux.safetensors", "--prompt", "p", "--base", "qe"
    )
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
    assert json.loads(run(pm, "effect", "list", "--json").stdout) == before
    # the base its effects are bound to stays, and a kind that is not the folder's is refused
    r = run(pm, "base", "remove", "qe")
    assert r.exit_code == 1 and "bound to base 'qe'" in r.stderr
    r = run(pm, "base", "add", "other", "--path", qwen_folders["plus"], "--kind", "qwen-image-edit")
    assert r.exit_code == 1 and "holds a qwen-image-edit-plus pipeline" in r.stderr


def test_exports_run_in_the_pipeline_with_the_model_cards_settings_as_clora_generate(  # type: ignore[no-untyped-def]
    qwen_world, qwen_folders: dict[str, Path], tmp_path: Path
) -> None:
    """The diffusers and comfyui exports loaded by QwenImageEditPlusPipeline.load_lora_weights and sampled
    with the scheduler settings of the model card reproduce `clora generate` (same seed, float32, CPU)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tiny_qwen import load_qwen_edit_pipeline, small_edit_sizes

    pm = qwen_world
    r = run(
        pm,
        "distill",
        "--effects",
        "ghibli",
        "--steps",
        "2",
        "--config",
        tmp_path / "cfg.json",
        "--no-progress",
        "--json",
    )
    assert r.exit_code == 0, r.output
    version = json.loads(r.stdout)["version"]
    exported = {}
    for fmt in ("diffusers", "comfyui", "peft"):
        out = tmp_path / "export" / fmt
        r = run(pm, "export", "--collection", version, "--format", fmt, "--out", out, "--json")
        assert r.exit_code == 0, r.output
        exported[fmt] = json.loads(r.stdout)
    lora = exported["diffusers"]["lora"]
    card = Path(exported["diffusers"]["card"]).read_text()
    assert "QwenImageEditPlusPipeline" in card and "stochastic_sampling=True" in card
    assert "pipe.load_lora_weights(" in card and str(qwen_folders["plus"]) not in card
    header = read_header(lora)
    # an input already at the edit size (160x96 at resolution 128), so neither side resizes it
    me = write_photos(tmp_path / "me", [(160, 96)], seed=5) / "photo0.png"
    r = run(
        pm,
        "generate",
        "--effect",
        "ghibli",
        "--image",
        me,
        "--out",
        tmp_path / "clora.png",
        "--seed",
        "7",
        "--no-fuse",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output

    pipe = load_qwen_edit_pipeline(qwen_folders["plus"])
    pipe.load_lora_weights(lora, adapter_name="diffusers")
    pipe.load_lora_weights(exported["comfyui"]["lora"], adapter_name="comfyui")
    shift = header.shift
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config,
        shift=shift,
        use_dynamic_shifting=False,
        shift_terminal=None,
        stochastic_sampling=True,
    )
    unshifted = [s / (shift - (shift - 1) * s) for s in header.few_step_sigmas]

    def sample(seed: int) -> np.ndarray:
        with small_edit_sizes(vae_area=4096, condition_area=3136), Image.open(me) as image:
            torch.manual_seed(seed)
            return pipe(  # type: ignore[no-any-return]
                image=image.convert("RGB"),
                prompt=header.effects["ghibli"]["prompt"],
                sigmas=unshifted,
                num_inference_steps=len(unshifted),
                true_cfg_scale=1.0,
                height=96,
                width=160,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
            ).images[0]

    ours = np.asarray(Image.open(tmp_path / "clora.png"), dtype=np.float32) / 255
    for adapter in ("diffusers", "comfyui"):  # the two layouts a pipeline loads
        pipe.set_adapters(adapter)
        out = sample(7)
        assert ours.shape == out.shape == (96, 160, 3)
        assert np.abs(ours - out).max() <= 1.5 / 255, (adapter, np.abs(ours - out).max())
    closeness = np.abs(ours - out).mean()
    assert np.abs(ours - sample(8)).mean() > 20 * closeness  # the seed matters
    # the LoRA is applied (two steps move it little: scaled up, it moves the image)
    pipe.set_adapters("diffusers", 100.0)
    assert np.abs(ours - sample(7)).mean() > 20 * closeness


def test_general_data_folder_feeds_the_general_stream(
    qwen_world, tmp_path: Path, registry_file: Path
) -> None:  # type: ignore[no-untyped-def]
    pm = qwen_world
    data = write_photos(tmp_path / "general", [(128, 128), (160, 96)], seed=3)
    (data / "prompts.jsonl").write_text(
        json.dumps({"image": "photo0.png", "prompt": "add a hat"})
        + "\n"
        + json.dumps({"image": "photo1.png", "prompt": "make it night"})
        + "\n"
    )
    before = set((clora_home() / "cache" / "targets").glob("general-*"))
    distill = ["distill", "--effects", "ghibli", "--config", tmp_path / "cfg.json", "--no-progress"]
    r = run(pm, *distill, "--steps", "2", "--general-data", data, "--p-switch", "0.5", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["data"]["general_data"] == str(data.resolve())
    made = set((clora_home() / "cache" / "targets").glob("general-*")) - before
    assert len(made) == 2  # the base's own outputs, one file per image size

    (data / "prompts.jsonl").write_text('{"image": "photo0.png"}\n')
    bad = [
        (data, "prompts.jsonl:1"),
        (tmp_path / "nowhere", "--general-data folder not found"),
        (tmp_path / "me", "needs prompts.jsonl"),
    ]
    write_photos(tmp_path / "me", [(64, 64)])
    runs = len(Registry(registry_file).list_runs())
    for folder, says in bad:
        r = run(pm, *distill, "--steps", "2", "--general-data", folder)
        assert r.exit_code == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert len(Registry(registry_file).list_runs()) == runs  # refused before a run was recorded
    (data / "prompts.jsonl").unlink()
    (data / "prompt.txt").write_text("keep it as it is\n")
    r = run(pm, *distill, "--steps", "1", "--general-data", data, "--p-switch", "0")
    assert r.exit_code == 0, r.output
