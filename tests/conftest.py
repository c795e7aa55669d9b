"""Shared fixtures: every test runs in a temp folder with its own registry; nothing touches ./registry.db."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from helpers import plugin_manager, run

from clora import hookimpl
from clora.backbone import Backbone, BackboneFactory
from clora.errors import BaseNotBuiltError
from clora.fileio import save_safetensors
from clora.lora import linear_shapes

# tiny models gain nothing from a second thread, and oversubscribed cores slow them 20x
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _clora_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One CLORA_HOME per test session, so built toy models are shared by tests but never by users.

    ``CLORA_TEST_HOME`` names a folder to keep between test runs instead (a faster local loop).
    """
    keep = os.environ.get("CLORA_TEST_HOME")
    home = Path(keep) if keep else tmp_path_factory.mktemp("clora_home")
    old = os.environ.get("CLORA_HOME")
    os.environ["CLORA_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("CLORA_HOME", None)
    else:
        os.environ["CLORA_HOME"] = old


@pytest.fixture(autouse=True)
def _isolated_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point CLORA_REGISTRY at a temp file and run in a temp folder."""
    reg = tmp_path / "registry.db"
    monkeypatch.setenv("CLORA_REGISTRY", str(reg))
    monkeypatch.delenv("CLORA_DISABLE_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)
    return reg


@pytest.fixture
def registry_file(_isolated_registry: Path) -> Path:
    return _isolated_registry


@pytest.fixture
def tiny_collection(registry_file: Path):  # type: ignore[no-untyped-def]
    """A plugin manager whose registry holds the tiny toy world's sepia and invert distilled 6 steps."""
    pm = plugin_manager()
    assert run(pm, "toy", "build-base", "--tiny").exit_code == 0
    assert run(pm, "toy", "teachers", "sepia", "invert", "--tiny").exit_code == 0
    r = run(pm, "distill", "--steps", "6", "--batch-size", "4", "--no-progress")
    assert r.exit_code == 0, r.output
    return pm


class ShapesOnlyFactory(BackboneFactory):
    """A test base model: a real tiny QwenImage transformer's module shapes, and no weights."""

    backbone_id = "shapes-only"
    description = "test base with shapes but no weights"

    def __init__(self) -> None:
        from diffusers import QwenImageTransformer2DModel

        self.model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=24,
            out_channels=12,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return linear_shapes(self.model)

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Backbone:
        raise BaseNotBuiltError("the shapes-only test base has no weights")


class ShapesOnlyPlugin:
    __name__ = "shapes_only"

    @hookimpl
    def register_backbones(self, register):  # type: ignore[no-untyped-def]
        register(ShapesOnlyFactory())


@pytest.fixture(scope="session")
def shapes_factory() -> ShapesOnlyFactory:
    return ShapesOnlyFactory()


TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


def lora_tensors(
    shapes: Mapping[str, tuple[int, int]], fmt: str, rank: int = 4, alpha: float | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """LoRA tensors for the attention projections of ``shapes``, spelled as format ``fmt`` writes them."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (fan_in, fan_out) in sorted(shapes.items()):
        if not name.endswith(TARGETS):
            continue
        down = torch.randn(rank, fan_in, generator=g) * 0.1
        up = torch.randn(fan_out, rank, generator=g) * 0.1
        if fmt == "diffusers":
            out[f"transformer.{name}.lora_A.weight"] = down
            out[f"transformer.{name}.lora_B.weight"] = up
        elif fmt == "peft":
            out[f"base_model.model.{name}.lora_A.weight"] = down
            out[f"base_model.model.{name}.lora_B.weight"] = up
        elif fmt == "kohya":
            flat = "lora_unet_" + name.replace(".", "_")
            out[f"{flat}.lora_down.weight"] = down
            out[f"{flat}.lora_up.weight"] = up
            out[f"{flat}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            raise ValueError(fmt)
    return out


@pytest.fixture
def make_lora(tmp_path: Path, shapes_factory: ShapesOnlyFactory):  # type: ignore[no-untyped-def]
    """``make_lora(name, fmt, rank, shapes) -> Path``: a LoRA file fitting the test base."""

    def make(name: str = "effect", fmt: str = "diffusers", rank: int = 4, shapes=None, seed: int = 0) -> Path:  # type: ignore[no-untyped-def]
        tensors = lora_tensors(shapes or shapes_factory.module_shapes(), fmt, rank, seed=seed)
        if fmt == "peft":  # peft keeps alpha in adapter_config.json beside the weights
            path = tmp_path / f"{name}.peft" / "adapter_model.safetensors"
            path.parent.mkdir(exist_ok=True)
            config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(TARGETS)}
            (path.parent / "adapter_config.json").write_text(json.dumps(config))
        else:
            path = tmp_path / f"{name}.{fmt}.safetensors"
        save_safetensors(tensors, path)
        return path

    return make
