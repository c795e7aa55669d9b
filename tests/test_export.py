"""`clora export`: every format carries the unified LoRA's weights, loads where it says, and has a card."""

from __future__ import annotations

import json
from pathlib import Path

import pluggy
import pytest
import torch
from helpers import file_digest, plugin_manager, run
from safetensors import safe_open
from safetensors.torch import load_file

from clora.backbone import Backbone
from clora.bases import get_factory
from clora.export import export
from clora.generate import UnifiedModel, sample_few_steps
from clora.lora import read_lora
from clora.plugins import Components
from clora.registry import Registry
from clora.unified import read_header, read_student_state


def _unified_file(registry_file: Path) -> Path:
    with Registry(registry_file, create=False) as reg:
        return Path(reg.require_collection().file)


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def unified_deltas(path: Path) -> dict[str, torch.Tensor]:
    """``alpha / rank * up @ down`` per module, read as clora reads a unified file."""
    header, state = read_header(path), read_student_state(path)
    scale = header.alpha / header.rank
    return {
        k.removesuffix(".lora_A.weight"): scale * state[k.replace("lora_A", "lora_B")] @ state[k]
        for k in state
        if k.endswith(".lora_A.weight")
    }


def diffusers_deltas(path: Path) -> dict[str, torch.Tensor]:
    """As diffusers reads the file: ``transformer.`` keys, r and alpha from ``lora_adapter_metadata``."""
    tensors, meta = load_file(str(path)), json.loads(_header(path)["lora_adapter_metadata"])
    scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
    return {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): scale
        * tensors[k.replace("lora_A", "lora_B")]
        @ tensors[k]
        for k in tensors
        if k.endswith(".lora_A.weight")
    }


def peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """As peft reads the folder: its LoraConfig and ``base_model.model.`` keys."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(folder))
    assert config.peft_type == "LORA" and config.bias == "none" and not config.rank_pattern
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    scale = config.lora_alpha / config.r
    out = {}
    for k in tensors:
        if k.endswith(".lora_A.weight"):
            assert k.startswith("base_model.model."), k
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[name] = scale * tensors[k.replace("lora_A", "lora_B")] @ tensors[k]
    assert set(config.target_modules) == set(out)
    return out


def assert_same(deltas: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(deltas) == set(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(deltas[name], delta, rtol=1e-6, atol=1e-7, msg=name)


def test_every_format_carries_the_unified_deltas(
    tiny_collection: pluggy.PluginManager, tmp_path: Path
) -> None:
    from diffusers import QwenImageEditPlusPipeline

    pm = tiny_collection
    unified = _unified_file(tmp_path / "registry.db")
    expected = unified_deltas(unified)
    for fmt in ("diffusers", "peft", "comfyui"):
        r = run(pm, "export", "--format", fmt, "--out", tmp_path / fmt, "--no-card")
        assert r.exit_code == 0, r.output
        assert r.stdout.startswith("exported collection v1 (2 effect(s), ") and f"as {fmt}: " in r.stdout
    diffusers_file = tmp_path / "diffusers" / "clora-v1.safetensors"
    comfy_file = tmp_path / "comfyui" / "clora-v1.comfyui.safetensors"
    assert str(comfy_file) in r.stdout

    assert file_digest(diffusers_file) == file_digest(unified)  # the unified file is diffusers' layout
    assert_same(diffusers_deltas(diffusers_file), expected)
    assert_same(peft_deltas(tmp_path / "peft"), expected)

    tensors = load_file(str(comfy_file))
    header = read_header(unified)
    for name in expected:  # kohya names, each with a 0-dim alpha: what ComfyUI's LoRA loader maps
        flat = "lora_unet_" + name.replace(".", "_")
        assert {f"{flat}.lora_down.weight", f"{flat}.lora_up.weight", f"{flat}.alpha"} <= set(tensors)
        assert tensors[f"{flat}.alpha"].ndim == 0 and tensors[f"{flat}.alpha"].item() == header.alpha
    assert len(tensors) == 3 * len(expected)
    # clora's own reader, told the module names, and diffusers' Qwen-Image converter read it back
    lora = read_lora(comfy_file, Components.collect(pm).teacher_providers(), module_names=list(expected))
    assert_same({n: m.scale * m.up @ m.down for n, m in lora.modules.items()}, expected)
    state = QwenImageEditPlusPipeline.lora_state_dict(str(comfy_file))
    assert_same(diffusers_deltas_of(state), expected)

    # nothing is lost: every format keeps the clora header; only diffusers' carries lora_adapter_metadata
    clora_json = _header(unified)["clora"]
    for path in (diffusers_file, tmp_path / "peft" / "adapter_model.safetensors", comfy_file):
        assert _header(path)["clora"] == clora_json, path
    assert "lora_adapter_metadata" not in _header(comfy_file)  # diffusers would scale twice


def diffusers_deltas_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deltas of a state dict diffusers converted (alpha folded into the weights, scale 1)."""
    return {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): state[k.replace("lora_A", "lora_B")]
        @ state[k]
        for k in state
        if k.endswith(".lora_A.weight")
    }


