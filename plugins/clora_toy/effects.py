"""A library of image effects with exact ground truth, each with the prompt its teacher is trained on.

Every effect is a pure torch function on ``[B, 3, H, W]`` images in ``[0, 1]``. Twenty hand-picked
effects come first; parametric families (hue angles, tint colours, duotones, ...) follow, interleaved,
so ``effects_library(n)`` is a varied set for any ``n`` up to :func:`library_size`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial

import torch
import torch.nn.functional as F

from clora.errors import CloraError, UnknownEffectError
from clora_toy.data import luma


@dataclass(frozen=True)
class Effect:
    """A named effect: exact ground truth plus the teacher's prompt."""

    name: str
    prompt: str
    fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    family: str = "core"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The true result ``[B,3,H,W]`` in ``[0,1]``."""
        return self.fn(images).clamp(0, 1)


# -- building blocks -------------------------------------------------------------------------


def _matrix(m: list[list[float]], x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", x.new_tensor(m), x)


def _hue_matrix(degrees: float) -> list[list[float]]:
    # the CSS/SVG feColorMatrix hue-rotate matrix: rotation about the grey axis in luma space
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [
        [0.213 + c * 0.787 - s * 0.213, 0.715 - c * 0.715 - s * 0.715, 0.072 - c * 0.072 + s * 0.928],
        [0.213 - c * 0.213 + s * 0.143, 0.715 + c * 0.285 + s * 0.140, 0.072 - c * 0.072 - s * 0.283],
        [0.213 - c * 0.213 - s * 0.787, 0.715 - c * 0.715 + s * 0.715, 0.072 + c * 0.928 + s * 0.072],
    ]


def _conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    k = kernel.to(x)
    pad = k.shape[-1] // 2
    weight = k.expand(3, 1, *k.shape)
    return F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), weight, groups=3)


def _gaussian(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _box(radius: int) -> torch.Tensor:
    n = 2 * radius + 1
    return torch.full((n, n), 1.0 / (n * n))


def _radius2(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return (xx**2 + yy**2).to(x)


def sepia(x: torch.Tensor) -> torch.Tensor:
    return _matrix([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], x)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 1 - x


def pixelate(x: torch.Tensor, block: int) -> torch.Tensor:
    return F.interpolate(F.avg_pool2d(x, block), scale_factor=block, mode="nearest")


def posterize(x: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round(x * (levels - 1)) / (levels - 1)


def gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    return _conv(x, _gaussian(1.2, 2))


def box_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    return _conv(x, _box(radius))


def sharpen(x: torch.Tensor) -> torch.Tensor:
    return x + 1.5 * (x - _conv(x, _gaussian(1.0, 1)))


def emboss(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]) * 0.5
    return (0.5 + _conv(luma(x).expand_as(x), k)).expand_as(x)


def edges(x: torch.Tensor) -> torch.Tensor:
    gray = luma(x).expand_as(x)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx, gy = _conv(gray, kx), _conv(gray, kx.T)
    return (gx**2 + gy**2).sqrt() * 0.5


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x > threshold, 1 - x, x)


def vignette(x: torch.Tensor) -> torch.Tensor:
    return x * (1 - 0.45 * _radius2(x)).clamp(0, 1)


def permute_channels(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    return x[:, list(order)]


def hue_rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    return _matrix(_hue_matrix(degrees), x)


def scale_channels(x: torch.Tensor, gains: tuple[float, float, float]) -> torch.Tensor:
    return x * x.new_tensor(gains).view(1, 3, 1, 1)


def threshold(x: torch.Tensor) -> torch.Tensor:
    return (luma(x) > 0.5).to(x).expand_as(x)


def vflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-2)


def chromatic(x: torch.Tensor) -> torch.Tensor:
    r = F.pad(x[:, :1], (2, 0, 0, 0), mode="replicate")[..., :-2]
    b = F.pad(x[:, 2:], (0, 2, 0, 0), mode="replicate")[..., 2:]
    return torch.cat([r, x[:, 1:2], b], dim=1)


def scanlines(x: torch.Tensor) -> torch.Tensor:
    rows = torch.ones(x.shape[-2], 1, dtype=x.dtype, device=x.device)
    rows[1::2] = 0.45
    return x * rows


def saturate(x: torch.Tensor, amount: float) -> torch.Tensor:
    y = luma(x)
    return y + (x - y) * amount


def gamma(x: torch.Tensor, g: float) -> torch.Tensor:
    return x.clamp(0, 1) ** g


def wash(x: torch.Tensor, colour: tuple[float, float, float]) -> torch.Tensor:
    return 0.6 * x + 0.4 * x.new_tensor(colour).view(1, 3, 1, 1)


def duotone(
    x: torch.Tensor, dark: tuple[float, float, float], light: tuple[float, float, float]
) -> torch.Tensor:
    t = luma(x)
    return x.new_tensor(dark).view(1, 3, 1, 1) * (1 - t) + x.new_tensor(light).view(1, 3, 1, 1) * t


# -- the library -----------------------------------------------------------------------------

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.0),
    "gold": (0.85, 0.7, 0.1),
    "yellow": (1.0, 0.95, 0.2),
    "lime": (0.6, 0.95, 0.1),
    "green": (0.1, 0.7, 0.2),
    "teal": (0.0, 0.55, 0.55),
    "cyan": (0.2, 0.95, 0.95),
    "sky": (0.45, 0.7, 1.0),
    "blue": (0.1, 0.2, 0.95),
    "navy": (0.05, 0.05, 0.4),
    "violet": (0.55, 0.25, 0.95),
    "purple": (0.45, 0.05, 0.5),
    "magenta": (0.95, 0.1, 0.8),
    "pink": (1.0, 0.6, 0.75),
    "maroon": (0.45, 0.05, 0.1),
    "brown": (0.5, 0.3, 0.1),
    "olive": (0.45, 0.45, 0.05),
    "cream": (1.0, 0.95, 0.8),
    "charcoal": (0.15, 0.15, 0.18),
}

_CHANNEL_NAMES = "rgb"


def _core() -> list[Effect]:
    return [
        Effect("sepia", "apply a sepia tone", sepia),
        Effect("invert", "invert the colors", invert),
        Effect("pixelate", "pixelate the image into big square blocks", partial(pixelate, block=4)),
        Effect("posterize", "posterize the image to a few flat color levels", partial(posterize, levels=3)),
        Effect("blur", "blur the image softly", gaussian_blur),
        Effect("sharpen", "sharpen the details", sharpen),
        Effect("emboss", "emboss the image like a grey relief", emboss),
        Effect("edges", "draw the edges glowing on black", edges),
        Effect("solarize", "solarize the bright tones", partial(solarize, threshold=0.5)),
        Effect("vignette", "darken the corners with a vignette", vignette),
        Effect("channel-swap", "swap the red and blue channels", partial(permute_channels, order=(2, 1, 0))),
        Effect("hue-120", "rotate the hue by 120 degrees", partial(hue_rotate, degrees=120)),
        Effect("warm", "give the image a warm tint", partial(scale_channels, gains=(1.15, 1.0, 0.75))),
        Effect("cool", "give the image a cool tint", partial(scale_channels, gains=(0.75, 0.95, 1.2))),
        Effect("threshold", "make it pure black and white", threshold),
        Effect("vflip", "turn the image upside down", vflip),
        Effect("chromatic", "add chromatic aberration", chromatic),
        Effect("scanlines", "add dark scanlines like an old monitor", scanlines),
        Effect("saturate", "boost the color saturation", partial(saturate, amount=1.8)),
        Effect(
            "duotone",
            "make a navy and cream duotone",
            partial(duotone, dark=PALETTE["navy"], light=PALETTE["cream"]),
        ),
    ]


def _families() -> list[list[Effect]]:
    hue = [
        Effect(f"hue-{d:03d}", f"rotate the hue by {d} degrees", partial(hue_rotate, degrees=d), "hue")
        for d in range(15, 360, 15)
        if d != 120
    ]
    tint = [
        Effect(f"tint-{c}", f"wash the image with {c}", partial(wash, colour=rgb), "tint")
        for c, rgb in PALETTE.items()
    ]
    names = list(PALETTE)
    # spread the ordered colour pairs so any prefix of this family uses many different colours
    pairs = [(names[i], names[(i + k) % len(names)]) for k in range(1, len(names)) for i in range(len(names))]
    duo = [
        Effect(
            f"duotone-{a}-{b}",
            f"make a {a} and {b} duotone",
            partial(duotone, dark=PALETTE[a], light=PALETTE[b]),
            "duotone",
        )
        for a, b in pairs
        if (a, b) != ("navy", "cream")
    ]
    chans = [
        Effect(
            "channels-" + "".join(_CHANNEL_NAMES[i] for i in p),
            "reorder the color channels to " + " ".join(_CHANNEL_NAMES[i] for i in p),
            partial(permute_channels, order=p),
            "channels",
        )
        for p in itertools.permutations(range(3))
        if p not in ((0, 1, 2), (2, 1, 0))
    ]
    pix = [
        Effect(f"pixelate-{n}", f"pixelate into {n} pixel blocks", partial(pixelate, block=n), "pixelate")
        for n in (2, 8)
    ]
    post = [
        Effect(f"posterize-{n}", f"posterize to {n} levels", partial(posterize, levels=n), "posterize")
        for n in (2, 4, 6)
    ]
    sol = [
        Effect(
            f"solarize-{int(t * 100)}",
            f"solarize above {int(t * 100)} percent",
            partial(solarize, threshold=t),
            "solarize",
        )
        for t in (0.25, 0.75)
    ]
    gam = [
        Effect(f"gamma-{int(g * 10):02d}", f"apply gamma {g}", partial(gamma, g=g), "gamma")
        for g in (0.4, 2.5)
    ]
    blur = [
        Effect(f"blur-{r}", f"box blur with radius {r}", partial(box_blur, radius=r), "blur") for r in (3, 5)
    ]
    sat = [
        Effect(
            f"saturation-{int(a * 10):02d}",
            f"set the saturation to {a} times",
            partial(saturate, amount=a),
            "saturation",
        )
        for a in (0.4, 2.6)
    ]
    return [hue, tint, duo, chans, pix, post, sol, gam, blur, sat]


@cache
def _library() -> tuple[Effect, ...]:
    ordered = _core()
    families = _families()
    for round_ in itertools.zip_longest(*families):
        ordered.extend(e for e in round_ if e is not None)
    names = [e.name for e in ordered]
    if len(set(names)) != len(names):
        raise RuntimeError("duplicate effect names in the toy library")
    return tuple(ordered)


def library_size() -> int:
    """How many distinct effects the library holds."""
    return len(_library())


def effects_library(n: int | None = None) -> list[Effect]:
    """The first ``n`` effects (all with ``None``), in a fixed order: hand-picked first, then families."""
    lib = _library()
    if n is None:
        return list(lib)
    if n < 0 or n > len(lib):
        raise CloraError(f"the toy library has {len(lib)} effects, cannot take {n}; pick n <= {len(lib)}")
    return list(lib[:n])


def list_effects() -> list[Effect]:
    """Every effect in the library."""
    return effects_library()


def effect_names() -> list[str]:
    """Names of every effect, in library order."""
    return [e.name for e in _library()]


def get_effect(name: str) -> Effect:
    """One effect by name, e.g. ``sepia`` or ``hue-045``."""
    for e in _library():
        if e.name == name:
            return e
    raise UnknownEffectError(
        f"no toy effect '{name}'; see `clora toy effects` for the {library_size()} names"
    )


def find_effect(name: str) -> Effect | None:
    """The library effect called ``name``, or None (an effect a user registered under another name)."""
    return next((e for e in _library() if e.name == name), None)
