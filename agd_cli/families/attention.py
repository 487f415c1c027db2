"""Which attention kernels a base runs: xformers only where it computes the same model.

PyTorch's SDPA (diffusers' default processors) is the default everywhere. xformers is turned on
only on CUDA, where it is installed (hardware.xformers_available) and where the family's
attention is plain softmax attention that xformers reproduces:
  * sd, sdxl, dit: softmax self-/cross-attention without masks;
  * sd3: the joint attention (diffusers' XFormersJointAttnProcessor, same qk norms);
  * pixart: no. Its cross-attention takes the T5 mask (300 tokens), and xformers refuses that
    bias ("attn_bias.stride(-2) % 8 != 0"): collect would crash on the first batch;
  * sana: no. Its self-attention is *linear* attention; diffusers' xformers switch replaces it
    with softmax attention, a different model (issue 31: outputs moved by up to 0.26 in a
    tiny experiment).
"""

from __future__ import annotations

import torch

from agd_cli.infra import hardware

XFORMERS_SAME_MODEL = {"sd": True, "sdxl": True, "dit": True, "sd3": True,
                       "pixart": False, "sana": False}


def attention_backend(family: str, device: torch.device | str) -> str:
    """'xformers' or 'sdpa' for a base of `family` on `device` (decision only, nothing set)."""
    if torch.device(device).type != "cuda" or not hardware.xformers_available():
        return "sdpa"
    return "xformers" if XFORMERS_SAME_MODEL.get(family, False) else "sdpa"


def use_fast_attention(den) -> str:
    """Set the chosen kernels on `den`'s model; returns what runs ('xformers' or 'sdpa'). The
    adapters hook the attention modules, so a processor set here keeps them."""
    if attention_backend(den.family, den.device) != "xformers":
        return "sdpa"
    try:
        den.model.enable_xformers_memory_efficient_attention()
    except Exception:  # noqa: BLE001 - no kernel for this GPU or dtype: SDPA is as exact
        return "sdpa"
    return "xformers"
