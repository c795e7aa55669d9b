"""Every layout a Qwen-Image LoRA comes in reads to the same modules; what clora cannot honour is refused.

One reference LoRA (every Linear of the tiny Qwen-Image transformer, ranks and alphas varying per module)
is written the way each trainer writes it; all of them must give the same ``scale * up @ down``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ShapesOnlyFactory, ShapesOnlyPlugin
from helpers import file_digest, plugin_manager, run
from safetensors.torch import load_file

from clora.fileio import save_safetensors
from clora.lora import LoraModule, add_lora_adapter, read_lora
from clora.plugins import Components

BLOCK = "transformer_blocks.0."
# The reference LoRA in peft's terms: default rank and alpha, and patterns with peft's semantics (a key
# matches a module name if it matches the name's last dotted parts; keys are regexes).
RANK, ALPHA = 4, 2.0
RANK_PATTERN = {"to_q": 8, r"img_mlp\.net\.2": 8}
ALPHA_PATTERN = {"attn.to_k": 16.0, r"proj_\w+": 3.0, "to_q": 4.0}
# ... and what those patterns mean, spelled out: only these modules differ from RANK / ALPHA
RANKS = {BLOCK + "attn.to_q": 8, BLOCK + "img_mlp.net.2": 8}
ALPHAS = {BLOCK + "attn.to_k": 16.0, "proj_out": 3.0, BLOCK + "attn.to_q": 4.0}

Reference = dict[str, LoraModule]


@pytest.fixture
def pm():  # type: ignore[no-untyped-def]
    return plugin_manager(ShapesOnlyPlugin())


@pytest.fixture(scope="module")
def shapes(shapes_factory: ShapesOnlyFactory) -> dict[str, tuple[int, int]]:
    return shapes_factory.module_shapes()


@pytest.fixture(scope="module")
def ref(shapes: dict[str, tuple[int, int]]) -> Reference:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (fan_in, fan_out) in sorted(shapes.items()):
        rank = RANKS.get(name, RANK)
        down = torch.randn(rank, fan_in, generator=g) * 0.2
        up = torch.randn(fan_out, rank, generator=g) * 0.2
        out[name] = LoraModule(down=down, up=up, alpha=ALPHAS.get(name, ALPHA))
    return out


def providers() -> list:  # type: ignore[type-arg]
    return Components.collect(plugin_manager()).teacher_providers()


def delta(m: LoraModule) -> torch.Tensor:
    return m.scale * m.up.double() @ m.down.double()


# ---- writers: the reference LoRA as each trainer saves it ----------------------------------------------


def flat(name: str) -> str:
    return name.replace(".", "_")


def peft_config(modules: list[str], rslora: bool = False) -> dict:  # type: ignore[type-arg]
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": ALPHA,
        "rank_pattern": RANK_PATTERN,
        "alpha_pattern": ALPHA_PATTERN,
        "target_modules": modules,
        "use_rslora": False,
    }
    if rslora:  # the same scales under alpha / sqrt(r): every module with rank 8 needs its own alpha
        config |= {
            "use_rslora": True,
            "lora_alpha": ALPHA / math.sqrt(RANK),
            "alpha_pattern": {
                "attn.to_k": 16.0 / math.sqrt(4),
                r"proj_\w+": 3.0 / math.sqrt(4),
                "to_q": 4.0 / math.sqrt(8),
                r"img_mlp\.net\.2": ALPHA / math.sqrt(8),
            },
        }
    return config


def diffusers_file(ref: Reference, d: Path) -> Path:
    """diffusers ``save_lora_weights``: ``transformer.`` keys, the LoraConfig in the header."""
    tensors = {}
    for name, m in ref.items():
        tensors[f"transformer.{name}.lora_A.weight"] = m.down
        tensors[f"transformer.{name}.lora_B.weight"] = m.up
    header = {f"transformer.{k}": v for k, v in peft_config(sorted(ref)).items() if k != "peft_type"}
    path = d / "pytorch_lora_weights.safetensors"
    save_safetensors(tensors, path, {"format": "pt", "lora_adapter_metadata": json.dumps(header)})
    return path


def peft_folder(ref: Reference, d: Path, rslora: bool = False, adapter_name: str = "") -> Path:
    """peft ``save_pretrained``: ``base_model.model.`` keys, ``adapter_config.json`` beside them."""
    folder = d / "adapter"
    folder.mkdir()
    tensors = {}
    for name, m in ref.items():
        tensors[f"base_model.model.{name}.lora_A{adapter_name}.weight"] = m.down
        tensors[f"base_model.model.{name}.lora_B{adapter_name}.weight"] = m.up
    save_safetensors(tensors, folder / "adapter_model.safetensors", {"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(peft_config(sorted(ref), rslora)))
    return folder


def kohya_tensors(ref: Reference, key: Callable[[str], str], down: str, up: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, m in ref.items():
        tensors[f"{key(name)}.{down}.weight"] = m.down
        tensors[f"{key(name)}.{up}.weight"] = m.up
        tensors[f"{key(name)}.alpha"] = torch.tensor(m.alpha)
    return tensors


def musubi_file(ref: Reference, d: Path) -> Path:
    """musubi-tuner ``networks.lora_qwen_image``: kohya's flat ``lora_unet_`` names with ``.alpha``."""
    path = d / "musubi.safetensors"
    meta = {"ss_network_module": "networks.lora_qwen_image", "ss_network_dim": "4", "ss_network_alpha": "2.0"}
    save_safetensors(kohya_tensors(ref, lambda n: "lora_unet_" + flat(n), "lora_down", "lora_up"), path, meta)
    return path


