"""What a family's model looks like, from configs alone: before any weight loads (from the
preset's architecture TOML or a local model folder's config.json) and after (from the loaded
configs), through the same functions.

    spec = FamilySpec(load_preset("sdxl"))
    spec.latent_shape(), spec.size_multiple, spec.num_classes, spec.cond_layout()
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from agd_cli.config.presets import Preset
from agd_cli.config.vocab import UNET_FAMILIES
from agd_cli.infra.io import read_json

DEFAULT_VAE_FACTOR = 8      # every SD/SDXL/DiT VAE downsamples 8x
DEFAULT_NUM_CLASSES = 1000  # ImageNet; DiTPipeline hard-codes the null class id to 1000


def vae_factor(vae_config: dict | None, pixel_space: bool = False) -> int:
    """Pixels per latent cell: 2^(stages - 1) of the VAE (DC-AE names its stages apart)."""
    if pixel_space:
        return 1
    stages = vae_config and (vae_config.get("block_out_channels")
                             or vae_config.get("encoder_block_out_channels"))
    return 2 ** (len(stages) - 1) if stages else DEFAULT_VAE_FACTOR


def num_classes(transformer_config: dict | None) -> int:
    """Class count of a class-conditional (DiT) model; its id is also the null class."""
    return int((transformer_config or {}).get("num_embeds_ada_norm", DEFAULT_NUM_CLASSES))


@dataclass(frozen=True)
class FamilySpec:
    """A preset's model, answered from configs only (no torch, no weights)."""

    preset: Preset

    @property
    def family(self) -> str:
        return self.preset.family

    def config(self, part: str) -> dict | None:
        """A model part's config: the preset's architecture, else a local model folder's."""
        if self.preset.architecture.get(part):
            return self.preset.architecture[part]
        path = Path(self.preset.resolve_base_model()) / part / "config.json"
        if path.is_file():
            return read_json(path)
        return None

    @cached_property
    def net_config(self) -> dict | None:
        """The denoiser's config (UNet or transformer)."""
        return self.config("unet" if self.family in UNET_FAMILIES else "transformer")

    @property
    def vae_factor(self) -> int:
        return vae_factor(None if self.preset.pixel_space else self.config("vae"),
                          self.preset.pixel_space)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple | None:
        """(C, h, w) of the model input for an image of height x width pixels (default: the
        preset's resolution); None when the config is not at hand (a hub id)."""
        if self.net_config is None:
            return None
        f = self.vae_factor
        h, w = height or self.preset.resolution, width or self.preset.resolution
        return (int(self.net_config.get("in_channels", 4)), h // f, w // f)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: VAE downsampling × the model's own."""
        arch = self.preset.architecture
        if "transformer" in arch:
            model = int(arch["transformer"].get("patch_size", 2))
        elif "unet" in arch:
            model = 2 ** (len(arch["unet"]["block_out_channels"]) - 1)
        else:  # shipped UNets forward odd upsample sizes; DiT needs whole patches
            model = 2 if self.family == "dit" else 1
        return self.vae_factor * model

    @property
    def num_classes(self) -> int:
        """DiT's class count (ids 0..n-1; n is the null class)."""
        return num_classes(self.config("transformer"))

    def cond_layout(self) -> dict[str, tuple[tuple, int]] | None:
        """Stored condition tensors of one prompt: key -> (shape, bytes per element)."""
        if self.family == "dit":
            return {"class_labels": ((), 8)}
        if self.family in TRANSFORMER_COND_LAYOUTS:
            net = self.config("transformer")
            tokenizer = self.preset.architecture.get("tokenizer", {})
            return None if net is None else TRANSFORMER_COND_LAYOUTS[self.family](net, tokenizer)
        unet = self.config("unet")
        if unet is None:
            return None
        tokens = self.preset.architecture.get("tokenizer", {}).get("model_max_length", 77)
        layout = {"prompt_embeds": ((tokens, unet.get("cross_attention_dim", 768)), 2)}
        if self.family == "sdxl":
            pooled = (unet["projection_class_embeddings_input_dim"]
                      - 6 * unet["addition_time_embed_dim"])
            layout.update({"pooled": ((pooled,), 2), "time_ids": ((6,), 4)})
        return layout


def _t5_layout(net: dict, tokenizer: dict) -> dict[str, tuple[tuple, int]]:
    """PixArt-Σ and Sana: T5/Gemma tokens and their attention mask."""
    length = int(tokenizer.get("max_sequence_length", 300))
    return {"prompt_embeds": ((length, net["caption_channels"]), 2), "prompt_mask": ((length,), 8)}


def _sd3_layout(net: dict, tokenizer: dict) -> dict[str, tuple[tuple, int]]:
    """SD3: CLIP tokens then T5 tokens in one sequence, and the pooled CLIP vectors."""
    length = int(tokenizer.get("model_max_length", 77)) + int(tokenizer.get("max_sequence_length", 256))
    return {"prompt_embeds": ((length, net["joint_attention_dim"]), 2),
            "pooled": ((net["pooled_projection_dim"],), 2)}


# Condition tensors of one prompt as collect stores them, per transformer family: key -> (shape,
# bytes each). The UNet families and DiT are laid out in FamilySpec.cond_layout itself.
TRANSFORMER_COND_LAYOUTS = {"pixart": _t5_layout, "sana": _t5_layout, "sd3": _sd3_layout}
