"""Whether a distill run's process still lives: it holds an exclusive ``flock`` on ``run.lock`` in its run
folder for as long as it runs. The kernel drops the lock when the process ends, however it ends (Ctrl-C,
SIGKILL, the out-of-memory killer, a crash), so a "running" run whose lock is free has no process left.
The file also names the holder (pid, host, start time) for the messages."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clora.errors import CloraError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: every lock counts as held
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "run.lock"


class RunBusyError(CloraError):
    """Another process is running this distill run."""


def describe(holder: dict[str, Any]) -> str:
    """``pid 123 on host h since 2026-...`` (what is known of it)."""
    parts = [f"pid {holder.get('pid', '?')}", f"on {holder.get('host', '?')}"]
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return " ".join(parts)


def _read(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text() or "{}")
        if isinstance(data, dict):
            return data
    return {}


def holder(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The live process holding the run's lock (its pid, host, start), or None when none does."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # never locked (or its folder is gone): no process can be running it
    try:
        if fcntl is None:  # pragma: no cover
            return _read(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read(path) or {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """The lock a run holds while it runs (``release`` or process exit frees it)."""

    def __init__(self, run_dir: str | os.PathLike[str], run_id: str) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            # a probe (``holder``) holds a shared lock for a moment: try a few times before giving up
            for attempt in range(10):
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if attempt == 9:
                        os.close(self.fd)
                        self.fd = None
                        who = describe(_read(self.path))
                        raise RunBusyError(
                            f"run {run_id} is running now ({who}); wait for it to finish, or stop it "
                            "and continue it with `clora distill --resume`"
                        ) from None
                    time.sleep(0.05)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def last_holder(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Who held the run's lock last (a process that may be gone); empty when unknown."""
    return _read(Path(run_dir) / LOCK_FILE)
