"""Where a base model's weights come from: a diffusers folder / hub id, or one checkpoint file.

Both sources answer the same questions (a model part in a dtype, a text encoder, a tokenizer,
the scheduler and VAE configs), so families load every source with the same code. No pickles:
folders and hub repos load with `use_safetensors=True` (a folder holding only `.bin` weights
is refused with a hint to convert it), and single-file checkpoints must be `.safetensors`.
Half-precision loads take the repo's `fp16` variant when it has one (SDXL: ~7 GB instead of
~14 GB to download and hold).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import tempfile
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTokenizer

from agd_cli.config.presets import Preset
from agd_cli.families.text import build_char_tokenizer
from agd_cli.infra.errors import InputError, ModelError

HALF = (torch.float16, torch.bfloat16)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CONVERT_HINT = ("convert it once to safetensors where you trust the file, e.g. load it with "
                "diffusers and call save_pretrained(folder, safe_serialization=True), then point "
                "base_model (or --base-model) at the new folder")


def is_single_file(source: str) -> bool:
    """A base model given as one checkpoint file rather than a folder or hub id."""
    return source.lower().endswith(CHECKPOINT_SUFFIXES) and not Path(source).is_dir()


def with_base_model(preset: Preset, base_model: str | None) -> Preset:
    """The preset with `--base-model` in place of its base_model (checked, paths made absolute)."""
    if base_model is None:
        return preset
    if not base_model.strip():
        raise InputError("--base-model is empty", hint="give a .safetensors file, a diffusers "
                                                       "folder or a hub id")
    path = Path(base_model).expanduser()
    if is_single_file(base_model) and not path.is_file():
        raise InputError(f"--base-model: checkpoint file '{base_model}' not found",
                         hint="check the path; a diffusers folder or a hub id also works")
    return dataclasses.replace(preset, base_model=str(path.resolve()) if path.exists()
                               else base_model)


def open_base(preset: Preset, source: str):
    """The weight source of a preset's base: SingleFileBase or PretrainedBase."""
    return SingleFileBase(preset, source) if is_single_file(source) else PretrainedBase(source)


def _dtype_kwarg(cls, dtype: torch.dtype) -> dict:
    # transformers 5 names it `dtype` (`torch_dtype` is deprecated); diffusers `torch_dtype`
    return {"dtype": dtype} if cls.__module__.startswith("transformers") else {"torch_dtype": dtype}


