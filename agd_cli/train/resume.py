"""Whether a checkpoint may resume this run: the settings it records (its identity) against
this run's, with the keys added later read as what older checkpoints used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from agd_cli.infra.errors import InputError

# must match to resume; --max-steps may grow (the schedule then stretches), precision may change
RESUME_KEYS = ("preset", "adapter", "seed", "batch_size", "grad_accum", "lr", "optimizer",
               "val_fraction", "weight_decay", "omega_loss_power", "negative_swap_share", "data")
IDENTITY_DEFAULTS = {"omega_loss_power": 0.0, "negative_swap_share": 0.0}  # keys added later: what older checkpoints used
# adapter settings added later that do not change training: a checkpoint from before them resumes
# (omega_range only clamps the ω embedding beyond the range, and training stays inside it)
ADAPTER_KEYS_ADDED_LATER = ("omega_range",)


def run_identity(tr) -> dict:
    """What a checkpoint records about the run, to check before resuming it."""
    keys = sorted(tr.data.keys)
    digest = hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]
    s = tr.s
    return {"preset": tr.den.preset.name, "adapter": s.adapter.to_dict(), "seed": s.seed,
            "batch_size": s.batch_size, "grad_accum": s.grad_accum, "lr": s.lr,
            "optimizer": s.optimizer, "val_fraction": s.val_fraction,
            "warmup_steps": s.warmup_steps, "weight_decay": s.weight_decay,
            "omega_loss_power": s.omega_loss_power, "negative_swap_share": s.negative_swap_share,
            "data": f"{len(keys)} trajectories, {len(tr.data)} samples, {digest}"}


def check_resumable(tr, path: Path, state: dict) -> None:
    """Refuse a checkpoint of other settings, another optimizer, or beyond --max-steps."""
    old, new = state.get("identity", {}), run_identity(tr)
    if isinstance(old.get("adapter"), dict):
        added = {k: new["adapter"].get(k) for k in ADAPTER_KEYS_ADDED_LATER}
        old = {**old, "adapter": {**added, **old["adapter"]}}
    for key in RESUME_KEYS:
        if old.get(key, IDENTITY_DEFAULTS.get(key)) != new[key]:
            raise InputError(
                f"checkpoint {path} was made with {key} = {old.get(key)!r}; "
                f"this run has {key} = {new[key]!r}",
                hint="rerun with the same settings to resume, or pass --no-resume to start "
                     "over (the old checkpoints are then deleted)")
    if state.get("optimizer_used") != tr.optimizer_name:
        raise InputError(f"checkpoint {path} holds {state.get('optimizer_used')} state but "
                         f"{tr.optimizer_name} runs here",
                         hint="resume on a machine where the same optimizer works, "
                              "or pass --no-resume")
    if int(state["step"]) > tr.s.steps:
        raise InputError(f"checkpoint {path} is at step {state['step']}, beyond "
                         f"--max-steps {tr.s.steps}",
                         hint=f"pass --max-steps {state['step']} or more, or --no-resume")
