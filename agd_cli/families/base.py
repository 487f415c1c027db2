"""The family-independent part of a denoiser: devices, dtypes, CFG, adapters, decoding."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

import diffusers
import torch
from diffusers import AutoencoderKL
from torch import nn

from agd_cli.config.presets import Preset, is_random_base, is_single_file
from agd_cli.core.adapters import AdapterSet
from agd_cli.families.adapter_host import AdapterHost
from agd_cli.families.precision import (
    TORCH_DTYPES,
    cast_like_loading,
    resolve_precision,
    text_dtypes,
)
from agd_cli.families.prediction import Predictor
from agd_cli.families.spec import vae_factor
from agd_cli.families.weights import checkpoint_identity, gated_error, open_base
from agd_cli.infra.errors import AgdError, InputError, ModelError

logger = logging.getLogger(__name__)

RANDOM_SEED = 0  # random-weight bases are identical in every process


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU; anything else is checked."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device '{device}'", hint="use cpu, cuda, cuda:0 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' asked for, but CUDA is not available",
                         hint="use --device cpu (slow) or run on a machine with a GPU")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Half precision on CUDA (bf16 falls back to fp16 on a card without it, said once); CPU
    kernels for fp16 are slow or missing, so CPU runs fp32."""
    if name not in TORCH_DTYPES:
        raise InputError(f"unknown dtype '{name}'", hint="use fp16, bf16 or fp32")
    if device.type == "cpu" and name != "fp32":
        return torch.float32
    return TORCH_DTYPES[resolve_precision(name, device)]


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


