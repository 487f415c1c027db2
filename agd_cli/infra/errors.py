"""Domain errors: library code raises these; the CLI prints them as one line plus a hint."""

from __future__ import annotations

import errno


class AgdError(Exception):
    """A user-facing error: a message naming the bad value, and a hint on what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class InputError(AgdError):
    """Bad flag, preset value or input file."""


class DataError(AgdError):
    """Missing, corrupt or mismatched run data (trajectories, checkpoints, adapters)."""


class ModelError(AgdError):
    """A model cannot be loaded or does not fit what is asked of it."""


class StorageError(AgdError):
    """The file system refused: disk full, read-only, no permission, a file where a folder goes."""


class Interrupted(AgdError):
    """Ctrl-C: the message says what is kept and how to continue."""

    exit_code = 130


class LockedError(AgdError):
    """Another agd process is writing into the same run folder."""


# errno -> what to do about it (the message names the path and the system's reason)
_STORAGE_HINTS = {
    errno.ENOSPC: "free some disk space (or use another --workdir/--out), then rerun the same "
                  "command: finished work is kept and it continues from there",
    errno.EROFS: "the file system is read-only: pass a writable --workdir or --out",
    errno.EACCES: "no permission (on Windows also: another program, e.g. a running agd generate, "
                  "has the file open): close it, pass a --workdir or --out you can write to, or "
                  "fix permissions",
    errno.EPERM: "no permission: pass a --workdir or --out you can write to, or fix permissions",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EISDIR: "that path is a folder where a file was expected: choose another path",
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _STORAGE_HINTS[errno.EDQUOT] = "your disk quota is used up: free some space, then rerun"


class WriteFailed(OSError):
    """An OSError raised while writing an output file (agd_cli.infra.io): whatever its errno, the
    place the user chose refused the file (a /proc path, a device, a network share gone)."""


def storage_error(e: OSError) -> StorageError | None:
    """An OSError caused by the user's environment as a StorageError (None for other errors)."""
    hint = _STORAGE_HINTS.get(e.errno)  # type: ignore[arg-type]
    if hint is None and isinstance(e, WriteFailed):
        hint = "that place does not take files: choose another --out, --grid or --workdir"
    if hint is None:
        return None
    where = f" '{e.filename}'" if e.filename else ""
    return StorageError(f"cannot write{where}: {e.strerror or e}", hint=hint)


class NonFiniteError(AgdError):
    """NaN or inf where data enter (a teacher's output at collect) or where weights are written
    (a diverging training run): refused, never stored."""
