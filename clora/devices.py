"""``--device`` and ``--dtype``: checked up front, so a bad request is one line, not a traceback mid-run."""

from __future__ import annotations

import torch

from clora.errors import CloraError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch device that this machine has, or a one-line error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CloraError(f"unknown --device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
            raise CloraError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}, {why}); "
                "use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CloraError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CloraError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in {"cpu", "cuda", "mps"}:
        raise CloraError(f"unsupported --device '{device}'; use cpu, cuda or cuda:N")
    return dev


def dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes in ``dtype`` (bfloat16 needs an Ampere or newer GPU under CUDA)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return bool(torch.cuda.is_bf16_supported())
    return not (device.type == "mps" and dtype == torch.bfloat16)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype named ``name`` (float32, bfloat16, float16), checked against ``device``."""
    if name not in DTYPES:
        raise CloraError(f"unknown --dtype '{name}'; use {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if not dtype_supported(device, dtype):
        raise CloraError(f"--dtype {name} is not supported on {device}; use --dtype float16 or float32")
    return dtype


def pick(device: str, dtype: str | None, default_dtype: str) -> tuple[torch.device, torch.dtype, str]:
    """The checked device and dtype of a command (``dtype`` None: ``default_dtype``), and the dtype's name."""
    dev = resolve_device(device)
    name = dtype or default_dtype
    return dev, resolve_dtype(name, dev), name
