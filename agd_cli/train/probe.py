"""Peak memory of one adapter-training step on a preset's base at real size (random weights).

The step measured is `agd train`'s own (step.AdapterStep: its autocast rule, loss scaling,
GRAD_CLIP and update) on random inputs of the real shapes. Each configuration runs in a fresh
subprocess so that nothing earlier inflates its peak (infra.peak_memory.PeakMemory measures it).
`agd train` asks it before training on the CPU; `agd bench --memory` reports it.

    python -m agd_cli.train.probe --preset sdxl --resolution 512 --device cpu   # one JSON line
    python benchmarks/train_memory.py --preset sdxl                         # the grid, a table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time

import torch

from agd_cli import PACKAGE_DIR
from agd_cli.config import checks
from agd_cli.config.presets import load_preset
from agd_cli.config.vocab import DTYPES, OPTIMIZERS
from agd_cli.families import FAMILY_CLASSES, resolve_device
from agd_cli.families.base import TORCH_DTYPES
from agd_cli.infra.errors import AgdError, ModelError
from agd_cli.infra.peak_memory import PeakMemory
from agd_cli.infra.runtime import quiet_libraries
from agd_cli.train.estimate import estimate_train_step
from agd_cli.train.step import AdapterStep, make_optimizer


def measure_train_step(preset_name: str, precision: str = "bf16", optimizer: str = "adamw8bit",
                       checkpointing: bool = True, batch_size: int = 1, device: str = "auto",
                       resolution: int | None = None, isolate: bool = True,
                       timeout: float | None = None) -> dict:
    """Peak memory of one full training step (forward, backward, optimizer step), as a dict.

    Keys: peak_bytes (the figure: peak over a first step and a steady-state second step),
    baseline_bytes (before training: base weights, adapters, libraries), step_bytes (peak -
    baseline: gradients, optimizer state, activations), weights_bytes, optimizer_state_bytes,
    base_params, adapter_params, method, seconds_step (the second step) and the configuration.
    """
    args = {"preset_name": preset_name, "precision": precision, "optimizer": optimizer,
            "checkpointing": checkpointing, "batch_size": batch_size, "device": device,
            "resolution": resolution}
    if not isolate:
        return measure_in_process(**args)
    cmd = [sys.executable, "-m", "agd_cli.train.probe", "--preset", preset_name, "--precision", precision,
           "--optimizer", optimizer, "--batch-size", str(batch_size), "--device", device,
           "--checkpointing" if checkpointing else "--no-checkpointing"]
    if resolution:
        cmd += ["--resolution", str(resolution)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise _failed(preset_name, cmd, proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _failed(preset_name: str, cmd: list[str], proc: subprocess.CompletedProcess) -> AgdError:
    """The measuring process's failure as one line: its error (the last line it wrote, not the
    traceback) and, in the hint, the command to rerun by hand. Exit 2 where the child refused
    an input (its own exit 2), else 1: a crash is not the user's doing."""
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    reason = lines[-1].removeprefix("error: ") if lines else "no output"
    shown = subprocess.list2cmdline(cmd) if os.name == "nt" else shlex.join(cmd)
    err = ModelError(f"memory measurement of {preset_name} failed (exit {proc.returncode}): "
                     f"{reason[:300]}", hint=f"run it by hand to see why: {shown}")
    if proc.returncode != AgdError.exit_code:
        err.exit_code = 1
    return err


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random_base(preset, device, dtype):
    """The preset's base with seeded random weights, built directly in `dtype`.

    Like load_denoiser(weights="random", text=False), but without an fp32 copy first
    (10 GB for SDXL) and keeping half precision on CPU too, so the CPU figure is comparable.
    """
    cls = FAMILY_CLASSES[preset.family]
    if not (preset.architecture.get("unet") or preset.architecture.get("transformer")):
        # a small shipped base (mnist) has no architecture to build from: load it, as
        # families.count_parameters does (on the meta device its weights become shapes)
        return cls.load(preset, device=device, dtype=dtype, text=False)
    with _default_dtype(dtype):
        model, _text_encoders, sched, vae = cls._build_random(preset, text=False)
    del _text_encoders  # conditions come from the collection: no text encoders in training
    return cls(preset, model, {}, sched, device, dtype,
               preset.base_source(random_weights=True), vae)