def folded(ref: Reference, prefix: str, sqrt: bool = False) -> dict[str, torch.Tensor]:
    """lora_A/lora_B with alpha / rank folded into the weights (files that have no alpha)."""
    tensors = {}
    for name, m in ref.items():
        s_down, s_up = (math.sqrt(m.scale), math.sqrt(m.scale)) if sqrt else (1.0, m.scale)
        tensors[f"{prefix}{name}.lora_A.weight"] = m.down * s_down
        tensors[f"{prefix}{name}.lora_B.weight"] = m.up * s_up
    return tensors


def write(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_safetensors(tensors, path)
    return path


LAYOUTS: dict[str, tuple[str, Callable[[Reference, Path], Path]]] = {
    "diffusers": ("diffusers", diffusers_file),
    "diffusers folder": ("diffusers", lambda r, d: diffusers_file(r, d).parent),
    # diffusers-named modules without `transformer.`: diffusers' load_lora_weights would skip them
    "unprefixed": ("peft", lambda r, d: write(folded(r, ""), d / "bare.safetensors")),
    "peft folder": ("peft", peft_folder),
    "peft file": ("peft", lambda r, d: peft_folder(r, d) / "adapter_model.safetensors"),
    "peft rslora": ("peft", lambda r, d: peft_folder(r, d, rslora=True)),
    "peft state_dict": ("peft", lambda r, d: peft_folder(r, d, adapter_name=".default")),
    "musubi-tuner": ("kohya", musubi_file),
    "kohya transformer.": (
        "kohya",
        lambda r, d: write(
            kohya_tensors(r, "transformer.{}".format, "lora_down", "lora_up"), d / "k.safetensors"
        ),
    ),
    "simpletuner lycoris_": (
        "kohya",
        lambda r, d: write(
            kohya_tensors(r, lambda n: "lycoris_" + flat(n), "lora_down", "lora_up"), d / "l.safetensors"
        ),
    ),
    "comfyui with alpha": (
        "comfyui",
        lambda r, d: write(
            kohya_tensors(r, "diffusion_model.{}".format, "lora_A", "lora_B"), d / "c.safetensors"
        ),
    ),
    "comfyui lora_down": (
        "kohya",
        lambda r, d: write(
            kohya_tensors(r, "diffusion_model.{}".format, "lora_down", "lora_up"), d / "c.safetensors"
        ),
    ),
    # ai-toolkit saves peft-style keys renamed to ComfyUI's and no alpha (it trains with alpha = rank)
    "ai-toolkit": ("comfyui", lambda r, d: write(folded(r, "diffusion_model."), d / "aitk.safetensors")),
    # musubi-tuner's convert_lora.py --target other folds sqrt(alpha / rank) into each factor
    "musubi converted": (
        "comfyui",
        lambda r, d: write(folded(r, "diffusion_model.", sqrt=True), d / "mc.safetensors"),
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_same_deltas(layout: str, ref: Reference, shapes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fmt, writer = LAYOUTS[layout]
    lora = read_lora(writer(ref, tmp_path), providers(), module_names=shapes)
    assert lora.format_id == fmt
    assert sorted(lora.modules) == sorted(ref)
    for name, m in lora.modules.items():
        assert m.rank == ref[name].rank, name
        torch.testing.assert_close(delta(m), delta(ref[name]), rtol=1e-5, atol=1e-7, msg=name)
    assert lora.path.name.endswith(".safetensors") and lora.path.is_file()


def test_peft_patterns_resolve_as_peft_does(ref: Reference, shapes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lora = read_lora(peft_folder(ref, tmp_path), providers(), module_names=shapes)
    assert {n: m.alpha for n, m in lora.modules.items()} == {n: ALPHAS.get(n, ALPHA) for n in ref}
    assert {n: m.rank for n, m in lora.modules.items()} == {n: RANKS.get(n, RANK) for n in ref}
    (tmp_path / "rs").mkdir()
    rs = read_lora(peft_folder(ref, tmp_path / "rs", rslora=True), providers(), module_names=shapes)
    # rsLoRA's alpha / sqrt(r) shows as the alpha giving that scale under alpha / r
    assert rs.modules["proj_out"].alpha == pytest.approx(3.0)
    assert rs.modules[BLOCK + "attn.to_q"].alpha == pytest.approx(4.0)


def test_same_output_as_diffusers_loading(ref: Reference, shapes, shapes_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """clora's adapter from a musubi-tuner file acts like diffusers loading the diffusers file, or the
    musubi-tuner file through the Qwen-Image pipeline's own ``lora_state_dict`` converter."""
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    base = copy.deepcopy(shapes_factory.model).eval()
    theirs, converted, ours = (copy.deepcopy(base) for _ in range(3))
    # use_safetensors: without it diffusers reads a file path without its header, so without the alphas
    theirs.load_lora_adapter(
        str(diffusers_file(ref, tmp_path)), prefix="transformer", adapter_name="ref", use_safetensors=True
    )
    musubi = musubi_file(ref, tmp_path)
    converted.load_lora_adapter(
        QwenImageLoraLoaderMixin.lora_state_dict(str(musubi)), prefix="transformer", adapter_name="conv"
    )
    add_lora_adapter(ours, read_lora(musubi, providers(), module_names=shapes).modules, "ours")

    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, 24, generator=g),
        "encoder_hidden_states": torch.randn(2, 3, 32, generator=g),
        "encoder_hidden_states_mask": torch.ones(2, 3),
        "timestep": torch.tensor([0.3, 0.8]),
        "img_shapes": [[(1, 2, 2)]] * 2,
        "return_dict": False,
    }
    with torch.no_grad():
        plain, want, got_conv, got = (m(**inputs)[0] for m in (base, theirs, converted, ours))
    assert not torch.allclose(plain, want, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_conv, want, rtol=1e-4, atol=1e-5)


# ---- through the CLI ----------------------------------------------------------------------------------


def add(pm, path: Path, name: str = "new"):  # type: ignore[no-untyped-def]
    return run(pm, "effect", "add", name, "--lora", path, "--prompt", "p", "--base", "shapes-only", "--json")


def test_add_accepts_a_peft_folder_and_reports_the_files_alpha(pm, ref: Reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = add(pm, peft_folder(ref, tmp_path), "peft")
    assert r.exit_code == 0, r.output
    lora = json.loads(r.stdout)["lora"]
    assert lora["format"] == "peft" and lora["rank"] == 8 and lora["alpha"] == 16.0
    assert lora["path"].endswith("adapter/adapter_model.safetensors")
    r = add(pm, musubi_file(ref, tmp_path), "musubi")
    assert r.exit_code == 0, r.output
    lora = json.loads(r.stdout)["lora"]
    assert lora["format"] == "kohya" and lora["alpha"] == 16.0  # the file's, not folded into the weights


def _refused(ref: Reference, d: Path, case: str) -> Path:
    """A file (or peft folder) holding the thing ``case`` names, beside ordinary LoRA weights."""
    q = BLOCK + "attn.to_q"
    z = torch.zeros
    if case in ("dora peft", "peft without config", "config of other weights"):
        folder = peft_folder(ref, d)
        weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
        if case == "dora peft":
            magnitude = {f"base_model.model.{q}.lora_magnitude_vector": z(32)}
            save_safetensors(load_file(weights) | magnitude, weights)
        elif case == "peft without config":
            config.unlink()
        else:
            config.write_text(json.dumps({"r": 16, "lora_alpha": 16}))
        return folder
    diffusers = folded(ref, "transformer.")
    kohya = kohya_tensors(ref, lambda n: "lora_unet_" + flat(n), "lora_down", "lora_up")
    comfy = folded(ref, "diffusion_model.")
    tensors = {
        "dora_scale": kohya | {f"lora_unet_{flat(q)}.dora_scale": z(1, 32)},
        "lokr": {
            f"diffusion_model.{q}.lokr_w1": z(4, 4),
            f"diffusion_model.{q}.lokr_w2": z(8, 8),
            f"diffusion_model.{q}.alpha": torch.tensor(1.0),
        },
        "loha": {f"lora_unet_{flat(q)}.hada_{k}": z(4, 32) for k in ("w1_a", "w1_b", "w2_a", "w2_b")},
        "diff": diffusers | {"transformer.norm_out.linear.diff": z(64, 32)},
        "diff_b": comfy | {"diffusion_model.proj_out.diff_b": z(48)},
        "lora bias": diffusers | {f"transformer.{q}.lora_B.bias": z(32)},
        "kohya text encoder": kohya
        | {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": z(4, 8)},
        "diffusers text encoder": diffusers
        | {"text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight": z(4, 8)},
        "leftovers": comfy
        | {
            "emb_params": z(2, 32),
            "diffusion_model.norm_out.weight": z(32),
            "diffusion_model.img_in.lora_A.weight2": z(1),
        },
        "unpaired": {
            f"transformer.{q}.lora_A.weight": z(4, 32),
            f"transformer.{q}.lora_B.weight": z(32, 4),
            "transformer.proj_out.lora_A.weight": z(4, 32),
        },
        "flux kohya": flux_kohya(),
        "wrong shapes": {
            f"diffusion_model.{q}.lora_A.weight": z(4, 3072),
            f"diffusion_model.{q}.lora_B.weight": z(3072, 4),
        },
    }[case]
    return write(tensors, d / f"{case.replace(' ', '_')}.safetensors")


def flux_kohya() -> dict[str, torch.Tensor]:
    """A kohya FLUX.1 LoRA: right layout, another model's module names."""
    out = {}
    for block in ("double_blocks_0_img_attn_qkv", "double_blocks_0_txt_mlp_0", "single_blocks_1_linear1"):
        out[f"lora_unet_{block}.lora_down.weight"] = torch.zeros(4, 32)
        out[f"lora_unet_{block}.lora_up.weight"] = torch.zeros(96, 4)
        out[f"lora_unet_{block}.alpha"] = torch.tensor(4.0)
    return out


def test_other_models_names_are_kept_whole(tmp_path: Path) -> None:
    """Names diffusers' Qwen-Image converter cannot map stay as written (check_fits then names them),
    rather than half-converted."""
    lora = read_lora(write(flux_kohya(), tmp_path / "flux.safetensors"), providers())
    assert sorted(lora.modules) == sorted(
        k.removesuffix(".alpha") for k in flux_kohya() if k.endswith("alpha")
    )


REFUSED = {
    "dora peft": "holds DoRA magnitudes ('base_model.model.transformer_blocks.0.attn.to_q.lora_magnitude_",
    "dora_scale": "holds DoRA magnitudes",
    "lokr": "holds LyCORIS LoKr/LoHa/OFT weights ('diffusion_model.transformer_blocks.0.attn.to_q.lokr_w1',",
    "loha": "holds LyCORIS LoKr/LoHa/OFT weights",
    "diff": "holds full-weight or bias deltas (.diff/.diff_b) ('transformer.norm_out.linear.diff')",
    "diff_b": "holds full-weight or bias deltas (.diff/.diff_b) ('diffusion_model.proj_out.diff_b')",
    "lora bias": "holds LoRA biases",
    "kohya text encoder": "holds text-encoder LoRA weights ('lora_te1_text_model",
    "diffusers text encoder": "holds text-encoder LoRA weights ('text_encoder.",
    "leftovers": "holds 3 tensors clora cannot use as LoRA weights ('diffusion_model.img_in.lora_A.weight2', "
    "'diffusion_model.norm_out.weight', 'emb_params')",
    "unpaired": "holds 1 tensor clora cannot use as LoRA weights ('transformer.proj_out.lora_A.weight')",
    "flux kohya": "targets modules that base 'shapes-only' does not have: lora_unet_double_blocks_0_img_attn",
    "wrong shapes": "has shape (3072, 4)x(4, 3072) but base 'shapes-only' needs in=32, out=32",
    "peft without config": "but no adapter_config.json beside them gives their lora_alpha",
    "config of other weights": "giving module 'img_in' rank 16 but its weights have rank 4",
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line(
    pm, ref: Reference, make_lora, registry_file, tmp_path: Path, case: str
) -> None:  # type: ignore[no-untyped-def]
    assert add(pm, make_lora("keep"), "keep").exit_code == 0
    before = file_digest(registry_file)
    path = _refused(ref, tmp_path, case)
    r = add(pm, path)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert REFUSED[case] in r.stderr
    assert file_digest(registry_file) == before
