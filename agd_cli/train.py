"""`agd train`: fit guidance adapters to collected CFG trajectories (AGD, arXiv 2503.07274 §3.2).

The base stays frozen, in half precision and in eval mode; only the adapters (fp32, under
autocast) learn, with an L2 loss against the stored CFG-guided output. Progress is measured
honestly on held-out trajectories against the no-adapter baseline (the base's conditional
prediction), and every `checkpoint_every` steps the complete training state is written so a
killed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from agd_cli import checks, ui
from agd_cli.checkpoint import (
    DAMAGED,
    checkpoint_dirs,
    clean_stale,
    latest_checkpoint,
    move_aside,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from agd_cli.data import ShuffledSampler, TrajectoryData, collection_root
from agd_cli.errors import DataError, InputError, Interrupted
from agd_cli.io import atomic_path, json_line, naming
from agd_cli.locks import run_lock
from agd_cli.presets import DTYPES, OPTIMIZERS, AdapterConfig, Preset

MAX_VAL_SAMPLES = 512  # validation cost stays bounded on big collections
GRAD_CLIP = 1.0        # global-norm clip: early Xavier-initialised adapters can spike
# must match to resume; --steps may grow (the schedule then stretches), precision may change
RESUME_KEYS = ("preset", "adapter", "seed", "batch_size", "grad_accum", "lr", "optimizer",
               "val_fraction", "weight_decay", "omega_loss_power", "data")
# below this ω − 1 the loss weight stops growing: targets are stored in fp16, so the error of an
# adapter whose output is scaled by (ω − 1) ≈ 0 is storage noise, not signal
OMEGA_WEIGHT_FLOOR = 0.5
IDENTITY_DEFAULTS = {"omega_loss_power": 0.0}  # keys added later: what older checkpoints used


@dataclass
class TrainSettings:
    """Training hyper-parameters: the preset's [train] section, flags winning."""

    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    optimizer: str
    precision: str
    gradient_checkpointing: bool
    val_fraction: float
    checkpoint_every: int
    keep_checkpoints: int
    preview_every: int
    warmup_steps: int
    weight_decay: float
    omega_loss_power: float
    seed: int
    adapter: AdapterConfig

    @classmethod
    def resolve(cls, preset: Preset, flags: dict) -> TrainSettings:
        """Preset defaults overridden by the flags that were given; every value checked."""
        t = dict(preset.train)
        for key in ("steps", "batch_size", "grad_accum", "lr", "optimizer", "precision",
                    "gradient_checkpointing", "val_fraction", "checkpoint_every",
                    "keep_checkpoints", "preview_every"):
            if flags.get(key) is not None:
                t[key] = flags[key]
        adapter = AdapterConfig(**preset.adapter.to_dict())
        if flags.get("adapter_kind"):
            adapter.kind = flags["adapter_kind"]
        s = cls(steps=t["steps"], batch_size=t["batch_size"], grad_accum=t["grad_accum"],
                lr=float(t["lr"]), optimizer=t["optimizer"], precision=t["precision"],
                gradient_checkpointing=bool(t["gradient_checkpointing"]),
                val_fraction=float(t["val_fraction"]), checkpoint_every=t["checkpoint_every"],
                keep_checkpoints=t["keep_checkpoints"], preview_every=t["preview_every"],
                # a short run (e.g. a smoke test) still reaches the peak learning rate
                warmup_steps=min(t["warmup_steps"], max(t["steps"], 0) // 2),
                weight_decay=float(t["weight_decay"]),
                omega_loss_power=float(t.get("omega_loss_power", 0.0)),
                seed=int(flags.get("seed") or 0),
                adapter=adapter)
        s.check()
        return s

    def check(self) -> None:
        """Refuse values that cannot train, naming the flag and the value."""
        for flag, value, minimum, example in (
                ("--steps", self.steps, 1, "--steps 2000"),
                ("--batch-size", self.batch_size, 1, "--batch-size 8"),
                ("--grad-accum", self.grad_accum, 1, "--grad-accum 4"),
                ("--checkpoint-every", self.checkpoint_every, 1, "--checkpoint-every 500"),
                ("--keep-checkpoints", self.keep_checkpoints, 1, "--keep-checkpoints 2"),
                ("--preview-every", self.preview_every, 0, "--preview-every 0 (off)"),
                ("--seed", self.seed, 0, "--seed 0")):
            checks.integer(flag, value, minimum, example)
        checks.number("--lr", self.lr, example="--lr 1e-4")
        checks.number("--val-fraction", self.val_fraction, 0, 1, low_open=False, high_open=True,
                      example="--val-fraction 0.1")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer '{self.optimizer}'",
                             hint=f"use one of {', '.join(OPTIMIZERS)}")
        if self.precision not in DTYPES:
            raise InputError(f"unknown precision '{self.precision}'",
                             hint=f"use one of {', '.join(DTYPES)}")

    def describe(self) -> dict:
        """The settings as JSON-able values (for checkpoints)."""
        d = asdict(self)
        d["adapter"] = self.adapter.to_dict()
        return d


