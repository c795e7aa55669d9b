"""Paths in the registry are stored relative to the registry's folder when they lie under it.

A workspace (the registry file with the teachers, examples and collections beside it) can then be moved
or copied to another folder or machine and keep working. Paths outside the folder stay absolute.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path, PurePosixPath

#: the folder of the registry whose session is open (set by ``Registry.session``)
WORKSPACE: ContextVar[Path | None] = ContextVar("clora_workspace", default=None)


def workspace_of(registry_file: Path) -> Path:
    return Path(os.path.abspath(registry_file.parent))


def to_stored(value: str, root: Path) -> str:
    """``value`` as the registry stores it: relative (POSIX) when under ``root``, else unchanged."""
    path = Path(value)
    if not path.is_absolute():
        return value
    for base in dict.fromkeys((root, root.resolve())):
        for candidate in dict.fromkeys((path, path.resolve())):
            if candidate.is_relative_to(base):
                return candidate.relative_to(base).as_posix()
    return value


def from_stored(value: str, root: Path) -> str:
    """The absolute path of a stored ``value``."""
    if Path(value).is_absolute():
        return value
    return str(root.joinpath(*PurePosixPath(value).parts))
