"""Non-finite guards: a NaN from the teacher is refused at collect (named, nothing written, the
collection resumes); a diverging training run skips its non-finite steps, stops when they keep
coming, and never writes a non-finite adapter or checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from agd_cli.collect.run import run_collect
from agd_cli.collect.store import TrajectoryStore
from agd_cli.families.base import Denoiser
from agd_cli.infra.errors import NonFiniteError
from agd_cli.infra.finite import MAX_NONFINITE_STEPS
from agd_cli.train.step import AdapterStep
from tests.conftest import agd_here as agd

STEPS = 6  # sampling steps of the small collections here


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test




def poison_guided_output(monkeypatch, call: int, row: int) -> dict:
    """From now on, the `call`-th guided (CFG) prediction (0-based, counted over the run) has
    NaN in batch row `row`; returns the call counter."""
    original = Denoiser.predict_cfg
    calls = {"n": 0}

    def predict_cfg(self, x, t, cond, uncond, omega, pair=None, **kwargs):
        out = original(self, x, t, cond, uncond, omega, pair, **kwargs)
        if calls["n"] == call:
            out = out.clone()
            out[row, 0, 0, 0] = float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(Denoiser, "predict_cfg", predict_cfg)
    return calls


# --- collect ----------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 3, STEPS - 1])
def test_a_nan_from_the_teacher_at_any_step_is_refused_and_the_collection_resumes(
        tmp_path, monkeypatch, capsys, step):
    # tiny-dit, classes 0-1 x 2: trajectories 0, 1 in the first batch, 2, 3 in the second
    args = ["collect", "--preset", "tiny-dit", "--classes", "0-1", "--num-per-prompt", "2",
            "--batch-size", "2", "--steps", str(STEPS), "--seed", "5", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    calls = poison_guided_output(monkeypatch, call=STEPS + step, row=1)  # batch 2, trajectory 3
    code, _, err = agd(*args, capsys=capsys)
    assert code == 2, err
    assert calls["n"] == 2 * STEPS  # the second batch ran to its end before it was refused
    assert "not finite" in err and "trajectory 3 (prompt 1" in err, err
    assert f"at sampling step {step + 1} of {STEPS}" in err and "--seed 5" in err, err
    assert "trajectories 2–3) was not written" in err and "--dtype bf16" in err, err
    traj = tmp_path / "run" / "trajectories"
    store = TrajectoryStore(traj)
    assert store.completed() == {0, 1} and store.damaged() == []
    assert sorted(p.name for p in traj.iterdir()) == [
        "manifest.json", "shard-w0-00000000.json", "shard-w0-00000000.safetensors"]

    monkeypatch.undo()  # a sound teacher again: the same command resumes and completes
    code, out, err = agd(*args, "--json", capsys=capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["complete"] and summary["new_trajectories"] == 2, summary


def test_the_first_nonfinite_step_is_named_when_nan_spreads(tmp_path, monkeypatch):
    """A NaN in the output at step 2 makes every later x_t NaN too; the error names step 2."""
    poison_guided_output(monkeypatch, call=1, row=0)
    with pytest.raises(NonFiniteError, match=rf"trajectory 0 \(prompt 0: '0'.* step 2 of {STEPS}"):
        run_collect("tiny-dit", classes="0", num_per_prompt=2, batch_size=2, steps=STEPS,
                    device="cpu", out=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "trajectories").exists()  # a failed start leaves nothing


def test_an_fp16_overflow_of_a_stored_target_is_refused(tmp_path, monkeypatch):
    """Finite in fp32 but beyond fp16's range (65504): it would be stored as inf."""
    original = Denoiser.predict_cfg

    def predict_cfg(self, *args, **kwargs):
        out = original(self, *args, **kwargs).clone()
        out[1, 0, 0, 0] = 1e6
        return out

    monkeypatch.setattr(Denoiser, "predict_cfg", predict_cfg)
    with pytest.raises(NonFiniteError, match=r"trajectory 1 \(prompt 0.* step 1 of"):
        run_collect("tiny-dit", classes="0", num_per_prompt=2, batch_size=2, steps=STEPS,
                    device="cpu", out=str(tmp_path / "run"))


def test_a_text_encoder_overflow_is_named_before_sampling(tmp_path, monkeypatch):
    from agd_cli.families.sd import SDDenoiser

    original = SDDenoiser.encode

    def encode(self, prompts, size=None):
        cond = original(self, prompts, size)
        for i, p in enumerate(prompts):
            if p == "a lighthouse at dusk":
                cond["prompt_embeds"][i, 3, 0] = float("inf")
        return cond

    monkeypatch.setattr(SDDenoiser, "encode", encode)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na lighthouse at dusk\n", encoding="utf-8")
    sampled = poison_guided_output(monkeypatch, call=-1, row=0)  # counts calls, poisons none
    with pytest.raises(NonFiniteError, match="prompt 1: 'a lighthouse at dusk'"):
        run_collect("tiny-sd", prompts=str(prompts), num_per_prompt=1, steps=2, device="cpu",
                    out=str(tmp_path / "run"))
    assert sampled["n"] == 0  # refused before any sampling