@functools.lru_cache(maxsize=16)
def repo_files(source: str) -> tuple[str, ...] | None:
    """Relative paths of a local folder or hub repo (cached snapshot offline); None if unknown."""
    path = Path(source)
    if path.is_dir():
        return tuple(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    try:
        from huggingface_hub import list_repo_files

        return tuple(list_repo_files(source))
    except Exception:  # noqa: BLE001 - offline, unknown repo, no network: ask the cache
        try:
            from huggingface_hub import snapshot_download

            return repo_files(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached either: diffusers will say why
            return None


def pretrained_kwargs(source: str, subfolder: str, dtype: torch.dtype) -> dict:
    """from_pretrained arguments: safetensors only, and the fp16 variant when it helps and exists."""
    kwargs: dict = {"use_safetensors": True}
    files = [f for f in repo_files(source) or () if f.startswith(subfolder + "/")]
    weights = [f for f in files if f.endswith((".safetensors", ".bin"))]
    if weights and not any(f.endswith(".safetensors") for f in weights):
        raise ModelError(f"base model '{source}' holds only pickle weights in {subfolder}/ "
                         f"({Path(weights[0]).name}); agd loads safetensors only, because "
                         "loading a pickle can run code", hint=CONVERT_HINT)
    if dtype in HALF and any(f.endswith(".fp16.safetensors") for f in weights):
        kwargs["variant"] = "fp16"
    return kwargs


class PretrainedBase:
    """A diffusers folder or hub repo."""

    checkpoint: dict | None = None

    def __init__(self, source: str):
        self.source = source

    def model(self, cls, subfolder: str, dtype: torch.dtype):
        """A model part (unet, transformer, vae, text_encoder…) in `dtype`."""
        return cls.from_pretrained(self.source, subfolder=subfolder, **_dtype_kwarg(cls, dtype),
                                   **pretrained_kwargs(self.source, subfolder, dtype))

    text_encoder = model

    def tokenizer(self, cls, subfolder: str):
        """A tokenizer (its files hold no weights)."""
        return cls.from_pretrained(self.source, subfolder=subfolder)

    def config(self, cls, subfolder: str) -> dict | None:
        """A part's config, or None where a local folder has no such part (pixel space)."""
        if Path(self.source).is_dir() and not (Path(self.source) / subfolder).is_dir():
            return None
        return dict(cls.load_config(self.source, subfolder=subfolder))


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_identity(path: str | Path) -> dict:
    """File name and SHA-256 of a checkpoint file (hashed once per process and file version)."""
    st = Path(path).stat()
    return {"file": Path(path).name, "sha256": _sha256(str(Path(path).resolve()), st.st_size,
                                                       st.st_mtime_ns)}


class SingleFileBase:
    """One original-layout `.safetensors` checkpoint (e.g. an SDXL fine-tune), loaded with
    diffusers' `from_single_file` against the preset's own architecture configs: offline."""

    def __init__(self, preset: Preset, source: str):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"checkpoint file '{source}' not found",
                             hint="give the path of a .safetensors checkpoint, a diffusers folder "
                                  "or a hub id")
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"checkpoint '{source}' is a pickle ({path.suffix}); agd loads "
                             "safetensors only, because loading a pickle can run code",
                             hint="use the .safetensors release of the model, or " + CONVERT_HINT)
        if not preset.architecture.get("unet"):
            raise InputError(f"a single-file base needs a preset with an [architecture] section; "
                             f"'{preset.name}' (family {preset.family}) has none for it",
                             hint="use a preset of the checkpoint's family, e.g. --preset sdxl")
        self.preset, self.path = preset, path
        self.checkpoint = checkpoint_identity(path)
        self._state: dict | None = None
        self._configs = tempfile.TemporaryDirectory(prefix="agd-config-")

    def _checkpoint(self) -> dict:
        if self._state is None:
            self._state = load_file(str(self.path))
        return self._state

    def _config_dir(self, subfolder: str, config: dict) -> str:
        folder = Path(self._configs.name) / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return self._configs.name

    def model(self, cls, subfolder: str, dtype: torch.dtype):
        """A diffusers model part converted from the checkpoint."""
        root = self._config_dir(subfolder, self.preset.architecture[subfolder])
        return cls.from_single_file(self._checkpoint(), config=root, subfolder=subfolder,
                                    torch_dtype=dtype, local_files_only=True)

    def text_encoder(self, cls, subfolder: str, dtype: torch.dtype):
        """A CLIP text encoder converted from the checkpoint (SD 1/2, SDXL layouts)."""
        arch = self.preset.architecture[subfolder]
        cfg = clip_config(arch, self.tokenizer(None, "tokenizer"))
        cfg.save_pretrained(Path(self._configs.name) / subfolder)
        return create_diffusers_clip_model_from_ldm(
            cls, self._checkpoint(), subfolder=subfolder, config=self._configs.name,
            torch_dtype=dtype, local_files_only=True)

    def tokenizer(self, cls, subfolder: str):
        """The preset's own tokenizer: built in memory for config-only presets, else from the
        preset's model id (a small download, or the hub cache)."""
        original = self.preset.raw.get("base_model", "config")
        if original == "config":  # the tokenizer the random-weight build uses
            return build_char_tokenizer(
                self.preset.architecture.get("tokenizer", {}).get("model_max_length", 77))
        return (cls or CLIPTokenizer).from_pretrained(original, subfolder=subfolder)

    def config(self, cls, subfolder: str) -> dict | None:
        """The preset's config of a part (scheduler, vae)."""
        return self.preset.architecture.get(subfolder)


def clip_config(arch: dict, tokenizer, **extra):
    """A CLIP text config from a preset's architecture dict and the tokenizer's ids."""
    cfg = {"vocab_size": len(tokenizer), **arch, **extra}
    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **cfg)
