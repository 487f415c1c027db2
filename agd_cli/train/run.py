"""`agd train`: fit guidance adapters to collected CFG trajectories (AGD, arXiv 2503.07274 §3.2).

The base stays frozen, in half precision and in eval mode; only the adapters (fp32, under
autocast) learn, with an L2 loss against the stored CFG-guided output. Progress is measured
honestly on held-out trajectories against the no-adapter baseline (the base's conditional
prediction), and every `checkpoint_every` steps the complete training state is written so a
killed run continues exactly where it stopped.

Here: the loop (`Trainer`) and the stage's entry point. Elsewhere: the settings, the
learning-rate schedule and the ω loss weight (train_settings.py), the optimizer step (step.py,
shared with `agd bench --memory`), saving and resuming (checkpoint.py's RunCheckpoints), the
metrics log, previews and the adapter file (train_output.py), and finding the collections and
loading the base (train_setup.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from pathlib import Path

import torch
from rich.progress import TextColumn

from agd_cli.config import checks
from agd_cli.config.presets import Preset
from agd_cli.core.guidance import per_sample, swapped_roles
from agd_cli.dry_run import train_dry_run
from agd_cli.families import FAMILY_CLASSES
from agd_cli.families.precision import resolve_precision
from agd_cli.infra import ui
from agd_cli.infra.errors import DataError, InputError, Interrupted
from agd_cli.infra.finite import NonFiniteSteps, check_finite_weights
from agd_cli.infra.locks import run_lock
from agd_cli.train.checkpoint import RunCheckpoints
from agd_cli.train.data import Batch, ShuffledSampler, TrajectoryData
from agd_cli.train.output import (
    Previews,
    announce,
    append_jsonl,
    fmt_loss,
    gap_closed,
    run_summary,
    write_adapter,
)
from agd_cli.train.resume import check_resumable, run_identity
from agd_cli.train.settings import TrainSettings, lr_at, omega_loss_weight
from agd_cli.train.setup import (
    check_cpu_memory,
    fit_gpu_memory,
    locate,
    prepare_denoiser,
    process_accelerator,
    process_device,
    recorded_preset,
)
from agd_cli.train.step import AdapterStep, make_optimizer

logger = logging.getLogger(__name__)

MAX_VAL_SAMPLES = 512  # validation cost stays bounded on big collections
SWAP_MIN_OMEGA = 1.5  # swapped targets divide by ω − 1: fp16 targets stay exact enough above it
class Trainer:
    """One training run of attached adapters on a denoiser; single or multi-process."""

    def __init__(self, den, data: TrajectoryData, settings: TrainSettings, run: str | Path,
                 accelerator=None):
        self.den, self.data, self.s = den, data, settings
        self.run = Path(run)
        self.acc = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.main = self.rank == 0
        self.device = den.device
        if settings.batch_size < self.world:
            raise InputError(f"--batch-size {settings.batch_size} is smaller than the "
                             f"{self.world} processes it is split across",
                             hint=f"use --batch-size {self.world} or more")
        self.params = [p for p in den.adapters.parameters() if p.requires_grad]
        self.opt, self.optimizer_name = make_optimizer(
            self.params, settings.optimizer, settings.lr, settings.weight_decay, self.device,
            say=self.main)
        # the step `agd bench --memory` measures too: autocast, loss scaling, clip, update
        self.update = AdapterStep(self.params, self.opt, settings.precision, self.device,
                                  den.dtype, sync_grads=self._sync_grads)
        train_idx, val_idx = data.split(settings.val_fraction, settings.seed)
        self.n_val_traj = data.trajectories_in(val_idx)
        self.n_train_traj = data.num_trajectories - self.n_val_traj
        self.n_train, self.n_val = len(train_idx), len(val_idx)
        if len(val_idx) > MAX_VAL_SAMPLES:  # an even spread over steps and trajectories
            val_idx = val_idx[torch.linspace(0, len(val_idx) - 1, MAX_VAL_SAMPLES).long()]
        self.val_idx = val_idx
        self.sampler = ShuffledSampler(train_idx, settings.seed)
        self.step = 0
        self.resumed_from: int | None = None
        self.val_no_adapter: float | None = None
        self.last_val: float | None = None
        self.records: list[dict] = []
        self.metrics_path = self.run / "train" / "metrics.jsonl"
        self.checkpoints = RunCheckpoints(self, check_resumable=functools.partial(check_resumable, self))
        self.nonfinite = NonFiniteSteps(settings.precision)  # skipped steps; stops a run that keeps diverging
        self.previews = Previews(self.run / "train")

    # --- numerics ----------------------------------------------------------------------------
    def _autocast(self):
        return self.update.autocast()

    def _mine(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's contiguous part of a global batch."""
        return torch.tensor_split(idx, self.world)[self.rank]

    def _sq_error(self, idx: torch.Tensor, adapters: bool = True,
                  weighted: bool = False) -> torch.Tensor:
        """Summed squared error of the prediction against the guided target (fp32); `weighted`:
        each sample's error times its ω weight (training only; validation stays plain L2)."""
        b = self.data.batch(idx)
        if weighted and self.s.negative_swap_share > 0 and b.uncond is not None:
            b = self._swapped(b)
        dev = self.device
        omega = b.omega.to(dev) if adapters else None
        with self._autocast():
            pred = self.den.forward(b.x.to(dev), b.timesteps.to(dev), b.cond, omega=omega,
                                    negative=b.uncond)
        sq = (pred.float() - b.target.to(dev)).pow(2)
        if not (weighted and self.s.omega_loss_power):
            return sq.sum()  # plain L2, summed as memory's step and earlier versions sum it
        weight = omega_loss_weight(b.omega, self.s.omega_loss_power, self.s.adapter.omega_range)
        return (sq.flatten(1).sum(1) * weight.to(dev)).sum()

    def _swapped(self, b: Batch) -> Batch:
        """The batch with a share of its rows' prompt and negative swapped and their target
        recomputed: CFG is antisymmetric in the two (ε_c − ε_n), and training on both orders
        teaches the adapters which is which (a similar digit's negative otherwise pulls towards
        that digit). Rows drawn from the global generator, which checkpoints save: a resumed
        run swaps the same rows."""
        rows = (torch.rand(len(b)) < self.s.negative_swap_share) & (b.omega >= SWAP_MIN_OMEGA)
        if not rows.any():
            return b
        dev = self.device
        with torch.no_grad(), self._autocast():  # the prompt's ε at x, frozen base alone (no ω)
            eps = self.den.forward(b.x[rows].to(dev), b.timesteps[rows].to(dev),
                                   {k: v[rows] for k, v in b.cond.items()}).float().cpu()
        target = b.target.clone()
        target[rows] = swapped_roles(b.target[rows], eps, b.omega[rows])

        def pick(keep: dict, swap: dict) -> dict:  # per row: `swap`'s entry where swapped
            return {k: torch.where(per_sample(rows, keep[k]), swap[k], keep[k]) for k in keep}

        return Batch(x=b.x, target=target, timesteps=b.timesteps, omega=b.omega,
                     cond=pick(b.cond, b.uncond), uncond=pick(b.uncond, b.cond))

    def _reduce(self, values: list[float]) -> list[float]:
        """Sum over processes."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.acc.reduce(t, reduction="sum").tolist()

    def _sync_grads(self) -> None:
        """All-reduce (sum) the adapter gradients in one flat buffer.

        The adapters run in forward hooks on the base's attention modules, never through a
        wrapper's forward, so DDP's hooks do not apply; an explicit all-reduce is simple and exact."""
        if self.world == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = self.acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def train_step(self) -> float:
        """One optimizer step over batch_size × grad_accum samples; returns their mean loss."""
        s = self.s
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, s)
        total = self.update(self._micro_losses())
        self.step += 1
        loss = self._reduce([total])[0]
        # a fp16 overflow with a finite loss is the grad scaler's routine skip, not divergence
        nonfinite = not math.isfinite(loss) or (self.update.skipped and self.update.scaler is None)
        self.nonfinite.record(self.step, loss, nonfinite, s.lr)
        return loss

    def _micro_losses(self):
        """The grad_accum losses of one step, each its share of the step's mean, one at a time."""
        s = self.s
        denom = s.batch_size * s.grad_accum * math.prod(self.data.sample_shape)
        for _ in range(s.grad_accum):
            loss = self._sq_error(self._mine(self.sampler.next(s.batch_size)), weighted=True) / denom
            yield loss

    @torch.no_grad()
    def evaluate(self, adapters: bool = True) -> float | None:
        """Mean squared error on the held-out trajectories (None without a validation split)."""
        if len(self.val_idx) == 0:
            return None
        sse, count = 0.0, 0
        per_sample = math.prod(self.data.sample_shape)
        for chunk in self.val_idx.split(max(self.s.batch_size, 2 * self.world)):
            mine = self._mine(chunk)
            if len(mine):
                sse += self._sq_error(mine, adapters).item()
                count += len(mine) * per_sample
        sse, count = self._reduce([sse, float(count)])
        return sse / count

    # --- checkpoints ---------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a checkpoint records about the run, to check before resuming it."""
        return run_identity(self)

    def barrier(self) -> None:
        """Wait for every process (no-op for one)."""
        if self.world > 1:
            self.acc.wait_for_everyone()

    # --- the loop --------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.records.append(record)
        if self.main:
            append_jsonl(self.metrics_path, record)

    def _validate(self) -> None:
        self.last_val = self.evaluate()
        self._log({"step": self.step, "val_loss": self.last_val,
                   "val_loss_no_adapter": self.val_no_adapter,
                   "gap_closed": gap_closed(self.last_val, self.val_no_adapter)})

    def fit(self) -> dict:
        """Train to `steps`, validating and checkpointing on the way; returns the summary."""
        t0, first = time.time(), self.step
        if self.val_no_adapter is None and self.step == 0:
            self.val_no_adapter = self.evaluate(adapters=False)  # the baseline: base cond. only
            self._validate()
        smoothed = None
        columns = TextColumn("loss {task.fields[loss]} · val {task.fields[val]} · "
                             "{task.fields[rate]} it/s")
        prog = ui.progress(columns)
        prog.disable = prog.disable or not self.main  # one bar, from the main process
        with prog:
            task = prog.add_task("training", total=self.s.steps, completed=self.step,
                                 loss="–", val=fmt_loss(self.last_val), rate="–")
            while self.step < self.s.steps:
                lr = lr_at(self.step, self.s)
                loss = self.train_step()
                if math.isfinite(loss):  # a skipped step's NaN would stick in the average
                    smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
                rate = (self.step - first) / max(time.time() - t0, 1e-9)
                self._log({"step": self.step, "loss": loss, "lr": lr})
                if self.step % self.s.checkpoint_every == 0 or self.step == self.s.steps:
                    self._validate()
                    self._refuse_nonfinite("checkpoint")
                    self.checkpoints.save()
                if self.s.preview_every and self.step % self.s.preview_every == 0:
                    self.preview()
                prog.update(task, completed=self.step, loss=fmt_loss(smoothed),
                            val=fmt_loss(self.last_val), rate=f"{rate:.2f}")
        if self.step == first and self.last_val is None:  # nothing left to train
            self.last_val = self.evaluate()
        return self.finish(time.time() - t0, smoothed)

    def _refuse_nonfinite(self, what: str) -> None:
        """Stop before writing a checkpoint or the adapter file whose weights or validation loss
        are not finite (every process decides alike: same weights, reduced loss)."""
        last = self.checkpoints.last_step()
        kept = (f"the newest checkpoint (step {last}) and any adapter file already in "
                f"{self.run} are kept" if last is not None else
                f"no checkpoint was written yet; any adapter file already in {self.run} is kept")
        check_finite_weights(self.den.adapters.parameters(), self.last_val, what, self.step, kept,
                             self.s.precision)

    def preview(self) -> Path | None:
        """CFG vs adapters from the same noise (fixed seeds), as one PNG; main process only."""
        path = self.previews.write(self.den, self.data, self.step) if self.main else None
        self.barrier()
        return path

    def finish(self, seconds: float, train_loss: float | None) -> dict:
        """Write the adapter file and the loss curve; the summary `--json` prints."""
        self._refuse_nonfinite("adapter file")
        summary = run_summary(self, seconds, train_loss)
        summary["nonfinite_steps"] = self.nonfinite.total
        if self.main:
            write_adapter(self, summary)
        self.barrier()
        return summary


