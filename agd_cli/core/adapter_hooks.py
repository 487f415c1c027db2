"""How adapters hang on a frozen base without editing it: forward hooks on the attention
modules (`AttentionHook`), the per-run cache of what stays fixed over a sampling run
(`ContextCache`), ω checked once outside any graph (`checked_omega`), adapters that follow their
model's `.to()` (`FollowModel`) and the registry of what is attached where."""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from agd_cli.core.adapter_layers import (
    AgdContext,
)
from agd_cli.core.negative_attention import QueryCatcher, negative_signal
from agd_cli.infra.errors import InputError

ATTENTION_TYPES = (Attention, AttentionModuleMixin)  # the modules cross_attention_kwargs reach


class AttentionHook:
    """The forward hooks on one attention module: `before` takes the per-call context out of the
    module's kwargs (no processor ever sees it), `after` adds gain·adapter(input) to its output.

    Hooking the module rather than wrapping its processor means whatever processor is set later
    (set_attn_processor, fused QKV, xformers, IP-Adapter) runs inside, adapters still on top.
    `pending` lives from one call's `before` to the same call's `after` (always run, even when
    the forward raises); calls of one attention module never nest. `fallback` supplies the
    per-call context for models whose forward does not hand attention kwargs down to their
    blocks (Sana). Adapters with `negative_map` (negative_attention) also get the base's own
    output for the negative at this site (core.negative_attention), the query caught from the
    module's `to_q` by `catcher`."""

    def __init__(self, adapter: nn.Module | None,
                 fallback: Callable[[], AgdContext | None] | None = None):
        self.adapter = adapter
        self.fallback = fallback
        self.pending: AgdContext | None = None
        wants = adapter is not None and getattr(adapter, "negative_map", None) is not None
        self.catcher = QueryCatcher() if wants else None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.pending = kwargs.pop("agd", None)
        if self.catcher is not None:
            self.catcher.take()  # a query left by a call that raised is not this call's
        return args, kwargs

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        agd, self.pending = self.pending, None
        if agd is None and self.fallback is not None:
            agd = self.fallback()
        if agd is None or self.adapter is None:
            return None  # output unchanged
        hidden = args[0] if args else kwargs["hidden_states"]
        main = output[0] if isinstance(output, tuple) else output  # joint attention: (image, text)
        prep = agd.prepared.get(self.adapter) if agd.prepared else None
        extra = {}
        if self.catcher is not None:  # the base's response to the negative, this site
            extra["signal"] = negative_signal(module, hidden, main, agd, self.catcher.take())
        if prep is not None and hidden.ndim == 3:
            main = self.adapter.apply(hidden, agd, prep, main, **extra)
        else:
            delta = agd.gain * self.adapter(hidden.to(agd.tokens.dtype), agd, **extra)
            main = main + delta.to(main.dtype)
        return (main, *output[1:]) if isinstance(output, tuple) else main

    def install(self, module: nn.Module) -> list:
        """Register both hooks on `module` (and the query catcher on its to_q); returns their
        handles."""
        handles = [module.register_forward_pre_hook(self.before, with_kwargs=True),
                   module.register_forward_hook(self.after, with_kwargs=True, always_call=True)]
        if self.catcher is not None:
            handles.append(module.to_q.register_forward_hook(self.catcher))
        return handles


class ContextCache:
    """The adapters' inputs that stay fixed over one sampling run (ω, condition, negative,
    weights), kept for that run: `AdapterSet.context` computes them on the first call and
    reuses them while each input is the same object, unmodified; then only t's share runs per
    step. Given the run's `timesteps`, t's embedding and each block's work on t's token are
    computed for every step at once, and a step only looks them up. Make one per run
    (sampling.sample does); it holds no global state and is used only without autograd
    (training never sees it)."""

    def __init__(self, timesteps: torch.Tensor | None = None):
        self.timesteps = None if timesteps is None else timesteps.detach().float().view(-1)
        self._rows = ({} if timesteps is None else
                      {float(v): i for i, v in enumerate(self.timesteps.tolist())})
        self.key: tuple | None = None
        self.inputs: dict = {}  # held, so that no other object can take an input's id
        self.versions: tuple = ()
        self.constant: AgdContext | None = None
        self.times: torch.Tensor | None = None  # (S, D): t's token at each of the run's timesteps
        self.computed = 0  # how often the constant part was (re)computed
        # the row of the run's timesteps the next call is at, when the sampling loop says so:
        # looking t's value up would wait for the device every step
        self.next_step: int | None = None

    def get(self, key: tuple, inputs: dict) -> AgdContext | None:
        if (self.constant is None or key != self.key or inputs.keys() != self.inputs.keys()
                # tensors by identity (and version, below); plain values (ω as a float) are in
                # the key by value: an equal float need not be the same object
                or any(v is not self.inputs[k] for k, v in inputs.items()
                       if isinstance(v, torch.Tensor))
                or self.versions != _versions(inputs)):
            return None
        return self.constant

    def put(self, key: tuple, inputs: dict, constant: AgdContext,
            times: torch.Tensor | None) -> None:
        self.key, self.inputs, self.versions = key, dict(inputs), _versions(inputs)
        self.constant, self.times = constant, times
        self.computed += 1

    def step_of(self, timestep: torch.Tensor) -> int | None:
        """The row of the run's timestep that every sample of this call is at, if any."""
        step, self.next_step = self.next_step, None
        if self.times is None or not (timestep.numel() == 1 or timestep.stride(0) == 0):
            return None  # no tables, or per-sample timesteps
        return step if step is not None else self._rows.get(float(timestep.view(-1)[0]))


