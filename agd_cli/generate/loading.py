"""Loading for `agd generate`: one base with the adapter file attached, on the GPU or with
diffusers-style model CPU offload (each model on the GPU only while it runs)."""

from __future__ import annotations

import logging

import torch
from accelerate import cpu_offload_with_hook

from agd_cli.config.presets import Preset
from agd_cli.core.adapter_file import AdapterFile
from agd_cli.families import (
    load_denoiser,
    resolve_device,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

TILE_ABOVE = 1024  # VAE tiling for images larger than this many pixels per side


def load_generator(adapter: AdapterFile, base: Preset, device: str | None, dtype: str,
                   offload: bool, height: int, width: int):
    """The base model with the adapter file attached, placed for generation."""
    dev = resolve_device(device)
    if offload and dev.type != "cuda":
        logger.info("--offload: running on the CPU already, nothing to offload")
    if offload and dev.type == "cuda":
        # weights stay on the CPU, loaded straight in the GPU's dtype: no fp32 copy in RAM
        half = resolve_dtype(dtype, dev)
        den = load_denoiser(base, device=torch.device("cpu"), dtype=half)
        den.load_adapters(adapter)
        _offload_to(den, dev, half)
    else:
        den = load_denoiser(base, device=dev, dtype=dtype)
        den.load_adapters(adapter)
    if not base.pixel_space and max(height, width) > TILE_ABOVE:
        den.vae_model().enable_tiling()  # decode large images in tiles: bounded VAE memory
    return den


def _offload_to(den, device, dtype) -> None:
    """diffusers-style model CPU offload: each model moves to the GPU only while it runs."""
    den.place_model()  # on the CPU, where it loaded: the offload hooks move it from now on
    vae = None if den.preset.pixel_space else den.vae_model()  # built on the CPU, offloaded too
    # text encoders were loaded in their own dtypes (T5's `wo` in fp32): moved, never cast
    modules = [m for m in den.text.values() if isinstance(m, torch.nn.Module)]
    den.model.to(dtype)
    den.adapters.to(device, dtype)  # small: they live on the GPU
    den.device, den.dtype = device, dtype
    hook = None
    for m in [*modules, den.model] + ([vae] if vae is not None else []):
        _, hook = cpu_offload_with_hook(m, device, prev_module_hook=hook)
