"""DiT (class-conditional latent transformer with learned sigma), e.g. DiT-XL/2."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from agd_cli.config.presets import is_single_file
from agd_cli.families.base import Denoiser, _seeded
from agd_cli.families.spec import num_classes
from agd_cli.families.weights import open_base
from agd_cli.infra.errors import InputError


class DiTDenoiser(Denoiser):
    """cond = {"class_labels": (B,) int64}; the null class id is the class count (spec.num_classes)."""

    family = "dit"
    adapter_kinds = ("offset",)  # no token sequence to attend to
    labels: dict = {}  # class id -> ImageNet names; set per instance in __init__

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the label table is not a text encoder: it stays after free_text_encoders()
        self.labels = self.text.pop("id2label", {})

    @classmethod
    def _build_random(cls, preset, text=True):
        arch = preset.architecture
        model = _seeded(lambda: DiTTransformer2DModel(**arch["transformer"]))
        return model, {"id2label": {}}, arch["scheduler"], arch.get("vae")

    @classmethod
    def _load_pretrained(cls, preset, source, text, dtype, text_dtypes=None):
        if is_single_file(source):
            raise InputError(f"single-file checkpoints are not supported for DiT: '{source}'",
                             hint="point base_model at a diffusers folder or hub id")
        base = open_base(preset, source)
        model = base.model(DiTTransformer2DModel, "transformer", dtype)
        try:
            id2label = dict(base.config(DiTPipeline, "").get("id2label") or {})
        except (OSError, ValueError):
            id2label = {}
        return (model, {"id2label": id2label}, base.config(DDIMScheduler, "scheduler"),
                base.config(AutoencoderKL, "vae"))

    @property
    def null_class(self) -> int:
        """The class count (from the loaded config, as FamilySpec reads it before loading)."""
        return num_classes(self.model.config)

    def class_id(self, prompt) -> int:
        """A class id from an int, a numeric string or an ImageNet class name."""
        text = str(prompt).strip()
        if text.isdigit() and int(text) < self.null_class:
            return int(text)
        for idx, names in self.labels.items():
            if text.lower() in [n.strip().lower() for n in str(names).split(",")]:
                return int(idx)
        raise InputError(f"unknown class '{prompt}' for {self.preset.name}",
                         hint=f"use a class id 0-{self.null_class - 1}"
                              + (" or an ImageNet class name" if self.labels else ""))

    def encode(self, prompts: Sequence, size=None) -> dict:
        labels = [self.class_id(p) for p in prompts]
        return {"class_labels": torch.tensor(labels, dtype=torch.long, device=self.device)}

    def encode_null(self, n: int, size=None) -> dict:
        return {"class_labels": torch.full((n,), self.null_class, dtype=torch.long, device=self.device)}

    def _model_kwargs(self, cond: dict) -> dict:
        return {"class_labels": cond["class_labels"]}

    def cond_spec(self) -> dict:
        return {"num_classes": self.null_class}

    def extract_adapter_cond(self, arguments: dict) -> tuple[int, dict]:
        return arguments["hidden_states"].shape[0], {"class_labels": arguments["class_labels"]}
