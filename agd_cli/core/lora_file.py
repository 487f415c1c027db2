"""The guidance LoRA's file: a LoRA safetensors that stock loaders read as is.

Keys (kohya sd-scripts' SD 1.x naming, which diffusers' `load_lora_weights` converts, and
ComfyUI and A1111/Forge map for SD 1.x/2.x and SDXL alike): for each diffusers UNet module
`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight  (r, in)
    ...                                                                  .lora_up.weight    (out, r)
    ...                                                                  .alpha             () = r

For a diffusers transformer (SD3, PixArt-Σ, Sana) the keys are diffusers' own (peft's names under
the pipeline component), which `load_lora_weights` of StableDiffusion3Pipeline and SanaPipeline
read and ComfyUI maps for SD3 and PixArt; no alpha keys (diffusers' loaders then take alpha = rank):

    transformer.transformer_blocks.0.attn.to_q.lora_A.weight  (r, in)
    transformer.transformer_blocks.0.attn.to_q.lora_B.weight  (out, r)

Metadata: kohya's `ss_*`, Stability's `modelspec.*` (base model, architecture, what it is: a
CFG-distillation LoRA, w_ref, ω range, λ formula) and agd's own keys with the tensors' checksum,
so `agd generate` reads it as an adapter file (core.adapter_file).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agd_cli import __version__
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.infra.io import atomic_path
from agd_cli.infra.tensor_files import save_tensors, tensors_sha256

FORMAT = "agd-adapter/1"  # agd reads it as an adapter file; stock loaders read the kohya keys
# family (preset for SD 2.x) -> (kohya ss_base_model_version, modelspec.architecture)
ARCHITECTURES = {
    "sd": ("sd_v1", "stable-diffusion-v1/lora"),
    "sd21": ("sd_v2", "stable-diffusion-v2-768-v/lora"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "sd3": ("sd3", "stable-diffusion-3/lora"),  # kohya sd-scripts' ARCH_SD3_M
    "pixart": ("pixart_sigma", "pixart-sigma/lora"),
    "sana": ("sana", "sana/lora"),
}


def describe(cfg: AdapterConfig, lo: float, hi: float) -> str:
    """What the file is, in one sentence for modelspec.description."""
    w = cfg.lora_w_ref
    return (f"agd CFG-distillation LoRA (guidance in one pass): run at CFG 1 with strength "
            f"λ = (ω − 1)/(w_ref − 1), w_ref = {w:g}, for guidance scale ω in {lo:g}–{hi:g} "
            f"(trained range); λ 1 gives ω {w:g}, λ {(hi - 1) / (w - 1):.3g} gives ω {hi:g}")


def lora_metadata(cfg: AdapterConfig, signature: str, metadata: dict) -> dict:
    """The file's metadata: ss_*, modelspec.* and agd's keys (all strings)."""
    lo, hi = float(metadata["omega_min"]), float(metadata["omega_max"])
    family = str(metadata.get("family"))
    kohya, arch = ARCHITECTURES.get(metadata.get("preset") if metadata.get("preset") in
                                    ARCHITECTURES else family, ARCHITECTURES["sd"])
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.update({
        "agd_version": __version__, "adapter_config": json.dumps(cfg.to_dict()),
        "signature": signature, "sites": "[]", "cond_spec": "{}", "format": FORMAT,
        "agd_lora_w_ref": f"{cfg.lora_w_ref:g}",
        "agd_lora_scale": "lambda = (omega - 1) / (w_ref - 1); omega = 1 + lambda * (w_ref - 1)",
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora_rank),
        "ss_network_alpha": str(cfg.lora_rank), "ss_base_model_version": kohya,
        "ss_sd_model_name": str(metadata.get("base_model")), "ss_v2": str(kohya.startswith("sd_v2")),
        "ss_training_comment": describe(cfg, lo, hi),
        "ss_steps": str(metadata.get("train_steps", 0)),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"agd guidance LoRA for {metadata.get('preset')} (w_ref {cfg.lora_w_ref:g})",
        "modelspec.description": describe(cfg, lo, hi),
        "modelspec.usage_hint": f"CFG 1.0, LoRA strength (ω − 1)/{cfg.lora_w_ref - 1:g}",
        "modelspec.author": "agd train", "modelspec.tags": "cfg-distillation,guidance,agd",
    })
    return meta


def save_lora(state: dict, cfg: AdapterConfig, signature: str, path: str | Path,
              metadata: dict, kohya: bool = True) -> None:
    """One safetensors file, written atomically: kohya or diffusers keys, checksum in the
    metadata."""
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    meta = lora_metadata(cfg, signature, metadata)
    if not kohya:  # kohya's network keys describe kohya's networks.lora only
        meta = {k: v for k, v in meta.items() if k not in ("ss_network_module", "ss_v2")}
    meta["tensors_sha256"] = tensors_sha256(tensors)  # verified on load
    with atomic_path(path) as tmp:
        save_tensors(tensors, tmp, metadata=meta)