def test_exports_load_with_diffusers_and_peft_to_the_same_outputs(
    tiny_collection: pluggy.PluginManager, tmp_path: Path
) -> None:
    from diffusers import QwenImageEditPlusPipeline
    from peft import PeftModel

    components = Components.collect(tiny_collection)
    unified = _unified_file(tmp_path / "registry.db")
    with Registry(tmp_path / "registry.db", create=False) as reg:
        files = {
            fmt: export(reg, components, None, fmt, tmp_path / fmt, card=False).lora
            for fmt in ("diffusers", "peft", "comfyui")
        }
    reference = UnifiedModel.load(components, unified, fuse=False)
    images = reference.backbone.sample_sources(3, seed=5)
    expected = reference.edit(images, ["sepia"], seed=1)
    # clora generate's own loader on the exported file: the very same outputs
    exported = UnifiedModel.load(components, files["diffusers"], fuse=False)
    assert torch.equal(exported.edit(images, ["sepia"], seed=1), expected)

    prompts, sigmas = [reference.prompt(["sepia"])] * len(images), reference.sigmas(None)

    def fresh_backbone() -> Backbone:
        return get_factory(components, None, reference.header.base_id).load("cpu", torch.float32)

    # the LoRA changes the outputs, so the equalities below say it was loaded
    assert not torch.allclose(sample_few_steps(fresh_backbone(), images, prompts, sigmas, 1), expected)

    # a Qwen-Image pipeline's load_lora_weights, step by step (lora_state_dict, then the transformer)
    for fmt in ("diffusers", "comfyui"):
        bb = fresh_backbone()
        state, meta = QwenImageEditPlusPipeline.lora_state_dict(str(files[fmt]), return_lora_metadata=True)
        QwenImageEditPlusPipeline.load_lora_into_transformer(state, transformer=bb.transformer, metadata=meta)
        edited = sample_few_steps(bb, images, prompts, sigmas, 1)
        if fmt == "diffusers":
            assert torch.equal(edited, expected)
        else:  # the converter folds alpha / rank into the weights: equal up to rounding
            torch.testing.assert_close(edited, expected)

    bb = fresh_backbone()
    PeftModel.from_pretrained(bb.transformer, str(files["peft"]))  # wraps the transformer in place
    assert torch.equal(sample_few_steps(bb, images, prompts, sigmas, 1), expected)


FAKE_EVAL = {
    "n_images": 16,
    "steps": {"student": 4, "teacher": 20},
    "effects": {
        name: {
            "student_vs_truth": {"psnr": 31.25, "ssim": 0.9},
            "teacher_vs_truth": {"psnr": 33.5, "ssim": 0.95},
            "student_vs_teacher": {"psnr": 36.75, "ssim": 0.97},
        }
        for name in ("sepia", "invert")
    },
    "overall": {"student_vs_truth": {"psnr": 31.25}, "teacher_vs_truth": {"psnr": 33.5}},
    "bleeding": {"reference": "truth", "bleed_rate": 0.0625, "teacher_bleed_rate": 0.0},
}


