"""The library API: an agd adapter inside ordinary diffusers pipelines, next to a LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agd_cli import sampling
from agd_cli.api import agd_adapter, agd_guidance, load_agd_adapter, unload_agd_adapter
from agd_cli.errors import DataError, ModelError
from agd_cli.families import load_denoiser, load_with_adapters
from agd_cli.presets import load_preset

STEPS = 4
OMEGA = 4.0


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, Path]:
    """Untrained (Xavier-initialised) adapter files for the tiny presets."""
    folder = tmp_path_factory.mktemp("adapters")
    files = {}
    for name in ("tiny-sd", "tiny-sdxl", "tiny-dit"):
        den = load_denoiser(load_preset(name), "cpu")
        files[name] = folder / f"{name}.safetensors"
        den.new_adapters().save(files[name], den.adapter_metadata(train_steps=0))
    return files


def tiny_sd_pipeline():
    """A plain diffusers StableDiffusionPipeline from the tiny-sd components (no agd inside)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    pipe = StableDiffusionPipeline(
        vae=den._vae(), text_encoder=den.text["text_encoder"], tokenizer=den.text["tokenizer"],
        unet=den.model, scheduler=DDIMScheduler.from_config(den.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, den.latent_shape()


def latents(pipe, noise, **kwargs) -> torch.Tensor:
    """Final latents of the pipeline without CFG (guidance_scale=1: one UNet pass per step)."""
    return pipe("a red fox", num_inference_steps=STEPS, guidance_scale=1.0, latents=noise.clone(),
                output_type="latent", **kwargs).images


def test_agd_adapter_and_lora_active_together(adapter_files):
    from peft import LoraConfig

    pipe, shape = tiny_sd_pipeline()
    noise = sampling.initial_noise(shape, [0])
    base = latents(pipe, noise)
    load_agd_adapter(pipe, adapter_files["tiny-sd"])
    agd_only = latents(pipe, noise, cross_attention_kwargs={"agd_omega": OMEGA})
    assert torch.equal(latents(pipe, noise), base)  # without ω the adapters stay out of the way

    # the same sampling through agd's own generate path (same noise, scheduler, steps)
    den = load_with_adapters(adapter_files["tiny-sd"], "cpu")
    own = sampling.sample(den, den.encode(["a red fox"]), None, OMEGA, noise, mode="agd",
                          steps=STEPS, scheduler="ddim").x
    torch.testing.assert_close(agd_only, own, rtol=1e-5, atol=1e-5)

    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"],
                                     init_lora_weights=False))
    lora_only = latents(pipe, noise)
    both = latents(pipe, noise, cross_attention_kwargs={"agd_omega": OMEGA})
    for a, b in [(both, lora_only), (both, agd_only), (lora_only, base)]:
        assert (a - b).abs().max() > 1e-4
    lora_params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)  # the LoRA stays trainable

    with agd_guidance(pipe, OMEGA):  # the same ω without cross_attention_kwargs
        assert torch.equal(latents(pipe, noise), both)
    unload_agd_adapter(pipe)
    assert agd_adapter(pipe) is None
    assert torch.equal(latents(pipe, noise), lora_only)


def test_dit_pipeline_with_agd_guidance(adapter_files):
    from diffusers import DDIMScheduler, DiTPipeline

    den = load_denoiser(load_preset("tiny-dit"), "cpu")
    pipe = DiTPipeline(transformer=den.model, vae=den._vae(),
                       scheduler=DDIMScheduler.from_config(den.scheduler_config))
    pipe.set_progress_bar_config(disable=True)

    def images(omega=None):
        ctx = agd_guidance(pipe, omega) if omega else torch.no_grad()
        with ctx:
            return pipe(class_labels=[3], guidance_scale=1.0, num_inference_steps=STEPS,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = images()
    with pytest.raises(ModelError, match="no agd adapter"):
        images(OMEGA)
    load_agd_adapter(pipe, adapter_files["tiny-dit"])
    low, high = images(2.0), images(OMEGA)
    assert (low - high).abs().max() > 1e-4 and (high - base).abs().max() > 1e-4
    assert torch.equal(images(), base)


def test_adapter_for_another_base_is_refused_naming_both(adapter_files):
    from diffusers import UNet2DConditionModel

    pipe, _ = tiny_sd_pipeline()
    with pytest.raises(DataError) as err:
        load_agd_adapter(pipe, adapter_files["tiny-sdxl"])
    assert "random:tiny-sdxl" in err.value.message and "family sd" in err.value.message

    arch = dict(load_preset("tiny-sd").architecture["unet"], cross_attention_dim=16)
    narrow = UNet2DConditionModel(**arch)  # same family, other architecture
    with pytest.raises(DataError) as err:
        load_agd_adapter(narrow, adapter_files["tiny-sd"])
    assert "random:tiny-sd" in err.value.message and "UNet2DConditionModel" in err.value.message
    assert agd_adapter(narrow) is None
