"""Errors a user can act on. The CLI prints ``str(error)`` as one line and exits non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """``"did you mean 'a', 'b'? "`` for the names close to ``name`` (empty when none is)."""
    close = difflib.get_close_matches(name, list(names), n=3)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""


class CloraError(Exception):
    """Base class: a problem with the user's input or workspace, with a next step in the message."""


class RegistryError(CloraError):
    """The registry file cannot be used (not a clora database, newer than this code, ...)."""


class UnknownEffectError(CloraError):
    """No effect of that name in the registry."""


class DuplicateEffectError(CloraError):
    """An effect of that name already exists."""


class TriggerError(CloraError):
    """A trigger word is malformed or collides with another trigger or prompt word."""


class InvalidNameError(CloraError):
    """A name is not a safe identifier."""


class LoraFileError(CloraError):
    """A LoRA file is missing, unreadable, corrupt, or holds no LoRA tensors."""


class IncompatibleLoraError(CloraError):
    """A LoRA's target modules or shapes do not fit the base model."""


class UnknownBackboneError(CloraError):
    """No installed plugin provides that base model id."""


class UnknownComponentError(CloraError):
    """No installed plugin registered an object of that kind with that id."""


class DuplicateIdError(CloraError):
    """Two plugins registered objects of the same kind with the same id."""


class BaseNotBuiltError(CloraError):
    """A backbone's weights are not available yet (e.g. the toy base was never built)."""


class OutputError(CloraError):
    """A file could not be written (a full disk, no permission, a name too long, a file for a folder)."""
