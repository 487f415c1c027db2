"""`agd collect`: the stored data are the teacher's CFG trajectories; resumable; bad input is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agd_cli.cli import main
from agd_cli.collect.disk import estimate_bytes_per_trajectory
from agd_cli.collect.run import run_collect
from agd_cli.collect.store import (
    IDENTITY_KEYS,
    TrajectoryStore,
    keep_indices,
    trajectory_omegas,
    worker_ids,
)
from agd_cli.config.presets import load_preset
from agd_cli.config.prompts import parse_classes, read_prompts
from agd_cli.core.sampling import make_scheduler
from agd_cli.families import load_denoiser
from agd_cli.infra.errors import DataError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of fruit",
           "a city street in the rain"]
ENV = {**os.environ, "AGD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
PRESETS = {"tiny-sd": {}, "tiny-sdxl": {}, "tiny-dit": {"classes": "0-3"},
           "tiny-sd3": {}, "tiny-pixart": {}, "tiny-sana": {}}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("AGD_NO_PROGRESS", "1")


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def collect_kwargs(name: str, tmp: Path) -> dict:
    """Small collections: 4 prompts (classes) x 2 trajectories, the preset's 10 DDIM steps."""
    kw = dict(PRESETS[name])
    if "classes" not in kw:
        kw["prompts"] = str(write_prompts(tmp / f"{name}.txt"))
    return {"preset": name, "num_per_prompt": 2, "batch_size": 3, "seed": 7, **kw}


@pytest.fixture(scope="module")
def collections(tmp_path_factory) -> dict[str, dict]:
    """One collection per tiny preset (collected once for the module)."""
    tmp = tmp_path_factory.mktemp("collections")
    os.environ["AGD_NO_PROGRESS"] = "1"
    torch.set_num_threads(1)
    return {name: run_collect(workdir=str(tmp / "runs"), **collect_kwargs(name, tmp))
            for name in PRESETS}


def load_all(traj_dir: str | Path) -> tuple[dict, dict[int, dict]]:
    """Manifest and every stored trajectory by id: x, target, timesteps, omega, cond, uncond."""
    store = TrajectoryStore(traj_dir)
    by_id = {}
    for info in store.shards():
        with store.open_shard(info, verify=True) as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safetensors handle
        for n, tid in enumerate(t["trajectory_id"].tolist()):
            row = int(t["cond_row"][n])
            by_id[tid] = {
                "x": t["x"][n], "target": t["target"][n], "x_final": t["x_final"][n],
                "timesteps": t["timesteps"][n], "omega": t["omega"][n],
                "prompt_index": int(t["prompt_index"][n]),
                "cond": {k[5:]: v[row:row + 1] for k, v in t.items() if k.startswith("cond.")},
                "uncond": {k[7:]: v for k, v in t.items() if k.startswith("uncond.")},
            }
    return store.manifest(), by_id