def test_the_card_lists_effects_sampler_usage_and_scores(
    tiny_collection: pluggy.PluginManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = tiny_collection
    unified = _unified_file(tmp_path / "registry.db")
    header = read_header(unified)
    r = run(pm, "export", "--format", "diffusers", "--out", tmp_path / "hf", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["card"] == str(tmp_path / "hf" / "README.md") and result["effects"] == ["invert", "sepia"]
    card = (tmp_path / "hf" / "README.md").read_text()
    for name, e in header.effects.items():
        assert (
            f"| {name} | `{e['trigger']}` | {e['prompt']} | {e['caption']} | {e['teacher_prompt']} |" in card
        )
    assert f"steps: {len(header.few_step_sigmas)};" in card and f"shift: {header.shift:g}" in card
    assert "(sigmas, shift applied): [" + ", ".join(f"{s:.6g}" for s in header.few_step_sigmas) + "]" in card
    assert f"`{header.base_id}` (kind `toy`)" in card and header.base_fingerprint in card
    assert "clora generate --collection 1 --effect invert" in card  # the toy has no diffusers pipeline
    assert 'UnifiedModel.load(Components.collect(get_plugin_manager()), "clora-v1.safetensors")' in card
    assert "Not evaluated: `clora eval --collection 1` was not run." in card
    assert "<" not in card.replace("<module>", "").replace("<trigger>", "")  # plain Markdown, no HTML

    # with scores on the row, and a base whose pipeline has diffusers code (given the file's name)
    with Registry(tmp_path / "registry.db", create=False) as reg:
        reg.update_collection_metrics(1, {"eval": FAKE_EVAL})
        components = Components.collect(pm)
        factory = type(get_factory(components, reg, header.base_id))
        monkeypatch.setattr(
            factory,
            "pipeline_usage",
            lambda self, file, sigmas, shift, seed: f"pipe.load_lora_weights({file!r})  # {sigmas}",
        )
        res = export(reg, components, 1, "comfyui", tmp_path / "x.safetensors")
    assert res.card == tmp_path / "x.README.md"
    card = res.card.read_text()
    assert f"pipe.load_lora_weights('x.safetensors')  # {header.few_step_sigmas}" in card
    assert "| sepia | 31.25 | 33.50 | 36.75 |" in card and "| mean | 31.25 | 33.50 | - |" in card
    assert "6%; the teachers' own: 0%" in card


def _one_error(r, says: str) -> None:  # type: ignore[no-untyped-def]
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert says in r.stderr, r.stderr


def test_bad_inputs_are_one_line_errors_and_write_nothing(
    tiny_collection: pluggy.PluginManager, tmp_path: Path
) -> None:
    pm = tiny_collection
    out = tmp_path / "out"
    _one_error(run(pm, "export", "--format", "onnx", "--out", out), "choose from diffusers, peft, comfyui")
    _one_error(run(pm, "export", "--collection", "7", "--format", "peft", "--out", out), "no collection v7")
    _one_error(run(pm, "export", "--format", "peft", "--out", out / "a.safetensors"), "writes a folder")
    _one_error(run(pm, "export", "--format", "diffusers", "--out", out / "a.bin"), "ends in .bin")
    (tmp_path / "file").write_text("x")
    _one_error(run(pm, "export", "--format", "diffusers", "--out", tmp_path / "file" / "a"), "is a file")
    assert not out.exists()

    # an existing output is replaced only with --force; the card is checked too
    assert run(pm, "export", "--format", "comfyui", "--out", out / "c.safetensors").exit_code == 0
    before = {p.name: file_digest(p) for p in out.iterdir()}
    assert set(before) == {"c.safetensors", "c.README.md"}
    _one_error(
        run(pm, "export", "--format", "comfyui", "--out", out / "c.safetensors"), "exists; pass --force"
    )
    assert {p.name: file_digest(p) for p in out.iterdir()} == before
    (out / "c.safetensors").unlink()
    _one_error(run(pm, "export", "--format", "comfyui", "--out", out / "c.safetensors"), "c.README.md exists")
    assert not (out / "c.safetensors").exists()
    r = run(pm, "export", "--format", "comfyui", "--out", out / "c.safetensors", "--force")
    assert r.exit_code == 0 and (out / "c.safetensors").exists()

    # a peft folder: replaced with --force, but never a folder that is not one
    peft = out / "peft"
    assert run(pm, "export", "--format", "peft", "--out", peft, "--no-card").exit_code == 0
    _one_error(run(pm, "export", "--format", "peft", "--out", peft), "exists; pass --force")
    assert run(pm, "export", "--format", "peft", "--out", peft, "--force").exit_code == 0
    assert sorted(p.name for p in peft.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("keep")
    _one_error(
        run(pm, "export", "--format", "peft", "--out", out / "mine", "--force"), "not a peft adapter folder"
    )
    assert [p.name for p in (out / "mine").iterdir()] == ["notes.txt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_export_help_explains_every_option() -> None:
    r = run(plugin_manager(), "export", "--help")
    assert r.exit_code == 0 and "Usage" in r.stdout
    options = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("--")]
    assert {o.split()[0] for o in options} >= {
        "--format",
        "--out",
        "--collection",
        "--force",
        "--no-card",
        "--json",
    }
    for line in options:
        assert len(line.split(None, 2)) >= 2, line
