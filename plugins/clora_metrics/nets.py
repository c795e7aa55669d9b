"""The networks behind the learned metrics (imported only when one is used): LPIPS on AlexNet, and a
CLIP vision tower. Images are ``[B,3,H,W]`` in [0,1]."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clora.errors import CloraError

#: LPIPS v0.1: shift and scale of the [-1, 1] input before AlexNet (per RGB channel)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
#: AlexNet ``features`` indices whose ReLU outputs LPIPS compares, and their channel counts
LPIPS_TAPS = (1, 4, 7, 9, 11)
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
#: images with a shorter side are upsampled (bilinear) to it first
LPIPS_MIN_SIDE = 64


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file without unpickling code; an unreadable
    file is a one-line :class:`CloraError`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CloraError(f"cannot read {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise CloraError(f"{path} does not hold a state dict")
    return state


def alexnet_features() -> nn.Sequential:
    """AlexNet's convolutional trunk, laid out as torchvision's ``alexnet().features`` (same keys)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
    )


class LpipsNet(nn.Module):
    """LPIPS v0.1 on AlexNet: per tapped layer, unit-normalise each position's channel vector, weigh the
    squared difference per channel (a 1x1 conv with non-negative weights), average over positions,
    and sum over layers. 0 for identical images; lower is more alike. Images smaller than 64 pixels
    a side (the toy's 32x32) are upsampled to 64 first."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.features = alexnet_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def load_weights(self, alexnet: dict[str, torch.Tensor], linear: dict[str, torch.Tensor]) -> None:
        """``alexnet``: torchvision AlexNet keys (``features.N.*``; the classifier is ignored);
        ``linear``: the lpips package's ``linN.model.1.weight`` keys (``linN.weight`` also taken)."""
        feats = {k[len("features.") :]: v for k, v in alexnet.items() if k.startswith("features.")}
        lins: dict[str, torch.Tensor] = {}
        for i in range(len(LPIPS_CHANNELS)):
            w = linear.get(f"lin{i}.model.1.weight", linear.get(f"lin{i}.weight"))
            if w is None:
                keys = ", ".join(sorted(linear))[:200]
                raise CloraError(f"LPIPS linear weights lack lin{i} (keys: {keys})")
            lins[f"{i}.weight"] = w
        try:
            self.features.load_state_dict(feats)
            self.lins.load_state_dict(lins)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CloraError(f"LPIPS weights do not fit AlexNet: {first}") from None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([a, b])
        if min(x.shape[-2:]) < LPIPS_MIN_SIDE:
            # LPIPS was fitted on 64x64 patches, and AlexNet's pooling needs about 32 pixels a side
            scale = LPIPS_MIN_SIDE / min(x.shape[-2:])
            x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        x = x * 2 - 1
        x = (x - self.shift) / self.scale
        total = torch.zeros(len(a), device=a.device, dtype=a.dtype)
        tap = 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == LPIPS_TAPS[tap]:
                f = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fa, fb = f.chunk(2)
                total = total + self.lins[tap]((fa - fb).pow(2)).mean((1, 2, 3))
                tap += 1
                if tap == len(LPIPS_TAPS):
                    break
        return total


class ClipNet(nn.Module):
    """A CLIP vision tower with its projection, fed [0,1] images resized and normalised its way."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, vision: nn.Module, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.vision = vision
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of the two batches' image embeddings, per image."""
        return (self.embed(a) * self.embed(b)).sum(-1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(
            images, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
        )
        x = (x.clamp(0, 1) - self.mean) / self.std
        out = self.vision(pixel_values=x)
        emb = out.image_embeds if hasattr(out, "image_embeds") else out[0]
        return torch.nn.functional.normalize(emb, dim=-1)


#: OpenAI CLIP's pixel normalisation, used when the model folder has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_lpips(alexnet: Path, linear: Path) -> LpipsNet:
    net = LpipsNet()
    net.load_weights(load_state(alexnet), load_state(linear))
    return net


def load_clip(folder: Path) -> ClipNet:
    """The vision tower of a local transformers CLIP folder (a full CLIPModel or a vision-only one)."""
    import json

    from transformers import AutoConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    conf = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    vision_conf = getattr(conf, "vision_config", conf)
    if vision_conf is not conf:  # a full CLIPModel: its projection size lives on the outer config
        vision_conf.projection_dim = conf.projection_dim
    # the text tower's weights are skipped on purpose; keep transformers' load report and bar quiet
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        vision = CLIPVisionModelWithProjection.from_pretrained(
            str(folder), config=vision_conf, local_files_only=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    mean, std = CLIP_MEAN, CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        conf = json.loads(pre.read_text())
        mean, std = tuple(conf.get("image_mean", mean)), tuple(conf.get("image_std", std))
    size: int = vision.config.image_size  # type: ignore[assignment]
    return ClipNet(vision, size, mean, std)