def close_fp16(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-3) -> bool:
    """Equal up to fp16 storage: max error within `rel` of the larger tensor's magnitude."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-3)
    return (a.float() - b.float()).abs().max().item() <= rel * scale


# --- the data are the teacher's CFG-guided trajectories ---------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_stored_target_is_the_teachers_cfg_output(collections, name):
    """Re-running CFG on a stored (x_t, t, cond, ω) gives the stored target; a wrong ω does not."""
    manifest, trajs = load_all(collections[name]["trajectories_dir"])
    den = load_denoiser(load_preset(name), device="cpu", text=False)
    for tid in (0, 5):
        tr = trajs[tid]
        for k in (0, 4, tr["x"].shape[0] - 1):
            args = (tr["x"][k:k + 1].float(), tr["timesteps"][k], tr["cond"], tr["uncond"])
            out = den.predict_cfg(*args, tr["omega"].view(1))
            assert close_fp16(out, tr["target"][k:k + 1]), (name, tid, k)
            wrong = den.predict_cfg(*args, tr["omega"].view(1) + 1.0)
            assert not close_fp16(wrong, tr["target"][k:k + 1]), "ω must matter"


@pytest.mark.parametrize("name", list(PRESETS))
def test_one_scheduler_step_gives_the_next_stored_x(collections, name):
    """With all steps kept, step(target_k, t_k, x_k) = x_{k+1}: the data are the guided path."""
    manifest, trajs = load_all(collections[name]["trajectories_dir"])
    cfg = manifest["config"]
    assert cfg["keep_steps"] == cfg["steps"] == 10
    den = load_denoiser(load_preset(name), device="cpu", text=False)
    for tid in (1, 6):
        tr = trajs[tid]
        sched = make_scheduler(cfg["scheduler"], den.scheduler_config)
        sched.set_timesteps(cfg["steps"])
        assert tr["timesteps"].tolist() == sched.timesteps.tolist()
        nxt = torch.cat([tr["x"][1:], tr["x_final"][None]])
        for k in range(cfg["steps"]):
            x_next = sched.step(tr["target"][k:k + 1].float(), tr["timesteps"][k],
                                tr["x"][k:k + 1].float()).prev_sample
            assert close_fp16(x_next, nxt[k:k + 1]), (name, tid, k)
        assert not close_fp16(tr["x"][2], tr["x"][1])


def test_collection_contents_and_manifest(collections):
    """Every id once, ω in range and seeded, conds stored once per prompt, manifest complete."""
    summary = collections["tiny-sd"]
    manifest, trajs = load_all(summary["trajectories_dir"])
    cfg = manifest["config"]
    assert sorted(trajs) == list(range(8)) and summary["complete"] and manifest["trajectories"] == 8
    for key in IDENTITY_KEYS + ("agd_version", "family", "prompts", "latent_shape", "preset_toml"):
        assert key in cfg, key
    assert cfg["prompts"] == PROMPTS and cfg["base_model"] == "random:tiny-sd"
    omegas = torch.stack([trajs[i]["omega"] for i in range(8)])
    assert torch.equal(omegas, trajectory_omegas(7, list(range(8)), 1.0, 8.0))
    assert ((omegas >= 1.0) & (omegas <= 8.0)).all() and omegas.unique().numel() == 8
    assert [trajs[i]["prompt_index"] for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert trajs[0]["x"].dtype == torch.float16 and trajs[0]["target"].dtype == torch.float16
    assert torch.equal(trajs[0]["cond"]["prompt_embeds"], trajs[1]["cond"]["prompt_embeds"])
    assert not torch.equal(trajs[0]["x"][0], trajs[1]["x"][0])  # own noise per trajectory
    store = TrajectoryStore(summary["trajectories_dir"])
    with store.open_shard(store.shards()[0]) as f:
        assert f.get_tensor("cond.prompt_embeds").shape[0] <= 2  # 3 trajectories, <= 2 prompts
    est = estimate_bytes_per_trajectory("tiny-sd", 10, 2)["bytes"]
    assert 0.9 < summary["bytes_per_trajectory"] / est < 1.2


def test_batching_sharding_and_keep_steps_do_not_change_the_data(collections, tmp_path):
    """Two shard workers with batch 1, keeping 4 of 10 steps, store the same numbers."""
    kw = collect_kwargs("tiny-sd", tmp_path)
    ref_manifest, ref = load_all(collections["tiny-sd"]["trajectories_dir"])
    for index in (1, 0):
        s = run_collect(**{**kw, "batch_size": 1, "keep_steps": 4}, out=str(tmp_path / "run"),
                        shard_index=index, num_shards=2)
    assert s["complete"] and s["trajectories"] == 8 and s["steps_per_trajectory"] == 4
    manifest, got = load_all(tmp_path / "run" / "trajectories")
    keep = keep_indices(10, 4)
    assert keep == manifest["config"]["kept_step_indices"] and keep[0] == 0 and len(keep) == 4
    for tid in range(8):
        assert torch.equal(got[tid]["omega"], ref[tid]["omega"])
        assert torch.equal(got[tid]["timesteps"], ref[tid]["timesteps"][keep])
        assert close_fp16(got[tid]["x"], ref[tid]["x"][keep], rel=1e-3)
        assert close_fp16(got[tid]["target"], ref[tid]["target"][keep], rel=1e-3)


def test_rerun_of_a_complete_collection_does_nothing(collections, tmp_path):
    """Resuming a finished run loads no model and writes nothing."""
    summary = collections["tiny-dit"]
    kw = collect_kwargs("tiny-dit", tmp_path)
    before = {p: p.stat().st_mtime_ns for p in Path(summary["trajectories_dir"]).glob("shard-*")}
    again = run_collect(**kw, out=summary["out"])
    assert again["new_trajectories"] == 0 and again["trajectories"] == 8 and again["complete"]
    assert {p: p.stat().st_mtime_ns for p in Path(summary["trajectories_dir"]).glob("shard-*")} == before


# --- resumable: kill -9 mid-run, rerun the same command ---------------------------------------
def test_killed_run_resumes_without_duplicates(tmp_path, capsys):
    """kill -9 after the first shard; the same command completes with every id exactly once."""
    prompts = write_prompts(tmp_path / "p.txt", [f"prompt number {i}" for i in range(8)])
    args = ["collect", "--preset", "tiny-sd", "--prompts", str(prompts), "--num-per-prompt", "2",
            "--batch-size", "2", "--steps", "10", "--seed", "3", "--out", str(tmp_path / "run"),
            "--json"]
    traj = tmp_path / "run" / "trajectories"
    proc = subprocess.Popen([sys.executable, "-m", "agd_cli.cli", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while not list(traj.glob("shard-*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    done_before = TrajectoryStore(traj).completed()
    assert 0 < len(done_before) < 16, f"the first run should be cut off mid-way: {err[-500:]!r}"

    # the rerun (in-process, to spare a second interpreter start) finishes the collection
    main(args)  # returns normally on success
    summary = json.loads(capsys.readouterr().out)
    assert summary["trajectories"] == 16 and summary["new_trajectories"] == 16 - len(done_before)
    assert summary["steps_per_trajectory"] == 10 and summary["bytes_on_disk"] > 0
    assert summary["out"] == str(tmp_path / "run") and summary["complete"]
    ids = [i for info in TrajectoryStore(traj).shards() for i in info["trajectory_ids"]]
    assert sorted(ids) == list(range(16)), "no duplicated or missing trajectory"
    assert not list(traj.glob(".*tmp*"))
    assert all(p.with_suffix(".json").exists() for p in traj.glob("shard-*.safetensors"))

    # identical to an uninterrupted run (another batch size) with the same seed
    ref = run_collect("tiny-sd", prompts=str(prompts), num_per_prompt=2, batch_size=8, steps=10,
                      seed=3, out=str(tmp_path / "ref"))
    _, a = load_all(traj)
    _, b = load_all(ref["trajectories_dir"])
    for tid in range(16):
        assert torch.equal(a[tid]["omega"], b[tid]["omega"])
        assert close_fp16(a[tid]["x"], b[tid]["x"], rel=1e-3)
        assert close_fp16(a[tid]["target"], b[tid]["target"], rel=1e-3)


# --- bad input: exit 2, a message naming the value, no traceback, nothing damaged -------------
def _bad_files(tmp: Path) -> dict[str, Path]:
    files = {"empty": tmp / "empty.txt", "latin1": tmp / "latin1.txt", "nocap": tmp / "nocap.csv",
             "badjson": tmp / "bad.jsonl", "doc": tmp / "prompts.docx", "afile": tmp / "afile",
             "other": tmp / "other.txt"}
    write_prompts(files["other"], ["a different prompt"])
    files["empty"].write_text("\n  \n\n", encoding="utf-8")
    files["latin1"].write_bytes("un café crème\n".encode("latin-1"))
    files["nocap"].write_text("text,id\na fox,1\n", encoding="utf-8")
    files["badjson"].write_text('{"prompt": "ok"}\n{"prompt": oops}\n', encoding="utf-8")
    files["doc"].write_text("a fox\n", encoding="utf-8")
    files["afile"].write_text("not a folder", encoding="utf-8")
    return files


BAD = [  # (flags after `--preset tiny-sd --prompts GOOD` unless they say otherwise, expected text)
    (["--prompts", "{tmp}/missing.txt"], "prompt file not found"),
    (["--prompts", "{empty}"], "holds no prompts"),
    (["--prompts", "{latin1}"], "is not UTF-8"),
    (["--prompts", "{nocap}"], "no 'caption' column"),
    (["--prompts", "{badjson}"], "line 2: not valid JSON"),
    (["--prompts", "{doc}"], "unknown format '.docx'"),
    (["--keep-steps", "5"], "--keep-steps 5 is more than the 2 sampling steps"),
    (["--omega-min", "9", "--omega-max", "2"], "--omega-min 9 is larger than --omega-max 2"),
    (["--omega-min", "0"], "--omega-min must be a finite number > 0, got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--steps", "-3"], "--steps must be a positive integer, got -3"),
    (["--shard-index", "2", "--num-shards", "2"], "--shard-index 2 is out of range"),
    (["--shard-index", "1"], "--shard-index and --num-shards go together"),
    (["--overwrite", "--shard-index", "0", "--num-shards", "2"], "--overwrite cannot be combined"),
    (["--classes", "0-3"], "--classes given, but preset 'tiny-sd' is text-conditional"),
    (["--seed", "99"], "already holds a different collection (seed: 7 there, 99 now)"),
    (["--prompts", "{other}"], "holds a different collection (prompts: "),
    (["--num-per-prompt", "3"], "(num_per_prompt: 1 there, 3 now)"),
    (["--omega-skew", "2"], "(omega_skew: 1.0 there, 2.0 now)"),
    (["--omega-skew", "0"], "--omega-skew must be a finite number > 0, got 0"),
    (["--omega-skew", "inf"], "--omega-skew must be a finite number > 0, got inf"),
    (["--preset", "tiny-dit", "--classes", "0-3,5000"], "class id 5000"),
    (["--preset", "tiny-dit", "--classes", "5-2"], "bad class range '5-2'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--out", "{afile}"], "is a file, not a folder"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """A finished tiny collection the bad commands point at (its bytes must survive them)."""
    tmp = tmp_path_factory.mktemp("existing")
    torch.set_num_threads(1)
    os.environ["AGD_NO_PROGRESS"] = "1"
    kw = collect_kwargs("tiny-sd", tmp)
    run_collect(**{**kw, "steps": 2, "num_per_prompt": 1}, out=str(tmp / "run"))
    (tmp / "bad").mkdir()
    return tmp, kw["prompts"], {k: str(v) for k, v in _bad_files(tmp / "bad").items()}


@pytest.mark.parametrize("flags,expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_exit_2_message_nothing_damaged(existing_run, flags, expected, capsys):
    tmp, good, files = existing_run
    flags = [f.format(tmp=tmp, **files) for f in flags]
    base = ["collect", "--preset", "tiny-sd", "--prompts", good, "--steps", "2",
            "--num-per-prompt", "1", "--seed", "7", "--out", str(tmp / "run")]
    if "--classes" in flags:
        base = [a for a in base if a not in ("--prompts", good)]
    before = _snapshot(tmp / "run")
    with pytest.raises(SystemExit) as exc:
        main(base + flags)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert expected in " ".join(err.split()), err
    assert "hint:" in err and "Traceback" not in err
    assert _snapshot(tmp / "run") == before


def test_overwrite_replaces_a_different_collection(tmp_path):
    kw = {**collect_kwargs("tiny-sd", tmp_path), "steps": 2, "out": str(tmp_path / "run")}
    first = run_collect(**kw)
    old_shards = {p.name for p in Path(first["trajectories_dir"]).glob("shard-*")}
    second = run_collect(**{**kw, "seed": 8, "num_per_prompt": 1}, overwrite=True)
    manifest, trajs = load_all(second["trajectories_dir"])
    assert manifest["config"]["seed"] == 8 and sorted(trajs) == [0, 1, 2, 3]
    assert second["trajectories"] == 4 and second["complete"]
    assert torch.equal(torch.stack([trajs[i]["omega"] for i in range(4)]),
                       trajectory_omegas(8, [0, 1, 2, 3], 1.0, 8.0))
    assert len(old_shards) == 6 and len(list(Path(second["trajectories_dir"]).glob("shard-*"))) == 4


def test_omega_skew_draws_low_omega_more_often_and_is_part_of_the_identity(tmp_path):
    """--omega-skew K stores ω = lo + (hi − lo)·u^K with the same per-trajectory u as uniform
    sampling (skew 1 gives the draws of collections made before the option); the skew is recorded
    and a different skew is a different collection."""
    ids = list(range(400))
    uniform = trajectory_omegas(3, ids, 1.0, 12.0)
    assert torch.equal(trajectory_omegas(3, ids, 1.0, 12.0, 1.0), uniform)
    skewed = trajectory_omegas(3, ids, 1.0, 12.0, 2.0)
    torch.testing.assert_close(skewed, 1.0 + 11.0 * ((uniform - 1.0) / 11.0) ** 2)
    assert (skewed <= uniform + 1e-5).all() and skewed.min() >= 1.0 and skewed.max() < 12.0
    assert 0.4 < float((skewed < 1.0 + 11.0 / 4).float().mean()) < 0.6  # half in the lowest quarter
    kw = {**collect_kwargs("tiny-sd", tmp_path), "steps": 2, "num_per_prompt": 2,
          "out": str(tmp_path / "run"), "omega_min": 1.0, "omega_max": 12.0}
    summary = run_collect(**kw, omega_skew=2.0)
    manifest, trajs = load_all(summary["trajectories_dir"])
    assert manifest["config"]["omega_skew"] == 2.0 and summary["omega_skew"] == 2.0
    n = len(trajs)
    assert torch.equal(torch.stack([trajs[i]["omega"] for i in range(n)]),
                       trajectory_omegas(kw["seed"], list(range(n)), 1.0, 12.0, 2.0))
    assert run_collect(**kw, omega_skew=2.0)["new_trajectories"] == 0
    with pytest.raises(DataError, match="omega_skew: 2.0 there, 1.0 now"):
        run_collect(**kw)


def test_disk_too_small_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import agd_cli.collect.plan as plan

    monkeypatch.setattr(plan, "DISK_MARGIN", 1e15)  # pretend the disk is nearly full
    with pytest.raises(SystemExit) as exc:
        main(["collect", "--preset", "tiny-sd", "--out", str(tmp_path / "run")])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "not enough disk space" in err and "--keep-steps" in err
    assert "plan: tiny-sd" in err and not (tmp_path / "run").exists()


def test_long_prompts_are_truncated_with_one_warning(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "long.txt", ["short", "x" * 200, "y" * 100, "ok"])
    s = run_collect("tiny-sd", prompts=str(prompts), steps=1, num_per_prompt=1,
                    out=str(tmp_path / "run"))
    err = " ".join(capsys.readouterr().err.split())
    assert s["trajectories"] == 4
    assert err.count("warning:") == 1 and "2 of 4 prompts are longer" in err


# --- prompt files and small helpers ------------------------------------------------------------
def test_prompt_files_txt_csv_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeff  a red fox  \r\n\r\n\ta lighthouse\r\n   \r\n".encode())
    assert read_prompts(txt) == ["a red fox", "a lighthouse"]
    csv_ = tmp_path / "p.csv"
    csv_.write_text('id,caption\n1,"a fox, in snow"\n2,\n3, a cat \n', encoding="utf-8")
    assert read_prompts(csv_) == ["a fox, in snow", "a cat"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a fox", "id": 1}\n\n{"prompt": " a cat "}\n', encoding="utf-8")
    assert read_prompts(jl) == ["a fox", "a cat"]


def test_classes_keep_steps_and_worker_split():
    assert parse_classes("all", 4) == [0, 1, 2, 3]
    assert parse_classes("0-2, 7", 10) == [0, 1, 2, 7]
    assert keep_indices(10, 10) == list(range(10))
    assert keep_indices(1000, 50)[:2] == [0, 20] and len(keep_indices(1000, 50)) == 50
    assert keep_indices(1000, 50)[-1] == 999
    parts = [worker_ids(5, 2, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))
    assert all(not set(a) & set(b) for a in parts for b in parts if a is not b)


def test_sdxl_bytes_per_trajectory_without_weights():
    """Real SDXL at defaults: 50 kept steps of 4x128x128 fp16 x and target, ~13 MB (goal <= 16)."""
    est = estimate_bytes_per_trajectory("sdxl")
    assert est["latent_shape"] == [4, 128, 128] and est["keep_steps"] == 50
    latents = 2 * 50 * 4 * 128 * 128 * 2          # x and target, fp16
    cond = 77 * 2048 * 2 + 1280 * 2 + 6 * 4       # prompt embeds + pooled (fp16), time ids
    assert latents + cond < est["bytes"] < latents + cond + 200_000
    assert est["bytes"] <= 16e6
