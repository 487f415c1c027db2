"""Portability: agd runs where Unix-only functions do not exist (Windows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Runs agd with what Windows lacks removed: os.sysconf & co., `resource`, `fcntl`, and os.open
# on a folder (PermissionError there); os.fsync refuses a handle opened read-only (EBADF: it is
# _commit there); stdout in a legacy code page (cp1252, a redirect on Windows). psutil is imported first: its Linux backend reads
# os.sysconf at import, its Windows backend does not. (Functions the standard library itself
# replaces on Windows, like os.getuid behind getpass or os.statvfs behind shutil.disk_usage,
# stay.)
NO_UNIX = """
import errno, os, sys
import fcntl as _fcntl
import psutil  # noqa: F401
_fsync = os.fsync
def _fsync_windows(fd):
    if _fcntl.fcntl(fd, _fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        raise OSError(errno.EBADF, "Bad file descriptor")
    return _fsync(fd)
os.fsync = _fsync_windows
for name in ("sysconf", "sysconf_names", "getloadavg"):
    if hasattr(os, name):
        delattr(os, name)
sys.modules["resource"] = None
sys.modules["fcntl"] = None
_open = os.open
def _open_no_folders(path, flags, *args, **kwargs):
    if os.path.isdir(path):
        raise PermissionError(13, "Permission denied", str(path))
    return _open(path, flags, *args, **kwargs)
os.open = _open_no_folders
from agd_cli.cli import main
main(sys.argv[1:])
"""


def _agd_without_unix(*args: str) -> dict:
    env = {**os.environ, "AGD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONIOENCODING": "cp1252"}
    proc = subprocess.run([sys.executable, "-c", NO_UNIX, *args], env=env, capture_output=True,
                          encoding="cp1252", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_collect_train_generate_without_unix_only_functions(tmp_path):
    wd = str(tmp_path)
    col = _agd_without_unix("--workdir", wd, "collect", "--preset", "tiny-sd", "--steps", "4",
                            "--num-per-prompt", "1", "--json")
    assert col["complete"] and col["trajectories"] > 0
    tr = _agd_without_unix("--workdir", wd, "train", "--steps", "4", "--checkpoint-every", "2",
                           "--batch-size", "8", "--json")
    assert tr["steps"] == 4
    assert (tmp_path / "tiny-sd" / "checkpoints" / "step-000004").is_dir()
    gen = _agd_without_unix("--workdir", wd, "generate", "a red fox", "--steps", "4", "--json")
    assert len(gen["images"]) == 1 and gen["nfe"] == 4


def test_people_output_survives_a_legacy_code_page(tmp_path):
    """Windows redirects stdout in cp1252, which has no ω: shown escaped, not an internal error."""
    env = {**os.environ, "AGD_NO_PROGRESS": "1", "PYTHONIOENCODING": "cp1252"}
    proc = subprocess.run([sys.executable, "-m", "agd_cli.cli", "presets"], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"mnist" in proc.stdout and b"\\u03c9" in proc.stdout
