"""Stable Diffusion XL: two CLIP text encoders, pooled embeddings and size/crop time ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPTextModelWithProjection

from agd_cli.families.base import _seeded, _tokenize
from agd_cli.families.sd import SDDenoiser
from agd_cli.families.weights import clip_config


class SDXLDenoiser(SDDenoiser):
    """cond = {"prompt_embeds": (B, L, 2048), "pooled": (B, 1280), "time_ids": (B, 6)}."""

    family = "sdxl"

    @classmethod
    def _build_random(cls, preset, text=True):
        unet, parts, scheduler, vae = super()._build_random(preset, text)  # each part seeded alike
        tok, arch = parts["tokenizer"], preset.architecture
        te2 = _seeded(lambda: CLIPTextModelWithProjection(clip_config(arch["text_encoder_2"], tok)))
        return unet, {**parts, "tokenizer_2": tok, "text_encoder_2": te2}, scheduler, vae

    @classmethod
    def _text_encoder_classes(cls) -> list[tuple[str, type]]:
        return [*super()._text_encoder_classes(), ("_2", CLIPTextModelWithProjection)]

    def _time_ids(self, n: int, size) -> torch.Tensor:
        h, w = size or (self.preset.resolution, self.preset.resolution)
        # (original size, crop top-left, target size), as SDXL was trained with
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).repeat(n, 1)

    def encode(self, prompts: Sequence[str], size=None) -> dict:
        self._text()
        embs = []
        with torch.no_grad():
            for sub in ("", "_2"):
                tok, te = self.text["tokenizer" + sub], self.text["text_encoder" + sub]
                out = te(_tokenize(tok, prompts, self.device), output_hidden_states=True)
                embs.append(out.hidden_states[-2])  # SDXL uses the penultimate layer
        return {"prompt_embeds": torch.cat(embs, dim=-1), "pooled": out.text_embeds,
                "time_ids": self._time_ids(len(prompts), size)}

    def encode_null(self, n: int, size=None) -> dict:
        # SDXL base sets force_zeros_for_empty_prompt: the unconditional embedding is all zeros
        ref = self.encode([""], size)
        null = {k: torch.zeros_like(v).expand(n, *v.shape[1:]).clone() for k, v in ref.items()}
        null["time_ids"] = self._time_ids(n, size)
        return null

    def _model_kwargs(self, cond: dict) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"],
                "added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}}

    def cond_spec(self) -> dict:
        c = self.model.config
        return {"token_dim": c.cross_attention_dim,
                "pooled_dim": c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim}

    def extract_adapter_cond(self, arguments: dict) -> tuple[int, dict]:
        added = arguments.get("added_cond_kwargs") or {}
        return arguments["sample"].shape[0], {"tokens": arguments["encoder_hidden_states"],
                                              "pooled": added.get("text_embeds")}
