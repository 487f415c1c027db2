"""One writer per run folder: an advisory OS file lock plus a sidecar naming its holder.

    <run>/.agd.lock        the lock (filelock: flock on POSIX, msvcrt on Windows); kept on disk
    <run>/.agd.lock.json   holder: PID, host, start time, command; removed on release

The operating system drops the lock when its process dies (even kill -9), so a lock left by a
dead process is taken over by simply acquiring it; the leftover sidecar only lets us say so.
Lock files are never deleted: unlinking a lock file another process has open splits the lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from agd_cli.infra.errors import LockedError
from agd_cli.infra.io import read_json, write_json

logger = logging.getLogger(__name__)

RUN_LOCK = ".agd.lock"


def holder_info(command: str) -> dict:
    """Who holds a lock: this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "argv": sys.argv[1:]}


def _read_holder(sidecar: Path) -> dict | None:
    try:
        return read_json(sidecar)
    except (OSError, ValueError):
        return None


def describe(holder: dict | None) -> str:
    """'agd train (PID 123 on host, started 2026-11-25T14:02:00+00:00)'."""
    if not holder:
        return "another agd process (it has not written its details yet)"
    return (f"agd {holder.get('command', '?')} (PID {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started')})")


def _alive(holder: dict) -> bool | None:
    """Whether the holder's process runs (None when it is on another host or unknown)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return None
    return psutil.pid_exists(int(holder.get("pid", -1)))


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str, name: str = RUN_LOCK) -> Iterator[dict]:
    """Hold the run folder's lock for the block, or fail at once naming the holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, sidecar = folder / name, folder / f"{name}.json"
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = _read_holder(sidecar)
        dead = holder is not None and _alive(holder) is False
        raise LockedError(
            f"run folder '{folder}' is in use by {describe(holder)}"
            + ("; that process has ended but a child of it may still hold the lock" if dead else ""),
            hint="wait for it to finish or stop it, or use another run folder (--out / --run)"
        ) from None
    try:
        stale = _read_holder(sidecar)
        if stale is not None:
            logger.warning(f"taking over the lock of {describe(stale)}, which ended without releasing it")
        me = holder_info(command)
        write_json(sidecar, me)
        yield me
    finally:
        with contextlib.suppress(OSError):
            sidecar.unlink()
        lock.release()


def worker_lock_name(index: int, count: int) -> str:
    """Parallel collect workers share a run folder: each locks its own part of it."""
    return RUN_LOCK if count == 1 else f".agd-worker-{index}-of-{count}.lock"
