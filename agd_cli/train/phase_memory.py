"""Will it fit? The peak GPU memory of each phase of a run, estimated without a GPU or weights.

Every part is built at real size on the meta device from the preset's configs (its
[architecture] section; a local model folder without one is read from disk), in the dtype each
part loads in, and each phase runs once while estimate.LiveBytes counts the live tensor
storages (attention as CUDA's memory-efficient kernel):

    text encoding   the text encoders alone, one chunk of prompts (the denoiser waits on the CPU
                    until they are freed: Denoiser.place_model)
    sampling        the denoiser, one CFG call of 2 × batch rows, collect's kept-step buffers
    VAE decode      one image (slicing), the denoiser still resident (generate and bench;
                    collect decodes nothing)
    training step   agd train's own step (memory.measure_in_process on the meta device)

The card: the device's free memory on CUDA (hardware.free_memory), else the preset's
`[memory] profile` ("24GB"). A phase fits when its peak leaves HEADROOM of the card free (CUDA
context, cuBLAS/cuDNN workspaces, allocator slack; on an H200 SDXL training's allocated peak was
within 3 % of this estimate, reserved 1 % above allocated).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from agd_cli.config.presets import CARD_SIZE, Preset
from agd_cli.families import FAMILY_CLASSES
from agd_cli.families.base import TORCH_DTYPES
from agd_cli.infra import hardware
from agd_cli.infra.errors import InputError
from agd_cli.infra.io import read_json
from agd_cli.train.estimate import LiveBytes, efficient_attention
from agd_cli.train.probe import measure_in_process, random_inputs

GiB = 2**30
HEADROOM = 2 * GiB   # kept free on the card: a 24 GB card takes phases up to 22 GiB
LONG_ENCODERS = ("T5", "Gemma")  # text encoders that read the long (max_sequence_length) prompt
META = torch.device("meta")


@dataclass
class Phase:
    """One phase's estimated peak: the total and what it is made of (bytes)."""

    name: str
    peak_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def to_dict(self, budget: int | None = None) -> dict:
        d = asdict(self)
        d["peak_gib"] = round(self.peak_bytes / GiB, 2)
        d["fits"] = None if budget is None else self.peak_bytes <= budget
        return d


@dataclass
class Card:
    """The memory a run may use: its size, where that figure comes from, and the budget
    (size minus HEADROOM) a phase must stay under."""

    bytes: int
    source: str

    @property
    def budget(self) -> int:
        return max(self.bytes - HEADROOM, 0)

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "gib": round(self.bytes / GiB, 2), "source": self.source,
                "budget_bytes": self.budget, "budget_gib": round(self.budget / GiB, 2),
                "headroom_gib": HEADROOM / GiB}


def profile_bytes(profile: str) -> int:
    """'24GB' -> bytes of a card sold as 24 GB (24 GiB: cards are sized in binary units)."""
    m = CARD_SIZE.fullmatch(str(profile))
    if not m:
        raise InputError(f"preset [memory] profile {profile!r} is not a card size",
                         hint='write the GPU memory the preset is sized for, e.g. profile = "24GB"')
    return int(float(m.group(1)) * GiB)


def card(preset: Preset, device: torch.device | None) -> Card:
    """The card to fit: free memory of a CUDA device, else the preset's [memory] profile."""
    free = hardware.free_memory(device) if device is not None and device.type == "cuda" else None
    if free is not None:
        return Card(int(free), f"free on {device}")
    profile = preset.memory.get("profile", "24GB")
    return Card(profile_bytes(profile), f"the preset's [memory] profile {profile!r}")


