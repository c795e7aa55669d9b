"""A library of image effects with known ground truth, each with the prompt its teacher is trained on.

Most effects are a pure torch function on ``[B, 3, H, W]`` images in ``[0, 1]`` with one exact result.
Twenty hand-picked effects come first; parametric families (hue angles, tint colours, duotones, ...)
follow, interleaved, so ``effects_library(n)`` is a varied set for any ``n`` up to the deterministic
part's size. A few *stochastic* effects (film grain, confetti, a tint from a palette, a motion streak in
a random direction) come last: their true result is a distribution, drawn per image with a
``torch.Generator`` (:meth:`Effect.sample`, :meth:`Effect.draws`).
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
from clora_toy.data import luma, name_seed


class StochasticEffectError(CloraError):
    """An exact result was asked of an effect whose true result is a distribution."""


@dataclass(frozen=True)
class Effect:
    """A named effect and its teacher's prompt, with its ground truth: one exact result (``fn(images)``),
    or, for a ``stochastic`` effect, a distribution drawn from by ``fn(images, generator)``."""

    name: str
    prompt: str
    #: ``fn(images)``, or ``fn(images, generator)`` for a stochastic effect: ``[B,3,H,W]`` to the same
    fn: Callable[..., torch.Tensor] = field(repr=False)
    family: str = "core"
    #: the true result is a distribution (each call of :meth:`sample` draws anew), not one image
    stochastic: bool = False

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The exact result ``[B,3,H,W]`` in ``[0,1]``; a stochastic effect has none and raises
        :class:`StochasticEffectError` (draw with :meth:`sample` or :meth:`draws` instead)."""
        if self.stochastic:
            raise StochasticEffectError(
                f"toy effect '{self.name}' is stochastic: its result is a distribution, not one image; "
                "draw from it with Effect.sample(images, generator) or Effect.draws(images, n, seed)"
            )
        return self.fn(images).clamp(0, 1)

    def sample(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw of the true result ``[B,3,H,W]`` in ``[0,1]``, independent per image, from the CPU
        ``generator`` (any device's images); a deterministic effect's exact result, the generator unused."""
        if not self.stochastic:
            return self.apply(images)
        return self.fn(images, generator).clamp(0, 1)

    def draws(self, images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        """``n`` independent draws ``[n,B,3,H,W]`` of the true result, a pure function of the effect's name,
        the images, ``n`` and ``seed`` (the first ``k`` of ``n`` draws are the ``k`` draws of that seed)."""
        g = torch.Generator().manual_seed(name_seed(f"truth:{self.name}", seed))
        return torch.stack([self.sample(images, g) for _ in range(n)])


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


# -- stochastic effects: a fresh draw per image from a CPU generator ------------------------------


def film_grain(x: torch.Tensor, generator: torch.Generator, strength: float, cell: int) -> torch.Tensor:
    """Monochrome (luma) Gaussian grain of std ``strength``: one value per ``cell`` x ``cell`` pixels,
    added alike to R, G and B, so the grain changes brightness, never hue."""
    b, _, h, w = x.shape
    noise = torch.randn(b, 1, -(-h // cell), -(-w // cell), generator=generator)
    noise = noise.repeat_interleave(cell, -2).repeat_interleave(cell, -1)[..., :h, :w]
    return x + strength * noise.to(x)


def confetti(
    x: torch.Tensor,
    generator: torch.Generator,
    colours: tuple[tuple[float, float, float], ...],
    count: tuple[int, int],
    side: int,
    grid: int = 1,
) -> torch.Tensor:
    """Between ``count[0]`` and ``count[1]`` (inclusive, uniform) squares of ``side`` pixels per image,
    each at a uniform place inside the image on a ``grid`` of that many pixels and in a uniform colour of
    ``colours``; later squares cover earlier ones."""
    b, _, h, w = x.shape
    most = count[1]
    n = torch.randint(count[0], most + 1, (b, 1), generator=generator)
    top = torch.randint((h - side) // grid + 1, (b, most), generator=generator) * grid
    left = torch.randint((w - side) // grid + 1, (b, most), generator=generator) * grid
    pick = torch.randint(len(colours), (b, most), generator=generator)
    rows = torch.arange(h).view(1, 1, h, 1)
    cols = torch.arange(w).view(1, 1, 1, w)
    t, l_ = top[..., None, None], left[..., None, None]
    inside = (rows >= t) & (rows < t + side) & (cols >= l_) & (cols < l_ + side)
    inside &= (torch.arange(most).view(1, most) < n)[..., None, None]  # [B, most, H, W]
    palette = x.new_tensor(colours)[pick.to(x.device)]  # [B, most, 3]
    out = x
    for k in range(most):
        out = torch.where(inside[:, k : k + 1].to(x.device), palette[:, k, :, None, None], out)
    return out


def palette_wash(
    x: torch.Tensor,
    generator: torch.Generator,
    colours: tuple[tuple[float, float, float], ...],
    weights: tuple[float, ...],
) -> torch.Tensor:
    """:func:`wash` with one colour per image, drawn from ``colours`` with probabilities ``weights``."""
    pick = torch.multinomial(torch.tensor(weights), len(x), replacement=True, generator=generator)
    colour = x.new_tensor(colours)[pick.to(x.device)].view(len(x), 3, 1, 1)
    return 0.6 * x + 0.4 * colour


def _line_kernels(length: int) -> torch.Tensor:
    """``[4, L, L]`` box kernels along a line of ``length`` pixels: horizontal, vertical, and the two
    diagonals."""
    line = torch.zeros(length, length)
    line[length // 2] = 1.0 / length
    diagonal = torch.eye(length) / length
    return torch.stack([line, line.T, diagonal, diagonal.flip(-1)])


def motion_streak(x: torch.Tensor, generator: torch.Generator, length: int) -> torch.Tensor:
    """A motion blur along a line of ``length`` pixels in one of four directions (horizontal, vertical,
    either diagonal), uniform per image."""
    direction = torch.randint(4, (len(x),), generator=generator).to(x.device)
    blurred = torch.stack([_conv(x, k) for k in _line_kernels(length)])  # [4, B, 3, H, W]
    return blurred[direction, torch.arange(len(x), device=x.device)]


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


#: the bright colours of :func:`confetti`
CONFETTI_COLOURS = tuple(PALETTE[c] for c in ("red", "yellow", "cyan", "magenta", "lime"))

#: the palette of ``palette-tint`` and each colour's probability: unequal, so a model that regresses to
#: the mean (a muddy blend of the three) and one that always picks the likeliest colour are both wrong
TINT_PALETTE = {"orange": 0.6, "teal": 0.3, "violet": 0.1}


def _stochastic() -> list[Effect]:
    return [
        # grain and confetti come in 2x2-pixel cells on the toy's 2x2 patch grid, what its teacher can
        # draw: measured on the full toy, a teacher of 1-pixel grain drew a third of the grain's spread
        # across seeds and a sixth of its fine detail, and one of 3x3 squares at any pixel drew many
        # scattered 1-2 pixel specks; on the patch grid both match the truth's spread and detail
        Effect(
            "grain",
            "add film grain",
            partial(film_grain, strength=0.08, cell=2),
            "grain",
            stochastic=True,
        ),
        Effect(
            "confetti",
            "sprinkle bright confetti squares",
            partial(confetti, colours=CONFETTI_COLOURS, count=(4, 8), side=2, grid=2),
            "confetti",
            stochastic=True,
        ),
        Effect(
            "palette-tint",
            "wash the image with a color picked at random",
            partial(
                palette_wash,
                colours=tuple(PALETTE[c] for c in TINT_PALETTE),
                weights=tuple(TINT_PALETTE.values()),
            ),
            "palette",
            stochastic=True,
        ),
        Effect(
            "streak",
            "smear the image with a motion streak",
            partial(motion_streak, length=7),
            "streak",
            stochastic=True,
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
    # last, so every prefix of the deterministic effects keeps its order (benchmarks take prefixes)
    ordered.extend(_stochastic())
    names = [e.name for e in ordered]
    if len(set(names)) != len(names):
        raise RuntimeError("duplicate effect names in the toy library")
    return tuple(ordered)


def library_size() -> int:
    """How many distinct effects the library holds."""
    return len(_library())


def effects_library(n: int | None = None) -> list[Effect]:
    """The first ``n`` effects (all with ``None``), in a fixed order: hand-picked first, then families,
    then the stochastic effects (so a prefix of the deterministic ones never changes)."""
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
