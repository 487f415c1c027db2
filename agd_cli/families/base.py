"""The family-independent part of a denoiser: devices, dtypes, CFG, adapters, decoding."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from agd_cli.adapters import AdapterSet, Site, adapter_metadata, read_adapter_file
from agd_cli.errors import AgdError, DataError, InputError, ModelError
from agd_cli.guidance import cfg_combine
from agd_cli.presets import AdapterConfig, Preset

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
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
    """Half precision on CUDA; CPU kernels for fp16 are slow or missing, so CPU runs fp32."""
    if name not in DTYPES:
        raise InputError(f"unknown dtype '{name}'", hint="use fp16, bf16 or fp32")
    if device.type == "cpu" and name != "fp32":
        return torch.float32
    return DTYPES[name]


def cond_select(cond: dict, index) -> dict:
    """Rows `index` of every tensor of a condition dict."""
    return {k: v[index] for k, v in cond.items()}


def cond_cat(conds: Sequence[dict]) -> dict:
    """Concatenate condition dicts along the batch dimension."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_to(cond: dict, device, dtype=None) -> dict:
    """Move a condition dict; floating tensors also take `dtype`."""
    return {k: v.to(device, dtype if (dtype and v.is_floating_point()) else v.dtype)
            for k, v in cond.items()}


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


