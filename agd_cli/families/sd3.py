"""Stable Diffusion 3 / 3.5: SD3Transformer2DModel (MMDiT, flow matching), CLIP-L + CLIP-G + T5.

Where the adapters sit. SD3 has no text cross-attention: each JointTransformerBlock runs ONE
attention over the concatenation [image tokens; text tokens] (`block.attn`, processor
JointAttnProcessor2_0), which returns the two streams separately. The guidance adapter hooks
that attention module and adds its output to the IMAGE stream only, right after the joint attention
and before the block's adaLN gate (gate_msa), as the offset adapters sit in DiT:
  * the image stream is what the transformer finally decodes into the velocity; the text
    stream of the last block is dropped (context_pre_only), so an adapter there would do nothing;
  * the adapter's queries are the block's normalised image tokens and its keys/values the
    shared [ω, t, prompt] context — the same cross-attention adapter as SD/SDXL, so the text
    condition still reaches it although the block has no attn2;
  * SD3.5 Medium's extra image-only self-attention (`attn2`, first 13 blocks) is left alone:
    one site per block, every block covered.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModelWithProjection

from agd_cli.core.adapter_layers import Site
from agd_cli.families.pixart import random_t5
from agd_cli.families.text import build_char_tokenizer, build_t5_tokenizer
from agd_cli.families.transformer import TextTransformerDenoiser
from agd_cli.families.weights import clip_config


class SD3Denoiser(TextTransformerDenoiser):
    """cond = {"prompt_embeds": (B, 77 + 256, 4096), "pooled": (B, 2048)}; velocity output."""

    family = "sd3"
    model_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    omega_kwarg = "joint_attention_kwargs"  # SD3 hands these on to every block's attention
    text_parts = {"tokenizer": "CLIPTokenizer", "text_encoder": "CLIPTextModelWithProjection",
                  "tokenizer_2": "CLIPTokenizer", "text_encoder_2": "CLIPTextModelWithProjection",
                  "tokenizer_3": "T5Tokenizer", "text_encoder_3": "T5EncoderModel"}

    @classmethod
    def _random_text(cls, arch):
        tok_cfg = arch.get("tokenizer", {})
        clip_tok = build_char_tokenizer(tok_cfg.get("model_max_length", 77))
        t5_tok = build_t5_tokenizer(tok_cfg.get("max_sequence_length", 256))
        return {"tokenizer": clip_tok, "tokenizer_2": clip_tok, "tokenizer_3": t5_tok,
                "text_encoder": CLIPTextModelWithProjection(clip_config(arch["text_encoder"], clip_tok)),
                "text_encoder_2": CLIPTextModelWithProjection(clip_config(arch["text_encoder_2"],
                                                                           clip_tok)),
                "text_encoder_3": random_t5(arch["text_encoder_3"], t5_tok)}

    def _encode_pair(self, prompts):
        emb, null, pooled, null_pooled = self._encoder_pipeline().encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=True,
            negative_prompt="", max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": emb, "pooled": pooled}, {"prompt_embeds": null, "pooled": null_pooled}

    def _model_kwargs(self, cond):
        return {"encoder_hidden_states": cond["prompt_embeds"], "pooled_projections": cond["pooled"]}

    def cond_spec(self):
        c = self.model.config
        return {"token_dim": c.joint_attention_dim, "pooled_dim": c.pooled_projection_dim}


    def random_cond(self, batch):
        clip_length = self.preset.architecture.get("tokenizer", {}).get("model_max_length", 77)
        length = clip_length + self.max_sequence_length  # CLIP tokens, then T5 tokens
        spec, dev, dt = self.cond_spec(), self.device, self.dtype
        return {"prompt_embeds": torch.randn(batch, length, spec["token_dim"], device=dev, dtype=dt),
                "pooled": torch.randn(batch, spec["pooled_dim"], device=dev, dtype=dt)}

    def adapter_sites(self, kind):
        """The joint attention `attn` of every block; the adapter adds to its image output."""
        return [Site(name, m.to_out[0].out_features) for name, m in self.model.named_modules()
                if name.startswith("transformer_blocks.") and name.endswith(".attn")]

    def extract_adapter_cond(self, arguments):
        return arguments["hidden_states"].shape[0], {"tokens": arguments["encoder_hidden_states"],
                                                     "pooled": arguments.get("pooled_projections")}