# --- the stage's entry point -----------------------------------------------------------------------
def run_train(run: str | None = None, data: tuple | list = (), preset: str | None = None,
              steps: int | None = None, batch_size: int | None = None, grad_accum: int | None = None,
              lr: float | None = None, optimizer: str | None = None, precision: str | None = None,
              gradient_checkpointing: bool | None = None, val_fraction: float | None = None,
              checkpoint_every: int | None = None, keep_checkpoints: int | None = None,
              preview_every: int | None = None, resume: bool = True, seed: int = 0,
              adapter_kind: str | None = None, device: str = "auto",
              workdir: str = "agd-runs", dry_run: bool = False) -> dict:
    """Train adapters on collected trajectories; returns the summary `agd train --json` prints.
    `dry_run`: the settings and one step's estimated peak memory only (agd_cli.dry_run)."""
    flags = {k: v for k, v in locals().items() if k not in ("run", "data", "preset", "device",
                                                             "workdir", "resume", "dry_run")}
    checks.seed(seed)  # the flags that need no preset, before looking for data
    if dry_run:
        return train_dry_run(run, data, preset, flags, device, workdir)
    # 1. Where: the run folder and its collection(s); the preset they were recorded with
    run_path, roots = locate(run, data, workdir)
    checks.writable_folder(run_path, "the run folder")
    preset_obj = recorded_preset(roots, preset)
    # 2. What: settings checked, and the adapter kind against the family, before weights load
    settings = TrainSettings.resolve(preset_obj, flags)
    family = FAMILY_CLASSES[preset_obj.family]
    family.check_adapter_kind(family, settings.adapter.kind)  # uses class attributes only
    acc = process_accelerator(device)
    lock = run_lock(run_path, "train") if acc.is_main_process else contextlib.nullcontext()
    with lock:  # one writer per run folder (the main process writes for all)
        return _train(run_path, roots, preset, preset_obj, settings, acc, resume,
                      gradient_checkpointing)


