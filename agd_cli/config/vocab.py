"""The closed name lists agd's flags, presets and checks share, written down once.

Pure data (no torch): `agd --help` and click.Choice read it without loading anything heavy.
"""

from __future__ import annotations

FAMILIES = ("sd", "sdxl", "dit", "sd3", "pixart", "sana")
UNET_FAMILIES = ("sd", "sdxl")  # the UNet families; the rest are diffusion transformers
ADAPTER_KINDS = ("cross_attention", "offset", "lora")
# families whose LoRA files agd writes: kohya UNet keys (sd, sdxl), diffusers/peft transformer
# keys (sd3, pixart, sana); DiT is class-conditional (no text to guide towards, no loader)
LORA_FAMILIES = ("sd", "sdxl", "sd3", "pixart", "sana")
# the modules a guidance LoRA trains: attention projections, or those and the feed-forward Linears
LORA_TARGETS = ("attention", "attention_ff")
ADAPTER_INPUTS = ("omega", "timestep", "condition")
SCHEDULERS = ("ddim", "euler", "euler-a", "dpm++", "ddpm", "unipc", "heun", "flow-euler")
DTYPES = ("fp16", "bf16", "fp32")
OPTIMIZERS = ("adamw8bit", "adamw")
RANDOM_BASE = "random:"  # a base built from the preset's config: "random:<preset name>"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # one-file base models
# the teacher's two-pass rule (agd_cli.core.guidance_rules): plain CFG or a refinement of it
GUIDANCE_RULES = ("cfg", "interval", "apg", "cfg-zero-star", "rescale")
