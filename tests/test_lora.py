"""The guidance LoRA (core/lora.py, core/lora_file.py): a kohya LoRA file that diffusers' own
loader reads, giving at strength λ and guidance_scale 1 the images `agd generate` gives at ω."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from agd_cli.api import lora_scale
from agd_cli.config.presets import load_preset
from agd_cli.core import sampling
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.families import load_denoiser, load_with_adapters
from agd_cli.infra.errors import AgdError, InputError

STEPS = 4
W_REF = 4.0
OMEGA = 6.0  # λ = 5/3
PROMPT = "a red fox"


def lora_file(name: str, folder: Path, seed: int = 0, targets: str = "attention") -> Path:
    """A LoRA for preset `name` with random (non-zero) weights, written as `agd train` writes it."""
    den = load_denoiser(load_preset(name), "cpu")
    cfg = AdapterConfig(kind="lora", lora_rank=4, lora_w_ref=W_REF, omega_range=[1.0, 12.0],
                        lora_targets=targets)
    lora = den.new_adapters(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    path = folder / f"{name}-{targets}-lora.safetensors"
    lora.save(path, den.adapter_metadata(train_steps=0))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora")
    files = {name: lora_file(name, folder) for name in ("tiny-sd", "tiny-sdxl")}
    return {**files, "tiny-sd-ff": lora_file("tiny-sd", folder, targets="attention_ff")}


def pipeline(name: str):
    """A plain diffusers pipeline from the tiny preset's components (no agd inside)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    den = load_denoiser(load_preset(name), "cpu")
    t = den.text
    parts = dict(vae=den.vae_model(), text_encoder=t["text_encoder"], tokenizer=t["tokenizer"],
                 unet=den.model, scheduler=DDIMScheduler.from_config(den.scheduler_config))
    if name == "tiny-sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=t["text_encoder_2"],
                                         tokenizer_2=t["tokenizer_2"])
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, den.latent_shape()


def pipe_latents(pipe, noise, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, latents=noise.clone(),
                output_type="latent", **kwargs).images


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-sd-ff"])
def test_diffusers_loads_the_file_and_matches_agd_at_lambda(files, name):
    pipe, shape = pipeline(name.removesuffix("-ff"))  # -ff: feed-forward Linears too
    noise = sampling.initial_noise(shape, [0])
    base = pipe_latents(pipe, noise)
    pipe.load_lora_weights(str(files[name]), adapter_name="guidance")  # kohya conversion inside
    with safe_open(str(files[name]), "pt") as f:
        stems = {k.removesuffix(".lora_down.weight") for k in f.keys() if "lora_down" in k}
    loaded = {"lora_unet_" + n.replace(".", "_") for n, m in pipe.unet.named_modules()
              if hasattr(m, "lora_A")}
    assert loaded == stems  # every module of the file, feed-forward included, and no other
    lam = lora_scale(OMEGA, W_REF)
    pipe.set_adapters(["guidance"], adapter_weights=[lam])
    theirs = pipe_latents(pipe, noise)
    assert (theirs - base).abs().max() > 1e-3  # the LoRA does something

    den = load_with_adapters(files[name], "cpu")  # agd generate's loader
    mine = sampling.sample(den, den.encode([PROMPT]), None, OMEGA, noise, mode="agd",
                           steps=STEPS, scheduler="ddim").x
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)
    # the dial: another λ is another ω
    pipe.set_adapters(["guidance"], adapter_weights=[lora_scale(3.0, W_REF)])
    other = sampling.sample(den, den.encode([PROMPT]), None, 3.0, noise, mode="agd",
                            steps=STEPS, scheduler="ddim").x
    torch.testing.assert_close(pipe_latents(pipe, noise), other, rtol=1e-4, atol=1e-4)