def _train(run_path: Path, roots: list[Path], preset_flag: str | None, preset_obj: Preset,
           settings: TrainSettings, acc, resume: bool,
           checkpointing_flag: bool | None = None) -> dict:
    """Load the data and the model, resume or start over, and fit (the run folder is locked)."""
    trajectories = TrajectoryData(roots, processes=acc.num_processes)
    # collections with negative prompts train adapters that also read the negative
    settings.adapter.negatives = trajectories.has_negatives
    if not trajectories.has_negatives:
        settings.negative_swap_share = 0.0
    settings.adapter.omega_range = trained_omega_range(trajectories)
    # 3. The model: frozen base + fresh adapters on this process's device; a card without
    # bf16 trains in fp16 with loss scaling instead (said once)
    settings.precision = resolve_precision(settings.precision, process_device(acc))
    check_cpu_memory(preset_obj, settings, process_device(acc))
    fit_gpu_memory(preset_obj, settings, process_device(acc), checkpointing_flag)
    den = prepare_denoiser(preset_obj, process_device(acc), settings)
    if trajectories.sample_shape[0] != den.in_channels:
        raise DataError(f"collection holds {trajectories.sample_shape[0]}-channel samples; "
                        f"the base takes {den.in_channels}",
                        hint="train with the preset the trajectories were recorded with")
    trainer = Trainer(den, trajectories, settings, run_path, acc)
    if not (resume and trainer.checkpoints.resume()):
        if not resume:
            trainer.checkpoints.start_over()
    if trainer.main:
        announce(trainer, roots, preset_flag)
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        last = trainer.checkpoints.last_step()
        where = (f"the last checkpoint is step {last} in {trainer.checkpoints.dir}" if last is not None
                 else "no checkpoint was written yet")
        raise Interrupted(f"interrupted at step {trainer.step} of {settings.steps}; {where}",
                          hint="rerun the same command to resume from "
                               + (f"step {last}" if last is not None else "step 0")) from None


def trained_omega_range(data: TrajectoryData) -> list[float]:
    """The ω range the collections sampled (their recorded ranges, else the stored ω)."""
    configs = [m.get("config", {}) for m in data.manifests]
    if all("omega_min" in c and "omega_max" in c for c in configs):
        return [min(float(c["omega_min"]) for c in configs),
                max(float(c["omega_max"]) for c in configs)]
    return [float(data.omega.min()), float(data.omega.max())]