def random_inputs(den, batch: int, resolution: int) -> dict:
    """Model inputs, target, timesteps, ω and condition of the preset's real shapes."""
    dev, dt = den.device, den.dtype
    shape = (batch, *den.latent_shape(resolution, resolution))
    if hasattr(den, "random_cond"):  # diffusion-transformer families know their own shapes
        cond = den.random_cond(batch)
    elif den.family == "dit":
        cond = {"class_labels": torch.randint(0, den.null_class, (batch,), device=dev)}
    else:
        spec = den.cond_spec()
        length = den.preset.architecture.get("tokenizer", {}).get("model_max_length", 77)
        cond = {"prompt_embeds": torch.randn(batch, length, spec["token_dim"], device=dev, dtype=dt)}
        if den.family == "sdxl":
            cond["pooled"] = torch.randn(batch, spec["pooled_dim"], device=dev, dtype=dt)
            cond["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                            device=dev, dtype=dt).repeat(batch, 1)
    return {"x": torch.randn(shape, device=dev, dtype=dt), "target": torch.randn(shape, device=dev),
            "t": torch.randint(0, 1000, (batch,), device=dev),
            "omega": torch.rand(batch, device=dev) * 5 + 1, "cond": cond}


def batch_losses(den, update, inputs: dict):
    """The loss `agd train` takes on a batch (its micro-batch share of the step's mean, here the
    whole batch): forward under the step's autocast rule, squared error summed in fp32 over
    the batch's elements. A generator, as the trainer's, so the forward runs inside the step."""
    with update.autocast():
        pred = den.forward(inputs["x"], inputs["t"], inputs["cond"], omega=inputs["omega"],
                           negative=inputs.get("negative"))
    yield (pred.float() - inputs["target"]).pow(2).sum() / inputs["target"].numel()


def train_step_of(den, params: list, opt, precision: str):
    """`agd train`'s step (step.AdapterStep: loss scaling, GRAD_CLIP, update) as a function of
    one batch of inputs; it returns the batch's loss."""
    update = AdapterStep(params, opt, precision, den.device, den.dtype)

    def step(inputs: dict) -> float:
        return update(batch_losses(den, update, inputs))

    return step


def measure_in_process(preset_name, precision: str, optimizer: str, checkpointing: bool,
                       batch_size: int, device: str, resolution: int | None,
                       flops: bool = True) -> dict:
    """One training step's peak memory, measured in this process (the probe's child side);
    on the meta device `flops=False` skips counting FLOPs (a memory check is faster without)."""
    checks.dtype(precision, "precision")
    preset = load_preset(preset_name) if isinstance(preset_name, str) else preset_name
    dev = resolve_device(device)
    dtype = TORCH_DTYPES[precision]
    res = resolution or preset.resolution
    with torch.device(dev) if dev.type == "meta" else contextlib.nullcontext():
        den = build_random_base(preset, dev, dtype)
        if checkpointing:
            den.model.enable_gradient_checkpointing()
        torch.manual_seed(0)
        adapters = den.new_adapters().train()
        inputs = random_inputs(den, batch_size, res)
    params = [p for p in adapters.parameters() if p.requires_grad]
    figures = (_estimate(den, adapters, inputs, optimizer, precision, flops) if dev.type == "meta"
               else _run_steps(den, params, inputs, optimizer, precision, dev))
    return {"preset": preset.name, "family": preset.family, "device": str(dev),
            "precision": precision, "optimizer_requested": optimizer,
            "gradient_checkpointing": checkpointing, "batch_size": batch_size,
            "resolution": res, "latent_shape": list(den.latent_shape(res, res)),
            "base_params": sum(p.numel() for p in den.model.parameters()),
            "adapter_params": sum(p.numel() for p in params),
            "weights_bytes": sum(p.numel() * p.element_size() for p in den.model.parameters()),
            "torch": torch.__version__, **figures}


def _estimate(den, adapters, inputs: dict, optimizer: str, precision: str,
              flops: bool = True) -> dict:
    """The meta-device figures (no GPU needed): peak bytes and FLOPs per sample."""
    def make_step(params, opt):
        return train_step_of(den, params, opt, precision)

    est = estimate_train_step(den, adapters, inputs, make_step, optimizer, flops)
    return {**est, "optimizer": optimizer, "seconds_step": None}


def _run_steps(den, params, inputs: dict, optimizer: str, precision: str, dev) -> dict:
    """Two real training steps on CPU or CUDA; peak memory over both, time of the second."""
    opt, used = make_optimizer(params, optimizer, 1e-4, 0.0, dev)
    step = train_step_of(den, params, opt, precision)
    # The window covers two steps: the first allocates the optimizer state (after its
    # backward), the second runs with it in place: the steady state of a training run.
    with PeakMemory(dev) as mem:
        losses = [step(inputs)]
        t0 = time.perf_counter()
        losses.append(step(inputs))
        seconds = time.perf_counter() - t0
    method, baseline, peak = mem.method, mem.start, mem.peak
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values()
                      for v in s.values() if isinstance(v, torch.Tensor))
    return {"optimizer": used, "optimizer_state_bytes": state_bytes, "baseline_bytes": baseline,
            "peak_bytes": peak, "step_bytes": peak - baseline, "method": method,
            "seconds_step": round(seconds, 2), "losses": losses}


def main(argv: list[str] | None = None) -> None:
    """One measurement; prints it as one JSON line (the subprocess side of measure_train_step)."""
    quiet_libraries()

    p = argparse.ArgumentParser(prog="python -m agd_cli.train.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True)
    p.add_argument("--precision", default="bf16", choices=DTYPES)
    p.add_argument("--optimizer", default="adamw8bit", choices=OPTIMIZERS)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N], or meta (an estimate "
                   "without a GPU: peak tensor memory and FLOPs, see agd_cli/estimate.py)")
    p.add_argument("--resolution", type=int, default=None)
    a = p.parse_args(argv)
    try:
        figures = measure_in_process(a.preset, a.precision, a.optimizer, a.checkpointing,
                                     a.batch_size, a.device, a.resolution)
    except AgdError as e:  # a refused input: one line (the parent reports it), exit 2
        print(f"error: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