class Denoiser(AdapterHost, Predictor):
    """A frozen base model of one family: loading, encoding conditions and decoding here; the
    prediction contract (`Predictor`) and the adapter plumbing (`AdapterHost`) beside it."""

    family = "base"
    adapter_kinds: tuple[str, ...] = ("cross_attention", "offset")
    model_subfolder = "unet"
    omega_kwarg = "cross_attention_kwargs"  # the model-forward dict that carries agd_omega
    omega_kwarg_routed = True  # does the model hand that dict on to its attention processors?
    vae_class = "AutoencoderKL"
    checkpoint: dict | None = None  # file name and sha256 of a single-file base
    compiled = None  # the model call through torch.compile (`compile`), else None: eager

    def __init__(self, preset: Preset, model: nn.Module, text: dict, scheduler_config: dict,
                 device: torch.device, dtype: torch.dtype, source: str, vae_config: dict | None):
        self.preset, self.model, self.text = preset, model, text
        self.scheduler_config = dict(scheduler_config)
        self.device, self.dtype, self.source = device, dtype, source
        self.vae_config = vae_config
        self.vae = None
        self.adapters: AdapterSet | None = None
        self.nfe = 0  # model evaluations per sample, summed over calls
        model.requires_grad_(False).eval()
        # Load order: with text encoders loaded, the denoiser waits on the CPU (cast already)
        # and goes to the device once they are freed (place_model), so the two never share the
        # GPU: SD 3.5 Large's 8.1 B transformer and 5.7 B of encoders would need 25.6 GiB
        self._model_placed = False
        self.model.to(dtype)
        if not any(isinstance(m, nn.Module) for m in text.values()):
            self.place_model()
        for module in text.values():
            if isinstance(module, nn.Module):
                # moved only: a cast would undo the dtypes the library chose at load (T5's `wo`
                # stays fp32 in fp16 runs); each encoder already has its own dtype (see load)
                module.requires_grad_(False).eval().to(device)

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, preset: Preset, device: str | torch.device | None = None, dtype: str = "fp32",
             weights: str = "pretrained", text: bool = True) -> Denoiser:
        """Load the preset's base (hub id / folder) or build it with random weights."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        # a torch.dtype is taken as is (--offload keeps half-precision weights on the CPU)
        dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
        source = preset.resolve_base_model()
        random = weights == "random" or source == "config"
        dtypes = text_dtypes(preset, cls.text_part_names(), dt, dev)
        try:
            parts = (cls._build_random(preset, text=text) if random
                     else cls._load_pretrained(preset, source, text, dt, dtypes))
        except AgdError:
            raise
        except (OSError, ValueError) as e:
            gated = gated_error(e, source)
            if gated is not None:
                raise gated from None
            raise ModelError(f"cannot load base model '{source}' for preset '{preset.name}': "
                             f"{str(e).splitlines()[0][:300]}",
                             hint="check the model id or folder; the hub must be reachable, or "
                                  "point base_model at a local copy") from None
        model, text_parts, sched, vae_cfg = parts
        if random:  # as from_pretrained would have loaded them, keep-in-fp32 layers included
            for name, module in text_parts.items():
                if isinstance(module, nn.Module):
                    cast_like_loading(module, dtypes.get(name, dt))
        den = cls(preset, model, text_parts if text else {}, sched, dev, dt,
                  preset.base_source(random_weights=random), vae_cfg)
        if not random and is_single_file(source):
            den.checkpoint = checkpoint_identity(source)
        return den

    @classmethod
    def _build_random(cls, preset: Preset, text: bool = True):
        """(model, text parts, scheduler config, VAE config) with seeded random weights; with
        text=False a family may skip building its text encoders (T5-XXL: 4.7 B parameters)."""
        raise NotImplementedError

    @classmethod
    def _load_pretrained(cls, preset: Preset, source: str, text: bool, dtype: torch.dtype,
                         text_dtypes: dict[str, torch.dtype] | None = None):
        """(model, text parts, scheduler config, VAE config) from a folder, hub id or file;
        each text encoder in text_dtypes[its part name], else in `dtype`."""
        raise NotImplementedError

    @classmethod
    def text_part_names(cls) -> tuple[str, ...]:
        """The subfolders of the base's text encoders (text_encoder, text_encoder_2, …)."""
        return ()

    _model_placed = True  # a Denoiser built without __init__ (api's view) wraps a placed model

    def place_model(self) -> None:
        """Move the denoiser to its device, once: when the text encoders are freed, or at its
        first call where they are kept (bench --quality encodes as it goes)."""
        if not self._model_placed:
            self.model.to(self.device, self.dtype)
            self._model_placed = True

    def free_text_encoders(self) -> None:
        """Conditions are encoded once; the encoders can then go, and the denoiser takes their
        place on the device."""
        self.text = {}
        if self.device.type == "cuda":
            gc.collect()  # encode_prompt's pipelines may hold the encoders in reference cycles
            torch.cuda.empty_cache()
        self.place_model()

    # --- conditions ----------------------------------------------------------------------
    def encode(self, prompts: Sequence) -> dict:
        """Condition tensors for a batch of prompts (or class ids), batch dimension first."""
        raise NotImplementedError

    def encode_null(self, n: int) -> dict:
        """The unconditional condition (empty prompt / null class), repeated n times."""
        raise NotImplementedError

    def encode_negative(self, negative: str | None, size=None) -> dict:
        """CFG's unconditional condition (1, ...): the negative prompt (DiT: a class), else null."""
        if not negative:
            return self.encode_null(1, size=size)
        try:
            return self.encode([negative], size=size)
        except InputError as e:  # e.g. text where a DiT class is needed
            raise InputError(f"--negative-prompt: {e.message}", hint=e.hint) from None

    def _model_kwargs(self, cond: dict) -> dict:
        raise NotImplementedError

    # --- prediction ----------------------------------------------------------------------
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        """(C, h, w) of the model input for an image of height x width pixels."""
        h, w = height or self.preset.resolution, width or self.preset.resolution
        f = self.vae_scale_factor
        return (self.in_channels, h // f, w // f)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae_config is None:
            return 1
        return vae_factor(self.vae_config, self.preset.pixel_space)

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    # --- images --------------------------------------------------------------------------
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> images in [0, 1], (N, C, H, W) float32 on CPU.

        The VAE decodes one image at a time (slicing: its peak memory is one image's, ~3.3 GiB
        for SDXL at 1024² in fp32, whatever the batch size) and in tiles when tiling is on and
        the image is larger than the VAE's own tile size; `vae_decode` says which."""
        if self.preset.pixel_space:
            return ((x.float().clamp(-1, 1) + 1) / 2).cpu()
        vae = self.vae_model()
        with torch.inference_mode():
            shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3's VAE has one
            z = x.to(self.device, torch.float32) / vae.config.scaling_factor + shift
            img = vae.decode(z, return_dict=False)[0]
        return ((img.float().clamp(-1, 1) + 1) / 2).cpu()

    def vae_decode(self, height: int | None = None, width: int | None = None) -> dict | None:
        """How `decode` runs for images of this size: {"slicing", "tiling", "tile_size"};
        None for pixel-space models. `tiling` is true only if the decode really tiles."""
        if self.preset.pixel_space:
            return None
        vae = self.vae_model()
        h, w = height or self.preset.resolution, width or self.preset.resolution
        # diffusers tiles only latents larger than this (AutoencoderKL: one size; DC: per axis)
        tile = getattr(vae, "tile_latent_min_size", None) or vae.tile_latent_min_height
        tiles = vae.use_tiling and max(h, w) // self.vae_scale_factor > tile
        return {"slicing": bool(vae.use_slicing), "tiling": bool(tiles),
                "tile_size": int(tile * self.vae_scale_factor)}

    def vae_model(self):
        """The VAE (fp32), built or loaded on first use: sampling never needs it."""
        if self.vae is None:
            cls = getattr(diffusers, self.vae_class)
            if is_random_base(self.source):
                self.vae = _seeded(lambda: cls(**self.preset.architecture["vae"]))
            else:  # fp16 weights where the base is half (smaller download); decodes in fp32
                self.vae = open_base(self.preset, self.source).model(cls, "vae", self.dtype)
            self.vae.requires_grad_(False).eval().to(self.device, torch.float32)
            self.vae.enable_slicing()  # one image at a time: a batch costs one image's memory
            if self.preset.memory.get("vae_tiling"):
                self.vae.enable_tiling()  # diffusers tiles only above the VAE's own sample size
        return self.vae


def _tokenize(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


def count_truncated(tokenizer, prompts: Sequence[str]) -> int:
    """How many prompts are longer than the text encoder takes."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False).input_ids]
    return sum(n > tokenizer.model_max_length for n in lengths)


def warn_truncated(den, texts: Sequence[str], what: str = "prompts") -> None:
    """One warning when prompts are longer than the text encoder takes (it cuts them; collect
    and generate alike). Class-conditional bases (DiT) have no tokenizer: nothing to say."""
    tokenizer = den.text.get("tokenizer")
    n = count_truncated(tokenizer, texts) if tokenizer is not None and texts else 0
    if n:
        logger.warning(f"{n} of {len(texts)} {what} are longer than the text encoder's "
                f"{tokenizer.model_max_length} tokens and were truncated")


def _vae_config(base) -> dict | None:
    """The VAE's config from a weight source (None where a local folder has no vae/)."""
    return base.config(AutoencoderKL, "vae")
