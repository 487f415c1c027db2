"""Use an agd adapter inside an ordinary diffusers pipeline (with LoRAs, ControlNets, …).

The adapter attaches to the pipeline's own UNet / transformer: no second model is loaded and
the base's weights are not touched, so LoRAs (diffusers/peft) and ControlNets keep working.
The adapters hook the attention modules, not their processors: attention processors set later
(xformers, fused QKV, `set_attn_processor`, IP-Adapter) keep them.
Call the pipeline WITHOUT classifier-free guidance — the adapters do the guiding — and pass ω
with each call::

    from diffusers import StableDiffusionPipeline
    from agd_cli.api import load_agd_adapter, unload_agd_adapter, agd_guidance

    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_lora_weights("my-style-lora")                 # optional: LoRAs stay active
    load_agd_adapter(pipe, "agd-runs/sd15/adapter.safetensors")
    image = pipe("a red fox", guidance_scale=1.0,            # 1.0: one UNet pass per step
                 cross_attention_kwargs={"agd_omega": 6.0}).images[0]

    with agd_guidance(pipe, 6.0):                            # for pipelines without
        image = dit_pipe(class_labels=[207], guidance_scale=1.0).images[0]  # cross_attention_kwargs
    unload_agd_adapter(pipe)                                 # the exact base again

SD3/SD3.5 pipelines take ω in `joint_attention_kwargs={"agd_omega": ω}`, Sana pipelines in
`attention_kwargs={"agd_omega": ω}`; PixArt-Σ pipelines pass no such dict: use agd_guidance.

Without ω the base runs exactly as without adapters. With guidance_scale > 1 the pipeline
would run its own CFG on top (both halves through the adapters): don't; a call that does
warns ("guided twice").

Adapters trained with negatives take the pipeline's usual `negative_prompt` at
guidance_scale=1.0, still one UNet pass per step (SD/SDXL pipelines)::

    image = pipe("a red fox", negative_prompt="blurry, watermark", guidance_scale=1.0,
                 cross_attention_kwargs={"agd_omega": 6.0}).images[0]

torch.compile works with the adapter attached (attach first, then compile; no graph break in
agd's code). Give ω as a tensor on the model's device: a Python number is a constant of the
compiled graph, so each new value would compile again::

    load_agd_adapter(pipe, "agd-runs/sdxl/adapter.safetensors")
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
    w = torch.tensor([6.0], device="cuda")
    image = pipe("a red fox", guidance_scale=1.0, cross_attention_kwargs={"agd_omega": w}).images[0]
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from agd_cli.core.adapter_file import AdapterFile
from agd_cli.core.adapter_hooks import attached_adapters, checked_omega
from agd_cli.core.adapters import AdapterSet
from agd_cli.core.lora import lora_scale
from agd_cli.families import FAMILY_CLASSES
from agd_cli.families.spec import num_classes
from agd_cli.infra.errors import DataError, InputError, ModelError

# lora_scale(ω, w_ref): the strength of an agd guidance LoRA (`agd train --adapter-kind lora`)
# for guidance scale ω, λ = (ω − 1)/(w_ref − 1): pipe.set_adapters([...], adapter_weights=[λ])
# at guidance_scale=1 (docs/lora.md); w_ref is in the file's metadata (agd_lora_w_ref)
__all__ = ["agd_adapter", "agd_guidance", "denoiser_of", "family_of", "load_agd_adapter",
           "lora_scale", "unload_agd_adapter"]

# model -> the negative-prompt feed of its attached adapters; weak keys: a deleted pipeline frees it
_NEGATIVE_FEEDS: weakref.WeakKeyDictionary[nn.Module, _NegativeFeed] = weakref.WeakKeyDictionary()
_DOUBLE_GUIDANCE_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> hook


def denoiser_of(pipe) -> nn.Module:
    """The pipeline's denoising model (`unet` or `transformer`); a bare model is returned as is."""
    if isinstance(pipe, nn.Module):
        return pipe
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            return model
    raise ModelError(f"{type(pipe).__name__} has no `unet` or `transformer` to attach to",
                     hint="pass a Stable Diffusion, SDXL or DiT pipeline (or its UNet/transformer)")


def family_of(model: nn.Module) -> str:
    """The agd family of a diffusers model: sd, sdxl (UNet with text_time embeddings) or dit."""
    cfg = getattr(model, "config", {})
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        return "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd"
    if name in ("DiTTransformer2DModel", "Transformer2DModel") and cfg.get("num_embeds_ada_norm"):
        return "dit"
    for family, cls in FAMILY_CLASSES.items():  # SD3, PixArt-Σ, Sana: one transformer class each
        if getattr(cls, "model_class", None) == name:
            return family
    raise ModelError(f"agd adapters do not support {name}",
                     hint="supported: UNet2DConditionModel (SD 1.x/2.x/XL), DiT, SD3/SD3.5, "
                          "PixArt and Sana transformers")


