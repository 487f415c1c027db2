"""Tiny models saved in the real hub repositories' layouts, loaded through agd's own load path.

Random configs hide what a user's first real run meets: file names and subfolders, `.fp16` /
`.bf16` variants (sharded too), the libraries' `_keep_in_fp32_modules`, a T5 tokenizer that is
only `spiece.model`, Gemma's tokenizer files, CLIP's vocab.json + merges.txt, a pickle-only main
branch beside a safetensors revision, a gated repository. Each family's folder here has the
layout of its preset's repository (model_index.json, unet/ or transformer/, text_encoder*/,
tokenizer*/, vae/, scheduler/) and loads with a preset whose base_model points at it. Nothing is
downloaded: hub answers come from monkeypatched huggingface_hub functions.
"""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from agd_cli.config.presets import from_dict, load_preset, preset_from_record
from agd_cli.families import load_denoiser
from agd_cli.families import weights as weights_mod
from agd_cli.families.pixart import random_t5
from agd_cli.families.weights import pretrained_kwargs, repo_files
from agd_cli.infra.errors import InputError, ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CPU = torch.device("cpu")
LINES = ["a red fox standing in fresh snow", "a lighthouse on a cliff at dusk",
         "a bowl of ramen on a wooden table", "an astronaut riding a horse on the moon"]


@pytest.fixture(autouse=True)
def _fresh_listings():
    repo_files.cache_clear()  # folders are rewritten per test; listings are cached per source
    yield
    repo_files.cache_clear()


# --- writing a repository's layout -------------------------------------------------------------
def _preset(name: str, folder: Path, **top):
    """The tiny preset `name` with base_model at `folder` (plus top-level keys / sections)."""
    return from_dict({**load_preset(name).raw, **top, "base_model": str(folder)})


def _model_index(root: Path, pipeline: str, parts: dict[str, list[str]], **extra) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": pipeline, "_diffusers_version": "0.32.0", **parts, **extra}))


def _scheduler(root: Path, den, cls: str) -> None:
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**den.scheduler_config, "_class_name": cls}))


def _clip_tokenizer(tok, folder: Path) -> None:
    """CLIP's files as SD / SDXL / SD3 repos ship them: vocab.json + merges.txt, no tokenizer.json."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(tok.get_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": tok.model_max_length,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def _spiece_tokenizer(folder: Path):
    """A T5 tokenizer folder holding only `spiece.model` (PixArt-Σ's layout), trained here with
    sentencepiece from a few lines; returns it as transformers loads it."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES * 5), model_writer=model,
                                   vocab_size=40, model_type="unigram", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return T5Tokenizer.from_pretrained(folder)


def _t5_for(tokenizer, arch: dict):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return random_t5(arch, tokenizer)


def _scaled(module, factor: float):
    """A copy of `module` with every weight times `factor`: a variant file we can tell apart."""
    import copy

    other = copy.deepcopy(module)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(factor)
    return other


def _same(a: torch.nn.Module, b: torch.nn.Module, dtype=None) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k].to(dtype or sa[k].dtype), sb[k].to(dtype or sa[k].dtype)) for k in sa)


def floating_dtypes(module) -> dict:
    return {n: p.dtype for n, p in module.named_parameters() if p.is_floating_point()}


def _wo_dtypes(encoder) -> set:
    return {dt for name, dt in floating_dtypes(encoder).items() if ".wo." in name}


