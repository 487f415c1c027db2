"""Small file helpers: atomic writes, JSON files."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from pathlib import Path

from agd_cli.infra.errors import WriteFailed


def naming(e: OSError, path: str | Path, tmp: str | Path | None = None) -> WriteFailed:
    """The OSError of writing `path`, naming `path` when it named nothing (a full disk) or only
    `tmp`, as a WriteFailed (the CLI reports any write failure as bad input, exit 2)."""
    named = e.filename and str(e.filename) != str(tmp)
    return WriteFailed(e.errno, e.strerror or str(e), str(e.filename if named else path))


@functools.cache
def file_mode() -> int:
    """The mode a new file gets from open() under this process's umask (rw for all, less it);
    read once, on the first file saved (not at import: reading the umask sets it briefly)."""
    if os.name == "nt":  # no umask there; chmod only sets or clears the read-only flag
        return 0o666
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_file(path: str | Path) -> None:
    """Flush a written file to disk. Opened for writing: on Windows os.fsync is _commit, which
    refuses a read-only handle (EBADF)."""
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success fsync and rename it over `path`.

    On failure the temp file goes and the old `path` stays as it was; an OSError names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise naming(e, path, tmp) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def json_safe(value):
    """NaN and ±inf as null (bare NaN is not JSON); containers converted recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(obj) -> str:
    """One strict JSON line (JSONL logs): no bare NaN."""
    return json.dumps(json_safe(obj), allow_nan=False)


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def read_json(path: str | Path):
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