def checked_omega(omega, batch: int) -> torch.Tensor:
    """`agd_omega` as a float tensor of 1 or `batch` values, each finite and > 0 (as the CLI's
    -w): a library caller's bad ω is named here, not as NaN images or a torch error."""
    def bad(why: str) -> InputError:
        return InputError(f"agd_omega must be {why}, got {_shown(omega)}",
                          hint="a guidance scale ω > 0 (typical 2–12), one number or one per "
                               "image: cross_attention_kwargs={'agd_omega': 6.0}")

    if isinstance(omega, bool) or not isinstance(omega, (int, float, torch.Tensor, list, tuple)):
        raise bad("a real number or a tensor of them")
    try:
        w = torch.as_tensor(omega, dtype=torch.float32).view(-1) if not isinstance(
            omega, torch.Tensor) else omega.detach().view(-1)
    except (TypeError, ValueError, RuntimeError):
        raise bad("a real number or a tensor of them") from None
    if w.is_complex() or w.dtype == torch.bool or w.numel() not in (1, batch):
        raise bad(f"one real number or {batch} (one per image)")
    w = w.float()
    # values read on the CPU only, and never inside a compiled graph: on a GPU the check would
    # wait for the device every call (training passes a tensor per step), meta tensors (memory
    # estimates) hold none, and in a graph a value check is a graph break; `agd` checks -w
    # before any model loads, library callers' numbers are checked eagerly here
    if (w.device.type == "cpu" and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(w).all() and (w > 0).all())):
        raise bad("finite and > 0")
    return w


def side_by_side(prepared: list) -> torch.Tensor:
    """One (S, B, Σ) table of every prepared adapter's per-step t entries; each adapter's
    `table` becomes a view of its columns, so that a compiled call picks every adapter's entries
    for its step with one index (AgdContext.row) and an eager one copies from the views."""
    steps, batch = prepared[0].table.shape[:2]
    table = torch.cat([p.table.reshape(steps, batch, -1) for p in prepared], dim=-1)
    start = 0
    for p in prepared:
        width = p.table[0, 0].numel()
        p.columns = (start, start + width, tuple(p.table.shape[2:]))
        p.table = table[..., start:start + width].view(p.table.shape)
        start += width
    return table


def _shown(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {value.tolist() if value.numel() <= 8 else tuple(value.shape)}"
    return repr(value)


def _versions(inputs: dict) -> tuple:
    """In-place changes bump a tensor's version: a cached input changed in place is a miss."""
    return tuple(v._version if isinstance(v, torch.Tensor) else None for v in inputs.values())


def _follow_apply(model: nn.Module, fn, *args, **kwargs):
    """The model's `_apply` (what `.to()`, `.half()`, `.cuda()` call), then the same on the agd
    adapters attached to it: they move and cast with their model."""
    out = type(model)._apply(model, fn, *args, **kwargs)
    adapters = attached_adapters(model)
    if adapters is not None:
        adapters._apply(fn, *args, **kwargs)
    return out


class FollowModel:
    """Makes an attached AdapterSet follow its model's device and dtype: `model.to(...)`, a
    pipeline's `.to(...)` and accelerate's offload hooks all go through the model's `_apply`,
    which this overrides on the model instance (a bound method: a deep copy of the model gets
    its own, and adapters are looked up in the registry, so the copy carries none). The adapters
    stay out of the model's submodules: its state_dict and saved files remain the base's."""

    def __init__(self, model: nn.Module):
        self.model = weakref.ref(model)
        model._apply = types.MethodType(_follow_apply, model)

    def remove(self) -> None:
        model = self.model()
        own = None if model is None else model.__dict__.get("_apply")
        if getattr(own, "__func__", None) is _follow_apply:
            del model.__dict__["_apply"]


@dataclass
class Attachment:
    """Where an AdapterSet is attached: the model, each site's attention module, the hooks."""

    model: nn.Module
    modules: dict[str, nn.Module]
    handles: list


# model -> its AdapterSet, both weakly held: the model's hooks keep the AdapterSet alive, and a
# deleted model frees both (a strong value would keep its key, the model, alive for ever)
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def attached_adapters(model: nn.Module) -> nn.Module | None:
    """The AdapterSet (core.adapters) whose hooks drive `model`, if any."""
    ref = _ATTACHED.get(model)
    return None if ref is None else ref()


def site_key(name: str) -> str:
    """Module names with dots are not valid ModuleDict keys."""
    return name.replace(".", "__")