def _name_of(pipe, model: nn.Module) -> str:
    for obj in (pipe, model):
        name = getattr(getattr(obj, "config", None), "_name_or_path", None)
        if name:
            return str(name)
    return f"an unnamed {type(model).__name__}"


def _denoiser_view(family: str, preset, model: nn.Module, source: str, device, dtype):
    """A Denoiser of `family` around the user's model, built without Denoiser.__init__: that
    would freeze, cast and move the model (a LoRA being trained must stay trainable)."""
    den = FAMILY_CLASSES[family].__new__(FAMILY_CLASSES[family])
    den.preset, den.model, den.text, den.source = preset, model, {}, source
    den.scheduler_config, den.vae_config, den.vae = {}, None, None
    den.device, den.dtype, den.adapters, den.nfe = device, dtype, None, 0
    return den


def _execution_device(pipe, model: nn.Module) -> torch.device:
    """Where the model runs: a pipeline with CPU offload keeps weights on the CPU until then."""
    dev = getattr(pipe, "_execution_device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


class _NegativeFeed:
    """Hands a pipeline's negative prompt to adapters trained with negatives.

    At guidance_scale=1 diffusers pipelines do not encode `negative_prompt`; the pipeline's
    `encode_prompt` is wrapped so that it always is (the empty prompt when none is given, as in
    training), and a pre-hook on the model passes it to the adapters as `agd_negative`."""

    def __init__(self, pipe, model: nn.Module, family: str):
        self.pipe, self.family, self.negative = pipe, family, None
        self.original = pipe.encode_prompt
        signature = inspect.signature(self.original)

        def encode_prompt(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.arguments["do_classifier_free_guidance"] = True  # pipelines skip the
            out = self.original(*bound.args, **bound.kwargs)       # negative embeds at gs 1
            # SD: (prompt, negative); SDXL: (prompt, negative, pooled, negative pooled)
            self.negative = {"tokens": out[1], **({"pooled": out[3]} if family == "sdxl" else {})}
            return out

        pipe.encode_prompt = encode_prompt
        self.handle = model.register_forward_pre_hook(self._give, with_kwargs=True, prepend=True)

    def _give(self, module, args, kwargs):
        cak = kwargs.get("cross_attention_kwargs") or {}
        if self.negative is not None and "agd_omega" in cak and "agd_negative" not in cak:
            kwargs["cross_attention_kwargs"] = {**cak, "agd_negative": self.negative}
        return args, kwargs

    def remove(self) -> None:
        self.handle.remove()
        del self.pipe.encode_prompt  # the pipeline class's own method again


def load_agd_adapter(pipe, path: str | Path, dtype: torch.dtype | None = None) -> AdapterSet:
    """Attach an agd adapter file to a diffusers pipeline (or a bare UNet/DiT); returns it.

    Refuses an adapter trained for another architecture, naming both bases. Replaces an agd
    adapter attached earlier. Other adapters (LoRA via peft) are left alone.
    """
    model = denoiser_of(pipe)
    family, source = family_of(model), _name_of(pipe, model)
    if not isinstance(path, (str, Path, AdapterFile)):
        raise InputError(f"path must be an adapter file's path, got {path!r}",
                         hint='e.g. load_agd_adapter(pipe, "agd-runs/sdxl/adapter.safetensors")')
    dtype = _checked_dtype(dtype)
    file = AdapterFile.open(path)  # metadata only; the tensors load once, in read_adapters
    if file.family != family:
        raise DataError(f"adapter {path} was trained for '{file.base_model}' (family "
                        f"{file.family}), but the pipeline's model is '{source}' "
                        f"(family {family})",
                        hint="use the adapter with a pipeline of the base it was trained on")
    param = next(model.parameters())
    den = _denoiser_view(family, file.preset, model, source,
                         _execution_device(pipe, model), dtype or param.dtype)
    adapters = den.read_adapters(file, dtype=dtype or param.dtype)  # checks the architecture
    unload_agd_adapter(pipe)  # only now: a refused file leaves the attached adapter working
    den.attach(adapters)
    if pipe is not model:
        _DOUBLE_GUIDANCE_GUARDS[model] = _warn_on_double_guidance(pipe, model, den.omega_kwarg)
    if adapters.wants_negative and hasattr(pipe, "encode_prompt") and family in ("sd", "sdxl"):
        _NEGATIVE_FEEDS[model] = _NegativeFeed(pipe, model, family)
    return adapters


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _checked_dtype(dtype) -> torch.dtype | None:
    """None (the model's), a floating torch dtype, or agd's name for one (fp16, bf16, fp32)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise InputError(f"dtype must be a floating-point torch dtype, got {dtype!r}",
                     hint="e.g. dtype=torch.float16, 'bf16', or leave it out for the model's own")


def unload_agd_adapter(pipe) -> None:
    """Detach the agd adapter: the pipeline's model runs exactly as before it was attached."""
    model = denoiser_of(pipe)
    adapters = attached_adapters(model)
    if adapters is not None:
        adapters.detach()
    feed = _NEGATIVE_FEEDS.pop(model, None)
    if feed is not None:
        feed.remove()
    guard = _DOUBLE_GUIDANCE_GUARDS.pop(model, None)
    if guard is not None:
        guard.remove()


def _pipeline_cfg(pipeline) -> tuple[bool, object]:
    """Whether a pipeline runs its own CFG in the current call, and its guidance_scale (None
    where unknown). Most pipelines expose both as properties (SD, SDXL, SD3, Sana); PixArt-Σ keeps
    them as locals of `__call__`, read here from that call's frame (no frames: not checked)."""
    flag = getattr(pipeline, "do_classifier_free_guidance", None)
    if flag is not None:
        return flag is True, getattr(pipeline, "guidance_scale", None)
    frame = inspect.currentframe()
    while frame is not None:
        if ("do_classifier_free_guidance" in frame.f_code.co_varnames
                and frame.f_locals.get("self") is pipeline):
            local = frame.f_locals
            return local.get("do_classifier_free_guidance") is True, local.get("guidance_scale")
        frame = frame.f_back
    return False, None


def _warn_on_double_guidance(pipe, model: nn.Module, key: str):
    """A pre-hook that warns when a call gets ω while the pipeline runs its own CFG
    (guidance_scale > 1): both halves of CFG's batch go through the adapters, so the image is
    guided twice at twice the cost. Seen from the pipeline's own CFG switch (_pipeline_cfg) or,
    for DiT, the null class in the batch (CFG's unconditional half)."""
    owner = weakref.ref(pipe)
    null = num_classes(model.config) if family_of(model) == "dit" else None

    def check(module, args, kwargs):
        pipeline = owner()
        if "agd_omega" not in (kwargs.get(key) or {}) or pipeline is None:
            return None
        running, scale = _pipeline_cfg(pipeline)
        labels = kwargs.get("class_labels")
        if running or (null is not None and isinstance(labels, torch.Tensor)
                       and bool((labels == null).any())):
            shown = "guidance_scale > 1" if scale is None else f"guidance_scale={scale}"
            warnings.warn(f"agd_omega is set while the pipeline runs its own CFG ({shown}): the "
                          "image is guided twice, at twice the cost; pass guidance_scale=1.0, "
                          "agd guides in one pass", UserWarning, stacklevel=2)
        return None

    return model.register_forward_pre_hook(check, with_kwargs=True, prepend=True)


def agd_adapter(pipe) -> AdapterSet | None:
    """The agd adapter that drives the pipeline's model, if any (attention processors set later
    do not remove it); raises if an attention module carrying an adapter was replaced since."""
    adapters = attached_adapters(denoiser_of(pipe))
    if adapters is not None:
        adapters.check_sites()
    return adapters


def _negative_class(model: nn.Module, negative_class) -> dict:
    """DiT adapters trained with negatives: {"agd_negative": its class labels} (default: the
    null class, as "no negative" in training); a class given to other adapters is refused."""
    reads_it = family_of(model) == "dit" and attached_adapters(model).wants_negative
    if not reads_it:
        if negative_class is not None:
            raise InputError(f"negative_class={negative_class!r} needs DiT adapters trained with "
                             "negatives; these would ignore it",
                             hint="leave it out, or collect and train with --negative-prompts")
        return {}
    null = num_classes(model.config)
    if negative_class is None:
        return {"agd_negative": {"class_labels": torch.tensor([null])}}
    try:
        label = None if isinstance(negative_class, bool) else operator.index(negative_class)
    except TypeError:
        label = None
    if label is None or not 0 <= label < null:
        raise InputError(f"negative_class must be a class id from 0 to {null - 1}, got "
                         f"{negative_class!r}", hint="e.g. negative_class=207 (ImageNet ids)")
    return {"agd_negative": {"class_labels": torch.tensor([label])}}


@contextlib.contextmanager
def agd_guidance(pipe, omega: float | torch.Tensor,
                 negative_class: int | None = None) -> Iterator[None]:
    """Within the block every call of the pipeline's model gets ω (unless the call passes its
    own `cross_attention_kwargs["agd_omega"]`): for pipelines that take no cross_attention_kwargs.
    DiT adapters trained with negatives also get `negative_class` (default: the null class)."""
    model = denoiser_of(pipe)
    if attached_adapters(model) is None:
        raise ModelError("no agd adapter is attached to this pipeline",
                         hint="call load_agd_adapter(pipe, path) first")
    checked_omega(omega, 1 if not isinstance(omega, torch.Tensor) else omega.numel())
    extra = _negative_class(model, negative_class)

    key = FAMILY_CLASSES[family_of(model)].omega_kwarg  # cross_attention_kwargs, joint_attention_kwargs…

    def give_omega(module, args, kwargs):
        kwargs[key] = {"agd_omega": omega, **extra, **(kwargs.get(key) or {})}
        return args, kwargs

    # prepend: ω must be in place before the adapters' own pre-hook reads it
    handle = model.register_forward_pre_hook(give_omega, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
