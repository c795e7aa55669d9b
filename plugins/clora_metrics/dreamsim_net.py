"""DreamSim (the ``dreamsim`` package, v0.2.1) rebuilt in plain torch, so it runs without torchvision, timm
or open_clip. It reads a dreamsim cache_dir: the folder ``dreamsim(pretrained=True, cache_dir=...)`` fills.

Files, per ViT-B branch (all take 224x224 images):
- ``dino_vitb16``: torch hub's ``checkpoints/dino_vitbase16_pretrain.pth``, the DINO ViT state dict (loaded
  strictly, as DINO's hubconf does). ``dino_vitb16_pretrain.pth`` beside it holds the DINO head, which
  dreamsim loads but does not use for the class-token embedding, so it is not read here.
- ``clip_vitbP`` / ``open_clip_vitbP``: ``<branch>_pretrain.pth.tar`` = ``{"state_dict": ...}``, the CLIP
  visual tower in the DINO ViT layout, with ``pos_drop`` as CLIP's pre-LayerNorm and ``proj`` its projection.
- the LoRA: ``<tag>lora/adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``), tag
  ``ensemble_`` or ``<type>_single_``, keys ``base_model.model.extractor_list.I.model.blocks.J.attn.qkv.*``.

Embedding (as dreamsim's ``PerceptualModel.embed``): each branch normalises the image (ImageNet mean/std
for DINO, OpenAI CLIP's for CLIP); DINO gives the class token output by the last block, before the final
norm (dreamsim hooks block 11, the last of ViT-B); CLIP gives the final-normed class token times ``proj``.
Branch vectors are concatenated, centred (their mean subtracted) and scaled to unit norm; the distance
is 1 - cosine similarity. dreamsim's own preprocess resizes to 224 with PIL (bicubic, uint8); here other
sizes are resized by torch (bicubic, antialias), which is close but not identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clora.errors import CloraError
from clora_metrics.nets import CLIP_MEAN, CLIP_STD, load_state

#: the dreamsim types supported, and the ViT branches each concatenates (in dreamsim's order)
DREAMSIM_BRANCHES: dict[str, tuple[str, ...]] = {
    "ensemble": ("dino_vitb16", "clip_vitb16", "open_clip_vitb16"),
    "dino_vitb16": ("dino_vitb16",),
    "open_clip_vitb32": ("open_clip_vitb32",),
    "clip_vitb32": ("clip_vitb32",),
}
DREAMSIM_TYPES = tuple(DREAMSIM_BRANCHES)
#: dreamsim's input side; every branch's position embedding is sized for it
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: torch hub's file for DINO ViT-B/16 (under the cache_dir, which dreamsim makes the hub dir)
DINO_HUB_FILE = Path("checkpoints") / "dino_vitbase16_pretrain.pth"
#: heads are not in the checkpoints: ViT-B (width 768) has 12; other widths (tiny test checkpoints) get
#: heads of 32 channels (width 64 -> 2 heads) unless ``heads=`` is given
VIT_B_WIDTH, VIT_B_HEADS, SMALL_HEAD_DIM = 768, 12, 32


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (the module LoRA adapts)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """A pre-norm transformer block (DINO's ``Block`` layout: norm1, attn, norm2, mlp.fc1/fc2)."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float, act: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(width, hidden))
        self.mlp.add_module("act", act)
        self.mlp.add_module("fc2", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """DINO's VisionTransformer (state-dict keys included); CLIP towers add ``pos_drop`` as pre-norm."""

    def __init__(
        self, width: int, depth: int, heads: int, patch: int, hidden: int, clip: bool, quick: bool
    ) -> None:
        super().__init__()
        eps = 1e-5 if clip else 1e-6
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, width, kernel_size=patch, stride=patch)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (IMAGE_SIZE // patch) ** 2 + 1, width))
        self.pos_drop = nn.LayerNorm(width, eps=eps) if clip else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(width, heads, hidden, eps, QuickGELU() if quick else nn.GELU()) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, final_norm: bool) -> torch.Tensor:
        """The class token after the last block (``final_norm``: and after the final LayerNorm)."""
        x = self.patch_embed["proj"](x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x)
        return (self.norm(x) if final_norm else x)[:, 0]


class Branch(nn.Module):
    """One dreamsim extractor: normalise, run the ViT, project (CLIP) or take the raw class token (DINO)."""

    mean: torch.Tensor
    std: torch.Tensor
    proj: torch.Tensor | None

    def __init__(
        self, model: ViT, mean: tuple[float, ...], std: tuple[float, ...], proj: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.register_buffer("proj", proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.proj is None:
            return self.model(x, final_norm=False)
        return self.model(x, final_norm=True) @ self.proj


class DreamSimNet(nn.Module):
    """``forward(a, b)``: DreamSim distances ``[B]`` of ``[B,3,H,W]`` images in [0,1] (0 when identical)."""

    def __init__(self, branches: list[Branch]) -> None:
        super().__init__()
        self.extractor_list = nn.ModuleList(branches)  # dreamsim's attribute name: the LoRA keys use it

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Centred, unit-norm embeddings ``[B,D]``; images not 224x224 are resized (bicubic, antialias)."""
        if tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            size = (IMAGE_SIZE, IMAGE_SIZE)
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
            images = images.clamp(0, 1)
        e = torch.cat([branch(images) for branch in self.extractor_list], dim=-1)
        e = e - e.mean(dim=-1, keepdim=True)
        return e / e.norm(dim=-1, keepdim=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(self.embed(a), self.embed(b), dim=-1)


def _branches(kind: str) -> tuple[str, ...]:
    if kind not in DREAMSIM_BRANCHES:
        raise CloraError(f"unknown dreamsim type '{kind}' (known: {', '.join(DREAMSIM_TYPES)})")
    return DREAMSIM_BRANCHES[kind]


def _lora_dir(folder: Path, kind: str) -> Path:
    return folder / ("ensemble_lora" if kind == "ensemble" else f"{kind}_single_lora")


def _adapter_file(lora: Path) -> Path:
    safe, bin_file = lora / "adapter_model.safetensors", lora / "adapter_model.bin"
    return bin_file if bin_file.is_file() and not safe.is_file() else safe


def _branch_file(folder: Path, name: str) -> Path:
    return folder / DINO_HUB_FILE if name.startswith("dino") else folder / f"{name}_pretrain.pth.tar"


def required_files(folder: Path, kind: str) -> list[Path]:
    """The files of a dreamsim cache_dir that :func:`load_dreamsim` reads for ``kind``: each branch's
    backbone, the adapter config and its weights (``.safetensors``, or ``.bin`` if only that is there)."""
    folder, lora = Path(folder), _lora_dir(Path(folder), kind)
    return [
        *(_branch_file(folder, name) for name in _branches(kind)),
        lora / "adapter_config.json",
        _adapter_file(lora),
    ]


def _load_branch(folder: Path, name: str, heads: int | None) -> Branch:
    path = _branch_file(folder, name)
    clip = not name.startswith("dino")
    state: dict[str, Any] = dict(load_state(path))
    if clip:
        inner = state.get("state_dict")
        if not isinstance(inner, dict) or "proj" not in inner:
            raise CloraError(f"{path} lacks the 'state_dict' with 'proj' that dreamsim's CLIP loader reads")
        state = dict(inner)
    proj = state.pop("proj") if clip else None
    try:
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise CloraError(f"{path} is not a ViT state dict in DINO's layout ({exc})") from None
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    heads = heads or (VIT_B_HEADS if width == VIT_B_WIDTH else max(1, width // SMALL_HEAD_DIM))
    if width % heads or patch <= 0 or IMAGE_SIZE % patch:
        raise CloraError(f"{path}: width {width} / {heads} heads or patch {patch} does not fit a 224 ViT")
    vit = ViT(width, depth, heads, patch, hidden, clip=clip, quick=name.startswith("clip"))
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CloraError(f"{path} does not fit a {depth}-block ViT of width {width}: {detail}") from None
    if proj is not None and (proj.dim() != 2 or proj.shape[0] != width):
        raise CloraError(f"{path}: 'proj' has shape {tuple(proj.shape)}, expected ({width}, N)")
    mean, std = (CLIP_MEAN, CLIP_STD) if clip else (IMAGENET_MEAN, IMAGENET_STD)
    return Branch(vit, mean, std, proj)


def load_dreamsim(folder: Path, kind: str, heads: int | None = None) -> DreamSimNet:
    """DreamSim of type ``kind`` from a dreamsim cache_dir, LoRA merged, in eval mode. Width, depth, MLP
    size and patch size come from the checkpoints; ``heads`` as :data:`VIT_B_HEADS` says unless given."""
    folder = Path(folder)
    missing = [str(p) for p in required_files(folder, kind) if not p.is_file()]
    if missing:
        raise CloraError(f"dreamsim '{kind}' needs {', '.join(missing)}")
    net = DreamSimNet([_load_branch(folder, name, heads) for name in _branches(kind)])
    return _merge_lora(net, _lora_dir(folder, kind)).eval()


def _merge_lora(net: DreamSimNet, lora: Path) -> DreamSimNet:
    """Apply the adapter as dreamsim's ``PeftModel.from_pretrained`` does (its saved config), then merge."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    try:
        config = LoraConfig.from_pretrained(str(lora))
        config.inference_mode = True
        model = get_peft_model(net, config)
    except (ValueError, TypeError, OSError) as exc:
        raise CloraError(f"{lora}: unusable LoRA config: {str(exc).strip().splitlines()[0]}") from None
    weights = load_state(_adapter_file(lora))
    try:
        result: Any = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:
        raise CloraError(f"{lora}: LoRA shapes do not fit: {' '.join(str(exc).split())[:300]}") from None
    unloaded = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or unloaded:
        bad = (result.unexpected_keys or unloaded)[0]
        raise CloraError(f"{lora}: LoRA keys do not match the model (e.g. {bad})")
    merged = model.merge_and_unload()
    assert isinstance(merged, DreamSimNet)
    return merged
