"""The registered toy backbone factories (importing this module does not import torch)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from clora.backbone import BackboneFactory
from clora.errors import BaseNotBuiltError, CloraError
from clora_toy import store
from clora_toy.config import TOY, TOY_TINY, ToyConfig

if TYPE_CHECKING:
    import torch

    from clora_toy.backbone import ToyBackbone


class ToyBackboneFactory(BackboneFactory):
    """Builds the toy backbone from the weights ``clora toy build-base`` wrote to the cache."""

    kind = "toy"

    def __init__(self, backbone_id: str, config: ToyConfig, build_hint: str, description: str) -> None:
        self.backbone_id = backbone_id
        self.config = config
        self.build_hint = build_hint
        self.description = description

    @property
    def weights_path(self) -> Path:
        """Where this recipe's base weights are (or will be) in the cache."""
        return store.base_dir(self.backbone_id, self.config) / store.BASE_WEIGHTS

    @property
    def fingerprint(self) -> str:
        return f"{self.backbone_id}-{self.config.base_hash()}"

    def is_built(self) -> bool:
        """Whether the base weights exist in the cache (installing the shipped ones if there are)."""
        path = self.weights_path
        return path.exists() or store.install_shipped(path.parent, store.BASE_FILES)

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> ToyBackbone:
        path = self.weights_path
        if not self.is_built():
            raise BaseNotBuiltError(
                f"the toy base '{self.backbone_id}' is not built yet (no {path}); run `{self.build_hint}`"
            )
        return self.load_file(path, device, dtype)

    def load_file(
        self, path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> ToyBackbone:
        """Load a base weights file written by ``clora_toy.build.build_base``."""
        import torch
        from safetensors.torch import load_file

        device = torch.device(device)
        dtype = dtype or torch.float32
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise CloraError(
                f"cannot read toy base weights {path} ({exc}); rebuild with `{self.build_hint} --force`"
            ) from exc
        return self._assemble(device, dtype, tensors)

    def fresh(self, device: torch.device | str = "cpu") -> ToyBackbone:
        """An untrained backbone (seeded init), the starting point of base training."""
        import torch

        return self._assemble(torch.device(device), torch.float32)

    def _assemble(
        self, device: torch.device, dtype: torch.dtype, tensors: dict[str, torch.Tensor] | None = None
    ) -> ToyBackbone:
        """The backbone of this recipe on ``device``: with ``tensors`` (a base weights file) loaded and
        frozen, else at its seeded initialisation."""
        import torch

        from clora_toy.backbone import ToyBackbone, build_transformer
        from clora_toy.text import build_text_encoder

        # Any: mypy resolves diffusers' and transformers' nn.Module methods through their decorators
        transformer: Any = build_transformer(self.config.model)
        text_encoder: Any = build_text_encoder(self.config.model)
        if tensors is not None:
            transformer.load_state_dict(_strip(tensors, "transformer."))
            # position_ids is a buffer some transformers versions save and others do not
            text_encoder.load_state_dict(_strip(tensors, "text_encoder."), strict=False)
            transformer.requires_grad_(False).eval()
        transformer.to(device)
        if dtype != torch.float32:
            transformer.to(dtype)
        text_encoder.to(device)
        return ToyBackbone(
            self.backbone_id,
            self.config.model,
            self.config.eval,
            self.fingerprint,
            transformer,
            text_encoder,
            device,
            dtype,
        )

    def info(self) -> dict[str, Any]:
        path = self.weights_path
        return {
            "kind": self.kind,
            "description": self.description,
            "dtype": "float32",
            "bytes": path.stat().st_size if path.exists() else None,
        }

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        import torch

        from clora_toy.backbone import build_transformer

        with torch.device("meta"):
            transformer: Any = build_transformer(self.config.model)
        return {
            name: (m.in_features, m.out_features)
            for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear)
        }


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


FACTORIES = [
    ToyBackboneFactory(
        "toy",
        TOY,
        "clora toy build-base",
        "embedded toy Qwen-Image-Edit: 32x32 RGB, width 128, 4 layers (build: `clora toy build-base`)",
    ),
    ToyBackboneFactory(
        "toy-tiny",
        TOY_TINY,
        "clora toy build-base --tiny",
        "test-size toy: 16x16 RGB, width 32, 1 layer (build: `clora toy build-base --tiny`)",
    ),
]


SIZES = {"full": "toy", "tiny": "toy-tiny"}


def get_factory(tiny: bool = False, size: str | None = None) -> ToyBackboneFactory:
    """The factory of ``size`` (full or tiny); ``tiny=True`` is ``size="tiny"``."""
    size = "tiny" if tiny else (size or "full")
    if size not in SIZES:
        raise CloraError(f"unknown toy size '{size}'; choose from {', '.join(SIZES)}")
    return next(f for f in FACTORIES if f.backbone_id == SIZES[size])