def omega_loss_weight(omega: torch.Tensor, power: float,
                      omega_range: list[float] | None) -> torch.Tensor:
    """Per-sample loss weight max(ω − 1, floor)^−power, scaled to mean 1 over U[omega_range].

    The adapters' output is multiplied by (ω − 1), so plain L2 weighs an error of their output
    by (ω − 1)²: training then serves high ω and leaves low ω under-fit. power 2 weighs every ω
    alike relative to its guidance term; the constant does not depend on the batch, so the loss
    is the same however a batch is split across processes."""
    def raw(w: torch.Tensor) -> torch.Tensor:
        return (w.double() - 1).clamp_min(OMEGA_WEIGHT_FLOOR).pow(-power)

    lo, hi = omega_range or (float(omega.min()), float(omega.max()))
    mean = raw(torch.linspace(lo, hi, 1001)).mean()
    return (raw(omega) / mean).float()


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to zero over the remaining steps."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(params: list, name: str, lr: float, weight_decay: float,
                   device: torch.device, say: bool = True) -> tuple[torch.optim.Optimizer, str]:
    """AdamW8bit (bitsandbytes) when it works on `device`, else torch AdamW (said once)."""
    if name == "adamw8bit":
        problem = adamw8bit_problem(device)
        if problem is None:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), "adamw8bit"
        if say:
            ui.warn(f"AdamW8bit (bitsandbytes) does not run on {device.type} here ({problem}); "
                    "using torch AdamW (4x the optimizer-state memory)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "adamw"


def autocast_dtype(precision: str, device: torch.device, base_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype a training forward needs: none where the base already computes in
    the training precision (autocast would only add fp32 norms: +0.6 GiB at SDXL batch 4)."""
    compute = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if device.type != "cuda" or compute is None or base_dtype == compute:
        return None
    return compute


def adamw8bit_problem(device: torch.device) -> str | None:
    """None when one bitsandbytes AdamW8bit step really runs on `device`, else why not."""
    try:
        import bitsandbytes as bnb

        probe = torch.zeros(4096, device=device, requires_grad=True)  # 8-bit path needs ≥ 4096
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
        return None
    except Exception as e:  # noqa: BLE001 - import errors, missing kernels, driver errors
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


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
        self.amp_dtype = autocast_dtype(settings.precision, self.device, den.dtype)
        half = self.device.type == "cuda" and settings.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if half else None
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
        self.ckpt_dir = self.run / "checkpoints"
        self.metrics_path = self.run / "train" / "metrics.jsonl"
        self._preview_cfg = None

    def _negatives_metadata(self) -> dict:
        """What the adapter file records about the negatives it was trained with."""
        if not self.s.adapter.negatives:
            return {}
        configs = [m["config"] for m in self.data.manifests
                   if m.get("config", {}).get("negative_prompts")]
        return {"negatives": {
            "negative_prompts": [n for c in configs for n in c["negative_prompts"]],
            "negative_source": ", ".join(str(c.get("negative_source")) for c in configs),
            "empty_negative_probability": configs[0].get("empty_negative_probability")}}

    # --- numerics ----------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _mine(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's contiguous part of a global batch."""
        return torch.tensor_split(idx, self.world)[self.rank]

    def _sq_error(self, idx: torch.Tensor, adapters: bool = True,
                  weighted: bool = False) -> torch.Tensor:
        """Summed squared error of the prediction against the guided target (fp32); `weighted`:
        each sample's error times its ω weight (training only; validation stays plain L2)."""
        b = self.data.batch(idx)
        dev = self.device
        omega = b.omega.to(dev) if adapters else None
        with self._autocast():
            pred = self.den.forward(b.x.to(dev), b.timesteps.to(dev), b.cond, omega=omega,
                                    negative=b.uncond)
        err = (pred.float() - b.target.to(dev)).pow(2).flatten(1).sum(1)  # (B,)
        if weighted and self.s.omega_loss_power:
            err = err * omega_loss_weight(b.omega, self.s.omega_loss_power,
                                          self.s.adapter.omega_range).to(dev)
        return err.sum()

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
        denom = s.batch_size * s.grad_accum * math.prod(self.data.sample_shape)
        total = 0.0
        for _ in range(s.grad_accum):
            loss = self._sq_error(self._mine(self.sampler.next(s.batch_size)), weighted=True) / denom
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        self._sync_grads()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return self._reduce([total])[0]

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
        keys = sorted(self.data.keys)
        digest = hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]
        s = self.s
        return {"preset": self.den.preset.name, "adapter": s.adapter.to_dict(), "seed": s.seed,
                "batch_size": s.batch_size, "grad_accum": s.grad_accum, "lr": s.lr,
                "optimizer": s.optimizer, "val_fraction": s.val_fraction,
                "warmup_steps": s.warmup_steps, "weight_decay": s.weight_decay,
                "omega_loss_power": s.omega_loss_power,
                "data": f"{len(keys)} trajectories, {len(self.data)} samples, {digest}"}

    def save(self) -> None:
        """Checkpoint the complete training state (main process writes, the others wait)."""
        if self.main:
            state = {"lr_schedule": {"kind": "warmup-cosine", "base_lr": self.s.lr,
                                     "warmup_steps": self.s.warmup_steps,
                                     "total_steps": self.s.steps, "next_lr": lr_at(self.step, self.s)},
                     "rng": rng_state(), "data_position": self.sampler.state(),
                     "identity": self.identity(), "settings": self.s.describe(),
                     "optimizer_used": self.optimizer_name,
                     "scaler": self.scaler.state_dict() if self.scaler else None,
                     "val_loss": self.last_val, "val_loss_no_adapter": self.val_no_adapter}
            save_checkpoint(self.ckpt_dir, self.step, self.den.adapters.state_dict(),
                            self.opt.state_dict(), state, self.s.keep_checkpoints)
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    def start_over(self) -> None:
        """--no-resume: old checkpoints and metrics of this run folder go."""
        if self.main:
            if self.ckpt_dir.exists():
                ui.info(f"--no-resume: removing the old checkpoints in {self.ckpt_dir}")
                shutil.rmtree(self.ckpt_dir)
            self.metrics_path.unlink(missing_ok=True)
        self._barrier()

    def resume(self) -> bool:
        """Continue from the newest readable checkpoint, if any; False when starting fresh."""
        if self.main:
            clean_stale(self.ckpt_dir)
        self._barrier()
        had_checkpoints = bool(checkpoint_dirs(self.ckpt_dir))
        found = latest_checkpoint(self.ckpt_dir, set_aside=self.main)
        if found is None:
            if self.main:
                self._restart_metrics(had_checkpoints)
            return False
        path, (adapter_state, opt_state, state) = found
        self._check_resumable(path, state)
        self.den.adapters.load_state_dict(adapter_state)
        self.opt.load_state_dict(opt_state)
        set_rng_state(state["rng"])
        pos = state["data_position"]
        self.sampler = ShuffledSampler(self.sampler.indices, self.s.seed, pos["epoch"], pos["offset"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = self.resumed_from = int(state["step"])
        self.last_val, self.val_no_adapter = state.get("val_loss"), state.get("val_loss_no_adapter")
        self.records = [r for r in _read_jsonl(self.metrics_path) if r.get("step", 0) <= self.step]
        if self.main:  # drop what the killed run logged after its last checkpoint
            write_jsonl(self.metrics_path, self.records)
        if self.main:
            ui.info(f"resuming from step {self.step} ({path})")
        return True

    def _restart_metrics(self, lost_checkpoints: bool) -> None:
        """A fresh start logs from step 0: an old log goes (aside, if checkpoints were lost)."""
        if not lost_checkpoints or not self.metrics_path.is_file():
            self.metrics_path.unlink(missing_ok=True)  # a run killed before its first checkpoint
            return
        kept = move_aside(self.metrics_path, self.ckpt_dir / DAMAGED)
        ui.warn(f"no readable checkpoint in {self.ckpt_dir}: training starts again at step 0; "
                f"the old metrics log was moved to {kept}")

    def last_checkpoint_step(self) -> int | None:
        """Step of the newest checkpoint on disk (what a rerun resumes from)."""
        found = checkpoint_dirs(self.ckpt_dir)
        return int(found[-1].name.split("-")[-1]) if found else None

    def _check_resumable(self, path: Path, state: dict) -> None:
        old, new = state.get("identity", {}), self.identity()
        for key in RESUME_KEYS:
            if old.get(key, IDENTITY_DEFAULTS.get(key)) != new[key]:
                raise InputError(
                    f"checkpoint {path} was made with {key} = {old.get(key)!r}; "
                    f"this run has {key} = {new[key]!r}",
                    hint="rerun with the same settings to resume, or pass --no-resume to start "
                         "over (the old checkpoints are then deleted)")
        if state.get("optimizer_used") != self.optimizer_name:
            raise InputError(f"checkpoint {path} holds {state.get('optimizer_used')} state but "
                             f"{self.optimizer_name} runs here",
                             hint="resume on a machine where the same optimizer works, "
                                  "or pass --no-resume")
        if int(state["step"]) > self.s.steps:
            raise InputError(f"checkpoint {path} is at step {state['step']}, beyond "
                             f"--steps {self.s.steps}",
                             hint=f"pass --steps {state['step']} or more, or --no-resume")

    # --- the loop --------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.records.append(record)
        if self.main:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(self.metrics_path, "a", encoding="utf-8") as f:
                    f.write(json_line(record) + "\n")
            except OSError as e:  # a full disk names no file by itself
                raise naming(e, self.metrics_path) from e

    def _validate(self) -> None:
        self.last_val = self.evaluate()
        self._log({"step": self.step, "val_loss": self.last_val,
                   "val_loss_no_adapter": self.val_no_adapter,
                   "gap_closed": gap_closed(self.last_val, self.val_no_adapter)})

    def fit(self) -> dict:
        """Train to `steps`, validating and checkpointing on the way; returns the summary."""
        from rich.progress import TextColumn

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
                                 loss="–", val=_fmt(self.last_val), rate="–")
            while self.step < self.s.steps:
                lr = lr_at(self.step, self.s)
                loss = self.train_step()
                smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
                rate = (self.step - first) / max(time.time() - t0, 1e-9)
                self._log({"step": self.step, "loss": loss, "lr": lr})
                if self.step % self.s.checkpoint_every == 0 or self.step == self.s.steps:
                    self._validate()
                    self.save()
                if self.s.preview_every and self.step % self.s.preview_every == 0:
                    self.preview()
                prog.update(task, completed=self.step, loss=f"{smoothed:.4g}",
                            val=_fmt(self.last_val), rate=f"{rate:.2f}")
        if self.step == first and self.last_val is None:  # nothing left to train
            self.last_val = self.evaluate()
        return self.finish(time.time() - t0, smoothed)

    @torch.no_grad()
    def preview(self) -> Path | None:
        """CFG vs adapters from the same noise (fixed seeds), as one PNG; main process only."""
        from agd_cli.images import make_grid, save_png, to_pil
        from agd_cli.sampling import initial_noise, sample

        if not self.main or self.data.uncond is None:
            self._barrier()
            return None
        den, sp = self.den, self.den.preset.sampling
        n = min(4, next(iter(self.data.cond.values())).shape[0])
        cond = {k: v[:n] for k, v in self.data.cond.items()}
        uncond = {k: v[:1].expand(n, *v.shape[1:]) for k, v in self.data.uncond.items()}
        noise = initial_noise(self.data.sample_shape, range(n))
        omega = float(sp["default_omega"])
        kw = {"steps": sp["steps"], "scheduler": sp["scheduler"]}
        if self._preview_cfg is None:  # the teacher's images do not change during training
            self._preview_cfg = den.decode(sample(den, cond, uncond, omega, noise, mode="cfg", **kw).x)
        agd = den.decode(sample(den, cond, uncond, omega, noise, mode="agd", **kw).x)
        grid = make_grid([[to_pil(i) for i in self._preview_cfg], [to_pil(i) for i in agd]],
                         row_labels=[f"CFG ω={omega:g}", f"agd, step {self.step}"])
        path = save_png(grid, self.run / "train" / f"preview-step-{self.step:06d}.png",
                        {"step": self.step, "omega": omega, "seeds": list(range(n))})
        self._barrier()
        return path

    def finish(self, seconds: float, train_loss: float | None) -> dict:
        """Write the adapter file and the loss curve; the summary `--json` prints."""
        from agd_cli.plots import loss_curve
        from agd_cli.workspace import ADAPTER

        adapter_path = self.run / ADAPTER
        gap = gap_closed(self.last_val, self.val_no_adapter)
        n_params = sum(p.numel() for p in self.den.adapters.parameters())
        summary = {
            "run": str(self.run), "adapter": str(adapter_path), "steps": self.step,
            "val_loss": self.last_val, "val_loss_no_adapter": self.val_no_adapter,
            "gap_closed": gap, "train_loss": train_loss, "params": n_params,
            "seconds": round(seconds, 2), "resumed_from": self.resumed_from,
            "optimizer": self.optimizer_name, "precision": self.s.precision,
            "batch_size": self.s.batch_size, "grad_accum": self.s.grad_accum, "lr": self.s.lr,
            "gradient_checkpointing": self.s.gradient_checkpointing, "seed": self.s.seed,
            "trajectories": {"train": self.n_train_traj, "val": self.n_val_traj},
            "samples": {"train": self.n_train, "val": self.n_val},
            "device": str(self.device), "processes": self.world,
            "metrics": str(self.metrics_path), "loss_plot": str(self.run / "train" / "loss.png")}
        if self.main:
            meta = self.den.adapter_metadata(
                train_steps=self.step, val_loss=self.last_val, val_loss_no_adapter=self.val_no_adapter,
                gap_closed=gap, lr=self.s.lr, batch_size=self.s.batch_size * self.s.grad_accum,
                optimizer=self.optimizer_name, seed=self.s.seed,
                trajectories=self.data.num_trajectories,
                collections=[str(s.root) for s in self.data.stores], **self._negatives_metadata())
            self.den.adapters.save(adapter_path, meta)
            if self.records:
                loss_curve(self.records, summary["loss_plot"],
                           title=f"agd train · {self.den.preset.name} · {self.step} steps")
        self._barrier()
        return summary


def gap_closed(val_loss: float | None, no_adapter: float | None) -> float | None:
    """Share of the no-adapter error the adapters remove: 1 − val / val_no_adapter."""
    if val_loss is None or not no_adapter:
        return None
    return 1.0 - val_loss / no_adapter


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by kill -9
            out.append(json.loads(line))
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Rewrite a JSONL file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json_line(r) + "\n" for r in records), encoding="utf-8")


