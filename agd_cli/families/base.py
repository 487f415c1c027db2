"""The family-independent part of a denoiser: devices, dtypes, CFG, adapters, decoding."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from agd_cli.adapter_file import AdapterFile
from agd_cli.adapters import AdapterSet, ContextCache, Site
from agd_cli.errors import AgdError, DataError, InputError, ModelError
from agd_cli.families.spec import vae_factor
from agd_cli.families.weights import checkpoint_identity, is_single_file, open_base
from agd_cli.guidance import cfg_combine
from agd_cli.presets import AdapterConfig, Preset, is_random_base

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
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
    if name not in TORCH_DTYPES:
        raise InputError(f"unknown dtype '{name}'", hint="use fp16, bf16 or fp32")
    if device.type == "cpu" and name != "fp32":
        return torch.float32
    return TORCH_DTYPES[name]


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
        # a torch.dtype is taken as is (--offload keeps half-precision weights on the CPU)
        dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
        source = preset.resolve_base_model()
        random = weights == "random" or source == "config"
        try:
            parts = (cls._build_random(preset, text=text) if random
                     else cls._load_pretrained(preset, source, text, dt))
        except AgdError:
            raise
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load base model '{source}' for preset '{preset.name}': "
                             f"{str(e).splitlines()[0][:300]}",
                             hint="check the model id or folder; the hub must be reachable, or "
                                  "point base_model at a local copy") from None
        model, text_parts, sched, vae_cfg = parts
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
        if self.vae_config is None:
            return 1
        return vae_factor(self.vae_config, self.preset.pixel_space)

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    def forward(self, x: torch.Tensor, t, cond: dict, omega=None,
                negative: dict | None = None, cache: ContextCache | None = None) -> torch.Tensor:
        """One batched model call; with `omega` the attached adapters are active. `negative` is
        CFG's unconditional condition (a negative prompt, or the null one) for adapters trained
        with negatives; others ignore it. `cache` (one per sampling run) lets the adapters reuse
        their work on the inputs that stay fixed over the run."""
        kwargs = self._model_kwargs(cond_to(cond, self.device, self.dtype))
        if omega is not None:
            kwargs[self.omega_kwarg] = {"agd_omega": omega}
            if cache is not None:
                kwargs[self.omega_kwarg]["agd_cache"] = cache
            if negative is not None and self.adapters is not None and self.adapters.wants_negative:
                kwargs[self.omega_kwarg]["agd_negative"] = self.adapter_cond(negative, x)
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if omega is not None and self.compiled is not None:
            kwargs[self.omega_kwarg] = self._graph_inputs(x, t, kwargs, kwargs[self.omega_kwarg])
        model = self.model if self.compiled is None else self.compiled
        out = model(x.to(self.device, self.dtype), timestep=t, return_dict=False, **kwargs)[0]
        return out[:, : self.in_channels]  # learned-sigma models: keep the ε/v channels

    def compile(self, backend=None) -> None:
        """Run the model (with its adapters) through torch.compile from now on (`--compile`);
        `backend`: another torch.compile backend than inductor (tests)."""
        from agd_cli.compiling import CompiledModel

        self.compiled = CompiledModel(self.model, self.device, backend)

    def _graph_inputs(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, agd: dict) -> dict:
        """The adapters' inputs for a compiled call, tensors only (a Python value in a graph's
        inputs is a constant of the graph: a new ω or step would compile a new graph). With a
        run's cache, its part without t, made eagerly once per run, and the step's row of its
        table; else ω as a tensor."""
        omega, cache = agd.pop("agd_omega"), agd.pop("agd_cache", None)
        if cache is None or self.adapters is None or not self.adapters.enabled:
            return {**agd, "agd_omega": torch.as_tensor(omega, dtype=torch.float32,
                                                        device=self.device).view(-1)}
        batch, cond = self.extract_adapter_cond({"sample": x, "hidden_states": x, **kwargs})
        constant = self.adapters.run_constant(cache, omega, cond, batch, self.device,
                                              agd.get("agd_negative"))
        step = cache.step_of(t)
        if step is None or constant.table is None:
            return {"agd_constant": constant}
        return {"agd_constant": constant,
                "agd_step": torch.full((1,), step, dtype=torch.long, device=self.device)}

    def predict(self, x, t, cond: dict, omega=None, negative: dict | None = None,
                cache: ContextCache | None = None) -> torch.Tensor:
        """Single-pass prediction (1 NFE); adapters active when `omega` is given."""
        self.nfe += 1
        return self.forward(x, t, cond, omega, negative, cache)

    def predict_cfg(self, x, t, cond: dict, uncond: dict, omega,
                    pair: dict | None = None) -> torch.Tensor:
        """Real CFG (2 NFE): cond and uncond in one batched call, adapters off. `pair` is
        cond_cat([cond, uncond]) when the caller made it once for a whole run."""
        self.nfe += 2
        b = x.shape[0]
        ctx = self.adapters.disabled() if self.adapters is not None else contextlib.nullcontext()
        with ctx:
            out = self.forward(torch.cat([x, x]), torch.as_tensor(t).expand(2 * b)
                               if torch.as_tensor(t).ndim else t,
                               cond_cat([cond, uncond]) if pair is None else pair)
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
        aset.attach(self.model, self.extract_adapter_cond, self.omega_kwarg, self.omega_kwarg_routed)
        self.adapters = aset

    def adapter_metadata(self, train_steps: int = 0, **extra) -> dict:
        """What an adapter file says about where it came from (see AdapterSet.save)."""
        lo, hi = self.preset.omega_range
        where = ({"base_checkpoint_file": self.checkpoint["file"],
                  "base_checkpoint_sha256": self.checkpoint["sha256"]} if self.checkpoint else {})
        return {"family": self.family, "base_model": self.source, "preset": self.preset.name,
                "preset_toml": self.preset.raw, "omega_min": lo, "omega_max": hi,
                "train_steps": train_steps, **where, **extra}

    def load_adapters(self, file: str | Path | AdapterFile,
                      dtype: torch.dtype | None = None) -> AdapterSet:
        """Load an adapter file written by `agd train` and attach it; refuse one made for
        another base."""
        mine = self.read_adapters(file, dtype)
        self.attach(mine)
        return mine

    def read_adapters(self, file: str | Path | AdapterFile,
                      dtype: torch.dtype | None = None) -> AdapterSet:
        """An adapter file's adapters, checked against this base and loaded, not attached yet
        (a refused file leaves whatever is attached in place)."""
        file = AdapterFile.open(file)
        path, meta = file.path, file.meta
        cfg = AdapterConfig(**meta["adapter_config"])
        mine = AdapterSet(cfg, self.adapter_sites(cfg.kind), self.cond_spec())
        if meta.get("family") == self.family and meta.get("base_model") == self.source \
                and meta["signature"] != mine.signature():
            raise DataError(f"adapter {path} does not fit the blocks of '{self.source}': it was "
                            f"trained on an architecture with other attention sites or condition "
                            f"sizes (signature {meta['signature']}, this base {mine.signature()})",
                            hint="the preset's architecture changed since; retrain the adapter")
        if meta.get("signature") != mine.signature() or meta.get("family") != self.family:
            raise DataError(
                f"adapter {path} was trained for '{meta.get('base_model')}' "
                f"(family {meta.get('family')}), which does not match the loaded base "
                f"'{self.source}' (family {self.family})",
                hint="use the adapter with the base it was trained on, or train a new one")
        try:
            mine.load_state_dict(file.tensors())
        except RuntimeError as e:
            raise DataError(f"adapter {path} does not match this agd version's adapter layout: "
                            f"{str(e).splitlines()[0][:200]}",
                            hint="retrain it with `agd train` (the base was not changed)") from None
        mine.to(self.device, dtype or self.dtype).requires_grad_(False).eval()
        mine.metadata = meta
        self._warn_other_checkpoint(path, meta)
        return mine

    def _warn_other_checkpoint(self, path, meta: dict) -> None:
        """Same architecture, other weights: it runs, but the adapter learned another teacher."""
        trained = meta.get("base_checkpoint_sha256")
        mine = (self.checkpoint or {}).get("sha256")
        if trained and mine and trained != mine:
            from agd_cli import ui

            ui.warn(f"adapter {path} was trained on checkpoint "
                    f"{meta.get('base_checkpoint_file')} (sha256 {trained[:12]}…), but the base "
                    f"is {self.checkpoint['file']} (sha256 {mine[:12]}…); results may not match CFG")

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
        import diffusers

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


def warn_truncated(den, texts: Sequence[str], what: str = "prompts") -> None:
    """One warning when prompts are longer than the text encoder takes (it cuts them; collect
    and generate alike). Class-conditional bases (DiT) have no tokenizer: nothing to say."""
    from agd_cli import ui

    tokenizer = den.text.get("tokenizer")
    n = count_truncated(tokenizer, texts) if tokenizer is not None and texts else 0
    if n:
        ui.warn(f"{n} of {len(texts)} {what} are longer than the text encoder's "
                f"{tokenizer.model_max_length} tokens and were truncated")


def _load_scheduler_config(source: str) -> dict:
    from diffusers import DDIMScheduler

    from agd_cli.families.weights import PretrainedBase

    return PretrainedBase(source).config(DDIMScheduler, "scheduler")


def _vae_config(source: str) -> dict | None:
    from diffusers import AutoencoderKL

    from agd_cli.families.weights import PretrainedBase

    return PretrainedBase(source).config(AutoencoderKL, "vae")
