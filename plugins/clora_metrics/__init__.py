"""Built-in image metrics: PSNR and SSIM (no model weights needed), and the learned LPIPS, CLIP
image similarity and DreamSim, which need weights on disk (nothing is downloaded).

A metric (:class:`clora.contracts.Metric`) has a ``metric_id``, ``higher_is_better`` and is called as
``metric(images, reference)`` on ``[B,3,H,W]`` tensors in [0,1], returning one value per image ``[B]``.
A metric that needs files overrides ``unavailable()``, returning None when it can run and else a
one-line note of what is missing; ``clora eval`` asks before it starts.
"""

from __future__ import annotations

import importlib.util
import os
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clora import hookimpl
from clora.contracts import Metric
from clora.paths import clora_home

if TYPE_CHECKING:
    import torch

#: torchvision's file name for the ImageNet AlexNet weights (what torch.hub caches)
TORCHVISION_ALEXNET = "alexnet-owt-7be5be79.pth"


class PSNR(Metric):
    """Peak signal-to-noise ratio in dB."""

    metric_id = "psnr"
    higher_is_better = True

    def __call__(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        from clora.metrics import psnr

        return psnr(images, reference)


class SSIM(Metric):
    """Structural similarity (Gaussian window 11, sigma 1.5), averaged over channels."""

    metric_id = "ssim"
    higher_is_better = True

    def __call__(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        from clora.metrics import ssim

        return ssim(images, reference)


def metrics_dir(metric_id: str) -> Path:
    """Where a learned metric's weights go: ``CLORA_HOME/metrics/<id>``."""
    return clora_home() / "metrics" / metric_id


def _first(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


class _Learned(Metric):
    """A metric whose network loads on first use (once per device) from files found on disk and
    maps an image pair ``(images, reference)`` to one value per image."""

    metric_id = ""
    higher_is_better = False  # the distances; similarities override it

    def __init__(self) -> None:
        self._nets: dict[str, Any] = {}

    @abstractmethod
    def unavailable(self) -> str | None:
        """None when the weights are on disk, else a one-line note of what is missing where."""

    @abstractmethod
    def _load(self) -> Any:
        """The network (a torch module mapping an image pair to ``[B]``), built from those files."""

    def __call__(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        import torch

        net = self.net(images.device)
        with torch.no_grad():
            return net(images.float(), reference.float())

    def net(self, device: Any) -> Any:
        key = str(device)
        if key not in self._nets:
            from clora.errors import CloraError

            problem = self.unavailable()
            if problem:
                raise CloraError(f"metric '{self.metric_id}' is not available: {problem}")
            self._nets[key] = self._load().to(device).eval().requires_grad_(False)
        return self._nets[key]


class LPIPS(_Learned):
    """LPIPS distance (v0.1 on AlexNet); 0 for identical images, lower is more alike."""

    metric_id = "lpips"

    def alexnet_path(self) -> Path | None:
        import torch

        here = metrics_dir(self.metric_id)
        hub = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_ALEXNET
        return _first([here / "alexnet.safetensors", here / "alexnet.pth", here / TORCHVISION_ALEXNET, hub])

    def linear_path(self) -> Path | None:
        here = metrics_dir(self.metric_id)
        found = [here / "alex.safetensors", here / "alex.pth"]
        spec = importlib.util.find_spec("lpips")  # the lpips package ships the v0.1 weights; not imported
        if spec is not None and spec.origin:
            found.append(Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth")
        return _first(found)

    def unavailable(self) -> str | None:
        here = metrics_dir(self.metric_id)
        missing = []
        if self.alexnet_path() is None:
            missing.append(
                f"AlexNet ImageNet weights (torchvision's {TORCHVISION_ALEXNET}) as {here}/alexnet.pth"
            )
        if self.linear_path() is None:
            missing.append(
                f"the LPIPS v0.1 linear weights (the lpips package's weights/v0.1/alex.pth) "
                f"as {here}/alex.pth"
            )
        return ("needs " + " and ".join(missing)) if missing else None

    def _load(self) -> Any:
        from clora_metrics.nets import load_lpips

        alexnet, linear = self.alexnet_path(), self.linear_path()
        assert alexnet is not None and linear is not None
        return load_lpips(alexnet, linear)


class CLIPSimilarity(_Learned):
    """Cosine similarity of CLIP image embeddings (CLIP-I); 1 for identical images, higher is more alike."""

    metric_id = "clip"
    higher_is_better = True

    def folder(self) -> Path:
        env = os.environ.get("CLORA_CLIP_MODEL")
        return Path(env).expanduser() if env else metrics_dir(self.metric_id)

    def unavailable(self) -> str | None:
        folder = self.folder()
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return None
        return (
            "needs a local CLIP model folder (transformers layout: config.json and *.safetensors, e.g. "
            f"openai/clip-vit-base-patch32) at {folder}, or CLORA_CLIP_MODEL=DIR"
        )

    def _load(self) -> Any:
        from clora_metrics.nets import load_clip

        return load_clip(self.folder())


class DreamSim(_Learned):
    """DreamSim distance (1 - cosine of the embeddings); 0 for identical images, lower is more alike.

    Reads a dreamsim cache folder (what ``dreamsim(pretrained=True, cache_dir=DIR)`` leaves after
    one online run) with clora's own ViT, so neither the dreamsim package nor torchvision is needed.
    """

    metric_id = "dreamsim"

    def folder(self) -> Path:
        env = os.environ.get("CLORA_DREAMSIM_DIR")
        return Path(env).expanduser() if env else metrics_dir(self.metric_id)

    def kind(self) -> str:
        return os.environ.get("CLORA_DREAMSIM_TYPE", "ensemble")

    def unavailable(self) -> str | None:
        from clora_metrics.dreamsim_net import DREAMSIM_TYPES, required_files

        kind, folder = self.kind(), self.folder()
        if kind not in DREAMSIM_TYPES:
            return f"CLORA_DREAMSIM_TYPE '{kind}' is not one of {', '.join(DREAMSIM_TYPES)}"
        missing = [p for p in required_files(folder, kind) if not p.exists()]
        if not missing:
            return None
        names = ", ".join(str(p.relative_to(folder)) for p in missing[:3])
        return (
            f"needs dreamsim's '{kind}' weights (a dreamsim cache_dir) at {folder} "
            f"(or CLORA_DREAMSIM_DIR=DIR); missing {names}"
        )

    def _load(self) -> Any:
        from clora_metrics.dreamsim_net import load_dreamsim

        return load_dreamsim(self.folder(), self.kind())


@hookimpl
def register_metrics(register: Callable[[Metric], None]) -> None:
    register(PSNR())
    register(SSIM())
    register(LPIPS())
    register(CLIPSimilarity())
    register(DreamSim())