# --- the parts, at real size, on the meta device -------------------------------------------------
def _loaded_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A text encoder in the dtypes transformers loads it in: `dtype`, but the modules the
    class keeps in fp32 (T5's `wo`) stay fp32 under fp16 (transformers' own rule)."""
    module.to(dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    if dtype == torch.float16 and keep:
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                sub.to(torch.float32)
    return module


def _weights(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size()
               for t in [*module.parameters(), *module.buffers()])


def meta_parts(preset: Preset, dtype: torch.dtype, text: bool = True):
    """(Denoiser on the meta device, {name: text encoder}) at real size, no weights read: from
    the preset's [architecture], else from a local model folder's config files (mnist)."""
    cls = FAMILY_CLASSES[preset.family]
    with init_empty_weights(), torch.device(META):
        if preset.architecture.get("unet") or preset.architecture.get("transformer"):
            model, parts, sched, vae = cls._build_random(preset, text=text)
        else:
            model, parts, sched, vae = _from_folder_configs(cls, preset, text)
    den = cls(preset, model, {}, sched, META, dtype, preset.base_source(random_weights=True), vae)
    encoders = {k: _loaded_dtype(v.to(META), dtype) for k, v in parts.items()
                if isinstance(v, nn.Module)}
    return den, encoders


def _from_folder_configs(cls, preset: Preset, text: bool):
    """(model, text encoders, scheduler config, VAE config) of a local diffusers folder, each
    part built from its config.json alone; a hub id's configs are not at hand offline."""
    root = Path(preset.resolve_base_model())
    if not root.is_dir():
        raise InputError(f"preset '{preset.name}' has no [architecture] section and its base "
                         f"'{preset.base_model}' is no local folder: its sizes are not known "
                         "offline", hint="add the model's configs to the preset's "
                                         "[architecture] section, as the shipped presets have")
    name = getattr(cls, "model_class", "") or (
        "DiTTransformer2DModel" if preset.family == "dit" else "UNet2DConditionModel")
    model_cls = getattr(diffusers, name)
    model = model_cls.from_config(model_cls.load_config(root, subfolder=cls.model_subfolder))
    encoders = {}
    wanted = (getattr(cls, "text_parts", None) or
              {"text_encoder" + sub: enc.__name__ for sub, enc in
               getattr(cls, "_text_encoder_classes", lambda: [])()})
    for part, class_name in (wanted.items() if text else ()):
        if part.startswith("text_encoder") and (root / part / "config.json").is_file():
            enc_cls = getattr(transformers, class_name)
            encoders[part] = enc_cls(enc_cls.config_class.from_pretrained(root / part))
    sched = read_json(root / "scheduler" / "scheduler_config.json")
    vae = read_json(root / "vae" / "config.json") if (root / "vae").is_dir() else None
    return model, encoders, sched, vae


def _peak_of(run) -> int:
    """Peak bytes of the tensors `run()` makes (inference, memory-efficient attention)."""
    tracker = LiveBytes()
    with torch.inference_mode(), efficient_attention(), tracker:
        run()
    return tracker.peak


# --- the phases ------------------------------------------------------------------------------------
def text_encoding(preset: Preset, encoders: dict[str, nn.Module], chunk: int) -> Phase | None:
    """All text encoders on the device at once, one chunk of `chunk` prompts through each."""
    if not encoders:
        return None  # class-conditional (DiT): nothing to encode
    tok = preset.architecture.get("tokenizer", {})
    weights = sum(_weights(m) for m in encoders.values())
    activations = 0
    for encoder in encoders.values():
        long = any(k in type(encoder).__name__ for k in LONG_ENCODERS)
        positions = getattr(encoder.config, "max_position_embeddings", None) or 10**6
        length = min(int(tok.get("max_sequence_length", 300) if long
                         else tok.get("model_max_length", 77)), positions)
        ids = torch.zeros(chunk, length, dtype=torch.long, device=META)
        activations = max(activations, _peak_of(lambda e=encoder, i=ids: e(input_ids=i)))
    return Phase("text encoding", weights + activations,
                 {"text_encoder_weights": weights, "activations": activations},
                 f"{len(encoders)} text encoder(s) alone, {chunk} prompts per call; the "
                 "denoiser waits on the CPU until they are freed")


def sampling(den, batch: int, keep_steps: int) -> Phase:
    """The denoiser and one CFG call (cond and uncond rows batched: 2 × batch), plus collect's
    kept-step buffers (x_t and target, fp16) and the fp32 latents of the sampler."""
    res = den.preset.resolution
    with torch.device(META):
        inputs = random_inputs(den, 2 * batch, res)
    kwargs = den._model_kwargs(inputs["cond"])
    weights = _weights(den.model)
    activations = _peak_of(lambda: den.model(inputs["x"], timestep=inputs["t"],
                                             return_dict=False, **kwargs))
    latent = torch.Size(den.latent_shape(res, res)).numel()
    buffers = 2 * batch * keep_steps * latent * 2 + 4 * batch * latent * 4
    conditions = sum(t.numel() * t.element_size() for t in inputs["cond"].values())
    return Phase("sampling", weights + activations + buffers + conditions,
                 {"denoiser_weights": weights, "activations": activations,
                  "trajectory_buffers": buffers, "conditions": conditions},
                 f"CFG: {2 * batch} rows per call (batch {batch})")