# --- train: the step ----------------------------------------------------------------------------
def _step_with(optimizer: str, scaler: bool = False):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096))  # AdamW8bit quantizes tensors of >= 4096 elements
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit([p], lr=1e-2)
    else:
        opt = torch.optim.AdamW([p], lr=1e-2)
    step = AdapterStep([p], opt, "fp32", torch.device("cpu"), torch.float32)
    if scaler:
        step.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return p, opt, step


def _state(opt) -> list[torch.Tensor]:
    return [v.detach().clone().float() for s in opt.state.values() for v in s.values()
            if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("optimizer, scaler", [("adamw8bit", False), ("adamw", False),
                                               ("adamw", True)])
def test_a_nonfinite_step_applies_no_update_and_leaves_the_optimizer_state_finite(optimizer,
                                                                                  scaler):
    p, opt, step = _step_with(optimizer, scaler)
    step([(p ** 2).sum()])  # a good step: creates the optimizer state
    assert not step.skipped
    weights, state = p.detach().clone(), _state(opt)
    scale = step.scaler.get_scale() if scaler else None
    for bad in (float("nan"), float("inf")):
        total = step([(p ** 2).sum() * bad])
        assert step.skipped and not math.isfinite(total)
        assert torch.equal(p.detach(), weights)                    # no update
        assert all(torch.equal(a, b) for a, b in zip(_state(opt), state, strict=True))
        assert p.grad is None
    if scaler:  # the scaler saw the overflow: it lowered its scale, as after its own skips
        assert step.scaler.get_scale() < scale
    step([(p ** 2).sum()])  # and the next good step trains again
    assert not step.skipped and not torch.equal(p.detach(), weights)
    assert all(bool(torch.isfinite(t).all()) for t in [p.detach(), *_state(opt)])


# --- train: the run -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nonfinite")
    run_collect("tiny-dit", num_per_prompt=4, steps=STEPS, device="cpu", out=str(root / "run"))
    return root / "run" / "trajectories"


@pytest.fixture
def run(dit_collection, tmp_path) -> Path:
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(dit_collection, folder / "trajectories")
    return folder


def _content(path: Path) -> str:
    """An adapter file's tensors and metadata, hashed (what a byte-for-byte copy keeps)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for key in sorted(f.keys()):
            h.update(key.encode() + f.get_tensor(key).numpy().tobytes())
    return h.hexdigest()


def _finite_files(folder: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for f in folder.rglob("*.safetensors")
               for t in load_file(str(f)).values() if t.is_floating_point())


def test_a_diverging_lr_keeps_the_good_adapter_and_writes_no_nonfinite_file(run, capsys):
    code, _, err = agd("train", "--run", str(run), "--steps", "4", "--checkpoint-every", "2",
                       capsys=capsys)
    assert code == 0, err
    good = _content(run / "adapter.safetensors")
    # today's black-box failure: a diverging --lr wrote an all-NaN adapter and exited 0
    code, out, err = agd("train", "--run", str(run), "--steps", "30", "--lr", "1e30",
                         "--checkpoint-every", "1", "--no-resume", capsys=capsys)
    assert code == 2, err
    assert "training diverged" in err and "was not written" in err and "--lr" in err, err
    assert "nan% of the gap" not in out
    assert _content(run / "adapter.safetensors") == good
    assert _finite_files(run)  # no checkpoint with NaN or inf in it either


def test_nonfinite_losses_are_skipped_then_the_run_stops(run, monkeypatch, capsys):
    """A loss that turns NaN from step 5 on: steps 1-4 train, then MAX_NONFINITE_STEPS warnings
    and a stop with exit 2; no adapter is written, and the checkpoints written meanwhile hold
    the step-4 weights (no update was applied since)."""
    from agd_cli.train.run import Trainer

    original = Trainer._sq_error

    def sq_error(self, idx, adapters=True, weighted=False):
        loss = original(self, idx, adapters, weighted)
        return loss * float("nan") if weighted and self.step >= 4 else loss

    monkeypatch.setattr(Trainer, "_sq_error", sq_error)
    code, _, err = agd("train", "--run", str(run), "--steps", "40", "--checkpoint-every", "4",
                       capsys=capsys)
    assert code == 2, err
    warned = [line for line in err.splitlines() if "update was skipped" in line]
    assert len(warned) == MAX_NONFINITE_STEPS and warned[0].startswith("warning: step 5:"), err
    assert f"{MAX_NONFINITE_STEPS} steps in a row (up to step {4 + MAX_NONFINITE_STEPS})" in err
    assert not (run / "adapter.safetensors").exists()
    from safetensors.torch import load_file

    kept = [load_file(str(run / "checkpoints" / name / "adapters.safetensors"))
            for name in ("step-000008", "step-000012")]
    assert all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0]) and _finite_files(run)


def test_one_nonfinite_step_is_skipped_and_training_goes_on(run, monkeypatch, capsys):
    from agd_cli.train.run import Trainer

    original = Trainer._sq_error

    def sq_error(self, idx, adapters=True, weighted=False):
        loss = original(self, idx, adapters, weighted)
        return loss * float("inf") if weighted and self.step == 2 else loss

    monkeypatch.setattr(Trainer, "_sq_error", sq_error)
    code, out, err = agd("train", "--run", str(run), "--steps", "6", "--json", capsys=capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["nonfinite_steps"] == 1 and math.isfinite(summary["val_loss"])
    assert "warning: step 3:" in err and "1 in a row" in err
    assert _finite_files(run)
