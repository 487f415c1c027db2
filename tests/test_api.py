"""The library API: an agd adapter inside ordinary diffusers pipelines, next to a LoRA."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from agd_cli.api import agd_adapter, agd_guidance, load_agd_adapter, unload_agd_adapter
from agd_cli.config.presets import load_preset
from agd_cli.core import sampling
from agd_cli.families import load_denoiser, load_with_adapters
from agd_cli.infra.errors import DataError, InputError, ModelError

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
        vae=den.vae_model(), text_encoder=den.text["text_encoder"], tokenizer=den.text["tokenizer"],
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
    pipe = DiTPipeline(transformer=den.model, vae=den.vae_model(),
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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # guidance_scale 1: no double-guidance warning
        low, high = images(2.0), images(OMEGA)
    assert (low - high).abs().max() > 1e-4 and (high - base).abs().max() > 1e-4
    assert torch.equal(images(), base)
    with pytest.warns(UserWarning, match=r"own CFG \(guidance_scale > 1\): the image is guided"), \
            agd_guidance(pipe, OMEGA):  # DiT's CFG: the null class in the batch's second half
        pipe(class_labels=[3], guidance_scale=4.0, num_inference_steps=2, output_type="pt")


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



def test_a_refused_load_leaves_the_attached_adapter_working(adapter_files):
    pipe, shape = tiny_sd_pipeline()
    noise = sampling.initial_noise(shape, [0])
    load_agd_adapter(pipe, adapter_files["tiny-sd"], dtype="fp32")  # agd's dtype names work too
    before = latents(pipe, noise, cross_attention_kwargs={"agd_omega": OMEGA})
    for path, dtype in [(adapter_files["tiny-sdxl"], None), (adapter_files["tiny-sd"], torch.int8),
                        (adapter_files["tiny-sd"], "fp8"), (123, None)]:
        with pytest.raises((DataError, InputError)):
            load_agd_adapter(pipe, path, dtype=dtype)
        assert torch.equal(latents(pipe, noise, cross_attention_kwargs={"agd_omega": OMEGA}), before)


@pytest.mark.parametrize("omega, why", [
    (float("nan"), "finite and > 0"), (float("inf"), "finite and > 0"), (-3.0, "finite and > 0"),
    (0, "finite and > 0"), (True, "a real number"), ("4", "a real number"), (4 + 0j, "a real number"),
    ([4.0, 5.0], "one real number or 1"), (torch.tensor([4.0, float("nan")]), "one real number or 1"),
])
def test_a_bad_omega_is_named_not_turned_into_nan_images(adapter_files, omega, why):
    pipe, shape = tiny_sd_pipeline()
    load_agd_adapter(pipe, adapter_files["tiny-sd"])
    with pytest.raises(InputError, match=f"agd_omega must be {why}"):
        latents(pipe, sampling.initial_noise(shape, [0]), cross_attention_kwargs={"agd_omega": omega})


def test_omega_with_the_pipelines_own_cfg_warns_guided_twice(adapter_files):
    pipe, shape = tiny_sd_pipeline()
    load_agd_adapter(pipe, adapter_files["tiny-sd"])
    noise = sampling.initial_noise(shape, [0])
    kwargs = {"cross_attention_kwargs": {"agd_omega": OMEGA}}
    with pytest.warns(UserWarning, match=r"guidance_scale=2.5\): the image is guided twice"):
        pipe("a red fox", num_inference_steps=2, guidance_scale=2.5, latents=noise.clone(),
             output_type="latent", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one pass at guidance_scale 1, CFG without ω: no warning
        latents(pipe, noise, **kwargs)
        pipe("a red fox", num_inference_steps=2, guidance_scale=2.5, latents=noise.clone(),
             output_type="latent")
        unload_agd_adapter(pipe)
        pipe("a red fox", num_inference_steps=2, guidance_scale=2.5, latents=noise.clone(),
             output_type="latent", **kwargs)


def test_dit_negative_class_is_checked(adapter_files):
    from diffusers import DDIMScheduler, DiTPipeline

    den = load_denoiser(load_preset("tiny-dit"), "cpu")
    pipe = DiTPipeline(transformer=den.model, vae=den.vae_model(),
                       scheduler=DDIMScheduler.from_config(den.scheduler_config))
    load_agd_adapter(pipe, adapter_files["tiny-dit"])  # trained without negatives
    with pytest.raises(InputError, match="needs DiT adapters trained with negatives"):
        with agd_guidance(pipe, OMEGA, negative_class=3):
            pass
    with pytest.raises(InputError, match="agd_omega must be finite and > 0"):
        with agd_guidance(pipe, float("nan")):
            pass

# --- adapters survive attention processors set later ---------------------------------------------
IMAGE_EMBED_DIM = 16  # the tiny IP-Adapter's image-embedding width


def tiny_ip_adapter(pipe, folder: Path, scale: float) -> dict:
    """Load a real IP-Adapter weight file (diffusers' safetensors layout, random weights) through
    `pipe.load_ip_adapter`: it replaces every attn2 processor. Returns the call's extra kwargs."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    d = pipe.unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(4 * d, IMAGE_EMBED_DIM, generator=g) * 0.3,
               "image_proj.proj.bias": torch.zeros(4 * d),
               "image_proj.norm.weight": torch.ones(d), "image_proj.norm.bias": torch.zeros(d)}
    attn2 = [m for n, m in pipe.unet.named_modules() if n.endswith(".attn2")]
    for i, module in enumerate(attn2):  # diffusers numbers the attn2 layers 1, 3, 5, …
        for kv in ("k", "v"):
            tensors[f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight"] = torch.randn(
                module.to_k.out_features, d, generator=g) * 0.3
    save_file(tensors, str(folder / "ip-adapter.safetensors"))
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter.safetensors",
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    assert "IPAdapterAttnProcessor2_0" in processor_names(pipe)
    embeds = torch.randn(1, 1, IMAGE_EMBED_DIM, generator=g)
    return {"ip_adapter_image_embeds": [embeds]}


