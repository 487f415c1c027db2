"""What this machine can do, asked in one place: bf16 support, xformers, free accelerator memory,
whether torch.compile has the compiler it needs.

Every hardware decision in agd (precision fallback, fast attention, gradient checkpointing)
reads these functions and nothing else, so tests can set the answers with `assume(...)` and
exercise each decision on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

# Test overrides: a key here wins over what the hardware says (see `assume`).
_ASSUMED: dict[str, Any] = {}


def bf16_supported(device: Any) -> bool:
    """Whether `device` runs bf16 natively (RTX 20xx and many laptop cards do not)."""
    if "bf16" in _ASSUMED:
        return bool(_ASSUMED["bf16"])
    dev = torch.device(device)
    if dev.type != "cuda":
        return True  # CPU autocast and tensors support bf16
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def usable_precision(name: str, device: Any) -> str:
    """The precision (fp16, bf16, fp32) `device` runs for `name`: fp16 where bf16 is asked of a
    CUDA card without it (the same 16-bit width; training adds fp16's loss scaling)."""
    if name == "bf16" and torch.device(device).type == "cuda" and not bf16_supported(device):
        return "fp16"
    return name


def xformers_available() -> bool:
    """Whether xformers is installed (its kernels are CUDA-only)."""
    if "xformers" in _ASSUMED:
        return bool(_ASSUMED["xformers"])
    return importlib.util.find_spec("xformers") is not None


def free_memory(device: Any) -> int | None:
    """Free bytes on a CUDA device, or None where that is not known (CPU, meta)."""
    if "free_memory" in _ASSUMED:
        return _ASSUMED["free_memory"]
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free)


def compiler_missing(device: Any) -> str | None:
    """What torch.compile (inductor) lacks to compile for `device`, or None when it has it: a
    C++ compiler for the CPU's kernels, triton for CUDA's."""
    if "compiler_missing" in _ASSUMED:
        return _ASSUMED["compiler_missing"]
    if torch.device(device).type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "triton"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except (RuntimeError, OSError, ImportError):  # InvalidCxxCompiler; MSVC's checks
        return "a C++ compiler (g++, clang++ or MSVC cl)"
    return None


@contextlib.contextmanager
def assume(**facts: Any) -> Iterator[None]:
    """Pretend the hardware answers `facts` (bf16=, xformers=, free_memory=,
    compiler_missing=) inside the block."""
    unknown = set(facts) - {"bf16", "xformers", "free_memory", "compiler_missing"}
    if unknown:
        raise ValueError(f"unknown hardware facts: {sorted(unknown)}")
    saved = dict(_ASSUMED)
    _ASSUMED.update(facts)
    try:
        yield
    finally:
        _ASSUMED.clear()
        _ASSUMED.update(saved)