# --- the stage's entry point -----------------------------------------------------------------------
def locate(run: str | None, data: tuple | list, workdir: str) -> tuple[Path, list[Path]]:
    """(run folder that receives the results, trajectory folders to train on)."""
    from agd_cli.workspace import latest_collection

    if run:
        run_path = Path(run)
        if not run_path.is_dir():
            raise DataError(f"run folder '{run}' not found",
                            hint="pass a folder written by `agd collect`, or leave out --run")
        own = [collection_root(run_path)] if not data or (run_path / "trajectories").is_dir() else []
        return run_path, own + [collection_root(d) for d in data]
    if data:
        roots = [collection_root(d) for d in data]
        return roots[0].parent, roots
    run_path = latest_collection(workdir)
    return run_path, [collection_root(run_path)]


def recorded_preset(roots: list[Path], override: str | None) -> Preset:
    """The preset the collection was recorded with; --preset may override it for the same base."""
    from agd_cli.presets import from_dict, load_preset
    from agd_cli.trajectories import TrajectoryStore

    configs = [TrajectoryStore(r).manifest().get("config", {}) for r in roots]
    bases = {(c.get("family"), c.get("base_model")) for c in configs}
    if len(bases) > 1:
        raise DataError(f"the collections were recorded with different base models: {sorted(map(str, bases))}",
                        hint="train on collections of one base model at a time")
    cfg = configs[0]
    recorded = None
    if isinstance(cfg.get("preset_toml"), dict):
        recorded = from_dict(cfg["preset_toml"])
        if cfg.get("base_model") and not str(cfg["base_model"]).startswith("random:"):
            recorded.base_model = cfg["base_model"]  # already resolved when it was collected
    elif cfg.get("preset"):
        recorded = load_preset(cfg["preset"])
    if override is None:
        if recorded is None:
            raise DataError(f"collection {roots[0]} does not say which preset recorded it",
                            hint="pass --preset NAME")
        return recorded
    chosen = load_preset(override)
    if recorded is not None and (chosen.family != recorded.family
                                 or chosen.resolve_base_model() != recorded.resolve_base_model()
                                 or chosen.architecture != recorded.architecture):
        raise InputError(f"--preset {override} uses base '{chosen.base_model}' ({chosen.family}), "
                         f"but the collection was recorded with preset '{recorded.name}' "
                         f"(base '{recorded.base_model}', {recorded.family})",
                         hint="train with the preset the trajectories came from (leave out --preset)")
    return chosen