def processor_names(pipe) -> set[str]:
    return {type(p).__name__ for p in pipe.unet.attn_processors.values()}


def classic_attention(pipe, monkeypatch, tmp_path) -> dict:
    from diffusers.models.attention_processor import AttnProcessor

    pipe.unet.set_attn_processor(AttnProcessor())  # the pre-SDPA baddbmm path
    assert processor_names(pipe) == {"AttnProcessor"}
    return {}


def fused_qkv(pipe, monkeypatch, tmp_path) -> dict:
    pipe.unet.fuse_qkv_projections()  # one to_qkv matmul, FusedAttnProcessor2_0
    assert processor_names(pipe) == {"FusedAttnProcessor2_0"}
    return {}


def xformers_style(pipe, monkeypatch, tmp_path) -> dict:
    """diffusers' own XFormersAttnProcessor; xformers has no CPU kernels, so its kernel is
    computed by PyTorch SDPA (same maths, the processor's code path is diffusers')."""
    from types import SimpleNamespace

    from diffusers.models import attention_processor

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None, scale=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                                                scale=scale)

    kernel = SimpleNamespace(ops=SimpleNamespace(memory_efficient_attention=memory_efficient_attention))
    monkeypatch.setattr(attention_processor, "xformers", kernel, raising=False)
    pipe.unet.set_attn_processor(attention_processor.XFormersAttnProcessor())
    assert processor_names(pipe) == {"XFormersAttnProcessor"}
    return {}


def ip_adapter_at_scale_zero(pipe, monkeypatch, tmp_path) -> dict:
    return tiny_ip_adapter(pipe, tmp_path, scale=0.0)  # IP processors on, image term × 0


@pytest.fixture(scope="module")
def reference(adapter_files) -> dict[str, torch.Tensor]:
    """Latents of the tiny SD pipeline with its default processors: noise, base and agd."""
    pipe, shape = tiny_sd_pipeline()
    noise = sampling.initial_noise(shape, [0])
    base = latents(pipe, noise)
    load_agd_adapter(pipe, adapter_files["tiny-sd"])
    agd = latents(pipe, noise, cross_attention_kwargs={"agd_omega": OMEGA})
    assert (agd - base).abs().max() > 1e-2
    return {"noise": noise, "base": base, "agd": agd}


@pytest.mark.parametrize("change", [classic_attention, fused_qkv, xformers_style,
                                    ip_adapter_at_scale_zero], ids=lambda f: f.__name__)
def test_adapter_survives_attention_processors_set_later(adapter_files, reference, change,
                                                         monkeypatch, tmp_path):
    pipe, _ = tiny_sd_pipeline()
    adapters = load_agd_adapter(pipe, adapter_files["tiny-sd"])
    extra = change(pipe, monkeypatch, tmp_path)
    assert agd_adapter(pipe) is adapters
    after = latents(pipe, reference["noise"], cross_attention_kwargs={"agd_omega": OMEGA}, **extra)
    # the processor is numerically equivalent: agd's output is what it was before the change
    torch.testing.assert_close(after, reference["agd"], rtol=1e-4, atol=1e-4)
    unload_agd_adapter(pipe)
    assert agd_adapter(pipe) is None
    torch.testing.assert_close(latents(pipe, reference["noise"], **extra), reference["base"],
                               rtol=1e-4, atol=1e-4)


def test_agd_adapter_with_an_active_ip_adapter(adapter_files, tmp_path):
    pipe, shape = tiny_sd_pipeline()
    noise = sampling.initial_noise(shape, [0])
    load_agd_adapter(pipe, adapter_files["tiny-sd"])
    agd_only = latents(pipe, noise, cross_attention_kwargs={"agd_omega": OMEGA})
    extra = tiny_ip_adapter(pipe, tmp_path, scale=1.0)
    ip_only = latents(pipe, noise, **extra)
    both = latents(pipe, noise, cross_attention_kwargs={"agd_omega": OMEGA}, **extra)
    for a, b in [(both, ip_only), (both, agd_only)]:
        assert (a - b).abs().max() > 1e-3
    unload_agd_adapter(pipe)
    assert torch.equal(latents(pipe, noise, **extra), ip_only)


