"""A guidance LoRA: CFG distilled into a LoRA whose strength is the guidance dial.

peft LoRA layers (rank `lora_rank`, alpha = rank: scale 1) on the q/k/v/out projections of the
transformer blocks' attention: a UNet's attn1 (image) and attn2 (image and text); SD3's joint
attention (image side to_*, text side add_*); PixArt's and Sana's attn1/attn2; with
`lora_targets = "attention_ff"` also the blocks' feed-forward Linears. One LoRA
is trained at every ω of the range at once: each sample's ω sets the strength of the LoRA branch,

    λ = (ω − 1) / (w_ref − 1),   output = W x + λ · B A x,

and the target is CFG at that ω; so a stock LoRA loader at strength λ and CFG 1 gives guidance
ω = 1 + λ (w_ref − 1) in one pass. peft's scale belongs to an adapter, not to a sample: here λ is
a per-sample tensor applied to the output of each LoRA's up-projection (a forward hook on
peft's `lora_B`), so training batches mix ω as the adapters' do and share agd train's data,
step, checkpoint and resume code unchanged (batches of one ω would need their own sampler).

The base's modules are not edited until `attach` swaps peft's wrappers in (each holds the base's
own Linear); `detach` puts the originals back. The file (lora_file.py) is a kohya LoRA for a
UNet, a diffusers (peft-key) LoRA for a transformer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import weakref

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.core.adapters import (
    _ATTACHED,
    AdapterSet,
    attached_adapters,
    checked_omega,
    site_key,
)
from agd_cli.core.lora_file import save_lora
from agd_cli.infra.errors import InputError, ModelError

LORA = "lora"
ADAPTER_NAME = "agd"
# each attention's projections: image side (to_*) and, in SD3's joint attention, text side (add_*)
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
               "to_add_out")
ATTENTIONS = (".attn", ".attn1", ".attn2")  # of the transformer blocks (self-, cross-, joint)
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
KOHYA_MODELS = ("UNet2DConditionModel",)  # kohya keys; diffusers transformers: peft keys
LORA_UNSUPPORTED = (" (a guidance LoRA is written for text-to-image families only: kohya keys "
                    "for SD 1.x/2.x and SDXL UNets, diffusers keys for SD3, PixArt-Σ and Sana "
                    "transformers; DiT is class-conditional and no stock loader reads a DiT LoRA)")


def lora_scale(omega, w_ref: float, allow_zero: bool = False):
    """The LoRA strength λ = (ω − 1)/(w_ref − 1) that gives guidance scale ω (a float for a
    number, a tensor for a tensor). λ ≤ 0 (ω ≤ 1) or NaN is refused: at ω = 1 the base alone is
    the answer (`allow_zero` admits λ = 0: training rows at ω = 1)."""
    if isinstance(w_ref, bool) or not isinstance(w_ref, (int, float)) or not math.isfinite(w_ref) \
            or w_ref <= 1:
        raise InputError(f"w_ref must be a finite number > 1, got {w_ref!r}",
                         hint="the ω the LoRA's strength 1 stands for (its file says: "
                              "agd_lora_w_ref); e.g. lora_scale(6.0, w_ref=4.0)")
    tensor = isinstance(omega, torch.Tensor)
    w = omega.detach().float() if tensor else torch.as_tensor(float(omega) if isinstance(
        omega, (int, float)) and not isinstance(omega, bool) else float("nan"))
    lam = (w - 1) / (w_ref - 1)
    low = (lam < 0) if allow_zero else (lam <= 0)
    if lam.device.type == "cpu" and bool((~torch.isfinite(lam) | low).any()):
        shown = omega.tolist() if tensor and omega.numel() <= 8 else omega
        raise InputError(f"LoRA strength λ = (ω − 1)/(w_ref − 1) must be finite and > 0, got "
                         f"ω = {shown} (w_ref {w_ref:g})",
                         hint="use ω > 1 (-w 4); at ω = 1 run the base without the LoRA")
    return lam if tensor else float(lam)


def lora_targets(model: nn.Module, targets: str = "attention") -> list[tuple[str, nn.Linear]]:
    """(dotted name, Linear) of every projection the LoRA trains, in the model's order: the
    transformer blocks' attention projections, and with "attention_ff" their feed-forward Linears
    (Sana's feed-forward is convolutions: none there)."""
    modules = dict(model.named_modules())
    found = []
    for name in modules:
        if ".transformer_blocks." not in f".{name}":
            continue
        leaves = PROJECTIONS if name.endswith(ATTENTIONS) else ()
        if targets == "attention_ff" and _is_block(name):
            leaves = FEED_FORWARD
        for leaf in leaves:
            layer = modules.get(f"{name}.{leaf}")
            if isinstance(layer, nn.Linear):
                found.append((f"{name}.{leaf}", layer))
    return found


def _is_block(name: str) -> bool:
    """A transformer block itself: '...transformer_blocks.<i>'."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == "transformer_blocks" and parts[-1].isdigit()


def lora_key(module: str, kohya: bool) -> str:
    """The stem of a module's keys: kohya's (and ComfyUI's, A1111's) `lora_unet_` + path with _,
    or diffusers' `transformer.` + path (diffusers, ComfyUI read it for SD3 and PixArt)."""
    return "lora_unet_" + module.replace(".", "_") if kohya else "transformer." + module


class LoraSet(nn.Module):
    """The guidance LoRA of one base model: peft LoRA layers on its attention projections, the
    per-sample strength λ from each call's ω, and the hooks that drive them. It stands where an
    AdapterSet stands (training, checkpoints, files, generate): same methods, same ω kwarg."""

    def __init__(self, cfg: AdapterConfig, model: nn.Module):
        super().__init__()
        if cfg.lora_w_ref is not None:  # None: a preset's LoRA before `agd train` sets it
            lora_scale(2 * cfg.lora_w_ref, cfg.lora_w_ref)  # w_ref checked
        self.config = cfg
        targets = lora_targets(model, cfg.lora_targets)
        self.kohya = type(model).__name__ in KOHYA_MODELS
        if not targets:
            raise ModelError(f"{type(model).__name__} has no transformer-block attention for a LoRA",
                             hint="use --adapter-kind cross_attention")
        peft_cfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=0.0,
                              target_modules=sorted({n.rsplit(".", 1)[-1] for n, _ in targets}))
        self.names = [n for n, _ in targets]
        self.shapes = [[layer.in_features, layer.out_features] for _, layer in targets]
        # the wrappers hold the base's Linear: kept out of this module's parameters
        self._wrappers = {n: PeftLoraLinear(layer, ADAPTER_NAME, peft_cfg, r=cfg.lora_rank,
                                            lora_alpha=cfg.lora_rank) for n, layer in targets}
        self.lora = nn.ModuleDict({
            site_key(n): nn.ModuleDict({"down": w.lora_A[ADAPTER_NAME], "up": w.lora_B[ADAPTER_NAME]})
            for n, w in self._wrappers.items()}).float()
        self.sites = []  # no agd adapter sites: the LoRA's places are `names`
        self.enabled = True
        self.wants_negative = False
        self._scale: torch.Tensor | None = None
        self._on: tuple = ()  # (the model it is attached to,): a tuple, so not a submodule
        self._handles: list = []

    def signature(self) -> str:
        """Identifies the projections the LoRA fits: their names and shapes."""
        spec = {"lora": [[n, *s] for n, s in zip(self.names, self.shapes, strict=True)]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    # --- state: kohya keys, in checkpoints and files alike ---------------------------------
    def state_dict(self, *args, **kwargs) -> dict:
        out = {}
        for name in self.names:
            pair, key = self.lora[site_key(name)], lora_key(name, self.kohya)
            down, up = self._suffixes()
            out[f"{key}.{down}"] = pair["down"].weight.detach()
            out[f"{key}.{up}"] = pair["up"].weight.detach()
            if self.kohya:  # diffusers' transformer loaders take no alpha keys: alpha = rank there
                out[f"{key}.alpha"] = torch.tensor(float(self.config.lora_rank))  # one each
        return out

    def _suffixes(self) -> tuple[str, str]:
        """The down- and up-projection's key suffixes: kohya's or peft's (diffusers')."""
        return ("lora_down.weight", "lora_up.weight") if self.kohya else ("lora_A.weight",
                                                                          "lora_B.weight")

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        mine = self.state_dict()
        if set(state) != set(mine):
            extra, missing = sorted(set(state) - set(mine)), sorted(set(mine) - set(state))
            raise RuntimeError(f"LoRA keys differ: missing {missing[:2]}, unexpected {extra[:2]}")
        for key, value in state.items():
            if tuple(value.shape) != tuple(mine[key].shape):
                raise RuntimeError(f"LoRA tensor {key} has shape {tuple(value.shape)}, "
                                   f"expected {tuple(mine[key].shape)}")
            if key.endswith(".alpha") and float(value) != self.config.lora_rank:
                raise RuntimeError(f"LoRA {key} = {float(value):g}; agd's LoRAs use alpha = rank")
        down, up = self._suffixes()
        with torch.no_grad():
            for name in self.names:
                pair, key = self.lora[site_key(name)], lora_key(name, self.kohya)
                pair["down"].weight.copy_(state[f"{key}.{down}"])
                pair["up"].weight.copy_(state[f"{key}.{up}"])
        return None

    # --- attaching -------------------------------------------------------------------------
    def attach(self, model: nn.Module, extract=None, omega_kwarg: str = "cross_attention_kwargs",
               routed: bool = True) -> None:
        """Swap peft's wrappers in for the targeted projections, and add the ω pre-hook."""
        if self._on or attached_adapters(model) is not None:
            raise ModelError("an agd adapter is already attached to this model",
                             hint="detach it first (adapters.detach())")
        for name, wrapper in self._wrappers.items():
            parent, child = name.rsplit(".", 1)
            if model.get_submodule(name) is not wrapper.base_layer:
                raise ModelError(f"module '{name}' of {type(model).__name__} is not the one this "
                                 "LoRA was built on", hint="build the LoRA on this model")
            setattr(model.get_submodule(parent), child, wrapper)
            self._handles.append(wrapper.lora_B[ADAPTER_NAME].register_forward_hook(self._scaled))
        self._handles.append(model.register_forward_pre_hook(self._omega_hook(omega_kwarg),
                                                             with_kwargs=True))
        self._on = (model,)
        self._set_active(False)
        _ATTACHED[model] = weakref.ref(self)

    def detach(self) -> None:
        """Give the base model back exactly as it was."""
        if not self._on:
            return
        model = self._on[0]
        for handle in self._handles:
            handle.remove()
        for name, wrapper in self._wrappers.items():
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, wrapper.base_layer)
        _ATTACHED.pop(model, None)
        self._on, self._handles, self._scale = (), [], None

    def _omega_hook(self, omega_kwarg: str):
        def pre_hook(model, args, kwargs):
            cak = dict(kwargs.get(omega_kwarg) or {})
            omega = cak.pop("agd_omega", None)
            for key in ("agd_negative", "agd_cache"):
                cak.pop(key, None)
            active = omega is not None and self.enabled
            if active:
                sample = args[0] if args else next(iter(kwargs.values()))
                w = checked_omega(omega, sample.shape[0])
                self._scale = lora_scale(w, self.config.lora_w_ref, allow_zero=self.training)
            self._set_active(active)
            return args, {**kwargs, omega_kwarg: cak or None}
        return pre_hook

    def _set_active(self, active: bool) -> None:
        """LoRA on (this call has ω) or off: the base alone, exactly."""
        for wrapper in self._wrappers.values():
            wrapper._disable_adapters = not active  # peft's switch, without its requires_grad side effect

    def _scaled(self, module, args, out: torch.Tensor) -> torch.Tensor:
        """The LoRA branch times each sample's λ."""
        scale = self._scale.to(out.device, out.dtype)
        if scale.numel() not in (1, out.shape[0]):
            raise ModelError(f"{scale.numel()} guidance scales for a batch of {out.shape[0]}",
                             hint="pass one ω, or one per image")
        return out * scale.view(-1, *([1] * (out.ndim - 1)))

    def check_sites(self) -> None:
        """Raise if a projection was replaced after attaching (the LoRA would not run)."""
        for name, wrapper in self._wrappers.items():
            if self._on and self._on[0].get_submodule(name) is not wrapper:
                raise ModelError(f"module '{name}' was replaced after the LoRA was attached",
                                 hint="attach the LoRA again")

    @contextlib.contextmanager
    def disabled(self):
        """Within this block the base runs exactly as without the LoRA."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def save(self, path, metadata: dict) -> None:
        """A kohya LoRA file with agd's metadata (lora_file.py)."""
        save_lora(self.state_dict(), self.config, self.signature(), path, metadata, self.kohya)


def build_adapters(cfg: AdapterConfig, model: nn.Module, sites_of, cond_spec: dict):
    """Fresh adapters of `cfg.kind` for `model`: a LoraSet, else an AdapterSet on its sites."""
    if cfg.kind == LORA:
        return LoraSet(cfg, model)
    return AdapterSet(cfg, sites_of(cfg.kind), cond_spec)
