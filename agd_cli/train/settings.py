"""`agd train`'s settings, resolved once from the preset and the flags, and the two rules that
depend only on them: the learning-rate schedule and the per-sample ω loss weight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from agd_cli.config import checks
from agd_cli.config.presets import Preset
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.infra.errors import InputError

# below this ω − 1 the loss weight stops growing: targets are stored in fp16, so the error of an
# adapter whose output is scaled by (ω − 1) ≈ 0 is storage noise, not signal
OMEGA_WEIGHT_FLOOR = 0.5


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
    # collections with negatives: the share of training rows (ω ≥ SWAP_MIN_OMEGA) whose prompt
    # and negative are swapped, target recomputed (guidance.swapped_roles); 0 elsewhere
    negative_swap_share: float = 0.0

    @classmethod
    def resolve(cls, preset: Preset, flags: dict) -> TrainSettings:
        """Preset defaults overridden by the flags that were given; every value checked."""
        t = dict(preset.train)
        for key in ("steps", "batch_size", "grad_accum", "lr", "optimizer", "precision",
                    "gradient_checkpointing", "val_fraction", "checkpoint_every",
                    "keep_checkpoints", "preview_every"):
            if flags.get(key) is not None:
                t[key] = flags[key]
        # a copy of every key (to_dict drops a cross-attention preset's lora_* keys, which
        # --adapter-kind lora must keep)
        adapter = replace(preset.adapter)
        if flags.get("adapter_kind"):
            adapter.kind = flags["adapter_kind"]
        if adapter.kind == "lora" and adapter.lora_w_ref is None:  # strength 1 = the default ω
            adapter.lora_w_ref = float(preset.sampling["default_omega"])
        s = cls(steps=t["steps"], batch_size=t["batch_size"], grad_accum=t["grad_accum"],
                # checked as given (checks.number returns floats): a flag's text shows in errors
                lr=checks.number("--lr", t["lr"], example="--lr 1e-4"), optimizer=t["optimizer"], precision=t["precision"],
                gradient_checkpointing=bool(t["gradient_checkpointing"]),
                val_fraction=checks.number("--val-fraction", t["val_fraction"], 0, 1,
                                           low_open=False, high_open=True,
                                           example="--val-fraction 0.1"),
                checkpoint_every=t["checkpoint_every"],
                keep_checkpoints=t["keep_checkpoints"], preview_every=t["preview_every"],
                # a short run (e.g. a smoke test) still reaches the peak learning rate
                warmup_steps=min(t["warmup_steps"], max(t["steps"], 0) // 2),
                weight_decay=float(t["weight_decay"]),
                omega_loss_power=float(t.get("omega_loss_power", 0.0)),
                seed=int(flags.get("seed") or 0),
                adapter=adapter, negative_swap_share=float(t.get("negative_swap_share", 0.0)))
        s.check()
        return s

    def check(self) -> None:
        """Refuse values that cannot train, naming the flag and the value."""
        for flag, value, minimum, example in (
                ("--max-steps", self.steps, 1, "--max-steps 2000"),
                ("--batch-size", self.batch_size, 1, "--batch-size 8"),
                ("--grad-accum", self.grad_accum, 1, "--grad-accum 4"),
                ("--checkpoint-every", self.checkpoint_every, 1, "--checkpoint-every 500"),
                ("--keep-checkpoints", self.keep_checkpoints, 1, "--keep-checkpoints 2"),
                ("--preview-every", self.preview_every, 0, "--preview-every 0 (off)")):
            checks.integer(flag, value, minimum, example)
        checks.seed(self.seed)
        checks.optimizer(self.optimizer)
        checks.dtype(self.precision, "precision")
        w_ref = self.adapter.lora_w_ref
        if self.adapter.kind == "lora" and not (w_ref is not None and math.isfinite(w_ref) and w_ref > 1):
            raise InputError(f"lora_w_ref must be a number > 1, got {w_ref!r}",
                             hint="the ω the LoRA's strength 1 stands for: [adapter] lora_w_ref = 4.0")

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
