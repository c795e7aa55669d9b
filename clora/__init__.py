"""clora: turn many image-effect LoRAs into one few-step LoRA."""

from clora.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