def test_agd_adapter_with_a_controlnet(adapter_files):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe, shape = tiny_sd_pipeline()
    noise = sampling.initial_noise(shape, [0])
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # from_unet zero-initialises the residual convs: give them an effect
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.1, generator=torch.Generator().manual_seed(2))
    cn = StableDiffusionControlNetPipeline(**{**pipe.components, "controlnet": controlnet},
                                           requires_safety_checker=False)
    cn.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    load_agd_adapter(pipe, adapter_files["tiny-sd"])  # the UNet both pipelines share
    agd_only = latents(pipe, noise, cross_attention_kwargs={"agd_omega": OMEGA})
    cn_only = latents(cn, noise, image=control)
    both = latents(cn, noise, image=control, cross_attention_kwargs={"agd_omega": OMEGA})
    for a, b in [(both, cn_only), (both, agd_only), (cn_only, latents(pipe, noise))]:
        assert (a - b).abs().max() > 1e-3
    off = latents(cn, noise, image=control, controlnet_conditioning_scale=0.0,
                  cross_attention_kwargs={"agd_omega": OMEGA})
    torch.testing.assert_close(off, agd_only, rtol=1e-4, atol=1e-4)


def test_a_replaced_attention_module_is_an_error_not_a_silent_drop(adapter_files):
    from diffusers.models.attention_processor import Attention

    pipe, shape = tiny_sd_pipeline()
    load_agd_adapter(pipe, adapter_files["tiny-sd"])
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    old = block.attn2
    block.attn2 = Attention(query_dim=old.query_dim, cross_attention_dim=old.cross_attention_dim,
                            heads=old.heads, dim_head=old.inner_dim // old.heads)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    with pytest.raises(ModelError, match=name):
        latents(pipe, sampling.initial_noise(shape, [0]), cross_attention_kwargs={"agd_omega": OMEGA})
    with pytest.raises(ModelError, match="replaced"):
        agd_adapter(pipe)
    unload_agd_adapter(pipe)
    assert agd_adapter(pipe) is None


def test_importing_the_library_changes_no_global_logging_but_the_cli_quiets():
    code = textwrap.dedent("""
        import importlib, logging, os, pkgutil, warnings
        import accelerate, diffusers, peft, torch, transformers  # their own import-time setup first

        def state():
            names = ["", "diffusers", "transformers", "accelerate", "bitsandbytes", "huggingface_hub"]
            return ({n: logging.getLogger(n).level for n in names}, [repr(f) for f in warnings.filters],
                    {k: os.environ.get(k) for k in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")})

        before = state()
        import agd_cli
        names = [m.name for m in pkgutil.walk_packages(agd_cli.__path__, "agd_cli.")
                 if not m.name.startswith(("agd_cli.cli", "agd_cli.commands"))]
        for name in names:
            importlib.import_module(name)
        assert len(names) > 20 and state() == before, (before, state())
        from agd_cli.cli import main
        try:
            main(["--version"])
        except SystemExit:
            pass
        assert logging.getLogger("diffusers").level == logging.ERROR
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_a_deleted_model_frees_its_adapters(adapter_files):
    import gc
    import weakref

    pipe, _ = tiny_sd_pipeline()
    adapters = weakref.ref(load_agd_adapter(pipe, adapter_files["tiny-sd"]))
    model = weakref.ref(pipe.unet)
    del pipe
    gc.collect()
    assert model() is None and adapters() is None


def test_adapters_follow_their_model_to_another_dtype_and_device(adapter_files):
    """pipe.to(dtype) / model.to(device) take the attached adapters along (issue 31, row 8);
    the model's own state_dict stays the base's, and unloading leaves no trace."""
    pipe, shape = tiny_sd_pipeline()
    keys = set(pipe.unet.state_dict())
    adapters = load_agd_adapter(pipe, adapter_files["tiny-sd"])
    pipe.to(torch.float64)
    assert {p.dtype for p in adapters.parameters()} == {torch.float64}
    noise = sampling.initial_noise(shape, [0]).double()
    out = latents(pipe, noise, cross_attention_kwargs={"agd_omega": OMEGA})
    assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())

    unet = pipe.unet
    x = torch.randn(1, *shape, dtype=torch.float64)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.float64)
    unet.to("meta")  # a device move, seen on a CPU-only machine
    assert {p.device.type for p in adapters.parameters()} == {"meta"}
    out = unet(x.to("meta"), 10, encoder_hidden_states=text.to("meta"),
               cross_attention_kwargs={"agd_omega": OMEGA}).sample
    assert out.device.type == "meta" and out.shape == x.shape
    assert set(unet.state_dict()) == keys  # the adapters are not the model's submodules

    unload_agd_adapter(pipe)
    assert "_apply" not in vars(unet)
    unet.to(torch.float32)  # no longer attached: the adapters stay as they were
    assert {p.dtype for p in adapters.parameters()} == {torch.float64}