# --- sd: fp16 variant, sharded, beside full weights and pickles (row 7) ------------------------
def test_sd_layout_half_loads_take_the_sharded_fp16_variant(tmp_path):
    src = load_denoiser(load_preset("tiny-sd"), device="cpu")
    root = tmp_path / "stable-diffusion-v1-5"
    _model_index(root, "StableDiffusionPipeline", {
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]})
    src.model.save_pretrained(root / "unet")
    src.model.save_pretrained(root / "unet", safe_serialization=False)  # the repo's .bin beside
    half_unet = _scaled(src.model, 0.5).half()
    half_unet.save_pretrained(root / "unet", variant="fp16", max_shard_size="200KB")
    src.text["text_encoder"].save_pretrained(root / "text_encoder")
    half_te = _scaled(src.text["text_encoder"], 0.5).half()
    half_te.save_pretrained(root / "text_encoder", variant="fp16")
    _clip_tokenizer(src.text["tokenizer"], root / "tokenizer")
    src.vae_model().save_pretrained(root / "vae")
    _scheduler(root, src, "PNDMScheduler")
    shards = sorted(p.name for p in (root / "unet").glob("*.fp16-*.safetensors"))
    assert len(shards) > 1 and (root / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()

    preset = _preset("tiny-sd", root)
    half = load_denoiser(preset, device=CPU, dtype=torch.float16)  # as --offload loads on CUDA
    assert half.model.dtype == torch.float16 and _same(half.model, half_unet)
    assert _same(half.text["text_encoder"], half_te)
    full = load_denoiser(preset, device="cpu", dtype="fp32")
    assert _same(full.model, src.model) and _same(full.text["text_encoder"], src.text["text_encoder"])
    assert full.encode(["a red fox"])["prompt_embeds"].isfinite().all()


# --- sdxl: a bf16-only unet (row 7) ---------------------------------------------------------------
def test_sdxl_layout_with_only_a_bf16_variant_loads_in_any_dtype(tmp_path):
    src = load_denoiser(load_preset("tiny-sdxl"), device="cpu")
    root = tmp_path / "sdxl"
    _model_index(root, "StableDiffusionXLPipeline", {
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"]})
    src.model.to(torch.bfloat16).save_pretrained(root / "unet", variant="bf16")
    src.model.float()
    for sub in ("", "_2"):
        src.text["text_encoder" + sub].save_pretrained(root / f"text_encoder{sub}")
        _clip_tokenizer(src.text["tokenizer" + sub], root / f"tokenizer{sub}")
    src.vae_model().save_pretrained(root / "vae")
    _scheduler(root, src, "EulerDiscreteScheduler")
    assert [p.name for p in (root / "unet").glob("*.safetensors")] == [
        "diffusion_pytorch_model.bf16.safetensors"]

    preset = _preset("tiny-sdxl", root)
    full = load_denoiser(preset, device="cpu", dtype="fp32")
    assert full.model.dtype == torch.float32
    assert _same(full.model, src.model.to(torch.bfloat16), dtype=torch.float32)
    src.model.float()
    bf16 = load_denoiser(preset, device=CPU, dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    cond = full.encode(["a red fox"])
    assert cond["prompt_embeds"].shape[-1] == 2 * 32 and cond["pooled"].isfinite().all()


# --- dit: model_index.json labels, a revision for the safetensors (row 6) -----------------------
def _dit_folder(root: Path):
    src = load_denoiser(load_preset("tiny-dit"), device="cpu")
    _model_index(root, "DiTPipeline", {
        "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "KarrasDiffusionSchedulers"]},
        id2label={"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus"})
    src.model.save_pretrained(root / "transformer")
    src.vae_model().save_pretrained(root / "vae")
    _scheduler(root, src, "DDIMScheduler")
    return src


def test_dit_layout_reads_the_labels_and_passes_the_revision_to_every_loader(tmp_path, monkeypatch):
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    src = _dit_folder(tmp_path / "DiT-XL-2-256")
    seen: list[tuple[str, object]] = []
    load_model, load_config = ModelMixin.from_pretrained.__func__, ConfigMixin.load_config.__func__

    def spy_model(cls, *a, **k):
        seen.append((f"{cls.__name__}.from_pretrained", k.get("revision")))
        return load_model(cls, *a, **k)

    def spy_config(cls, *a, **k):
        seen.append((f"{cls.__name__}.load_config", k.get("revision")))
        return load_config(cls, *a, **k)

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(spy_model))
    monkeypatch.setattr(ConfigMixin, "load_config", classmethod(spy_config))
    den = load_denoiser(_preset("tiny-dit", tmp_path / "DiT-XL-2-256", revision="refs/pr/1"),
                        device="cpu")
    den.vae_model()
    assert _same(den.model, src.model)
    assert den.class_id("goldfish") == 1 and den.class_id("tench") == 0
    names = {name for name, _ in seen}
    assert {"DiTTransformer2DModel.from_pretrained", "AutoencoderKL.from_pretrained",
            "DiTPipeline.load_config", "DDIMScheduler.load_config"} <= names
    assert {rev for _, rev in seen} == {"refs/pr/1"}, seen


def _hub_listing(monkeypatch, by_revision: dict):
    """huggingface_hub.list_repo_files answering from `by_revision` (no network)."""
    import huggingface_hub

    def listing(repo_id, revision=None, **_):
        return list(by_revision[revision])

    monkeypatch.setattr(huggingface_hub, "list_repo_files", listing)


def test_dit_pickle_only_main_branch_is_refused_naming_the_revision_key(monkeypatch):
    _hub_listing(monkeypatch, {
        None: ["model_index.json", "transformer/config.json",
               "transformer/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin"],
        "refs/pr/1": ["model_index.json", "transformer/config.json",
                      "transformer/diffusion_pytorch_model.safetensors",
                      "vae/diffusion_pytorch_model.safetensors"]})
    raw = {k: v for k, v in load_preset("dit").raw.items() if k != "revision"}
    with pytest.raises(ModelError) as e:
        load_denoiser(from_dict(raw), device="cpu", dtype="fp16")
    assert "pickle" in e.value.message and "diffusion_pytorch_model.bin" in e.value.message
    assert 'revision = "refs/pr/1"' in e.value.hint
    # the shipped preset names that revision, and it reaches the loader's arguments
    dit = load_preset("dit")
    assert dit.revision == "refs/pr/1"
    assert pretrained_kwargs(dit.base_model, "transformer", torch.float16, dit.revision) == {
        "use_safetensors": True, "revision": "refs/pr/1"}


def test_revision_key_is_checked_recorded_and_dropped_with_another_base(tmp_path):
    with pytest.raises(InputError, match="revision") as e:
        from_dict({**load_preset("dit").raw, "revision": "refs pr 1"})
    assert "'revision'" in e.value.message and "refs pr 1" in e.value.message
    dit = load_preset("dit")
    record = {"preset_toml": dit.raw, "base_model": dit.base_model}  # as manifests record it
    assert preset_from_record(record).revision == "refs/pr/1"
    folder = tmp_path / "my-dit"
    folder.mkdir()
    other = dit.with_base_model(str(folder))
    assert other.revision is None and "revision" not in other.raw
    assert dit.with_base_model(dit.base_model).revision == "refs/pr/1"


# --- sd3: sharded transformer, T5 from spiece.model, fp16 variant, wo in fp32 (rows 1, 5, 7) ---
def test_sd3_layout_keeps_t5_wo_in_fp32_in_a_half_load(tmp_path):
    src = load_denoiser(load_preset("tiny-sd3"), device="cpu")
    root = tmp_path / "stable-diffusion-3.5-medium"
    _model_index(root, "StableDiffusion3Pipeline", {
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
    src.model.save_pretrained(root / "transformer", max_shard_size="100KB")
    for sub in ("", "_2"):
        src.text["text_encoder" + sub].save_pretrained(root / f"text_encoder{sub}")
        _clip_tokenizer(src.text["tokenizer" + sub], root / f"tokenizer{sub}")
    t5_tok = _spiece_tokenizer(root / "tokenizer_3")
    t5 = _t5_for(t5_tok, load_preset("tiny-sd3").architecture["text_encoder_3"])
    t5.half().save_pretrained(root / "text_encoder_3", variant="fp16", max_shard_size="20KB")
    src.vae_model().save_pretrained(root / "vae")
    _scheduler(root, src, "FlowMatchEulerDiscreteScheduler")

    den = load_denoiser(_preset("tiny-sd3", root), device=CPU, dtype=torch.float16)
    assert _same(den.model, src.model.half()) and den.model.dtype == torch.float16
    encoder = den.text["text_encoder_3"]
    assert _wo_dtypes(encoder) == {torch.float32}  # transformers' _keep_in_fp32_modules
    assert floating_dtypes(encoder)["shared.weight"] == torch.float16
    assert den.text["tokenizer_3"]("a red fox").input_ids == t5_tok("a red fox").input_ids
    cond = den.encode(["a red fox standing in fresh snow"])
    assert cond["prompt_embeds"].isfinite().all() and cond["pooled"].isfinite().all()


# --- pixart: tokenizer = spiece.model only, T5 sharded, wo fp32 (rows 1, 5) ----------------------
def _pixart_folder(root: Path):
    src = load_denoiser(load_preset("tiny-pixart"), device="cpu", text=False)
    _model_index(root, "PixArtSigmaPipeline", {
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]})
    src.model.save_pretrained(root / "transformer")
    tok = _spiece_tokenizer(root / "tokenizer")
    _t5_for(tok, load_preset("tiny-pixart").architecture["text_encoder"]).save_pretrained(
        root / "text_encoder", max_shard_size="20KB")
    src.vae_model().save_pretrained(root / "vae")
    _scheduler(root, src, "DPMSolverMultistepScheduler")
    return src, tok


def test_pixart_layout_loads_the_spiece_tokenizer_and_keeps_wo_fp32(tmp_path):
    root = tmp_path / "PixArt-Sigma-XL-2-1024-MS"
    src, tok = _pixart_folder(root)
    assert [p.name for p in (root / "tokenizer").iterdir()] == ["spiece.model"]
    den = load_denoiser(_preset("tiny-pixart", root), device=CPU, dtype=torch.float16)
    assert den.text["tokenizer"]("a red fox").input_ids == tok("a red fox").input_ids
    assert _wo_dtypes(den.text["text_encoder"]) == {torch.float32}
    assert den.model.dtype == torch.float16 and _same(den.model, src.model.half())
    cond = den.encode(["a lighthouse on a cliff at dusk"])
    assert cond["prompt_embeds"].isfinite().all() and cond["prompt_mask"].sum() > 1
    # generate --offload places the same parts (here on the CPU, the hooks' device): moved only
    from agd_cli.generate.loading import _offload_to

    den.new_adapters()
    _offload_to(den, CPU, torch.float16)
    assert _wo_dtypes(den.text["text_encoder"]) == {torch.float32}


def test_random_t5_is_cast_as_transformers_would_load_it():
    """Random-weight encoders (tests, gpu_check) follow the same rule as loaded ones."""
    den = load_denoiser(load_preset("tiny-pixart"), device=CPU, dtype=torch.float16)
    dtypes = floating_dtypes(den.text["text_encoder"])
    assert _wo_dtypes(den.text["text_encoder"]) == {torch.float32}
    assert {dt for n, dt in dtypes.items() if ".wo." not in n} == {torch.float16}
    bf16 = load_denoiser(load_preset("tiny-pixart"), device=CPU, dtype=torch.bfloat16)
    assert set(floating_dtypes(bf16.text["text_encoder"]).values()) == {torch.bfloat16}


def test_sentencepiece_and_protobuf_are_dependencies():
    """PixArt-Σ / SD3 ship T5's tokenizer as spiece.model only: transformers reads it with
    sentencepiece and protobuf (without them: 'cannot load base model')."""
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "dependencies"]
    names = {d.split(">")[0].split("=")[0].split(";")[0].strip() for d in deps}
    assert {"sentencepiece", "protobuf"} <= names


# --- sana: Gemma tokenizer files, bf16-only transformer, sharded bf16 Gemma (rows 7, 10) --------
def test_sana_layout_bf16_variants_and_the_text_encoders_own_dtype(tmp_path):
    src = load_denoiser(load_preset("tiny-sana"), device="cpu")
    root = tmp_path / "Sana_1600M_1024px_BF16_diffusers"
    _model_index(root, "SanaPipeline", {
        "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"],
        "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": ["transformers", "GemmaTokenizerFast"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]})
    src.model.to(torch.bfloat16).save_pretrained(root / "transformer", variant="bf16")
    src.model.float()
    gemma = src.text["text_encoder"]
    gemma.to(torch.bfloat16).save_pretrained(root / "text_encoder", variant="bf16",
                                             max_shard_size="4KB")
    gemma.float()
    src.text["tokenizer"].save_pretrained(root / "tokenizer")
    src.vae_model().save_pretrained(root / "vae")
    _scheduler(root, src, "FlowMatchEulerDiscreteScheduler")
    assert (root / "text_encoder" / "model.safetensors.index.bf16.json").is_file()

    preset = _preset("tiny-sana", root, dtypes={"text_encoder": "bf16"})
    den = load_denoiser(preset, device=CPU, dtype=torch.float16)
    assert den.model.dtype == torch.float16  # the run's dtype, from the bf16-only files
    assert _same(den.model, src.model.to(torch.bfloat16), dtype=torch.float16)
    assert set(floating_dtypes(den.text["text_encoder"]).values()) == {torch.bfloat16}
    assert _same(den.text["text_encoder"], gemma.to(torch.bfloat16))
    cond = den.encode(["a bowl of ramen on a wooden table"])
    assert cond["prompt_embeds"].isfinite().all()
    # fp32 runs stay fp32 throughout, the preset's own text-encoder dtype included
    full = load_denoiser(preset, device="cpu", dtype="fp32")
    assert {full.model.dtype, *floating_dtypes(full.text["text_encoder"]).values()} == {torch.float32}


def test_real_presets_run_bf16_where_the_model_was_trained_in_bf16():
    assert load_preset("sd35-medium").collect["dtype"] == "bf16"
    assert load_preset("sd35-large").collect["dtype"] == "bf16"
    sana = load_preset("sana-1600m")
    assert sana.collect["dtype"] == "fp16" and sana.dtypes == {"text_encoder": "bf16"}
    from agd_cli.families.precision import preset_half_precision  # generate's and bench's default

    assert [preset_half_precision(load_preset(n)) for n in ("sd35-medium", "sdxl", "mnist")] == [
        "bf16", "fp16", "fp16"]
    with pytest.raises(InputError, match="dtypes.text_encoder"):
        from_dict({**sana.raw, "dtypes": {"text_encoder": "bfloat16"}})
    with pytest.raises(InputError, match="dtypes.unet"):
        from_dict({**sana.raw, "dtypes": {"unet": "bf16"}})


@pytest.mark.parametrize(("files", "dtype", "want"), [
    (["x/diffusion_pytorch_model.safetensors", "x/diffusion_pytorch_model.fp16.safetensors"],
     torch.float16, "fp16"),
    (["x/diffusion_pytorch_model.safetensors", "x/diffusion_pytorch_model.fp16.safetensors"],
     torch.float32, None),
    (["x/model.fp16-00001-of-00002.safetensors", "x/model.fp16-00002-of-00002.safetensors",
      "x/model.safetensors.index.fp16.json", "x/model.safetensors"], torch.float16, "fp16"),
    (["x/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",  # the legacy shard naming
      "x/diffusion_pytorch_model.safetensors.fp16.index.json", "x/diffusion_pytorch_model.safetensors"],
     torch.float16, "fp16"),
    (["x/diffusion_pytorch_model.bf16.safetensors"], torch.float32, "bf16"),
    (["x/diffusion_pytorch_model.bf16.safetensors"], torch.float16, "bf16"),
    (["x/diffusion_pytorch_model.safetensors", "x/diffusion_pytorch_model.bf16.safetensors"],
     torch.float16, None),  # fp32 files round to fp16 better than bf16 ones
    (["x/diffusion_pytorch_model.safetensors", "x/diffusion_pytorch_model.bf16.safetensors",
      "x/diffusion_pytorch_model.fp16.safetensors"], torch.bfloat16, "bf16"),
    (["x/diffusion_pytorch_model.safetensors", "x/diffusion_pytorch_model.fp16.safetensors"],
     torch.bfloat16, "fp16"),
    (["x/diffusion_pytorch_model.safetensors", "x/diffusion_pytorch_model.fp16.bin"],
     torch.float16, None),  # a pickle variant is no variant for a safetensors-only load
])
def test_variant_choice_follows_diffusers_naming(files, dtype, want):
    from agd_cli.families.weights import choose_variant

    assert choose_variant(files, dtype) == want


# --- a gated repository (row 11) -----------------------------------------------------------------
def _gated(repo_id: str):
    from huggingface_hub.errors import GatedRepoError

    response = types.SimpleNamespace(headers={}, request=None)
    return GatedRepoError(f"403 Client Error: cannot access gated repo {repo_id}", response=response)


def test_gated_repository_says_accept_the_licence_then_log_in(monkeypatch):
    import huggingface_hub

    repo = "stabilityai/stable-diffusion-3.5-large"
    monkeypatch.setattr(weights_mod, "_hub_online", lambda: True, raising=False)

    def auth_check(repo_id, **_):
        raise _gated(repo_id)

    monkeypatch.setattr(huggingface_hub, "auth_check", auth_check)
    _hub_listing(monkeypatch, {None: ["model_index.json", "transformer/config.json"]})
    with pytest.raises(ModelError) as e:
        load_denoiser(load_preset("sd35-large"), device="cpu")
    assert f"accept the licence at https://huggingface.co/{repo}, then log in" in e.value.message
    assert "not a valid model identifier" not in e.value.message
    assert "hf auth login" in e.value.hint and "huggingface-cli login" in e.value.hint


def test_gated_error_raised_inside_a_loader_gets_the_same_message(monkeypatch):
    """diffusers turns GatedRepoError into OSError('… not a valid model identifier …')."""
    from agd_cli.families.sd3 import SD3Denoiser

    repo = "stabilityai/stable-diffusion-3.5-medium"

    def load(*_a, **_k):
        try:
            raise _gated(repo)
        except OSError:
            raise OSError(f"{repo} is not a local folder and is not a valid model identifier "
                          "listed on 'https://huggingface.co/models'") from None

    monkeypatch.setattr(SD3Denoiser, "_load_pretrained", classmethod(lambda cls, *a, **k: load()))
    with pytest.raises(ModelError, match="accept the licence at https://huggingface.co/"
                                         "stabilityai/stable-diffusion-3.5-medium, then log in"):
        load_denoiser(load_preset("sd35-medium"), device="cpu")
