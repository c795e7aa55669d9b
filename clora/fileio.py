"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from clora.errors import OutputError

if TYPE_CHECKING:
    import torch

#: tests only: a file-path glob (``*/checkpoint.pt``, ``*/out/*.safetensors``), optionally ``@N`` for the
#: N-th matching write; that write SIGKILLs the process after its temp file is complete, before the rename
KILL_AT_ENV = "CLORA_TEST_KILL_AT"
_kill_count: dict[str, int] = {}

_HINTS = {
    errno.ENOSPC: "the disk is full; free some space and try again",
    errno.EDQUOT: "the disk quota is used up; free some space and try again",
    errno.EACCES: "no permission to write there; choose another place",
    errno.EPERM: "no permission to write there; choose another place",
    errno.EROFS: "the file system is read-only; choose another place",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter one",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
}


def os_error_message(action: str, path: str | os.PathLike[str], e: OSError) -> str:
    """One line for a failed file operation: what, where, why and what to do."""
    why = e.strerror or e.__class__.__name__
    hint = _HINTS.get(e.errno or 0)
    return f"cannot {action} {path} ({why})" + (f"; {hint}" if hint else "")


def _umask() -> int:
    """This process's umask (read from /proc where it can be, so no other thread sees it change)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _kill_point(target: Path) -> None:
    """The test hook of ``KILL_AT_ENV`` (read here and nowhere else)."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition("@")
    if fnmatch.fnmatch(str(target), pattern):
        _kill_count[pattern] = _kill_count.get(pattern, 0) + 1
        if _kill_count[pattern] >= int(nth or 1):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The file gets the mode a plain ``open`` would give it (0666 less the umask), and a failed write
    (disk full, no permission, a name too long) is one :class:`OutputError` with the old file intact."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a short prefix, so a name just under the file system's limit still has a temp name
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:64]}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(os_error_message("write", target, e)) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it 0600
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _kill_point(target)
        os.replace(tmp_path, target)
    except OSError as e:
        raise OutputError(os_error_message("write", target, e)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically (tensors made contiguous and moved to CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(clean, str(tmp), metadata=metadata)
        except SafetensorError as e:  # safetensors reports a failed write as its own error type
            raise OSError(_io_errno(e, tmp), f"writing failed: {str(e).splitlines()[0]}") from None


def save_torch(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save`` atomically (for checkpoints; load them with ``weights_only=True``)."""
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) this way
            raise OSError(_io_errno(e, tmp), f"writing failed: {str(e).splitlines()[0]}") from None


def _io_errno(e: BaseException, where: Path) -> int:
    """The errno a library's write error stands for: ENOSPC when the disk holding ``where`` is full."""
    text = str(e).lower()
    if "no space" in text or "os error 28" in text:
        return errno.ENOSPC
    with contextlib.suppress(OSError):
        if shutil.disk_usage(where.parent).free < 1 << 20:
            return errno.ENOSPC
    return errno.EIO


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