def prepare_denoiser(preset: Preset, device: torch.device, settings: TrainSettings):
    """Frozen base in half precision and eval mode, fast attention, fresh fp32 adapters."""
    from agd_cli.families import load_denoiser

    den = load_denoiser(preset, device=device, dtype=settings.precision, text=False)
    if device.type == "cuda":
        # the adapters hook the attention modules, so any processor set here keeps them
        with contextlib.suppress(Exception):
            den.model.enable_xformers_memory_efficient_attention()
            ui.info("attention: xformers")
    if settings.gradient_checkpointing:
        if not getattr(den.model, "_supports_gradient_checkpointing", False):
            raise InputError(f"--gradient-checkpointing: {type(den.model).__name__} does not support it",
                             hint="pass --no-gradient-checkpointing")
        den.model.enable_gradient_checkpointing()
    torch.manual_seed(settings.seed)  # identical initial adapters in every process
    den.new_adapters(settings.adapter).train()
    return den


def _accelerator(device: str):
    """HF accelerate state: device placement and the process group (no-op for one process)."""
    from accelerate import Accelerator

    from agd_cli.families import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(dev)  # one process: accelerate's device is "the current GPU"
    return Accelerator(cpu=dev.type == "cpu")


def _process_device(acc) -> torch.device:
    """This process's device with its index (cuda:N as asked, or the one accelerate assigned)."""
    dev = acc.device
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def run_train(run: str | None = None, data: tuple | list = (), preset: str | None = None,
              steps: int | None = None, batch_size: int | None = None, grad_accum: int | None = None,
              lr: float | None = None, optimizer: str | None = None, precision: str | None = None,
              gradient_checkpointing: bool | None = None, val_fraction: float | None = None,
              checkpoint_every: int | None = None, keep_checkpoints: int | None = None,
              preview_every: int | None = None, resume: bool = True, seed: int = 0,
              adapter_kind: str | None = None, device: str = "auto",
              workdir: str = "agd-runs") -> dict:
    """Train adapters on collected trajectories; returns the summary `agd train --json` prints."""
    from agd_cli.families import FAMILIES

    flags = {k: v for k, v in locals().items() if k not in ("run", "data", "preset", "device",
                                                             "workdir", "resume")}
    # 1. Where: the run folder and its collection(s); the preset they were recorded with
    run_path, roots = locate(run, data, workdir)
    checks.writable_folder(run_path, "the run folder")
    preset_obj = recorded_preset(roots, preset)
    # 2. What: settings checked, and the adapter kind against the family, before weights load
    settings = TrainSettings.resolve(preset_obj, flags)
    family = FAMILIES[preset_obj.family]
    family.check_adapter_kind(family, settings.adapter.kind)  # uses class attributes only
    acc = _accelerator(device)
    lock = run_lock(run_path, "train") if acc.is_main_process else contextlib.nullcontext()
    with lock:  # one writer per run folder (the main process writes for all)
        return _train(run_path, roots, preset, preset_obj, settings, acc, resume)


