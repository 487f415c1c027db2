"""Stable Diffusion 1.x/2.x (latent, ε or v) and its pixel-space variant (no VAE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from agd_cli.families.base import Denoiser, _seeded, _tokenize
from agd_cli.families.text import build_char_tokenizer
from agd_cli.families.weights import clip_config, open_base
from agd_cli.infra.errors import ModelError


class SDDenoiser(Denoiser):
    """UNet2DConditionModel + one CLIP text encoder; cond = {"prompt_embeds": (B, L, D)}."""

    family = "sd"
    adapter_kinds = ("cross_attention", "offset", "lora")  # lora: kohya UNet keys (core.lora_file)

    @classmethod
    def _build_random(cls, preset, text=True):
        arch = preset.architecture
        tok = build_char_tokenizer(arch.get("tokenizer", {}).get("model_max_length", 77))
        unet = _seeded(lambda: UNet2DConditionModel(**arch["unet"]))
        te = _seeded(lambda: CLIPTextModel(clip_config(arch["text_encoder"], tok)))
        return unet, {"tokenizer": tok, "text_encoder": te}, arch["scheduler"], arch.get("vae")

    @classmethod
    def _text_encoder_classes(cls) -> list[tuple[str, type]]:
        """(subfolder suffix, text encoder class) of each CLIP text encoder the base has."""
        return [("", CLIPTextModel)]

    @classmethod
    def text_part_names(cls) -> tuple[str, ...]:
        return tuple("text_encoder" + sub for sub, _ in cls._text_encoder_classes())

    @classmethod
    def _load_pretrained(cls, preset, source, text, dtype, text_dtypes=None):
        base = open_base(preset, source)
        unet = base.model(UNet2DConditionModel, "unet", dtype)
        parts, dtypes = {}, text_dtypes or {}
        if text:
            for sub, encoder in cls._text_encoder_classes():
                name = "text_encoder" + sub
                parts["tokenizer" + sub] = base.tokenizer(CLIPTokenizer, "tokenizer" + sub)
                parts[name] = base.text_encoder(encoder, name, dtypes.get(name, dtype))
        vae = None if preset.pixel_space else base.config(AutoencoderKL, "vae")
        return unet, parts, base.config(DDIMScheduler, "scheduler"), vae

    def _text(self):
        if "text_encoder" not in self.text:
            raise ModelError("the text encoder was not loaded or has been freed",
                             hint="encode all conditions before free_text_encoders()")
        return self.text["tokenizer"], self.text["text_encoder"]

    @property
    def tokenizer(self):
        return self._text()[0]

    def encode(self, prompts: Sequence[str], size=None) -> dict:
        tok, te = self._text()
        with torch.no_grad():
            emb = te(_tokenize(tok, prompts, self.device)).last_hidden_state
        return {"prompt_embeds": emb}

    def encode_null(self, n: int, size=None) -> dict:
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in self.encode([""]).items()}

    def _model_kwargs(self, cond: dict) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"]}

    def cond_spec(self) -> dict:
        return {"token_dim": self.model.config.cross_attention_dim}

    def extract_adapter_cond(self, arguments: dict) -> tuple[int, dict]:
        return arguments["sample"].shape[0], {"tokens": arguments["encoder_hidden_states"]}