def test_keys_are_what_diffusers_kohya_converter_maps_onto_the_unets_attention(files):
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key

    den = load_denoiser(load_preset("tiny-sdxl"), "cpu", text=False)
    modules = dict(den.model.named_modules())
    with safe_open(str(files["tiny-sdxl"]), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert {k[len(s):] for s in stems for k in keys if k.startswith(s + ".")} == {
        ".lora_down.weight", ".lora_up.weight", ".alpha"}
    projections = {}
    for stem in stems:
        assert stem.startswith("lora_unet_")
        converted = _convert_unet_lora_key(stem + ".lora_down.weight")
        # diffusers' names: <attention>.processor.<to_q|to_k|to_v|to_out>_lora.down.weight
        attention, proj = converted.split(".processor.")
        proj = {"to_out_lora": "to_out.0"}.get(proj.split(".")[0], proj.split("_lora")[0])
        assert isinstance(modules[f"{attention}.{proj}"], torch.nn.Linear)
        projections.setdefault(attention.rsplit(".", 1)[1], set()).add(proj)
    assert projections == {a: {"to_q", "to_k", "to_v", "to_out.0"} for a in ("attn1", "attn2")}
    n_attn = sum(name.endswith((".attn1", ".attn2")) for name in modules)
    assert len(stems) == 4 * n_attn
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert "w_ref = 4" in meta["modelspec.description"] and "(ω − 1)/(w_ref − 1)" in meta[
        "modelspec.description"]
    assert json.loads(meta["adapter_config"])["lora_w_ref"] == W_REF and meta["tensors_sha256"]


def test_lora_scale_refuses_zero_negative_and_nan():
    assert lora_scale(4.0, 4.0) == pytest.approx(1.0)
    assert lora_scale(2.5, 4.0) == pytest.approx(0.5)
    for bad in (1.0, 0.5, float("nan"), float("inf")):
        with pytest.raises(InputError, match="λ"):
            lora_scale(bad, 4.0)
    for bad_ref in (1.0, 0.0, float("nan")):
        with pytest.raises(InputError, match="w_ref"):
            lora_scale(4.0, bad_ref)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agd_cli.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_generate_with_the_lora_and_bad_input_exit_2(files, tmp_path):
    out = tmp_path / "img.png"
    ok = run_cli("generate", PROMPT, "--adapter", str(files["tiny-sd"]), "-w", str(OMEGA),
                 "--steps", str(STEPS), "--seed", "0", "--out", str(out), "--device", "cpu",
                 "--workdir", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    pipe, shape = pipeline("tiny-sd")
    pipe.load_lora_weights(str(files["tiny-sd"]), adapter_name="guidance")
    pipe.set_adapters(["guidance"], adapter_weights=[lora_scale(OMEGA, W_REF)])
    theirs = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, output_type="np",
                  latents=sampling.initial_noise(shape, [0])).images[0]
    mine = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255
    assert np.abs(mine - theirs).max() <= 2 / 255  # PNG rounding

    low = run_cli("generate", PROMPT, "--adapter", str(files["tiny-sd"]), "-w", "1",
                  "--steps", "2", "--out", str(tmp_path / "low.png"), "--device", "cpu",
                  "--workdir", str(tmp_path))
    assert low.returncode == 2 and "λ" in low.stderr and "ω > 1" in low.stderr
    other = run_cli("generate", PROMPT, "--adapter", str(files["tiny-sdxl"]), "--preset",
                    "tiny-sd", "--steps", "2", "--out", str(tmp_path / "x.png"), "--device",
                    "cpu", "--workdir", str(tmp_path))
    assert other.returncode == 2 and "tiny-sdxl" in other.stderr


def test_lora_for_another_base_is_refused(files):
    den = load_denoiser(load_preset("tiny-sd"), "cpu", text=False)
    with pytest.raises(AgdError, match="does not match") as err:
        den.load_adapters(files["tiny-sdxl"])
    assert err.value.exit_code == 2


def test_without_omega_the_base_runs_exactly_and_detach_restores_it(files):
    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    x, cond = torch.randn(2, *den.latent_shape()), den.encode(["a", "b"])
    base = den.forward(x, 500, cond)
    lora = den.load_adapters(files["tiny-sd"])
    assert torch.equal(den.forward(x, 500, cond), base)
    both = den.forward(x, 500, cond, omega=torch.tensor([3.0, OMEGA]))  # λ per sample
    one = den.forward(x[1:], 500, {k: v[1:] for k, v in cond.items()}, omega=OMEGA)
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)
    assert (both[0] - base[0]).abs().max() > 1e-4
    with lora.disabled():
        assert torch.equal(den.forward(x, 500, cond, omega=OMEGA), base)
    lora.detach()
    assert all(type(m) is torch.nn.Linear for n, m in den.model.named_modules() if n in lora.names)
    assert torch.equal(den.forward(x, 500, cond), base)
