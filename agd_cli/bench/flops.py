"""FLOPs of the adapters: one sampling step's model call with and without them (`agd bench`'s
adapter_overhead), counted by torch's FlopCounterMode, machine-independent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from agd_cli.core.sampling import RunInputs

if TYPE_CHECKING:
    from agd_cli.bench.plan import Case


def flop_counter():
    """torch's FlopCounterMode, also counting the CPU attention kernel (which it skips)."""
    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return FlopCounterMode(display=False, custom_mapping={op: cpu_attention})


def adapter_flops(den, case: Case, uncond: dict, batches: Sequence[int]) -> dict:
    """FLOPs of one model call with and without the adapters (torch's FlopCounterMode: matmuls,
    convolutions, attention; machine-independent), at each batch size, as a sampling step runs
    them (the run's fixed inputs already prepared)."""
    out = {}
    for b in dict.fromkeys(batches):
        cond = {k: v.expand(b, *v.shape[1:]) for k, v in case.cond.items()}
        x = case.noise.expand(b, *case.noise.shape[1:]).to(den.device)
        t = torch.tensor([500, 400], device=den.device)
        run = RunInputs.make(den, "agd", cond, None, t)
        counts = {}
        with torch.no_grad():
            agd = {"omega": case.omega, "negative": uncond, "cache": run.cache}
            den.forward(x, t[0], run.cond, **agd)  # the run's first step prepares its inputs
            for name, kwargs in (("base", {}), ("agd", agd)):
                with flop_counter() as counter:
                    den.forward(x, t[1], run.cond, **kwargs)
                counts[name] = counter.get_total_flops()
        out[str(b)] = {"base_flops": counts["base"], "agd_flops": counts["agd"],
                       "adapter_flops_pct": 100 * (counts["agd"] - counts["base"]) / counts["base"]}
    params = sum(p.numel() for p in den.adapters.parameters())
    mine = {id(p) for p in den.adapters.parameters()}  # a LoRA's layers sit inside the model
    base = sum(p.numel() for p in den.model.parameters() if id(p) not in mine)
    return {"adapter_params": params, "base_params": base, "params_pct": 100 * params / base,
            "by_batch": out,
            "what": "FLOPs of one sampling step's model call with adapters vs the base alone "
                    "(FlopCounterMode); wall-clock cost: ratio_agd_to_unguided in latency/throughput"}

