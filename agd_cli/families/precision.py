"""Which dtype each model part runs in.

Three rules, one place:
  * bf16 falls back to fp16 where the card has no bf16 (RTX 20xx, many laptop GPUs), said
    once; training then scales its loss as for fp16 (step.AdapterStep's grad scaler);
  * a preset may give a part its own dtype (`[dtypes] text_encoder = "bf16"`: Sana's Gemma-2
    was trained in bf16, its transformer in fp16); fp32 runs stay fp32 throughout;
  * text encoders keep the dtypes their library chose at load: transformers keeps some layers
    in fp32 (`_keep_in_fp32_modules`, T5's `wo`), so a loaded encoder is only moved, never cast.
    Encoders built from config with random weights are cast by the same rule.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from agd_cli.infra import hardware

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = {v: k for k, v in TORCH_DTYPES.items()}
_SAID: set[str] = set()  # fallbacks already announced in this process
logger = logging.getLogger(__name__)


def resolve_precision(name: str, device: torch.device | str) -> str:
    """`name` (fp16, bf16, fp32) as this device runs it: bf16 becomes fp16 on a CUDA card
    without bf16, said in one line (once per process)."""
    dev = torch.device(device)
    usable = hardware.usable_precision(name, dev)
    if usable != name and name not in _SAID:
        _SAID.add(name)
        logger.warning(f"this GPU ({dev}) has no bf16: running in fp16 instead (training "
                       "scales its loss, as for --dtype fp16)")
    return usable


def preset_half_precision(preset) -> str:
    """The model's half precision where no --dtype is given: the preset's own (bf16 for
    models trained in bf16, as SD 3.5), else fp16."""
    own = preset.collect.get("dtype", "fp16")
    return own if own in ("fp16", "bf16") else "fp16"


def part_dtype(preset, part: str, dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype `part` (text_encoder, text_encoder_2, …) loads in: the preset's own entry for
    it in half-precision runs, else the run's dtype. fp32 runs (and the CPU) stay fp32."""
    own = (getattr(preset, "dtypes", None) or {}).get(part)
    if own is None or dtype == torch.float32:
        return dtype
    return TORCH_DTYPES[resolve_precision(own, device)]


def text_dtypes(preset, parts, dtype: torch.dtype, device) -> dict[str, torch.dtype]:
    """part -> dtype for each text encoder part name in `parts`."""
    return {p: part_dtype(preset, p, dtype, device) for p in parts}


def keep_in_fp32(module: nn.Module, dtype: torch.dtype) -> list[str]:
    """Names of the submodules transformers would keep in fp32 when loading `module` in
    `dtype` (`_keep_in_fp32_modules` for fp16, `_keep_in_fp32_modules_strict` for fp16 and
    bf16), matched as whole name components as transformers matches the checkpoint keys."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    if not keep:
        return []
    return [name for name, _ in module.named_modules() if keep & set(name.split("."))]


def cast_like_loading(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast an encoder built from config (random weights) to `dtype` as from_pretrained would
    have loaded it: the library's keep-in-fp32 layers stay fp32."""
    module.to(dtype)
    for name in keep_in_fp32(module, dtype):
        module.get_submodule(name).to(torch.float32)
    return module


def floating_dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    """Parameter name -> dtype (checks and reports: which layers run in which precision)."""
    return {n: p.dtype for n, p in module.named_parameters() if p.is_floating_point()}