class Denoiser:
    """A frozen base model of one family, with optional guidance adapters attached."""

    family = "base"
    adapter_kinds: tuple[str, ...] = ("cross_attention", "offset")
    model_subfolder = "unet"

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
        self.model.to(device, dtype)
        for module in text.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval().to(device, dtype)

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, preset: Preset, device: str | torch.device | None = None, dtype: str = "fp32",
             weights: str = "pretrained", text: bool = True) -> Denoiser:
        """Load the preset's base (hub id / folder) or build it with random weights."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        source = preset.resolve_base_model()
        random = weights == "random" or source == "config"
        try:
            parts = (cls._build_random(preset) if random
                     else cls._load_pretrained(preset, source, text, dt))
        except AgdError:
            raise
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load base model '{source}' for preset '{preset.name}': "
                             f"{str(e).splitlines()[0][:300]}",
                             hint="check the model id or folder; the hub must be reachable, or "
                                  "point base_model at a local copy") from None
        model, text_parts, sched, vae_cfg = parts
        return cls(preset, model, text_parts if text else {}, sched, dev, dt,
                   "random:" + preset.name if random else source, vae_cfg)

    @classmethod
    def _build_random(cls, preset: Preset):
        raise NotImplementedError

    @classmethod
    def _load_pretrained(cls, preset: Preset, source: str, text: bool, dtype: torch.dtype):
        raise NotImplementedError

    def free_text_encoders(self) -> None:
        """Conditions are encoded once; the encoders can then go."""
        self.text = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
        if self.preset.pixel_space or self.vae_config is None:
            return 1
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    def forward(self, x: torch.Tensor, t, cond: dict, omega=None,
                negative: dict | None = None) -> torch.Tensor:
        """One batched model call; with `omega` the attached adapters are active. `negative` is
        CFG's unconditional condition (a negative prompt, or the null one) for adapters trained
        with negatives; others ignore it."""
        kwargs = self._model_kwargs(cond_to(cond, self.device, self.dtype))
        if omega is not None:
            kwargs["cross_attention_kwargs"] = {"agd_omega": omega}
            if negative is not None and self.adapters is not None and self.adapters.wants_negative:
                kwargs["cross_attention_kwargs"]["agd_negative"] = self.adapter_cond(negative, x)
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.model(x.to(self.device, self.dtype), t, return_dict=False, **kwargs)[0]
        return out[:, : self.in_channels]  # learned-sigma models: keep the ε/v channels

    def predict(self, x, t, cond: dict, omega=None, negative: dict | None = None) -> torch.Tensor:
        """Single-pass prediction (1 NFE); adapters active when `omega` is given."""
        self.nfe += 1
        return self.forward(x, t, cond, omega, negative)

    def predict_cfg(self, x, t, cond: dict, uncond: dict, omega) -> torch.Tensor:
        """Real CFG (2 NFE): cond and uncond in one batched call, adapters off."""
        self.nfe += 2
        b = x.shape[0]
        ctx = self.adapters.disabled() if self.adapters is not None else contextlib.nullcontext()
        with ctx:
            out = self.forward(torch.cat([x, x]), torch.as_tensor(t).expand(2 * b)
                               if torch.as_tensor(t).ndim else t, cond_cat([cond, uncond]))
        return cfg_combine(out[b:], out[:b], omega)

    # --- adapters ------------------------------------------------------------------------
    def cond_spec(self) -> dict:
        raise NotImplementedError

    def adapter_sites(self, kind: str) -> list[Site]:
        """Attention modules that get an adapter: attn2 (cross-attention) or attn1 (offset)."""
        leaf = "attn2" if kind == "cross_attention" else "attn1"
        return [Site(name, m.to_out[0].out_features) for name, m in self.model.named_modules()
                if name.endswith("." + leaf)]

    def extract_adapter_cond(self, arguments: dict) -> tuple[int, dict]:
        raise NotImplementedError

    def adapter_cond(self, cond: dict, x: torch.Tensor) -> dict:
        """A condition dict in the form the adapters read (as the model call would pass it)."""
        kwargs = self._model_kwargs(cond_to(cond, self.device, self.dtype))
        return self.extract_adapter_cond({"sample": x, "hidden_states": x, **kwargs})[1]

    def check_adapter_kind(self, kind: str) -> None:
        if kind not in self.adapter_kinds:
            raise InputError(f"adapter kind '{kind}' does not fit family '{self.family}'",
                             hint=f"family '{self.family}' supports: {', '.join(self.adapter_kinds)}")

    def new_adapters(self, cfg: AdapterConfig | None = None) -> AdapterSet:
        """Fresh adapters (fp32) attached to this base."""
        cfg = cfg or self.preset.adapter
        self.check_adapter_kind(cfg.kind)
        sites = self.adapter_sites(cfg.kind)
        aset = AdapterSet(cfg, sites, self.cond_spec()).to(self.device)
        self.attach(aset)
        return aset

    def attach(self, aset: AdapterSet) -> None:
        if self.adapters is not None:
            self.adapters.detach()
        aset.attach(self.model, self.extract_adapter_cond)
        self.adapters = aset

    def adapter_metadata(self, train_steps: int = 0, **extra) -> dict:
        """What an adapter file says about where it came from (see AdapterSet.save)."""
        lo, hi = self.preset.omega_range
        return {"family": self.family, "base_model": self.source, "preset": self.preset.name,
                "preset_toml": self.preset.raw, "omega_min": lo, "omega_max": hi,
                "train_steps": train_steps, **extra}

    def load_adapters(self, path: str | Path, dtype: torch.dtype | None = None) -> AdapterSet:
        """Load an adapter file written by `agd train`; refuse one made for another base."""
        state, raw = read_adapter_file(path)
        meta = adapter_metadata(raw)
        cfg = AdapterConfig(**meta["adapter_config"])
        mine = AdapterSet(cfg, self.adapter_sites(cfg.kind), self.cond_spec())
        if meta.get("signature") != mine.signature() or meta.get("family") != self.family:
            raise DataError(
                f"adapter {path} was trained for '{meta.get('base_model')}' "
                f"(family {meta.get('family')}), which does not match the loaded base "
                f"'{self.source}' (family {self.family})",
                hint="use the adapter with the base it was trained on, or train a new one")
        try:
            mine.load_state_dict(state)
        except RuntimeError as e:
            raise DataError(f"adapter {path} does not match this agd version's adapter layout: "
                            f"{str(e).splitlines()[0][:200]}",
                            hint="retrain it with `agd train` (the base was not changed)") from None
        mine.to(self.device, dtype or self.dtype).requires_grad_(False).eval()
        mine.metadata = meta
        self.attach(mine)
        return mine

    # --- images --------------------------------------------------------------------------
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> images in [0, 1], (N, C, H, W) float32 on CPU."""
        if self.preset.pixel_space:
            return ((x.float().clamp(-1, 1) + 1) / 2).cpu()
        vae = self._vae()
        with torch.inference_mode():
            z = x.to(self.device, torch.float32) / vae.config.scaling_factor
            img = vae.decode(z, return_dict=False)[0]
        return ((img.float().clamp(-1, 1) + 1) / 2).cpu()

    def _vae(self):
        from diffusers import AutoencoderKL

        if self.vae is None:
            if self.source.startswith("random:"):
                self.vae = _seeded(lambda: AutoencoderKL(**self.preset.architecture["vae"]))
            else:
                self.vae = AutoencoderKL.from_pretrained(self.source, subfolder="vae")
            self.vae.requires_grad_(False).eval().to(self.device, torch.float32)
            if self.preset.memory.get("vae_tiling"):
                self.vae.enable_tiling()
        return self.vae


def _clip_config(arch: dict, tokenizer, **extra):
    from transformers import CLIPTextConfig

    cfg = {"vocab_size": len(tokenizer), **arch, **extra}
    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **cfg)


def _tokenize(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


def count_truncated(tokenizer, prompts: Sequence[str]) -> int:
    """How many prompts are longer than the text encoder takes."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False).input_ids]
    return sum(n > tokenizer.model_max_length for n in lengths)


def _load_scheduler_config(source: str) -> dict:
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler.load_config(source, subfolder="scheduler"))


def _vae_config(source: str) -> dict | None:
    from diffusers import AutoencoderKL

    if Path(source).is_dir() and not (Path(source) / "vae").is_dir():
        return None
    return dict(AutoencoderKL.load_config(source, subfolder="vae"))
