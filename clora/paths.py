"""Where clora keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_REGISTRY = "registry.db"


def clora_home() -> Path:
    """Cache folder for built models, teacher targets and runs (``CLORA_HOME``, else ~/.cache/clora)."""
    env = os.environ.get("CLORA_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clora"


def registry_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The registry file: ``explicit``, else ``CLORA_REGISTRY``, else ``./registry.db``."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("CLORA_REGISTRY") or DEFAULT_REGISTRY)
