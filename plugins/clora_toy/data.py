"""Procedural source images and the general edits that train the toy base editor."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clora.errors import CloraError

#: seeds at or above this are never used for training, so images made from them are held out
HELD_OUT_SEED = 1_000_000_007

LUMA = (0.299, 0.587, 0.114)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return rows, cols


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=g)


def _colour(g: torch.Generator) -> torch.Tensor:
    c = _rand(g, 3)
    if _rand(g, 1).item() < 0.5:
        # push half the colours towards full saturation so hue-type effects have something to act on
        c = (c - c.min()) / (c.max() - c.min() + 1e-6)
    return c.view(3, 1, 1)


def _background(g: torch.Generator, size: int, depth: int = 0) -> torch.Tensor:
    yy, xx = _grid(size)
    kind = int(_rand(g, 1).item() * (6 if depth == 0 else 5))
    a, b = _colour(g), _colour(g)
    angle = _rand(g, 1).item() * 2 * math.pi
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 0:
        return a.expand(3, size, size).clone()
    if kind == 1:
        t = ((u + 1.5) / 3).clamp(0, 1)
        return a * (1 - t) + b * t
    if kind == 2:
        freq = 1 + _rand(g, 1).item() * 4
        t = (torch.sin(u * freq * math.pi) > 0).float()
        return a * (1 - t) + b * t
    if kind == 3:
        cells = 2 + int(_rand(g, 1).item() * 5)
        t = ((torch.floor((xx + 1) * cells / 2) + torch.floor((yy + 1) * cells / 2)) % 2).float()
        return a * (1 - t) + b * t
    if kind == 4:
        low = 2 + int(_rand(g, 1).item() * 6)
        noise = _rand(g, 1, 3, low, low)
        return F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[0]
    mix = _rand(g, 1).item()
    return _background(g, size, depth + 1) * mix + _background(g, size, depth + 1) * (1 - mix)


def _shape_mask(g: torch.Generator, size: int) -> torch.Tensor:
    yy, xx = _grid(size)
    cx, cy = (_rand(g, 2) * 1.6 - 0.8).tolist()
    r = 0.15 + _rand(g, 1).item() * 0.45
    kind = int(_rand(g, 1).item() * 4)
    if kind == 0:
        return ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).float()
    if kind == 1:
        rx, ry = r, 0.15 + _rand(g, 1).item() * 0.45
        return (((xx - cx).abs() < rx) & ((yy - cy).abs() < ry)).float()
    if kind == 2:
        d = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        return ((d < r) & (d > r * 0.55)).float()
    # triangle: intersection of three half-planes
    inside = torch.ones_like(xx, dtype=torch.bool)
    turn = _rand(g, 1).item() * 2 * math.pi
    for k in range(3):
        a = turn + k * 2 * math.pi / 3
        inside &= (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a) < r * 0.5
    return inside.float()


def source_image(g: torch.Generator, size: int) -> torch.Tensor:
    """One procedural image ``[3, size, size]`` in ``[0, 1]``: a background and a few shapes."""
    img = _background(g, size)
    for _ in range(int(_rand(g, 1).item() * 4)):
        m = _shape_mask(g, size)
        img = img * (1 - m) + _colour(g) * m
    return img.clamp(0, 1)


def make_sources(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` procedural source images ``[n, 3, size, size]``, a pure function of ``(n, size, seed)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([source_image(g, size) for _ in range(n)])


def held_out_sources(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Source images no trainer ever sees (evaluation sets); ``seed`` picks among disjoint sets."""
    return make_sources(n, size, HELD_OUT_SEED + seed)


def name_seed(name: str, seed: int) -> int:
    """A training seed mixed with a name (below :data:`HELD_OUT_SEED`)."""
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % HELD_OUT_SEED


def luma(images: torch.Tensor) -> torch.Tensor:
    """Luminance ``[B, 1, H, W]``."""
    w = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * w).sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class Edit:
    """A general edit the base model is trained on: exact function plus its instruction."""

    name: str
    prompt: str
    fn: Callable[[torch.Tensor], torch.Tensor]

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Edited images ``[B,3,H,W]`` in ``[0,1]``."""
        return self.fn(images).clamp(0, 1)


GENERAL_EDITS: list[Edit] = [
    Edit("identity", "keep the image unchanged", lambda x: x),
    Edit("flip", "flip the image horizontally", lambda x: x.flip(-1)),
    Edit("brighten", "make the image brighter", lambda x: x + 0.25),
    Edit("darken", "make the image darker", lambda x: x * 0.6),
    Edit("grayscale", "convert the image to grayscale", lambda x: luma(x).expand_as(x)),
    Edit("contrast", "increase the contrast", lambda x: (x - 0.5) * 1.6 + 0.5),
]


def general_edits() -> list[Edit]:
    """The general (base) edit instructions, the distiller's general stream."""
    return list(GENERAL_EDITS)


def get_general_edit(name: str) -> Edit:
    """One general edit by name."""
    for e in GENERAL_EDITS:
        if e.name == name:
            return e
    raise CloraError(f"no general edit '{name}'; choose one of {', '.join(e.name for e in GENERAL_EDITS)}")


def general_batch(
    n: int,
    size: int,
    seed: int,
    edits: list[Edit] | None = None,
    weights: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` training triplets (source, edited, instruction); edits drawn uniformly, or in proportion
    to ``weights`` (edit name -> weight, 1 for edits not named)."""
    edits = edits or GENERAL_EDITS
    sources = make_sources(n, size, seed)
    g = torch.Generator().manual_seed(seed ^ 0x5EED)
    if weights:
        unknown = sorted(set(weights) - {e.name for e in edits})
        if unknown:
            raise CloraError(f"edit_weights names unknown general edits {unknown}")
        w = torch.tensor([float(weights.get(e.name, 1.0)) for e in edits])
        picks = torch.multinomial(w, n, replacement=True, generator=g).tolist()
    else:
        picks = torch.randint(len(edits), (n,), generator=g).tolist()
    targets = torch.stack([edits[k].apply(sources[i : i + 1])[0] for i, k in enumerate(picks)])
    return sources, targets, [edits[k].prompt for k in picks]
