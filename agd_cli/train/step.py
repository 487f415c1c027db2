"""One adapter training step, the same for `agd train` and `agd bench --memory`.

`AdapterStep` holds the numerics of an optimizer step over attached adapters: the autocast
rule, fp16 loss scaling, gradient accumulation, the all-reduce hook, the GRAD_CLIP global-norm
clip and the update. The trainer feeds it the losses of its micro-batches; the memory probe
feeds it one loss of random inputs, so the peak it measures is the peak of the step that trains.
The optimizer choice (AdamW8bit or torch AdamW) lives here too.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable

import torch

logger = logging.getLogger(__name__)

GRAD_CLIP = 1.0  # global-norm clip: early Xavier-initialised adapters can spike


def make_optimizer(params: list, name: str, lr: float, weight_decay: float,
                   device: torch.device, say: bool = True) -> tuple[torch.optim.Optimizer, str]:
    """AdamW8bit (bitsandbytes) when it works on `device`, else torch AdamW (said once)."""
    if name == "adamw8bit":
        problem = adamw8bit_problem(device)
        if problem is None:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), "adamw8bit"
        if say:
            logger.warning(f"AdamW8bit (bitsandbytes) does not run on {device.type} here ({problem}); "
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


class AdapterStep:
    """Backward over micro-batch losses, then one clipped optimizer update of the adapters."""

    def __init__(self, params: list, opt: torch.optim.Optimizer, precision: str,
                 device: torch.device, base_dtype: torch.dtype,
                 sync_grads: Callable[[], None] | None = None):
        self.params, self.opt, self.device = params, opt, device
        self.amp_dtype = autocast_dtype(precision, device, base_dtype)
        half = device.type == "cuda" and precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if half else None  # fp16 grads underflow
        self.sync_grads = sync_grads  # multi-process: sums the gradients before the clip
        self.skipped = False  # the last step's loss or gradients were not finite: no update

    def autocast(self):
        """The context a training forward runs in (see autocast_dtype)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, losses: Iterable[torch.Tensor]) -> float:
        """Accumulate the gradients of `losses` (each already a share of the step's mean),
        then update; returns their sum. A generator keeps one micro-batch's graph alive at a time.

        A step whose loss or gradients are not finite applies no update (AdamW8bit's state
        would turn NaN for good); `skipped` then says so. Under fp16 loss scaling, gradients
        that overflow with a finite loss are the scaler's routine skip (it lowers the scale)."""
        total, meta = 0.0, False
        for loss in losses:
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            meta = meta or loss.is_meta
            total += float("nan") if loss.is_meta else loss.item()  # meta (an estimate): no value
        if not meta and not math.isfinite(total):
            self._poison_grads()  # every process then skips alike, after the all-reduce
        if self.sync_grads:
            self.sync_grads()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        # the same answer in every process: the gradients were all-reduced before the norm
        self.skipped = not meta and not bool(torch.isfinite(norm))
        if self.scaler:
            if not self.skipped:
                self.scaler.step(self.opt)
            self.scaler.update()  # an overflow lowers the scale, as the scaler's own skip does
        elif not self.skipped:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    def _poison_grads(self) -> None:
        """A non-finite local loss marks the gradients non-finite, so that the (all-reduced)
        gradient norm every process sees tells each of them to skip this step."""
        for p in self.params:
            if p.grad is not None:
                p.grad.view(-1)[:1].fill_(float("nan"))
                return
