"""`agd train`: the gap to CFG closes on held-out trajectories, the base stays bit-identical,
a killed run resumes to the same result, two processes write one adapter, bad inputs exit 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import agd_here as agd

REPO = Path(__file__).resolve().parent.parent
# One thread per process: these models are tiny, and on a shared 2-core machine two threads
# per process spend most of their time waiting for each other (10x slower measured here).
ENV = {**os.environ, "AGD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
_COLLECTIONS: dict[str, Path] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


# tiny-dit: 8 classes x 8 = 64 trajectories (a stable validation split, < 2 s to record);
# tiny-sd: 2 prompts x 2 with 4 sampling steps (its UNet is slow on CPU; only shapes matter there)
COLLECT = {"tiny-dit": {"num_per_prompt": 8},
           "tiny-sd": {"num_per_prompt": 2, "steps": 4, "prompts": "PROMPTS"}}


@pytest.fixture(scope="session")
def collection(tmp_path_factory):
    """A real collection per tiny preset, recorded once per session by `agd collect`'s API."""
    from agd_cli.collect.run import run_collect

    def get(preset: str) -> Path:
        if preset not in _COLLECTIONS:
            root = tmp_path_factory.mktemp(f"collect-{preset}")
            kwargs = dict(COLLECT[preset])
            if kwargs.get("prompts") == "PROMPTS":
                (root / "prompts.txt").write_text("a red fox in the snow\na lighthouse at dusk\n")
                kwargs["prompts"] = str(root / "prompts.txt")
            run_collect(preset, out=str(root / preset), device="cpu", workdir=str(root), **kwargs)
            _COLLECTIONS[preset] = root / preset
        return _COLLECTIONS[preset]

    return get


@pytest.fixture
def run_of(collection, tmp_path):
    """A private copy of a collection's run folder inside this test's workspace."""

    def make(preset: str, name: str | None = None) -> Path:
        dst = tmp_path / "ws" / (name or preset)
        shutil.copytree(collection(preset) / "trajectories", dst / "trajectories")
        return dst

    return make




def adapter_state(path: Path) -> dict[str, torch.Tensor]:
    from agd_cli.core.adapter_file import read_adapter_file

    return read_adapter_file(path)[0]


def base_state(den) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in den.model.state_dict().items()}


# --- the numbers: the gap closes, measured on held-out trajectories -----------------------------
def test_gap_closed_tiny_dit_via_cli(run_of, capsys):
    run = run_of("tiny-dit")
    code, out, err = agd("train", "--run", str(run), "--steps", "800", "--lr", "3e-2", "--json",
                         capsys=capsys)
    assert code == 0, err
    s = json.loads(out)
    for key in ("steps", "val_loss", "val_loss_no_adapter", "adapter", "params", "seconds"):
        assert key in s
    assert s["steps"] == 800 and s["params"] > 0
    assert s["val_loss"] <= 0.5 * s["val_loss_no_adapter"], s
    assert s["trajectories"]["val"] >= 1 and s["trajectories"]["train"] > s["trajectories"]["val"]
    # artifacts: the self-describing adapter, the metrics log, the loss curve
    from agd_cli.families import load_with_adapters

    den = load_with_adapters(s["adapter"], device="cpu", text=False)
    assert den.adapters.metadata["train_steps"] == 800
    # the ω range the collection sampled, which the ω embedding is clamped to
    assert den.adapters.config.omega_range == list(den.preset.omega_range)
    assert abs(den.adapters.metadata["val_loss"] - s["val_loss"]) < 1e-9
    records = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 801))
    assert (run / "train" / "loss.png").stat().st_size > 1000
    # --run names the collection: nothing is picked "as the most recent" behind the user's back
    assert "most recent" not in err and "using the" not in err, err


