"""`--compile`: a denoiser's model call through torch.compile (inductor).

On CUDA the mode is "reduce-overhead": inductor's kernels replayed as a CUDA graph, so a step
costs one graph launch instead of one launch (and one Python hook) per kernel. Eagerly, that is
what the adapters' small sites cost at batch 1, not their FLOPs (SDXL 1024² on an H200: 1.7 % of
the FLOPs, +24 % of the time). On the CPU inductor's default mode: the same graph in C++ kernels,
so that tests and CI exercise the path.

The whole call (the adapters' hooks and the base) is one compiled frame. Shapes are static
(dynamic=False): each batch size and sampling mode (agd, CFG's pair, unguided) gets its own
graph, compiled on its first call; `agd bench` reports that warm-up apart. ω, prompts and
negatives are tensors to the graph, so changing them compiles nothing (see agd_cli.core.adapters).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from agd_cli.infra import hardware
from agd_cli.infra.errors import InputError

MODES = {"cuda": "reduce-overhead", "cpu": "default"}  # torch.compile's mode per device type
# graphs one compiled function may hold before torch falls back to eager (torch's default, 8,
# is soon reached: batch sizes × sampling modes, and bench times two batch sizes)
GRAPH_LIMIT = 64


def check_compile(device: Any) -> None:
    """Raise before any model loads when torch.compile cannot compile for `device`."""
    dev = torch.device(device)
    missing = hardware.compiler_missing(dev)
    if missing:
        raise InputError(f"--compile on {dev.type} needs {missing}, which was not found",
                         hint="install it (e.g. apt-get install g++, or pip install triton on "
                              "CUDA), or run without --compile")


def compile_mode(device: Any) -> str:
    """torch.compile's mode for a device: CUDA graphs on CUDA, inductor's default elsewhere."""
    return MODES.get(torch.device(device).type, "default")


class CompiledModel:
    """`model(*args, **kwargs)` through torch.compile, the model's hooks inside the graph.

    `backend` (tests): another torch.compile backend than inductor. `graphs` counts the graphs
    compiled by this model's calls, `warmup_seconds` the time of the calls that compiled one."""

    def __init__(self, model, device: Any, backend: Any = None):
        self.model = model
        self.device = torch.device(device)
        self.mode = compile_mode(self.device) if backend is None else None
        self.cuda_graphs = self.mode == "reduce-overhead"
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), GRAPH_LIMIT))  # torch < 2.6: the old name
        # guards on the model's modules are left out (torch ≥ 2.7): a guard per attribute of
        # every module is checked at every call (thousands for a UNet; ~0.5 ms of the mnist
        # teacher's 10 ms on one CPU thread), and nothing agd compiles changes its modules
        # afterwards (weights are graph inputs: new values are seen; new modules, hooks or
        # flags would not be)
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        options = {} if skip is None else {"guard_filter_fn": skip}
        if self.cuda_graphs:
            options["triton.cudagraphs"] = True  # mode "reduce-overhead", which takes no options
        self._compiled = torch.compile(self._call, dynamic=False, options=options or None,
                                       **({} if backend is None else {"backend": backend}))
        self.graphs = 0
        self.warmup_seconds = 0.0

    def _call(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        from torch._dynamo.utils import counters

        if self.cuda_graphs:  # each call is a new step: the previous outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        out = self._compiled(*args, **kwargs)
        if self.cuda_graphs:  # the graph's output buffers are overwritten by the next replay
            out = tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
        new = counters["stats"]["unique_graphs"] - before
        if new:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.graphs += new
            self.warmup_seconds += time.perf_counter() - t0
        return out
