"""What the text-to-image diffusion transformers (SD3, PixArt-Σ, Sana) share.

Prompts are encoded by the diffusers pipeline's own `encode_prompt` (built around the text
parts only), so agd's conditions are exactly what the pipeline would feed its transformer;
the large text encoders (T5-XXL, Gemma-2) are freed once every prompt is encoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import diffusers
import torch
import transformers

from agd_cli.families.base import Denoiser, _seeded, _vae_config
from agd_cli.families.weights import open_base
from agd_cli.infra.errors import ModelError


class TextTransformerDenoiser(Denoiser):
    """A diffusers transformer + the text encoders of its pipeline; subclasses set the names."""

    model_subfolder = "transformer"
    adapter_kinds = ("cross_attention", "offset", "lora")  # lora: diffusers keys (core.lora_file)
    model_class = ""      # diffusers transformer class
    pipeline_class = ""   # diffusers pipeline whose encode_prompt we use
    text_parts: dict[str, str] = {}  # pipeline component -> transformers class (pretrained load)

    @classmethod
    def _build_random(cls, preset, text=True):
        arch = preset.architecture
        model = _seeded(lambda: getattr(diffusers, cls.model_class)(**arch["transformer"]))
        parts = _seeded(lambda: cls._random_text(arch)) if text else {}
        return model, parts, arch["scheduler"], arch.get("vae")

    @classmethod
    def _random_text(cls, arch: dict) -> dict:
        """Tokenizers built in memory and text encoders with random weights, from config."""
        raise NotImplementedError

    @classmethod
    def text_part_names(cls) -> tuple[str, ...]:
        return tuple(n for n in cls.text_parts if not n.startswith("tokenizer"))

    @classmethod
    def _load_pretrained(cls, preset, source, text, dtype, text_dtypes=None):
        base = open_base(preset, source)  # safetensors only, the variant that fits the dtype
        model = base.model(getattr(diffusers, cls.model_class), cls.model_subfolder, dtype)
        parts, dtypes = {}, text_dtypes or {}
        for name, cls_name in (cls.text_parts.items() if text else ()):
            loader = getattr(transformers, cls_name)
            parts[name] = (base.tokenizer(loader, name) if name.startswith("tokenizer")
                           else base.text_encoder(loader, name, dtypes.get(name, dtype)))
        return model, parts, base.config(diffusers.DDIMScheduler, "scheduler"), _vae_config(base)

    def _encoder_pipeline(self):
        """The family's diffusers pipeline holding only the text parts (no weights copied)."""
        if not self.text:
            raise ModelError("the text encoders were not loaded or have been freed",
                             hint="encode all conditions before free_text_encoders()")
        cls = getattr(diffusers, self.pipeline_class)
        return cls(**{**dict.fromkeys(("transformer", "vae", "scheduler")), **self.text})

    @property
    def max_sequence_length(self) -> int:
        """Tokens of the (T5 / Gemma) prompt encoding: 256 for SD3, 300 for PixArt-Σ and Sana."""
        return int(self.preset.architecture.get("tokenizer", {}).get("max_sequence_length", 300))

    def _encode_options(self) -> dict:
        return {}

    def _encode_pair(self, prompts: list[str]) -> tuple[dict, dict]:
        """(cond, null) for `prompts`, as the pipeline encodes them: embeddings + attention mask."""
        emb, mask, null, null_mask = self._encoder_pipeline().encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt="", device=self.device,
            clean_caption=False, max_sequence_length=self.max_sequence_length,
            **self._encode_options())
        return ({"prompt_embeds": emb, "prompt_mask": mask},
                {"prompt_embeds": null, "prompt_mask": null_mask})

    def encode(self, prompts: Sequence[str], size=None) -> dict:
        with torch.no_grad():
            return self._encode_pair(list(prompts))[0]

    def encode_null(self, n: int, size=None) -> dict:
        with torch.no_grad():
            null = self._encode_pair([""])[1]
        return {k: v[:1].expand(n, *v.shape[1:]).clone() for k, v in null.items()}

    def _model_kwargs(self, cond: dict) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"],
                "encoder_attention_mask": cond["prompt_mask"]}

    def extract_adapter_cond(self, arguments: dict) -> tuple[int, dict]:
        return arguments["hidden_states"].shape[0], {"tokens": arguments["encoder_hidden_states"]}

    def cond_spec(self) -> dict:
        return {"token_dim": self.model.config.caption_channels}


    def random_cond(self, batch: int) -> dict:
        """Conditions of the real shapes, random values (memory probes on random bases)."""
        length, dev, dt = self.max_sequence_length, self.device, self.dtype
        return {"prompt_embeds": torch.randn(batch, length, self.cond_spec()["token_dim"],
                                             device=dev, dtype=dt),
                "prompt_mask": torch.ones(batch, length, dtype=torch.long, device=dev)}
