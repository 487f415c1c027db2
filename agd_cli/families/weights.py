"""Where a base model's weights come from: a diffusers folder / hub id, or one checkpoint file.

Both sources answer the same questions (a model part in a dtype, a text encoder, a tokenizer,
the scheduler and VAE configs), so families load every source with the same code. No pickles:
folders and hub repos load with `use_safetensors=True` (a folder holding only `.bin` weights
is refused with a hint to convert it), and single-file checkpoints must be `.safetensors`.
Half-precision loads take the repo's `fp16` / `bf16` variant when it has one (SDXL: ~7 GB
instead of ~14 GB to download and hold), recognised by diffusers' own naming rules (sharded
variants included); a repo that ships only a variant (bf16-only) loads from it in any dtype.
A preset's `revision` (a branch, tag, commit or refs/pr/N) goes with every hub call.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path

import huggingface_hub
import torch
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from diffusers.pipelines.pipeline_loading_utils import variant_compatible_siblings
from huggingface_hub.errors import GatedRepoError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTokenizer

from agd_cli.config.presets import Preset, is_single_file
from agd_cli.families.text import build_char_tokenizer
from agd_cli.infra.errors import InputError, ModelError

VARIANTS = ("fp16", "bf16")  # the half-precision variants diffusers repos ship
CONVERT_HINT = ("convert it once to safetensors where you trust the file, e.g. load it with "
                "diffusers and call save_pretrained(folder, safe_serialization=True), then point "
                "base_model (or --base-model) at the new folder")


def open_base(preset: Preset, source: str):
    """The weight source of a preset's base: SingleFileBase or PretrainedBase."""
    if is_single_file(source):
        return SingleFileBase(preset, source)
    return PretrainedBase(source, getattr(preset, "revision", None))


def _dtype_kwarg(cls, dtype: torch.dtype) -> dict:
    # transformers 5 names it `dtype` (`torch_dtype` is deprecated); diffusers `torch_dtype`
    return {"dtype": dtype} if cls.__module__.startswith("transformers") else {"torch_dtype": dtype}