def test_base_bit_identical_and_grads_flow_with_checkpointing(run_of):
    """Training touches only the adapters; gradient checkpointing still lets grads reach them."""
    from agd_cli.train.data import TrajectoryData
    from agd_cli.train.run import Trainer, prepare_denoiser, recorded_preset
    from agd_cli.train.settings import TrainSettings

    run = run_of("tiny-sd")
    roots = [run / "trajectories"]
    preset = recorded_preset(roots, None)
    settings = TrainSettings.resolve(preset, {"steps": 3, "batch_size": 4,
                                              "gradient_checkpointing": True})
    den = prepare_denoiser(preset, torch.device("cpu"), settings)
    assert den.model.is_gradient_checkpointing and not den.model.training
    before = base_state(den)
    start = {k: v.clone() for k, v in den.adapters.state_dict().items()}
    trainer = Trainer(den, TrajectoryData(roots), settings, run)
    idx = trainer.sampler.next(4)
    b = trainer.data.batch(idx)  # the training loss, through public API only
    pred = den.forward(b.x, b.timesteps, b.cond, omega=b.omega, negative=b.uncond)
    (pred.float() - b.target).pow(2).sum().backward()
    grads = [p.grad for p in trainer.params if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in den.model.parameters())
    trainer.opt.zero_grad(set_to_none=True)
    for _ in range(3):
        trainer.train_step()
    after = base_state(den)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [k for k, v in den.adapters.state_dict().items() if not torch.equal(v, start[k])]
    assert changed
    with den.adapters.disabled():  # and the frozen base still predicts what a fresh base does
        from agd_cli.families import load_denoiser

        fresh = load_denoiser(preset, device="cpu", text=False)
        b = trainer.data.batch(idx)
        with torch.no_grad():
            assert torch.equal(den.forward(b.x, b.timesteps, b.cond),
                               fresh.forward(b.x, b.timesteps, b.cond))


def test_memory_measures_the_step_train_takes(run_of):
    """`agd bench --memory` measures `agd train`'s step: on the same batch from the same start,
    both give the same loss and the same adapter update (loss scaling, clip, optimizer alike)."""
    from agd_cli.train.data import ShuffledSampler, TrajectoryData
    from agd_cli.train.probe import train_step_of
    from agd_cli.train.run import Trainer, prepare_denoiser, recorded_preset
    from agd_cli.train.settings import TrainSettings, lr_at
    from agd_cli.train.step import make_optimizer

    run = run_of("tiny-dit")
    roots = [run / "trajectories"]
    preset = recorded_preset(roots, None)
    settings = TrainSettings.resolve(preset, {"steps": 4, "batch_size": 4, "grad_accum": 1,
                                              "optimizer": "adamw", "lr": 1e-2})
    cpu = torch.device("cpu")
    trained, measured = (prepare_denoiser(preset, cpu, settings) for _ in range(2))
    trainer = Trainer(trained, TrajectoryData(roots), settings, run)
    # the batch the trainer's first step draws, as memory's inputs
    b = trainer.data.batch(ShuffledSampler(trainer.sampler.indices, settings.seed).next(4))
    inputs = {"x": b.x, "t": b.timesteps, "cond": b.cond, "omega": b.omega, "target": b.target,
              "negative": b.uncond}
    params = [p for p in measured.adapters.parameters() if p.requires_grad]
    opt, _ = make_optimizer(params, "adamw", lr_at(0, settings), settings.weight_decay, cpu)
    step = train_step_of(measured, params, opt, settings.precision)
    assert step(inputs) == trainer.train_step()
    after_train, after_memory = trained.adapters.state_dict(), measured.adapters.state_dict()
    assert all(torch.equal(after_train[k], after_memory[k]) for k in after_train)
    assert any(not torch.equal(v, measured.adapters.state_dict()[k]) for k, v in
               prepare_denoiser(preset, cpu, settings).adapters.state_dict().items())


