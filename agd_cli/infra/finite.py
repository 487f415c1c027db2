"""Guards against non-finite values (NaN, inf) where data enter and where weights are written.

At collect, every sampling step's model input x_t and guided output are watched on the device
(no host sync per step) and the stored fp16 tensors are checked before a shard is written: a
non-finite trajectory is refused, named by trajectory, prompt, seed and step, and nothing of its
batch reaches the disk. At train, a step whose loss or gradients are not finite applies no
update (step.AdapterStep); `NonFiniteSteps` says so and stops the run when it keeps happening,
and `check_finite_weights` keeps a non-finite adapter or checkpoint from being written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch

from agd_cli.infra.errors import NonFiniteError

logger = logging.getLogger(__name__)

MAX_NONFINITE_STEPS = 10  # consecutive training steps with a non-finite loss before agd stops
PROMPT_SHOWN = 60         # characters of a prompt quoted in an error message


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which rows (first dimension) hold only finite values; integers always do."""
    if not t.is_floating_point():
        return torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)


class StepWatch:
    """The first sampling step at which each trajectory of a batch met a non-finite model input
    or output; kept on the device and read once, after the batch."""

    def __init__(self, batch: int, device):
        self.first = torch.full((batch,), -1, dtype=torch.long, device=device)

    def update(self, step: int, *tensors: torch.Tensor) -> None:
        ok = torch.ones_like(self.first, dtype=torch.bool)
        for t in tensors:
            ok &= finite_rows(t)
        self.first.masked_fill_(~ok & (self.first < 0), step)

    def first_bad(self, stored: Sequence[tuple[torch.Tensor, Sequence[int]]] = ()
                  ) -> tuple[int, int] | None:
        """(row, step) of the first trajectory that went non-finite, or None. `stored`: the
        batch's tensors as they go to disk, (B, K, ...) each with the sampling step of each of
        its K slots (fp16 storage: a finite fp32 value may still overflow)."""
        first = self.first.cpu()
        for t, steps in stored:
            bad = ~torch.isfinite(t.reshape(*t.shape[:2], -1)).all(dim=2).cpu()  # (B, K)
            for row, k in zip(*torch.nonzero(bad, as_tuple=True), strict=True):
                step = steps[int(k)]
                if first[row] < 0 or step < first[row]:
                    first[row] = step
        rows = torch.nonzero(first >= 0).view(-1).tolist()
        if not rows:
            return None
        row = min(rows, key=lambda r: (int(first[r]), r))
        return row, int(first[row])


def quoted(text: object) -> str:
    """A prompt (or class) as an error message shows it: quoted, cut to PROMPT_SHOWN characters."""
    s = str(text)
    return repr(s if len(s) <= PROMPT_SHOWN else s[:PROMPT_SHOWN - 1] + "…")


def nonfinite_trajectory(trajectory_id: int, prompt_index: int, prompt: object, seed: int,
                         step: int, steps: int, omega: float,
                         batch_ids: Sequence[int]) -> NonFiniteError:
    """The refusal of a batch whose trajectory `trajectory_id` went non-finite at `step`."""
    which = ("the empty prompt (a negative-only trajectory)" if prompt_index < 0
             else f"prompt {prompt_index}: {quoted(prompt)}")
    return NonFiniteError(
        f"the teacher's guided output is not finite (NaN or inf) in trajectory {trajectory_id} "
        f"({which}, --seed {seed}, ω {omega:.3g}) at sampling step {step + 1} of {steps}; its "
        f"batch (trajectories {batch_ids[0]}–{batch_ids[-1]}) was not written",
        hint="every shard stored before is intact. A teacher that overflows in "
             "fp16 usually runs in bf16 or fp32: rerun the same command with --dtype bf16 (or "
             "fp32) and it resumes where it stopped")


def check_conditions(table: dict, labels: Sequence, what: str = "prompt") -> None:
    """Refuse encoded conditions (text-encoder outputs, one row per prompt) that are not finite,
    naming the first such prompt; `labels[r]` is (index, text) of row r (index None: `text`
    names the row as it is, e.g. "the empty prompt")."""
    bad = None
    for t in table.values():
        rows = torch.nonzero(~finite_rows(t)).view(-1).tolist()
        if rows:
            bad = min(rows) if bad is None else min(bad, *rows)
    if bad is None:
        return
    index, text = labels[bad]
    name = f"{what} {index}: {quoted(text)}" if index is not None else str(text)
    raise NonFiniteError(f"the text encoder's output for {name} is not finite (NaN or inf); "
                         "nothing was collected with it",
                         hint="text encoders such as T5 overflow in fp16: rerun with --dtype bf16 "
                              "(or fp32)")


# --- training ------------------------------------------------------------------------------------
def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor holds only finite values (meta tensors: unknown, True)."""
    for t in tensors:
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            return False
    return True


def check_finite_weights(tensors: Iterable[torch.Tensor], val_loss: float | None, what: str,
                         step: int, kept: str, precision: str = "fp32") -> None:
    """Refuse to write `what` (an adapter file, a checkpoint) whose weights or validation loss
    are not finite: training diverged. `kept` says what stays in place."""
    tensors = list(tensors)
    if all_finite(tensors) and (val_loss is None or math.isfinite(val_loss)):
        return
    why = ("its weights are not finite (NaN or inf)" if not all_finite(tensors)
           else f"its validation loss is {val_loss}")
    raise NonFiniteError(f"training diverged: at step {step} {why}, so the {what} was not "
                         f"written; {kept}", hint=diverged_hint(precision))


def diverged_hint(precision: str) -> str:
    """What to do about a diverged run (half precision: fp32 rules out an overflow)."""
    fp32 = ("; or train in fp32 (--dtype fp32) to rule out a half-precision overflow"
            if precision != "fp32" else "")
    return ("lower the learning rate (--lr, e.g. a tenth of this run's) and pass --no-resume to "
            f"start over (a checkpoint resumes only with its own --lr){fp32}")


class NonFiniteSteps:
    """Counts training steps that applied no update because their loss or gradients were not
    finite; warns for each, stops the run after MAX_NONFINITE_STEPS in a row."""

    def __init__(self, precision: str = "fp32", limit: int = MAX_NONFINITE_STEPS):
        self.precision, self.limit, self.in_a_row, self.total = precision, limit, 0, 0

    def record(self, step: int, loss: float, nonfinite: bool, lr: float) -> None:
        """After optimizer step `step` (1-based) with (reduced) `loss`; raises when it is time."""
        if not nonfinite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        logger.warning(f"step {step}: the loss or its gradients are not finite (loss {loss:.4g}); "
                f"the update was skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"training diverged: {self.in_a_row} steps in a row (up to step {step}) had a "
                f"non-finite loss or gradients at learning rate {lr:.3g}; stopped, and no adapter "
                "was written (an adapter file already in the run folder is kept)",
                hint=diverged_hint(self.precision))
