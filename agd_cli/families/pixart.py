"""PixArt-Σ: PixArtTransformer2DModel (learned sigma, ε), one T5 encoder with attention mask."""

from __future__ import annotations

from transformers import T5Config, T5EncoderModel

from agd_cli.families.text import build_t5_tokenizer
from agd_cli.families.transformer import TextTransformerDenoiser


def random_t5(arch: dict, tokenizer):
    """A T5 encoder with random weights from the preset's text_encoder config."""
    cfg = {"vocab_size": len(tokenizer), **arch}  # real presets give T5's own 32128
    return T5EncoderModel(T5Config(pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=0,
                                   eos_token_id=tokenizer.eos_token_id, **cfg))


class PixArtDenoiser(TextTransformerDenoiser):
    """cond = {"prompt_embeds": (B, L, 4096), "prompt_mask": (B, L) int64}."""

    family = "pixart"
    model_class = "PixArtTransformer2DModel"
    pipeline_class = "PixArtSigmaPipeline"
    text_parts = {"tokenizer": "T5Tokenizer", "text_encoder": "T5EncoderModel"}

    @classmethod
    def _random_text(cls, arch):
        tok = build_t5_tokenizer(arch["tokenizer"]["max_sequence_length"])
        return {"tokenizer": tok, "text_encoder": random_t5(arch["text_encoder"], tok)}

    def _model_kwargs(self, cond):
        # PixArt-Σ has no resolution/aspect-ratio conditioning (use_additional_conditions off)
        return {**super()._model_kwargs(cond),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