def _train(run_path: Path, roots: list[Path], preset_flag: str | None, preset_obj: Preset,
           settings: TrainSettings, acc, resume: bool) -> dict:
    """Load the data and the model, resume or start over, and fit (the run folder is locked)."""
    trajectories = TrajectoryData(roots, processes=acc.num_processes)
    # collections with negative prompts train adapters that also read the negative
    settings.adapter.negatives = trajectories.has_negatives
    settings.adapter.omega_range = trained_omega_range(trajectories)
    # 3. The model: frozen base + fresh adapters on this process's device
    den = prepare_denoiser(preset_obj, _process_device(acc), settings)
    if trajectories.sample_shape[0] != den.in_channels:
        raise DataError(f"collection holds {trajectories.sample_shape[0]}-channel samples; "
                        f"the base takes {den.in_channels}",
                        hint="train with the preset the trajectories were recorded with")
    trainer = Trainer(den, trajectories, settings, run_path, acc)
    if not (resume and trainer.resume()):
        if not resume:
            trainer.start_over()
    if trainer.main:
        _announce(trainer, roots, preset_flag)
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        last = trainer.last_checkpoint_step()
        where = (f"the last checkpoint is step {last} in {trainer.ckpt_dir}" if last is not None
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


def _announce(tr: Trainer, roots: list[Path], preset_flag: str | None) -> None:
    s = tr.s
    origin = "--preset" if preset_flag else "recorded with the collection"
    ui.info(f"training {s.adapter.kind} adapters for preset '{tr.den.preset.name}' ({origin}) "
            f"({sum(p.numel() for p in tr.params):,} params) on {tr.data.num_trajectories} "
            f"trajectories from {', '.join(map(str, roots))}: {tr.n_train_traj} train / "
            f"{tr.n_val_traj} val trajectories ({tr.n_train} / {tr.n_val} samples)")
    ui.info(f"steps {s.steps}, batch {s.batch_size} × accum {s.grad_accum}, lr {s.lr:g}, "
            f"{tr.optimizer_name}, {s.precision}, gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}, {tr.world} process(es) on "
            f"{tr.device}; results in {tr.run}")
    if tr.device.type == "cpu" and s.precision != "fp32":
        ui.info(f"note: on CPU the base computes in fp32 ({s.precision} applies on CUDA)")
    if tr.resumed_from is None and tr.step == 0:
        ui.info(f"starting from fresh adapters (seed {s.seed})")
