"""Image files in and out: PNG reading/writing (atomic) and contact sheets."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clora.errors import CloraError
from clora.fileio import atomic_path


def image_error(path: str | os.PathLike[str], e: Exception) -> CloraError:
    """The one-line error for an image PIL could not open (``e``: one of ``IMAGE_ERRORS``)."""
    if isinstance(e, Image.DecompressionBombError):
        size = str(e).split(",")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        return CloraError(f"image {path} is too large to read safely ({size}); resize it first")
    return CloraError(f"cannot read image {path} ({e.__class__.__name__}); use PNG or JPEG")


#: what opening or decoding a bad image raises (a decompression bomb is not an OSError)
IMAGE_ERRORS = (UnidentifiedImageError, OSError, Image.DecompressionBombError)


def read_image(
    path: str | os.PathLike[str],
    size: tuple[int, int] | Callable[[int, int], tuple[int, int]],
    crop: bool = False,
) -> torch.Tensor:
    """One image as ``[3,H,W]`` in [0,1], resized to ``size`` (H, W), or to ``size(height, width)`` of the
    image as read (``crop``: first cut to that aspect around the centre, so nothing is stretched); a
    one-line error if unreadable."""
    p = Path(path)
    if not p.is_file():
        raise CloraError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
            if callable(size):
                size = size(rgb.height, rgb.width)
            if crop:
                rgb = _centre_crop(rgb, size[1] / size[0])
            rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    except IMAGE_ERRORS as e:
        raise image_error(p, e) from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _centre_crop(im: Image.Image, ratio: float) -> Image.Image:
    """The largest centred part of ``im`` with width / height ``ratio``."""
    w, h = im.size
    if w / h > ratio:
        cw = max(1, round(h * ratio))
        return im.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
    ch = max(1, round(w / ratio))
    return im.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    return im


def write_png(
    image: torch.Tensor,
    path: str | os.PathLike[str],
    scale: int = 1,
    aspect_of: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``[3,H,W]`` in [0,1] as a PNG, atomically; ``aspect_of``: an image file whose aspect the
    output takes (resized to it at the same number of pixels, when the two differ)."""
    im = to_pil(image, scale)
    if aspect_of is not None:
        with Image.open(aspect_of) as src:
            w0, h0 = src.size
        if w0 * im.height != h0 * im.width:
            area = im.width * im.height
            h = max(1, round((area * h0 / w0) ** 0.5))
            im = im.resize((max(1, round(h * w0 / h0)), h), Image.Resampling.BICUBIC)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def contact_sheet(
    rows: Sequence[Sequence[torch.Tensor]], path: str | os.PathLike[str], scale: int = 4
) -> None:
    """A grid PNG: one row per sequence of ``[3,H,W]`` images (e.g. source | truth | output)."""
    if not rows:
        raise CloraError("nothing to draw in the contact sheet")
    h = max(int(img.shape[-2]) for row in rows for img in row)
    w = max(int(img.shape[-1]) for row in rows for img in row)
    pad = 2
    cols = max(len(r) for r in rows)
    sheet = Image.new(
        "RGB", (cols * (w * scale + pad) + pad, len(rows) * (h * scale + pad) + pad), (255, 255, 255)
    )
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            sheet.paste(to_pil(img, scale), (pad + j * (w * scale + pad), pad + i * (h * scale + pad)))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