def vae_decode(den) -> Phase | None:
    """One image decoded in fp32 (the VAE decodes one image at a time) beside the resident
    denoiser, as generate and bench decode; None for pixel-space models."""
    p = den.preset
    if p.pixel_space or not p.architecture.get("vae"):
        return None
    with init_empty_weights(), torch.device(META):
        vae = getattr(diffusers, den.vae_class)(**p.architecture["vae"])
    vae.to(META, torch.float32)
    vae.enable_slicing()
    if p.memory.get("vae_tiling"):
        vae.enable_tiling()
    shape = (1, vae.config.latent_channels, *den.latent_shape()[1:])
    z = torch.empty(shape, device=META)
    activations = _peak_of(lambda: vae.decode(z, return_dict=False))
    weights, resident = _weights(vae), _weights(den.model)
    return Phase("VAE decode", weights + resident + activations,
                 {"vae_weights": weights, "denoiser_weights": resident,
                  "activations": activations},
                 "one image in fp32, the denoiser still on the device (generate, bench; "
                 "collect decodes nothing)")


def collect_phases(preset: Preset, dtype: str, batch: int, keep_steps: int,
                   chunk: int) -> list[Phase]:
    """The phases of `agd collect` (and the VAE decode of generate), estimated."""
    den, encoders = meta_parts(preset, TORCH_DTYPES[dtype], text=True)
    phases = [text_encoding(preset, encoders, chunk), sampling(den, batch, keep_steps),
              vae_decode(den)]
    return [ph for ph in phases if ph is not None]


def training_step(preset: Preset, precision: str, optimizer: str, checkpointing: bool,
                  batch: int) -> Phase:
    """One `agd train` step (forward, backward, optimizer update), estimated on the meta device."""
    est = measure_in_process(preset, precision, optimizer, checkpointing, batch, "meta", None,
                             flops=False)
    return Phase("training step", int(est["peak_bytes"]),
                 {"denoiser_weights": int(est["weights_bytes"]),
                  "optimizer_state": int(est["optimizer_state_bytes"]),
                  "step": int(est["step_bytes"])},
                 f"batch {batch}, {precision}, {optimizer}, gradient checkpointing "
                 f"{'on' if checkpointing else 'off'}")


@contextlib.contextmanager
def quiet_casts():
    """diffusers warns about `.to()` casts of models built from config; irrelevant here."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --- training: gradient checkpointing where the step does not fit (issue 31, row 12) -----------
@dataclass
class CheckpointingChoice:
    """What a training run does about its memory: 'fits' (as set), 'turn on' gradient
    checkpointing (it then fits), or 'refuse' (with the flags that would fit in `hint`)."""

    action: str
    checkpointing: bool
    phase: Phase          # the step as it will run (or as it was asked for, when refused)
    message: str
    hint: str | None = None
    asked: Phase | None = None  # the step as set, where agd turned checkpointing on instead

    def to_dict(self) -> dict:
        return {"action": self.action, "gradient_checkpointing": self.checkpointing,
                "peak_gib": round(self.phase.peak_bytes / GiB, 2), "message": self.message,
                "hint": self.hint}


def choose_checkpointing(estimate, c: Card, checkpointing: bool,
                         explicit: bool | None) -> CheckpointingChoice:
    """The decision, from `estimate(checkpointing) -> Phase` and the card: keep a setting that
    fits; turn checkpointing on where only that fits, unless the user asked for it off
    (`explicit` False: refused, naming the flag); refuse what fits neither way."""
    now = estimate(checkpointing)
    budget = f"{c.budget / GiB:.1f} GiB ({c.source}, {HEADROOM / GiB:g} GiB kept free)"
    if now.peak_bytes <= c.budget:
        return CheckpointingChoice("fits", checkpointing, now,
                                   f"one training step needs ~{now.peak_bytes / GiB:.1f} GiB of "
                                   f"{budget}")
    need = f"one training step needs ~{now.peak_bytes / GiB:.1f} GiB; the card allows {budget}"
    on = now if checkpointing else estimate(True)
    smaller = "a smaller --batch-size (with a larger --grad-accum for as many samples per step)"
    if on.peak_bytes > c.budget:
        flags = smaller if checkpointing else f"--gradient-checkpointing and {smaller}"
        return CheckpointingChoice("refuse", checkpointing, now, f"{need}, "
                                   f"~{on.peak_bytes / GiB:.1f} GiB with gradient checkpointing",
                                   hint=f"train with {flags}, or on a card with more memory")
    if explicit is False:
        return CheckpointingChoice("refuse", False, now,
                                   f"{need} without gradient checkpointing (asked for with "
                                   f"--no-gradient-checkpointing); ~{on.peak_bytes / GiB:.1f} "
                                   "GiB with it",
                                   hint="pass --gradient-checkpointing (it recomputes "
                                        "activations in the backward pass: ~1/3 more compute)")
    return CheckpointingChoice("turn on", True, on,
                               f"{need} without gradient checkpointing: turning it on "
                               f"(~{on.peak_bytes / GiB:.1f} GiB; about 1/3 more compute per "
                               "step)", asked=now)
