"""Sana: SanaTransformer2DModel (linear attention, flow matching), Gemma-2 text encoder, DC-AE."""

from __future__ import annotations

import inspect

from diffusers import SanaPipeline
from transformers import Gemma2Config, Gemma2Model

from agd_cli.families.text import build_gemma_tokenizer
from agd_cli.families.transformer import TextTransformerDenoiser


def _default_instruction() -> list[str] | None:
    """The 'complex human instruction' SanaPipeline prepends to every prompt by default."""
    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


class SanaDenoiser(TextTransformerDenoiser):
    """cond = {"prompt_embeds": (B, 300, 2304), "prompt_mask": (B, 300) int64}; velocity output."""

    family = "sana"
    model_class = "SanaTransformer2DModel"
    pipeline_class = "SanaPipeline"
    omega_kwarg = "attention_kwargs"
    # Sana's forward reads attention_kwargs only for the LoRA scale and calls its blocks without
    # them, so the adapters' per-call context is kept on the AdapterSet (see adapters.attach)
    omega_kwarg_routed = False
    vae_class = "AutoencoderDC"
    text_parts = {"tokenizer": "GemmaTokenizer", "text_encoder": "Gemma2Model"}

    @classmethod
    def _random_text(cls, arch):
        tok = build_gemma_tokenizer(arch["tokenizer"]["max_sequence_length"])
        cfg = Gemma2Config(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id,
                           **{"vocab_size": len(tok), **arch["text_encoder"]})
        return {"tokenizer": tok, "text_encoder": Gemma2Model(cfg)}

    def _encoder_pipeline(self):
        pipe = super()._encoder_pipeline()
        pipe.tokenizer.padding_side = "right"  # as SanaPipeline.__init__ sets it
        return pipe

    def _encode_options(self):
        return {"complex_human_instruction": _default_instruction()}
