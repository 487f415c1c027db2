"""Peak memory and FLOPs of one training step at real size, with no GPU: the meta device.

Tensors on the meta device have shapes and dtypes but no data, so a full SDXL step at 1024²
runs in a minute on any CPU. A dispatch mode counts the bytes of every live tensor storage
(freed when its storage dies) and keeps the peak; torch's FlopCounterMode counts FLOPs in a
separate pass (its module hooks keep tensors alive, which would inflate the memory figure).
Attention runs as the memory-efficient SDPA kernel CUDA picks for half precision (output and
log-sum-exp saved, no L×L matrix), not the math fallback a meta or CPU tensor would take.

What it is not: the CUDA caching allocator's slack (5–20 %), the CUDA context (0.3–0.5 GiB)
and cuBLAS/cuDNN workspaces come on top; see benchmarks/train_memory.py for the table.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

META = torch.device("meta")
ADAMW_STATE_BYTES = 8      # torch AdamW: exp_avg + exp_avg_sq in fp32 per parameter
ADAMW8BIT_STATE_BYTES = 2  # bitsandbytes AdamW8bit: two uint8 states (tensors ≥ 4096 elements)


class LiveBytes(TorchDispatchMode):
    """Bytes held by live tensor storages, and their peak, for tensors made inside the mode
    (plus any passed to `track`)."""

    def __init__(self):
        super().__init__()
        self._sizes = WeakIdKeyDictionary()
        self.live = self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        """Count a tensor's storage once, until it is freed."""
        storage = t.untyped_storage()
        if storage in self._sizes:
            return
        n = storage.nbytes()
        self._sizes[storage] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@contextlib.contextmanager
def efficient_attention():
    """SDPA as CUDA's memory-efficient kernel, also in checkpoint recomputation (which may run
    on autograd's worker thread, where a thread-local mode would not reach: hence a patch)."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or is_causal or q.device.type != "meta":
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def estimate_train_step(den, adapters, inputs: dict, make_step, optimizer: str,
                        flops: bool = True) -> dict:
    """Peak bytes over two training steps, and FLOPs per sample, of a meta-device denoiser.

    `make_step(params, opt)` returns one training step, `step(inputs)` (probe.train_step_of:
    the step `agd train` takes); torch AdamW stands in for AdamW8bit
    (no meta kernels) and its state is then rescaled to 8-bit size. `flops=False` skips the
    FLOP-counting third step (flops_per_sample None): a memory check needs only the peak."""
    params = [p for p in adapters.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)  # foreach temporaries are fused on CUDA
    step = make_step(params, opt)
    tracker = LiveBytes()
    for t in [*den.model.parameters(), *den.model.buffers(), *adapters.parameters(),
              *tree_leaves(inputs)]:
        if isinstance(t, torch.Tensor):
            tracker.track(t)
    baseline = tracker.live
    with efficient_attention():
        with tracker:
            for _ in range(2):  # the first step creates the optimizer state, the second has it
                step(inputs)
                gc.collect()
        counter = FlopCounterMode(display=False) if flops else contextlib.nullcontext()
        with counter:
            if flops:
                step(inputs)
    state_bytes = sum(p.numel() for p in params) * ADAMW_STATE_BYTES
    saved = 0
    if optimizer == "adamw8bit":
        big = sum(p.numel() for p in params if p.numel() >= 4096)
        saved = big * (ADAMW_STATE_BYTES - ADAMW8BIT_STATE_BYTES)
    batch = inputs["x"].shape[0]
    return {"peak_bytes": tracker.peak - saved, "baseline_bytes": baseline,
            "step_bytes": tracker.peak - saved - baseline,
            "optimizer_state_bytes": state_bytes - saved,
            "flops_per_sample": counter.get_total_flops() / batch if flops else None,
            "method": "meta-device estimate: live tensor storages, memory-efficient SDPA; "
                      "add CUDA context and allocator slack"}
