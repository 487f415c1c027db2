"""Model families behind one interface (registry: FAMILY_CLASSES).

Each family loads from a hub id or a local folder, or builds from the preset's architecture
config with seeded random weights; encodes conditions once (including the unconditional one);
predicts for (x_t, t, cond) with adapters fed ω; and runs real CFG through guidance.cfg_combine.
"""

from __future__ import annotations

from agd_cli.config.presets import Preset
from agd_cli.families.base import (
    Denoiser,
    count_truncated,
    resolve_device,
    resolve_dtype,
    warn_truncated,
)
from agd_cli.families.dit import DiTDenoiser
from agd_cli.families.pixart import PixArtDenoiser
from agd_cli.families.sana import SanaDenoiser
from agd_cli.families.sd import SDDenoiser
from agd_cli.families.sd3 import SD3Denoiser
from agd_cli.families.sdxl import SDXLDenoiser

FAMILY_CLASSES: dict[str, type[Denoiser]] = {
    "sd": SDDenoiser, "sdxl": SDXLDenoiser, "dit": DiTDenoiser, "sd3": SD3Denoiser,
    "pixart": PixArtDenoiser, "sana": SanaDenoiser}  # presets.FAMILIES names them

__all__ = ["FAMILY_CLASSES", "Denoiser", "count_truncated", "warn_truncated",
           "load_denoiser", "load_with_adapters", "resolve_device", "resolve_dtype"]


def load_denoiser(preset: Preset, device=None, dtype: str = "fp32", weights: str = "pretrained",
                  text: bool = True) -> Denoiser:
    """The registry's entry point: the preset's family, loaded (or built with random weights)."""
    return FAMILY_CLASSES[preset.family].load(preset, device=device, dtype=dtype, weights=weights,
                                        text=text)


def count_parameters(preset: Preset) -> dict:
    """Base (UNet/transformer) and adapter parameter counts; real-size bases on the meta device."""
    import torch
    from accelerate import init_empty_weights

    cls = FAMILY_CLASSES[preset.family]
    if preset.architecture.get("unet") or preset.architecture.get("transformer"):
        # the device context also puts buffers on meta: SD3.5's 384² position table takes 13 s
        with init_empty_weights(), torch.device("meta"):
            den = cls.load(preset, device=torch.device("meta"), weights="random", text=False)
            adapters = den.new_adapters()
    else:  # a small shipped model without an architecture section: load it for real
        den = cls.load(preset, device="cpu", text=False)
        adapters = den.new_adapters()
    mine = {id(p) for p in adapters.parameters()}  # a LoRA's layers sit inside the model
    base = sum(p.numel() for p in den.model.parameters() if id(p) not in mine)
    extra = sum(p.numel() for p in adapters.parameters())
    return {"base_params": base, "adapter_params": extra, "ratio": extra / base,
            "adapter_sites": len(adapters.sites) or len(getattr(adapters, "names", ()))}


def load_with_adapters(path, device=None, dtype: str = "fp32", text: bool = True,
                       base: Preset | None = None) -> Denoiser:
    """Load the base an adapter file was trained on (or `base`) and attach the adapters."""
    from agd_cli.core.adapter_file import AdapterFile

    file = AdapterFile.open(path)
    den = load_denoiser(base or file.preset, device=device, dtype=dtype, text=text)
    den.load_adapters(file)
    return den
