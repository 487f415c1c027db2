"""Reliability probes: a bad value or an environment failure ends as one clear line naming it,
a hint and exit 2, with every file as it was; one writer per run; resume verifies what it trusts.

Run as a script, it prints the probe matrix (case, exit code, first message line):
    .venv/bin/python tests/test_reliability.py
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agd_cli.cli import main
from agd_cli.config.presets import PRESET_DIR

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "AGD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO)}
DIT = ["--preset", "tiny-dit", "--classes", "0-3", "--num-per-prompt", "2", "--batch-size", "4",
       "--seed", "0"]  # 8 trajectories in 2 shards of the tiny DiT, < 2 s
TRAIN = ["--steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "2", "--device", "cpu",
         "--val-fraction", "0"]  # no validation passes: the probes test files, not fits


# --- a base run (collection + checkpoints + adapter), made once, copied per probe -------------
_BASE: dict[str, Path] = {}


def base_run() -> Path:
    """A finished tiny-dit run: 2 shards, checkpoints at steps 2 and 4, adapter.safetensors."""
    if "run" not in _BASE:
        root = Path(tempfile.mkdtemp(prefix="agd-probe-base-"))
        for args in (["collect", *DIT, "--out", str(root / "run")],
                     ["train", "--run", str(root / "run"), *TRAIN]):
            code, _, err = invoke(args)
            assert code == 0, err
        _BASE["run"] = root / "run"
    return _BASE["run"]


def invoke(args: list[str]) -> tuple[int, str, str]:
    """`agd ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    """Every file below `root` (lock files aside) and its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".agd" not in p.name}


# --- ways to break things ------------------------------------------------------------------------
def flip_byte(path: Path, at: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def shards(run: Path) -> list[Path]:
    return sorted((run / "trajectories").glob("shard-*.safetensors"))


def full_disk_after(calls: int):
    """A stand-in for io.save_tensors that fills the disk after `calls` successful writes."""
    from agd_cli.infra.tensor_files import save_tensors

    done = []

    def save(tensors, path, metadata=None):
        if len(done) >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        done.append(path)
        save_tensors(tensors, path, metadata)

    return save


def read_only(mp: pytest.MonkeyPatch, folder: Path) -> None:
    """Make `folder` read-only. Root (and Windows, for folders) ignores the mode bits, so
    os.access is told the same."""
    folder.chmod(0o555)
    real = os.access

    def access(path, mode, *a, **k):
        inside = Path(path).absolute().is_relative_to(folder.absolute())
        return False if inside and mode & os.W_OK else real(path, mode, *a, **k)

    mp.setattr(os, "access", access)


def hold_lock(folder: Path, command: str, stack: contextlib.ExitStack) -> int:
    """Another real process holding the run folder's lock; returns its PID."""
    code = ("import sys, time; from agd_cli.infra.locks import run_lock\n"
            f"with run_lock(sys.argv[1], {command!r}):\n"
            "    print('ready', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    stack.callback(proc.wait)
    stack.callback(proc.kill)
    assert proc.stdout.readline().strip() == "ready"
    return proc.pid


# --- the probe table -----------------------------------------------------------------------------
@dataclass
class Probe:
    """One case: a command (placeholders {run} {tmp} {file}), what it must say, what must hold."""

    name: str
    args: list[str]
    code: int
    text: str
    setup: Callable | None = None          # (tmp, run, monkeypatch, exit stack) -> None
    after: Callable | None = None          # (tmp, run, before snapshot, stdout, stderr) -> None
    changes_run: bool = False              # the run folder may change (resume, recovery)


def _setup_toml(tmp, run, mp, stack):
    text = (PRESET_DIR / "tiny-dit.toml").read_text(encoding="utf-8")
    (tmp / "inf.toml").write_text(text.replace("omega_max = 6.0", "omega_max = inf"))


def _no_new_run(tmp, run, before, out, err):
    assert not (tmp / "new").exists(), "a failed start leaves nothing behind"


def _one_shard_kept(tmp, run, before, out, err):
    traj = tmp / "new" / "trajectories"
    from agd_cli.collect.store import TrajectoryStore

    assert len(TrajectoryStore(traj).shards()) == 1 and not TrajectoryStore(traj).damaged()
    assert not list(traj.glob(".*tmp*")), "no half-written file"


def _checkpoints_kept(tmp, run, before, out, err):
    ckpt = run / "checkpoints"
    assert [p.name for p in sorted(ckpt.iterdir())] == ["step-000002", "step-000004"]
    assert snapshot(ckpt) == {k[12:]: v for k, v in before.items() if k.startswith("checkpoints/")}
    assert snapshot(run)["adapter.safetensors"] == before["adapter.safetensors"]


def _json_error(fragment: str):
    def check(tmp, run, before, out, err):
        obj = json.loads(out)  # exactly one valid JSON object on stdout
        assert fragment in obj["error"] and obj["hint"], obj
    return check


def _shard_redone(tmp, run, before, out, err):
    from safetensors.torch import load_file

    from agd_cli.infra.tensor_files import tensors_sha256

    assert list((run / "trajectories" / "damaged").glob("shard-*.safetensors"))
    for shard in shards(run):  # every redone shard holds exactly the original tensors
        original = BEFORE_DAMAGE / "trajectories" / shard.name
        assert tensors_sha256(load_file(shard)) == tensors_sha256(load_file(original)), shard
    assert "collection complete" in out


def _checkpoints_recovered(tmp, run, before, out, err):
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in (ckpt / "damaged").iterdir()) == [
        "metrics.jsonl", "step-000002", "step-000004"], "kept as evidence"
    assert [p.name for p in sorted(ckpt.glob("step-*"))] == ["step-000002", "step-000004"]
    metrics = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4], "one record per step"


BEFORE_DAMAGE = Path()  # set by run_probe: the undamaged base run

PROBES = [
    # 1. every user value checked before anything loads or is written
    Probe("collect --steps above the schedule",
          ["collect", *DIT, "--steps", "2000", "--out", "{tmp}/new"], 2,
          "--steps 2000 is more than the model's 1000 training timesteps", after=_no_new_run),
    Probe("collect --overwrite with a bad value deletes nothing",
          ["collect", *DIT, "--steps", "2000", "--overwrite", "--out", "{run}"], 2,
          "--steps 2000 is more than"),
    Probe("collect --omega-min nan", ["collect", *DIT, "--omega-min", "nan", "--out", "{tmp}/new"],
          2, "--omega-min must be a finite number > 0, got nan", after=_no_new_run),
    Probe("collect --omega-max inf", ["collect", *DIT, "--omega-max", "inf", "--out", "{tmp}/new"],
          2, "--omega-max must be a finite number > 0, got inf", after=_no_new_run),
    Probe("omega_max = inf in a preset TOML",
          ["collect", "--preset", "{tmp}/inf.toml", "--classes", "0-3", "--out", "{tmp}/new"], 2,
          "bad value for 'sampling.omega_max': inf", setup=_setup_toml, after=_no_new_run),
    Probe("train --lr nan", ["train", "--run", "{run}", "--lr", "nan"], 2,
          "--lr must be a finite number > 0, got nan"),
    Probe("train --val-fraction inf", ["train", "--run", "{run}", "--val-fraction", "inf"], 2,
          "--val-fraction must be a finite number in [0, 1), got inf"),
    Probe("generate --steps above the schedule", ["generate", "1", "--run", "{run}", "--steps",
                                                  "5000"], 2, "--steps 5000 is more than"),
    Probe("bench -w nan", ["bench", "--run", "{run}", "-w", "nan"], 2,
          "guidance scale nan must be a positive number"),
    # 2. environment failures: one line naming the path and the cause, data intact
    Probe("--workdir is a file (--json)", ["--workdir", "{file}", "train", "--json"], 2,
          "is a file, not a folder", after=_json_error("--workdir")),
    Probe("collect --out below a file", ["collect", *DIT, "--out", "{file}/sub"], 2,
          "is a file, not a folder"),
    Probe("collect into a read-only workdir", ["collect", *DIT, "--workdir", "{tmp}/ro"], 2,
          "no write permission on",
          setup=lambda tmp, run, mp, st: ((tmp / "ro").mkdir(), read_only(mp, tmp / "ro"))),
    Probe("train in a read-only run folder", ["train", "--run", "{run}", "--steps", "6"], 2,
          "no write permission on", setup=lambda tmp, run, mp, st: read_only(mp, run)),
    Probe("bench in a read-only run folder", ["bench", "--run", "{run}"], 2,
          "no write permission on", setup=lambda tmp, run, mp, st: read_only(mp, run)),
    Probe("disk full during collect", ["collect", *DIT, "--out", "{tmp}/new"], 2,
          "No space left on device", after=_one_shard_kept,
          setup=lambda tmp, run, mp, st: mp.setattr("agd_cli.collect.store.save_tensors",
                                                    full_disk_after(1))),
    Probe("disk full at a train checkpoint", ["train", "--run", "{run}", "--steps", "6", *TRAIN[2:]],
          2, "No space left on device", after=_checkpoints_kept, changes_run=True,
          setup=lambda tmp, run, mp, st: mp.setattr("agd_cli.train.checkpoint.save_tensors",
                                                    full_disk_after(0))),
    # 3. values shown literally, never as rich markup
    Probe("prompt path with [/x]", ["collect", "--preset", "tiny-sd", "--prompts", "{tmp}/a[/x].txt"],
          2, "a[/x].txt"),
    Probe("prompt path with [draft]", ["collect", "--preset", "tiny-sd", "--prompts",
                                       "{tmp}/p[draft].txt", "--json"], 2, "p[draft].txt holds no",
          setup=lambda tmp, run, mp, st: (tmp / "p[draft].txt").write_text("\n"),
          after=_json_error("p[draft].txt")),
    # 4. --json: one object on stdout for every exit
    Probe("usage error with --json", ["collect", "--steps", "abc", "--json"], 2, "'abc'",
          after=_json_error("abc")),
    Probe("internal error with --json", ["collect", *DIT, "--out", "{tmp}/new", "--json"], 1,
          "internal error: RuntimeError: boom", after=_json_error("boom"),
          setup=lambda tmp, run, mp, st: mp.setattr(
              "agd_cli.collect.run.plan_collection",
              lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))),
    # 5. one writer per run folder
    Probe("train while another process holds the run", ["train", "--run", "{run}"], 2,
          "is in use by agd train (PID",
          setup=lambda tmp, run, mp, st: hold_lock(run, "train", st)),
    Probe("collect while another process holds the run", ["collect", *DIT, "--out", "{run}",
                                                          "--overwrite"], 2,
          "is in use by agd collect (PID",
          setup=lambda tmp, run, mp, st: hold_lock(run, "collect", st)),
    # 6. resume verifies what it trusts
    Probe("collect resume with a flipped byte in a shard", ["collect", *DIT, "--out", "{run}"], 0,
          "(checksum mismatch); it will be redone", changes_run=True, after=_shard_redone,
          setup=lambda tmp, run, mp, st: flip_byte(shards(run)[0])),
    Probe("collect resume with a truncated shard", ["collect", *DIT, "--out", "{run}"], 0,
          "expected); it will be redone", changes_run=True, after=_shard_redone,
          setup=lambda tmp, run, mp, st: truncate(shards(run)[-1])),
    Probe("train with every checkpoint unreadable", ["train", "--run", "{run}", *TRAIN], 0,
          "training starts again at step 0", changes_run=True, after=_checkpoints_recovered,
          setup=lambda tmp, run, mp, st: [truncate(p) for p in
                                          (run / "checkpoints").glob("step-*/adapters.safetensors")]),
    Probe("generate with a damaged adapter file", ["generate", "1", "--run", "{run}"], 2,
          "its tensors do not match the checksum",
          setup=lambda tmp, run, mp, st: flip_byte(run / "adapter.safetensors")),
    # 7. input formats
    Probe("CSV with a stray quote", ["collect", "--preset", "tiny-sd", "--prompts",
                                     "{tmp}/stray.csv"], 2, "stray.csv, line 3: a prompt spans",
          setup=lambda tmp, run, mp, st: (tmp / "stray.csv").write_text(
              'caption\na red fox\n"a lighthouse\na bowl of fruit\na city street\n')),
]


def run_probe(probe: Probe, tmp: Path) -> tuple[int, str, str]:
    """Copy the base run, break what the probe breaks, run it, check the message and the files."""
    global BEFORE_DAMAGE
    BEFORE_DAMAGE = base_run()
    run = tmp / "ws" / "run"
    shutil.copytree(base_run(), run)
    (tmp / "afile").write_text("a file, not a folder")
    with pytest.MonkeyPatch.context() as mp, contextlib.ExitStack() as stack:
        mp.chdir(tmp)
        if probe.setup:
            probe.setup(tmp, run, mp, stack)
        before = snapshot(run)
        args = [a.format(run=run, tmp=tmp, file=tmp / "afile") for a in probe.args]
        code, out, err = invoke(args)
    for folder in (run, tmp / "ro"):
        if folder.exists():
            folder.chmod(0o755)
    flat = " ".join(err.split())
    assert code == probe.code and probe.text in flat, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err
    if probe.code == 2:
        assert "hint:" in err
    if not probe.changes_run:
        assert snapshot(run) == before, "files of the run changed"
    if probe.after:
        probe.after(tmp, run, before, out, err)
    return code, out, err


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_probe(probe, tmp_path):
    run_probe(probe, tmp_path)


# --- real concurrent processes, kill -9, Ctrl-C -------------------------------------------------
# 40,000 trajectories: about 7 minutes on an idle 2-core machine (4000 took 41 s), so it is surely
# still running when the test interrupts it
LONG = ["collect", "--preset", "tiny-dit", "--classes", "all", "--num-per-prompt", "40",
        "--batch-size", "4", "--json"]


def _start_collect(out: Path) -> subprocess.Popen:
    args = [*LONG, "--out", str(out)]
    # SIGINT back to its default in the child: a test run started in the background (`.ci/run &`)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler (the collect
    # ran on through the test's Ctrl-C)
    return subprocess.Popen([sys.executable, "-m", "agd_cli.cli", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert cond(), f"condition not reached; process exit {proc.poll()}"


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a child process is POSIX")
def test_second_collect_refused_then_ctrl_c_says_how_to_resume(tmp_path):
    """Two real processes on one run: the second is refused naming the first; Ctrl-C on the
    first prints one JSON object saying what is stored and how to continue."""
    run = tmp_path / "run"
    first = _start_collect(run)
    _wait_for(lambda: list((run / "trajectories").glob("shard-*.json")), first)
    second = subprocess.run([sys.executable, "-m", "agd_cli.cli", *LONG, "--out", str(run)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first collect should still be running"
    assert second.returncode == 2, second.stderr
    assert f"is in use by agd collect (PID {first.pid} on " in json.loads(second.stdout)["error"]
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, (out, err)
    obj = json.loads(out)
    assert "trajectories are stored in" in obj["error"] and "rerun the same command" in obj["hint"]
    assert "Traceback" not in err and not (run / ".agd.lock.json").exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    with contextlib.ExitStack() as stack:
        pid = hold_lock(run, "collect", stack)
        os.kill(pid, signal.SIGKILL)
    code, out, err = invoke(["collect", *DIT, "--out", str(run)])
    assert code == 0, err
    assert f"taking over the lock of agd collect (PID {pid}" in " ".join(err.split())
    assert "collection complete" in out and not (run / ".agd.lock.json").exists()


# --- small invariants ----------------------------------------------------------------------------
def test_json_output_never_holds_bare_nan(capsys):
    from agd_cli.infra import ui

    ui.emit_json({"loss": float("nan"), "rows": [float("inf"), 1.5], "ok": {"x": -float("inf")}})
    text = capsys.readouterr().out
    assert json.loads(text) == {"loss": None, "rows": [None, 1.5], "ok": {"x": None}}
    assert "NaN" not in text and "Infinity" not in text


def test_prompt_file_warnings_once_per_kind(tmp_path, capsys):
    from agd_cli.config.prompts import read_prompts

    path = tmp_path / "p.txt"
    path.write_text("a fox\na cat\na fox\na fox\nbell\x07\n", encoding="utf-8")
    assert len(read_prompts(path)) == 5
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("duplicate prompt(s)") == 1 and "2 duplicate prompt(s)" in err
    assert err.count("control characters") == 1


def test_disk_estimate_covers_what_collect_writes(tmp_path):
    """The plan's estimate (before its safety margin) is at least the bytes the disk allocates."""
    from agd_cli.collect.disk import estimate_bytes_per_trajectory, estimate_collection_bytes

    out = tmp_path / "run"
    code, _, err = invoke(["collect", *DIT, "--out", str(out)])
    assert code == 0, err
    files = [p for p in out.rglob("*") if p.is_file()]
    used = sum(p.stat().st_blocks * 512 if hasattr(p.stat(), "st_blocks") else p.stat().st_size
               for p in files)
    est = estimate_bytes_per_trajectory("tiny-dit", None, 2)
    assert estimate_collection_bytes(est, 8, 4) >= used


if __name__ == "__main__":  # the probe matrix, for the note
    rows = []
    for probe in PROBES:
        with tempfile.TemporaryDirectory() as d:
            try:
                code, out, err = run_probe(probe, Path(d))
                ok = "ok"
            except AssertionError as e:
                code, err, ok = -1, str(e), "FAILED"
        first = next((ln for ln in err.splitlines() if ln.startswith(("error:", "warning:"))), "")
        rows.append((probe.name, code, ok, first))
    width = max(len(r[0]) for r in rows)
    for name, code, ok, first in rows:
        print(f"{name:<{width}}  exit {code:>3}  {ok:<6}  {first}")
    shutil.rmtree(base_run().parent, ignore_errors=True)
