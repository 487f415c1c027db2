"""The guidance LoRA on diffusion transformers (core/lora.py): SD3 and Sana files in diffusers'
own key format, which the pipelines' `load_lora_weights` read with no agd code, giving at
strength λ and guidance_scale 1 what `agd generate` gives at ω; PixArt-Σ's pipeline has no LoRA
loader in diffusers, so its file is checked with peft's own loader."""

from __future__ import annotations

import diffusers
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from agd_cli.api import lora_scale
from agd_cli.config.presets import load_preset
from agd_cli.core import sampling
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.core.lora import FEED_FORWARD, PROJECTIONS
from agd_cli.families import FAMILY_CLASSES, load_denoiser, load_with_adapters
from agd_cli.infra.errors import InputError

STEPS = 3
W_REF = 3.0
OMEGA = 5.0  # λ = 2
PROMPT = "a red fox"


def lora_file(name: str, folder, targets: str = "attention"):
    """A LoRA for preset `name` with random (non-zero) weights, written as `agd train` writes it."""
    den = load_denoiser(load_preset(name), "cpu")
    cfg = AdapterConfig(kind="lora", lora_rank=4, lora_w_ref=W_REF, omega_range=[1.0, 8.0],
                        lora_targets=targets)
    lora = den.new_adapters(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = folder / f"{name}-{targets}.safetensors"
    lora.save(path, den.adapter_metadata(train_steps=0))
    return path, lora.names


def pipeline(name: str):
    """The family's plain diffusers pipeline from the tiny preset's parts (no agd inside)."""
    preset = load_preset(name)
    den = load_denoiser(preset, "cpu")
    cls = getattr(diffusers, FAMILY_CLASSES[preset.family].pipeline_class)
    scheduler = sampling.make_scheduler(preset.sampling["scheduler"], den.scheduler_config)
    pipe = cls(transformer=den.model, vae=den.vae_model(), scheduler=scheduler, **den.text)
    pipe.set_progress_bar_config(disable=True)
    return pipe, den


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sana"])
@pytest.mark.parametrize("targets", ["attention", "attention_ff"])
def test_the_pipelines_own_loader_reads_the_file_and_matches_agd(tmp_path, name, targets):
    path, names = lora_file(name, tmp_path, targets)
    pipe, den = pipeline(name)
    noise = sampling.initial_noise(den.latent_shape(), [0])
    size = {"height": den.preset.resolution, "width": den.preset.resolution}

    def run():
        return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, latents=noise.clone(),
                    output_type="latent", max_sequence_length=den.max_sequence_length,
                    **size).images

    base = run()
    pipe.load_lora_weights(str(path), adapter_name="guidance")
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")}
    assert loaded == set(names)  # every projection agd trained, and no other
    pipe.set_adapters(["guidance"], adapter_weights=[lora_scale(OMEGA, W_REF)])
    theirs = run()
    assert (theirs - base).abs().max() > 1e-3  # the LoRA does something

    mine_den = load_with_adapters(path, "cpu")  # agd generate's loader
    mine = sampling.sample(mine_den, mine_den.encode([PROMPT]), None, OMEGA, noise, mode="agd",
                           steps=STEPS, scheduler=den.preset.sampling["scheduler"]).x
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


def test_sd3_targets_see_image_and_text_and_keys_are_diffusers(tmp_path):
    path, names = lora_file("tiny-sd3", tmp_path)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {f"transformer.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    den = load_denoiser(load_preset("tiny-sd3"), "cpu", text=False)
    modules = dict(den.model.named_modules())
    joint = [n for n in modules if n.endswith(".attn")]
    assert joint
    for attn in joint:  # both streams of every joint attention (the last has no to_add_out)
        present = {f"{attn}.{p}" for p in PROJECTIONS
                   if isinstance(modules.get(f"{attn}.{p}"), torch.nn.Linear)}
        assert present <= set(names) and {f"{attn}.to_q", f"{attn}.add_q_proj"} <= present
    assert meta["modelspec.architecture"] == "stable-diffusion-3/lora"
    assert "ss_network_module" not in meta and meta["agd_lora_w_ref"] == "3"


def test_pixart_file_loads_with_peft_and_matches_agd(tmp_path):
    """diffusers' PixArtSigmaPipeline has no load_lora_weights; ComfyUI maps the same keys."""
    path, names = lora_file("tiny-pixart", tmp_path, "attention_ff")
    assert any(n.endswith(FEED_FORWARD) for n in names)
    den = load_denoiser(load_preset("tiny-pixart"), "cpu")
    x, cond = torch.randn(2, *den.latent_shape()), den.encode([PROMPT, "a cat"])
    base = den.forward(x, 500, cond)
    state = load_file(str(path))
    stems = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in state})
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=stems)
    inject_adapter_in_model(cfg, den.model, adapter_name="guidance")
    set_peft_model_state_dict(den.model, {k[len("transformer."):]: v for k, v in state.items()},
                              adapter_name="guidance")
    lam = lora_scale(OMEGA, W_REF)
    for m in den.model.modules():
        if hasattr(m, "scaling") and "guidance" in getattr(m, "scaling", {}):
            m.scaling["guidance"] = lam  # alpha/r = 1, times the strength
    theirs = den.forward(x, 500, cond)
    assert (theirs - base).abs().max() > 1e-3
    mine_den = load_with_adapters(path, "cpu")
    mine = mine_den.forward(x, 500, cond, omega=OMEGA)
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


def test_dit_refuses_a_lora_with_a_clear_message():
    den_cls = FAMILY_CLASSES[load_preset("tiny-dit").family]
    with pytest.raises(InputError, match="adapter kind 'lora' does not fit") as err:
        den_cls.check_adapter_kind(den_cls, "lora")
    assert "class-conditional" in err.value.message and err.value.exit_code == 2
