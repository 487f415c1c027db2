"""Shared test settings: quiet progress bars, few threads, the CLI run in a subprocess or in this process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("AGD_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_agd(*args: str, cwd=None, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `agd ARGS` in a fresh interpreter, as a user would; returns the completed process."""
    full_env = {**os.environ, "AGD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "agd_cli.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def agd_here(*args: str, capsys=None) -> tuple[int, str, str]:
    """Run `agd ARGS` in this process: (exit code, stdout, stderr; empty without `capsys`)."""
    from agd_cli.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code or 0
    if capsys is None:
        return code, "", ""
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models are overhead-bound on a shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(autouse=True)
def _agd_logs_on_stderr():
    """Library log lines reach stderr as the CLI shows them (tests read them with capsys)."""
    from agd_cli.infra import ui

    ui.setup_logging(0)
    yield