@functools.lru_cache(maxsize=16)
def repo_files(source: str, revision: str | None = None) -> tuple[str, ...] | None:
    """Relative paths of a local folder or hub repo (cached snapshot offline); None if unknown.
    A gated repository the user may not download yet raises the licence message."""
    path = Path(source)
    if path.is_dir():
        return tuple(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    check_hub_access(source)
    try:
        import huggingface_hub

        return tuple(huggingface_hub.list_repo_files(source, revision=revision))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no network: ask the cache
        gated = gated_error(e, source)
        if gated is not None:
            raise gated from None
        try:
            from huggingface_hub import snapshot_download

            return repo_files(snapshot_download(source, revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached either: diffusers will say why
            return None


def check_hub_access(repo_id: str) -> None:
    """Refuse a gated repository (SD 3.5) whose licence this account has not accepted, with the
    way out; anything else (offline, no network, not found) is left to the loaders to say."""
    if not _hub_online():
        return  # the cache answers: whoever filled it had access
    try:
        huggingface_hub.auth_check(repo_id)
    except Exception as e:  # noqa: BLE001 - only a gated repo is answered here
        gated = gated_error(e, repo_id)
        if gated is not None:
            raise gated from None


def _hub_online() -> bool:
    return not huggingface_hub.constants.HF_HUB_OFFLINE


def gated_error(error: BaseException, repo_id: str) -> ModelError | None:
    """The licence message where `error`, or an error it was raised from (diffusers turns the
    hub's GatedRepoError into "not a valid model identifier"), is a GatedRepoError."""
    seen: BaseException | None = error
    for _ in range(16):  # a chain of causes, never a cycle
        if seen is None:
            return None
        if isinstance(seen, GatedRepoError):
            return ModelError(
                f"base model '{repo_id}' is a gated repository: accept the licence at "
                f"https://huggingface.co/{repo_id}, then log in",
                hint="log in with `hf auth login` (or `huggingface-cli login`) as the account "
                     "that accepted it, or set HF_TOKEN to one of its access tokens")
        seen = seen.__cause__ or seen.__context__
    return None


def _pickle_hint(source: str) -> str:
    if Path(source).is_dir():
        return CONVERT_HINT
    return ("if the repository keeps safetensors weights under another revision (a branch, or "
            "a pull request such as refs/pr/1 on its 'Files and versions' page), set "
            "revision = \"refs/pr/1\" (that revision) at the top of the preset; else "
            + CONVERT_HINT)


def half_variants(files) -> tuple[set[str], bool]:
    """(the half-precision variants that have safetensors weights, whether full-precision
    safetensors weights exist) among one part's files, by diffusers' naming rules:
    `x.fp16.safetensors`, sharded `x.fp16-00001-of-00002.safetensors` with
    `x.safetensors.index.fp16.json`, and the legacy `x-00001-of-00002.fp16.safetensors`."""
    safe = [f for f in files if ".safetensors" in Path(f).name]
    found = set()
    for variant in VARIANTS:
        try:
            _, named = variant_compatible_siblings(safe, variant=variant)
        except ValueError:  # diffusers' answer for "no files of this variant"
            continue
        if any(f.endswith(".safetensors") for f in named):
            found.add(variant)
    plain, _ = variant_compatible_siblings(safe, variant=None)
    return found, any(f.endswith(".safetensors") for f in plain)


def choose_variant(files, dtype: torch.dtype) -> str | None:
    """The variant a load in `dtype` takes: its own half variant, else (bf16) the fp16 one as
    before, else the full-precision files; a part that has only a variant loads from it."""
    found, plain = half_variants(files)
    own = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    for variant in ((own, "fp16") if dtype == torch.bfloat16 else (own,)):
        if variant in found:
            return variant
    if plain or not found:
        return None
    return next(v for v in VARIANTS if v in found)


def pretrained_kwargs(source: str, subfolder: str, dtype: torch.dtype,
                      revision: str | None = None) -> dict:
    """from_pretrained arguments: safetensors only, the preset's revision, and the variant that
    fits `dtype` where the part has one (see choose_variant)."""
    kwargs: dict = {"use_safetensors": True}
    if revision:
        kwargs["revision"] = revision
    files = [f for f in repo_files(source, revision) or () if f.startswith(subfolder + "/")]
    weights = [f for f in files if f.endswith((".safetensors", ".bin"))]
    if weights and not any(f.endswith(".safetensors") for f in weights):
        at = f" at revision '{revision}'" if revision else ""
        raise ModelError(f"base model '{source}'{at} holds only pickle weights in {subfolder}/ "
                         f"({Path(weights[0]).name}); agd loads safetensors only, because "
                         "loading a pickle can run code", hint=_pickle_hint(source))
    variant = choose_variant(files, dtype)
    if variant is not None:
        kwargs["variant"] = variant
    return kwargs


class PretrainedBase:
    """A diffusers folder or hub repo (at `revision`, where the preset names one)."""

    checkpoint: dict | None = None

    def __init__(self, source: str, revision: str | None = None):
        self.source, self.revision = source, revision

    def _hub(self) -> dict:
        return {"revision": self.revision} if self.revision else {}

    def model(self, cls, subfolder: str, dtype: torch.dtype):
        """A model part (unet, transformer, vae, text_encoder…) in `dtype`."""
        return cls.from_pretrained(self.source, subfolder=subfolder, **_dtype_kwarg(cls, dtype),
                                   **pretrained_kwargs(self.source, subfolder, dtype,
                                                       self.revision))

    text_encoder = model

    def tokenizer(self, cls, subfolder: str):
        """A tokenizer (its files hold no weights)."""
        return cls.from_pretrained(self.source, subfolder=subfolder, **self._hub())

    def config(self, cls, subfolder: str) -> dict | None:
        """A part's config ("": the pipeline's model_index.json), or None where a local folder
        has no such part (pixel space)."""
        if Path(self.source).is_dir() and not (Path(self.source) / subfolder).is_dir():
            return None
        return dict(cls.load_config(self.source, subfolder=subfolder or None, **self._hub()))


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
        revision = self.preset.raw.get("revision")
        return (cls or CLIPTokenizer).from_pretrained(
            original, subfolder=subfolder, **({"revision": revision} if revision else {}))

    def config(self, cls, subfolder: str) -> dict | None:
        """The preset's config of a part (scheduler, vae)."""
        return self.preset.architecture.get(subfolder)


def clip_config(arch: dict, tokenizer, **extra):
    """A CLIP text config from a preset's architecture dict and the tokenizer's ids."""
    cfg = {"vocab_size": len(tokenizer), **arch, **extra}
    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **cfg)