# --- checkpoints and resume -------------------------------------------------------------------------
def test_resume_after_kill_matches_uninterrupted(run_of):
    killed, clean = run_of("tiny-dit", "killed"), run_of("tiny-dit", "clean")
    args = ["train", "--steps", "120", "--checkpoint-every", "10", "--keep-checkpoints", "2",
            "--lr", "1e-2", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "agd_cli.cli", *args, "--run", str(killed)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith("step-") for p in ckpts.glob("step-*")):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "adapter.safetensors").exists()
    first = sorted(ckpts.glob("step-*"))
    assert first and int(first[-1].name[5:]) < 120
    code, _, _ = agd(*args, "--run", str(killed))  # resumes from the last checkpoint
    assert code == 0
    code, _, _ = agd(*args, "--run", str(clean))
    assert code == 0
    a, b = adapter_state(killed / "adapter.safetensors"), adapter_state(clean / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert len(list(ckpts.glob("step-*"))) == 2  # the last two kept
    log = [json.loads(x) for x in (killed / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 121))  # no step twice


def test_checkpoint_roundtrip_adamw8bit(tmp_path):
    """8-bit optimizer state survives safetensors exactly, and the next step is the same."""
    from agd_cli.train.checkpoint import latest_checkpoint, save_checkpoint
    from agd_cli.train.step import make_optimizer

    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(128, 64)

    def step(m, opt, i):
        torch.manual_seed(100 + i)
        m(torch.randn(8, 128)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    m = model()
    opt, name = make_optimizer(list(m.parameters()), "adamw8bit", 1e-2, 0.0, torch.device("cpu"))
    assert name == "adamw8bit"
    for i in range(3):
        step(m, opt, i)
    save_checkpoint(tmp_path, 3, m.state_dict(), opt.state_dict(), {"note": "x"}, keep=1)
    step(m, opt, 3)
    m2 = model()
    opt2, _ = make_optimizer(list(m2.parameters()), "adamw8bit", 1e-2, 0.0, torch.device("cpu"))
    path, (weights, opt_state, state) = latest_checkpoint(tmp_path)
    assert path.name == "step-000003" and state["note"] == "x" and state["step"] == 3
    m2.load_state_dict(weights)
    opt2.load_state_dict(opt_state)
    assert opt2.state[m2.weight]["state1"].dtype == torch.uint8  # really 8-bit state
    step(m2, opt2, 3)
    assert torch.equal(m.weight, m2.weight) and torch.equal(m.bias, m2.bias)
    assert not list(tmp_path.glob(".*"))  # no temp folders left


def test_split_by_trajectory_and_sampler_position(collection):
    from agd_cli.train.data import ShuffledSampler, TrajectoryData

    data = TrajectoryData([collection("tiny-dit")])
    train, val = data.split(0.2, seed=0)
    tr_traj, va_traj = set(data.samples[train, 0].tolist()), set(data.samples[val, 0].tolist())
    assert va_traj and not tr_traj & va_traj and len(tr_traj | va_traj) == data.num_trajectories
    assert torch.equal(data.split(0.2, seed=0)[1], val)
    s = ShuffledSampler(train, seed=1)
    epoch = torch.cat([s.next(7) for _ in range(len(train) // 7)] + [s.next(len(train) % 7)])
    assert sorted(epoch.tolist()) == sorted(train.tolist())  # every sample once per epoch
    assert len({tuple(data.samples[i].tolist()) for i in epoch[:10]}) == 10
    s.next(5)
    resumed = ShuffledSampler(train, seed=1, **{k: v for k, v in s.state().items() if k != "seed"})
    assert torch.equal(resumed.next(50), s.next(50))
    b = data.batch(val[:5])
    assert b.x.shape == (5, *data.sample_shape) and b.cond["class_labels"].shape == (5,)
    mapped = TrajectoryData([collection("tiny-dit")], in_memory=False)  # memory-mapped reads
    for key in ("x", "target", "timesteps", "omega"):
        assert torch.equal(getattr(mapped.batch(epoch[:40]), key), getattr(data.batch(epoch[:40]), key))


# --- several processes --------------------------------------------------------------------------------
def test_two_processes_write_one_adapter_equal_to_one_process(run_of):
    two, one = run_of("tiny-dit", "two"), run_of("tiny-dit", "one")
    args = ["train", "--steps", "30", "--batch-size", "16", "--checkpoint-every", "10", "--json"]
    # accelerate's --cpu flag starts one process; --multi_gpu on a machine without GPUs goes
    # through torchrun and gives two CPU processes joined by gloo (accelerate's MULTI_CPU)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "agd_cli.cli", *args, "--device", "cpu", "--run", str(two)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])  # one JSON object, from rank 0
    assert summary["processes"] == 2 and summary["steps"] == 30
    assert proc.stdout.count('"adapter"') == 1
    assert sorted(p.name for p in two.iterdir()) == [".agd.lock", "adapter.safetensors",
                                                     "checkpoints", "train", "trajectories"]
    assert len((two / "train" / "metrics.jsonl").read_text().splitlines()) == 30 + 4
    code, _, _ = agd(*args, "--run", str(one))
    assert code == 0
    a, b = adapter_state(two / "adapter.safetensors"), adapter_state(one / "adapter.safetensors")
    for k in a:  # the global batch is split, so two processes compute the same update
        assert torch.allclose(a[k], b[k], atol=1e-5), k


# --- bad inputs: exit 2, one message, no traceback, nothing written -------------------------------------
def _truncate(run: Path) -> None:
    shard = sorted((run / "trajectories").glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _corrupt(run: Path) -> None:
    shard = sorted((run / "trajectories").glob("shard-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-100:-90] = bytes(10)
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize(("case", "extra", "damage", "needle"), [
    ("no collection", [], None, "no collection found"),
    ("truncated shard", [], _truncate, "is damaged: "),
    ("corrupt shard", [], _corrupt, "is damaged: checksum mismatch"),
    ("adapter kind", ["--adapter-kind", "cross_attention"], None, "does not fit family 'dit'"),
    ("lora on dit", ["--adapter-kind", "lora"], None, "DiT is class-conditional"),
    ("steps 0", ["--max-steps", "0"], None, "--max-steps must be a positive integer, got 0"),
    ("other preset", ["--preset", "tiny-sd"], None, "recorded with preset 'tiny-dit'"),
])
def test_bad_inputs_exit_2(run_of, tmp_path, capsys, case, extra, damage, needle):
    if case == "no collection":
        target = ["--workdir", str(tmp_path / "empty")]
        run = None
    else:
        run = run_of("tiny-dit")
        target = ["--run", str(run)]
        if damage:
            damage(run)
    code, out, err = agd("train", *target, "--steps", "5", *extra, capsys=capsys)  # last wins
    assert code == 2, err
    assert needle in err and "Traceback" not in err and "hint:" in err
    if run is not None:
        assert not (run / "adapter.safetensors").exists() and not (run / "checkpoints").exists()


def _halved(run: Path, tag: str | None = None) -> None:
    """Rewrite a collection's shards at half resolution (a collection recorded at another size);
    with `tag`, add one such shard (new ids) next to the full-size ones instead."""
    from safetensors.torch import load_file

    from agd_cli.collect.store import TrajectoryStore

    store = TrajectoryStore(run / "trajectories")
    for info in store.shards():
        t = load_file(store.root / info["file"])
        t["x"], t["target"] = t["x"][..., ::2, ::2], t["target"][..., ::2, ::2]
        ids = t["trajectory_id"].tolist() if tag is None else [1000 + i for i in range(len(t["x"]))]
        t["trajectory_id"] = torch.tensor(ids)
        store.write_shard(tag or info["file"].removeprefix("shard-").removesuffix(".safetensors"),
                          t, ids)
        if tag:
            return


@pytest.mark.parametrize("where", ["two collections", "one collection"])
def test_samples_of_two_shapes_are_refused_before_training(run_of, capsys, where):
    run = run_of("tiny-dit")
    if where == "two collections":
        other = run_of("tiny-dit", "small")
        _halved(other)
        extra = ["--data", str(other)]
    else:
        _halved(run, tag="w9-00000000")
        extra = []
    code, out, err = agd("train", "--run", str(run), *extra, "--steps", "2", "--json",
                         capsys=capsys)
    assert code == 2, err
    msg = json.loads(out)["error"]
    assert "4x4x4" in msg and "4x8x8" in msg and "shard-w" in msg, msg
    assert "same preset and resolution" in json.loads(out)["hint"]
    assert not (run / "checkpoints").exists() and "Traceback" not in err


def test_the_same_collection_twice_counts_each_trajectory_once(run_of, capsys):
    run = run_of("tiny-dit")
    copy = run.parent / "copy"
    shutil.copytree(run, copy)
    spellings = [str(run), str(run / "trajectories"), str(run / ".." / run.name / "trajectories"), str(copy)]
    code, out, err = agd("train", "--run", str(run), *[a for d in spellings for a in ("--data", d)],
                         "--steps", "2", "--json", capsys=capsys)
    assert code == 0, err
    split = json.loads(out)["trajectories"]
    assert split["train"] + split["val"] == 64, split  # not 5 × 64: validation stays held out
    assert "reading it once" in err and "training on each once" in err


def test_data_into_a_new_run_folder(run_of, capsys, tmp_path):
    run = run_of("tiny-dit")
    out_dir = tmp_path / "experiments" / "first"  # two levels that do not exist yet
    code, out, err = agd("train", "--data", str(run), "--run", str(out_dir), "--steps", "2",
                         "--json", capsys=capsys)
    assert code == 0, err
    assert (out_dir / "adapter.safetensors").is_file()
    assert not (run / "adapter.safetensors").exists()  # the collection's folder is left alone
    assert json.loads(out)["trajectories"]["train"] > 0


def test_a_missing_run_folder_without_data_is_refused(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    code, out, err = agd("train", "--run", str(missing), "--json", capsys=capsys)
    assert code == 2, err
    report = json.loads(out)
    assert f"run folder '{missing}' not found" in report["error"], report
    assert "--data" in report["hint"] and not missing.exists() and "Traceback" not in err


def test_a_copied_sidecar_is_refused_as_collect_would_repair_it(run_of, capsys):
    run = run_of("tiny-dit")
    first = sorted((run / "trajectories").glob("shard-*.json"))[0]
    shutil.copy(first, first.with_name("shard-w0-00000099.json"))
    code, out, err = agd("train", "--run", str(run), "--steps", "2", "--json", capsys=capsys)
    assert code == 2, err
    report = json.loads(out)
    assert "shard-w0-00000099.safetensors is damaged" in report["error"], report
    assert first.with_suffix(".safetensors").name in report["error"]
    assert "agd collect" in report["hint"]


def _manifest_with(run: Path, steps) -> None:
    path = run / "trajectories" / "manifest.json"
    m = json.loads(path.read_text())
    m["config"]["steps"] = steps
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(("content", "needle"), [
    (None, "field 'config.steps' is \"four\", expected an integer"),
    (b"[]", "holds a list, not a JSON object"),
    (b"null", "holds null, not a JSON object"),
    (bytes(range(256)) * 4, "not UTF-8 text"),
])
def test_damaged_manifest_exit_2(run_of, capsys, content, needle):
    run = run_of("tiny-dit")
    manifest = run / "trajectories" / "manifest.json"
    if content is None:
        _manifest_with(run, "four")
    else:
        manifest.write_bytes(content)
    code, out, err = agd("train", "--run", str(run), "--steps", "2", "--json", capsys=capsys)
    assert code == 2, err
    report = json.loads(out)
    assert needle in report["error"] and str(manifest) in report["error"], report
    assert report["hint"] and "Traceback" not in err


# --- previews, memory benchmark, help ---------------------------------------------------------------
def test_preview_images(run_of, capsys):
    from agd_cli.infra.images import read_png_metadata

    run = run_of("tiny-dit")
    code, _, err = agd("train", "--data", str(run / "trajectories"), "--steps", "4",
                       "--preview-every", "2", capsys=capsys)  # results go to its run folder
    assert code == 0, err
    previews = sorted((run / "train").glob("preview-step-*.png"))
    assert [p.name for p in previews] == ["preview-step-000002.png", "preview-step-000004.png"]
    assert read_png_metadata(previews[-1])["step"] == "4"


def test_memory_of_one_training_step():
    from agd_cli.train.probe import measure_train_step

    rows = {opt: measure_train_step("tiny-sd", precision="fp32", optimizer=opt, checkpointing=True,
                                    batch_size=2, device="cpu", isolate=False)
            for opt in ("adamw", "adamw8bit")}
    for opt, r in rows.items():
        assert r["optimizer"] == opt and r["peak_bytes"] >= r["baseline_bytes"] > 0
        assert r["adapter_params"] > 0 and r["base_params"] > 10 * r["adapter_params"]
    # AdamW keeps two fp32 moments per adapter parameter; 8-bit never more
    assert rows["adamw"]["optimizer_state_bytes"] >= 8 * rows["adamw"]["adapter_params"]
    assert rows["adamw8bit"]["optimizer_state_bytes"] <= rows["adamw"]["optimizer_state_bytes"]


def test_help_does_not_import_torch():
    code = ("import sys; from agd_cli.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--grad-accum" in proc.stdout and "--resume / --no-resume" in proc.stdout


def test_checkpoint_from_before_the_omega_range_resumes(run_of, capsys):
    """A run checkpointed before adapters recorded their trained ω range (and the ω loss power)
    resumes after the upgrade; another adapter setting is still refused."""
    run = run_of("tiny-dit", "upgraded")
    args = ["train", "--steps", "10", "--checkpoint-every", "5", "--keep-checkpoints", "5",
            "--run", str(run), "--json"]
    assert agd(*args)[0] == 0
    (run / "adapter.safetensors").unlink()
    states = sorted((run / "checkpoints").glob("step-*/state.json"))
    assert states
    for path in states:  # what a checkpoint written before these settings holds
        state = json.loads(path.read_text())
        assert state["identity"]["adapter"]["omega_range"] is not None
        del state["identity"]["adapter"]["omega_range"], state["identity"]["omega_loss_power"]
        path.write_text(json.dumps(state))
    code, out, _ = agd(*args[:2], "20", *args[3:])
    assert code == 0, out
    assert (run / "adapter.safetensors").is_file()
    for path in sorted((run / "checkpoints").glob("step-*/state.json")):
        state = json.loads(path.read_text())
        state["identity"]["adapter"]["hidden_dim"] += 1
        path.write_text(json.dumps(state))
    capsys.readouterr()
    code, out, err = agd(*args[:2], "30", *args[3:], capsys=capsys)
    assert code == 2 and "hidden_dim" in out + err
