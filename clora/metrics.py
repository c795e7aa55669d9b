"""Image metrics on ``[B,3,H,W]`` tensors in [0,1]; each returns one value per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB (peak 1.0); identical images give 100 dB (MSE floored at 1e-10)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def means_by(values: torch.Tensor, keys: list[str]) -> dict[str, float]:
    """The mean of per-image ``values`` ``[B]`` over the images of each key (e.g. each instruction), in
    the order the keys first occur."""
    rows = {k: [i for i, q in enumerate(keys) if q == k] for k in keys}
    return {k: float(values[idx].float().mean()) for k, idx in rows.items()}


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(images: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004 constants, window clipped to the image size)."""
    x, y = images.float(), reference.float()
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(size, sigma).to(x.device).expand(c, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def nearest(outputs: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each output ``[B,...]``, the index of the closest of ``references [K,B,...]`` (per image MSE)."""
    d = (references.float() - outputs.float().unsqueeze(0)).pow(2).flatten(2).mean(2)  # [K, B]
    return d.argmin(0)


# -- distribution metrics: for effects whose true result is a distribution (grain, confetti, ...) --------

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian(images: torch.Tensor) -> torch.Tensor:
    """The 4-neighbour Laplacian of each channel (edges replicated): the image's finest detail."""
    x = images.float()
    c = x.shape[1]
    k = _LAPLACIAN.to(x.device).expand(c, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared Laplacian per image (texture, grain): an over-smoothed output has less than its truth."""
    return laplacian(images).pow(2).flatten(1).mean(1)


def small_features(images: torch.Tensor) -> torch.Tensor:
    """``[B, d]`` features for a kernel distance on small images: colours and layout (4x4 average pool)
    and where the fine detail is (4x4 pool of the absolute Laplacian)."""
    x = images.float()
    coarse = F.adaptive_avg_pool2d(x, 4).flatten(1)
    detail = F.adaptive_avg_pool2d(laplacian(x).abs(), 4).flatten(1)
    return torch.cat([coarse, detail], 1)


def kernel_distance(outputs: torch.Tensor, draws: torch.Tensor, sources: torch.Tensor | None = None) -> float:
    """MMD between ``outputs [B, C, H, W]`` and true ``draws [K, B, C, H, W]`` (draw k of image i is for
    the source of output i): the unbiased squared MMD (torchmetrics' estimator, which takes sets of one
    size, averaged over the K draws) with a Gaussian kernel on :func:`small_features` of the edit (minus
    ``sources`` when given, so the sources' own variety does not drown the effect's).

    The kernel's bandwidth is the size of the effect: the mean squared norm of the true edits' features,
    fixed by the truth alone so that rows are scored on one scale. (The median distance between the
    draws, the usual heuristic, collapses for an effect like film grain, whose pooled features barely
    vary between draws: every output then sits outside the kernel, and a set of outputs that disagree
    with one another scores better than one that is uniformly a little off.) About 0 when outputs and
    draws come from one distribution (it can dip just below 0); doing nothing at all scores about
    ``1 + k_tt - 2/e`` (about 1.2 for an effect whose draws agree); up to 2 when far apart."""
    from torchmetrics.image.kid import maximum_mean_discrepancy

    base = 0 if sources is None else sources.float()
    true = torch.stack([small_features(d.float() - base) for d in draws]).double()  # [K, B, d]
    mine = small_features(outputs.float() - base).double()
    size = true.flatten(0, 1).pow(2).sum(1).mean()
    width = size if float(size) > 0 else torch.tensor(1.0, dtype=true.dtype)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / width)

    return sum(
        float(maximum_mean_discrepancy(kernel(t, t), kernel(t, mine), kernel(mine, mine))) for t in true
    ) / len(true)


def diversity(draws: torch.Tensor) -> torch.Tensor:
    """Per image of ``draws [K, B, C, H, W]`` (K seeds for one source each), the mean per-pixel standard
    deviation across the K: 0 when every seed gives the same image."""
    return draws.float().std(0).flatten(1).mean(1)


def distribution_scores(
    outputs: torch.Tensor, seeds: torch.Tensor, truth: torch.Tensor, sources: torch.Tensor | None = None
) -> dict[str, float]:
    """A stochastic effect's ``outputs [B, C, H, W]`` (one seed) and ``seeds [K, M, C, H, W]`` (the
    first M sources at K seeds) against its true ``draws [D, B, C, H, W]``: high-frequency energy and
    diversity across seeds as ratios to the truth's (below 1: smoother or less varied than the truth),
    and :func:`kernel_distance` (edits from ``sources`` when given)."""
    t_hf = float(high_frequency_energy(truth.flatten(0, 1)).mean())
    t_div = float(diversity(truth[:, : seeds.shape[1]]).mean())
    return {
        "hf_ratio": round(float(high_frequency_energy(outputs).mean()) / max(t_hf, 1e-12), 4),
        "diversity_ratio": round(float(diversity(seeds).mean()) / max(t_div, 1e-12), 4),
        "mmd": round(kernel_distance(outputs, truth, sources), 6),
    }
