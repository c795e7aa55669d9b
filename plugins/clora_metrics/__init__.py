"""Built-in image metrics: PSNR and SSIM (no model weights needed).

A metric has a ``metric_id``, ``higher_is_better`` and is called as ``metric(images, reference)``
on ``[B,3,H,W]`` tensors in [0,1], returning one value per image ``[B]``.
"""

from __future__ import annotations

from typing import Any

from clora import hookimpl


class PSNR:
    """Peak signal-to-noise ratio in dB."""

    metric_id = "psnr"
    higher_is_better = True

    def __call__(self, images: Any, reference: Any) -> Any:
        from clora.metrics import psnr

        return psnr(images, reference)


class SSIM:
    """Structural similarity (Gaussian window 11, sigma 1.5), averaged over channels."""

    metric_id = "ssim"
    higher_is_better = True

    def __call__(self, images: Any, reference: Any) -> Any:
        from clora.metrics import ssim

        return ssim(images, reference)


@hookimpl
def register_metrics(register: Any) -> None:
    register(PSNR())
    register(SSIM())
