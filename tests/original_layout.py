"""Test helper: a diffusers SD model back in the original single-file (LDM) layout.

The inverse of diffusers' own conversion (diffusers.loaders.single_file_utils:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint) for
SD 1.x-style checkpoints, so tests can write a tiny `model.safetensors` in the layout users'
fine-tunes come in and check that loading it gives back exactly the model it came from.
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
               ("conv_shortcut", "skip_connection"))
VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out."))


def _rename(rest: str, pairs) -> str:
    for new, old in pairs:
        rest = rest.replace(new, old)
    return rest


def _translate(key: str, fixed: dict, rules: list, what: str) -> str:
    """The original name of a diffusers key: a fixed entry, else the first matching rule."""
    if key in fixed:
        return fixed[key]
    for pattern, name in rules:
        if m := re.fullmatch(pattern, key):
            return name(m)
    raise KeyError(f"no original-layout name for {what} key {key}")


def _unet_key(key: str, config: dict) -> str:
    per = config["layers_per_block"] + 1  # resnets per level, plus the down/upsampler slot

    def block(m) -> str:
        b, j = int(m[2]), int(m[4])
        slot = "0." + _rename(m[5], UNET_RESNET) if m[3] == "resnets" else "1." + m[5]
        if m[1] == "down":  # input block 0 is conv_in
            return f"input_blocks.{per * b + j + 1}.{slot}"
        return f"output_blocks.{per * b + j}.{slot}"

    def upsampler(m) -> str:
        b = int(m[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
        return f"output_blocks.{per * b + per - 1}.{slot}.conv.{m[2]}"

    rules = [
        (r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", block),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
         lambda m: f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.*)",
         lambda m: f"middle_block.{2 * int(m[1])}.{_rename(m[2], UNET_RESNET)}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", upsampler),
    ]
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],
             **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    return _translate(key, fixed, rules, "UNet")


def _vae_key(key: str, n_blocks: int) -> str:
    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)",
         lambda m: f"encoder.down.{m[1]}.downsample.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",  # up blocks count down
         lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)",
         lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)",
         lambda m: f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION)}"),
    ]
    return _translate(key, DIFFUSERS_TO_LDM_MAPPING["vae"], rules, "VAE")


def to_original_sd(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One SD 1.x-layout state dict (UNet, VAE, CLIP text encoder) from diffusers models."""
    out = {UNET + _unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    n = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        name = _vae_key(k, n)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[VAE + name] = v
    for k, v in text_encoder.state_dict().items():
        out[CLIP + "text_model." + k.removeprefix("text_model.")] = v
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
