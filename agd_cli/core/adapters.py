"""Guidance adapters (AGD, arXiv 2503.07274 §3): small residual modules inside a frozen base.

One shared embedding of (ω, t, condition) per model feeds small per-block adapters:
  * cross_attention: block tokens attend to [ω, t, prompt tokens] (paper: best for SD/SDXL);
  * offset: a vector from (ω, t, class/pooled condition) added after self-attention (DiT).
Adapters trained with negatives (`AdapterConfig.negatives`) also see CFG's unconditional branch:
the negative prompt's tokens, through a learned map and marked by a learned type embedding, join
the cross-attention context; offset adapters add the same map of the negative class / pooled
vector. "No negative" is the empty prompt / null class, as in training (`agd_negative`).
Adapters hang on the base's attention MODULES (forward hooks), not on their processors, so a
processor set later (set_attn_processor, fused QKV, xformers, IP-Adapter) cannot drop them; the
base's modules and weights are never edited. ω travels with each call in
`cross_attention_kwargs["agd_omega"]`; a forward pre-hook turns it into a per-call context that
flows down with the kwargs, so nothing is tied to a batch size and gradient checkpointing
recomputes with the same inputs.

Everything a call runs is tensor arithmetic on that call's inputs, so `torch.compile` captures
the adapters with the base in one graph: ω is read as a tensor (a new value is new data, not a
new graph), values are checked eagerly and never inside a graph, and a compiled sampling run gets
its run-constant part (`agd_constant`, computed eagerly from the run's ContextCache) and its step
(`agd_step`, a tensor indexing the run's per-step table) as tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from agd_cli import __version__
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.core.adapter_file import AdapterFile, adapter_metadata, read_adapter_file  # noqa: F401
from agd_cli.core.adapter_layers import (
    ADAPTER_CLASSES,
    AgdContext,
    SharedConditioning,
    Site,
)
from agd_cli.infra.errors import InputError, ModelError
from agd_cli.infra.io import atomic_path
from agd_cli.infra.tensor_files import save_tensors, tensors_sha256

ATTENTION_TYPES = (Attention, AttentionModuleMixin)  # the modules cross_attention_kwargs reach


class AttentionHook:
    """The forward hooks on one attention module: `before` takes the per-call context out of the
    module's kwargs (no processor ever sees it), `after` adds gain·adapter(input) to its output.

    Hooking the module rather than wrapping its processor means whatever processor is set later
    (set_attn_processor, fused QKV, xformers, IP-Adapter) runs inside, adapters still on top.
    `pending` lives from one call's `before` to the same call's `after` (always run, even when
    the forward raises); calls of one attention module never nest. `fallback` supplies the
    per-call context for models whose forward does not hand attention kwargs down to their
    blocks (Sana)."""

    def __init__(self, adapter: nn.Module | None,
                 fallback: Callable[[], AgdContext | None] | None = None):
        self.adapter = adapter
        self.fallback = fallback
        self.pending: AgdContext | None = None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.pending = kwargs.pop("agd", None)
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
        if prep is not None and hidden.ndim == 3:
            main = self.adapter.apply(hidden, agd, prep, main)
        else:
            delta = agd.gain * self.adapter(hidden.to(agd.tokens.dtype), agd)
            main = main + delta.to(main.dtype)
        return (main, *output[1:]) if isinstance(output, tuple) else main

    def install(self, module: nn.Module) -> list:
        """Register both hooks on `module`; returns their handles."""
        return [module.register_forward_pre_hook(self.before, with_kwargs=True),
                module.register_forward_hook(self.after, with_kwargs=True, always_call=True)]


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
        p.columns = (start, start + width)
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


def attached_adapters(model: nn.Module) -> AdapterSet | None:
    """The AdapterSet whose hooks drive `model`, if any."""
    ref = _ATTACHED.get(model)
    return None if ref is None else ref()


def site_key(name: str) -> str:
    """Module names with dots are not valid ModuleDict keys."""
    return name.replace(".", "__")


class AdapterSet(nn.Module):
    """All adapters of one base model, the shared embedding, and the hooks that drive them."""

    def __init__(self, cfg: AdapterConfig, sites: list[Site], cond_spec: dict):
        super().__init__()
        self.config = cfg
        self.sites = list(sites)
        self.cond_spec = dict(cond_spec)
        self.shared = SharedConditioning(cfg, cond_spec)
        cls = ADAPTER_CLASSES[cfg.kind]
        self.blocks = nn.ModuleDict({site_key(s.name): cls(s.dim, cfg) for s in sites})
        self.enabled = True
        self._attached: Attachment | None = None
        self._call_context: AgdContext | None = None  # this call's context, for unrouted models
        self.reset_parameters()
        # where each parameter lives: a cache key reads them without walking the module tree
        self._param_slots = [(m._parameters, name) for m in self.modules()
                             for name, q in m._parameters.items() if q is not None]

    def reset_parameters(self) -> None:
        """Xavier init (paper: beat zero init); `init = "zero"` zeroes each block's output."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.device.type != "meta":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        neg = self.shared.negative_proj
        if neg is not None and neg.weight.device.type != "meta":
            with torch.no_grad():
                neg.weight.copy_(-torch.eye(self.config.context_dim))
        if self.config.init == "zero":
            for block in self.blocks.values():
                last = block.out if hasattr(block, "out") else block.net[-1]
                nn.init.zeros_(last.weight)

    @property
    def wants_negative(self) -> bool:
        """Trained with negatives: calls pass CFG's unconditional condition in `agd_negative`."""
        return self.shared.wants_negative

    def signature(self) -> str:
        """Identifies the base architecture the adapters fit: sites, widths and condition dims."""
        spec = {"sites": [[s.name, s.dim] for s in self.sites], "cond": self.cond_spec}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def context(self, omega, timestep, cond: dict, batch: int, device,
                negative: dict | None = None, cache: ContextCache | None = None) -> AgdContext:
        """The per-call context from ω, t, the condition the base was called with and (adapters
        trained with negatives) the condition of CFG's unconditional branch. With a `cache`
        (one per sampling run) and no autograd, the part that does not depend on t is reused."""
        p = next(self.parameters())
        t = torch.as_tensor(timestep, device=device).view(-1).expand(batch).to(p.device)
        if cache is not None and not torch.is_grad_enabled():
            const = self._constant(cache, omega, cond, batch, device, negative)
            step = cache.step_of(t)
            if step is None:
                return self.shared.with_time(const, t)
            return self.shared.with_time(const, t=cache.times[step][None].expand(batch, -1),
                                         step=step)
        self.check_sites()
        w, negative = self._inputs(omega, batch, device, negative)
        return self.shared(w, t, cond, negative)

    def _inputs(self, omega, batch: int, device, negative: dict | None):
        p = next(self.parameters())
        w = checked_omega(omega, batch).to(device).view(-1).expand(batch)
        if negative is not None:  # one row serves the whole batch
            negative = {k: v.to(p.device).expand(batch, *v.shape[1:]) if v.shape[0] == 1
                        else v.to(p.device) for k, v in negative.items() if v is not None}
        return w.to(p.device), negative

    def run_constant(self, cache: ContextCache, omega, cond: dict, batch: int, device,
                     negative: dict | None = None) -> AgdContext:
        """The context without t for a compiled call (`agd_constant`), from `cache` while the
        run's inputs stay the same (computed eagerly: a cache lookup is Python, not tensors)."""
        with torch.no_grad():
            return self._constant(cache, omega, cond, batch, device, negative)

    def _constant(self, cache: ContextCache, omega, cond: dict, batch: int, device,
                  negative: dict | None) -> AgdContext:
        """The context without t, from `cache` while ω, condition, negative and weights are the
        same objects, unmodified; else computed, with each block's share (prepare)."""
        p = next(self.parameters())
        inputs = {"omega": omega, **{"cond." + k: v for k, v in cond.items()},
                  **{"negative." + k: v for k, v in (negative or {}).items()}}
        params = [slots[name] for slots, name in self._param_slots]
        key = (batch, str(device), p.device, p.dtype, self.training,
               tuple(map(id, params)), tuple(q._version for q in params),
               tuple((k, v if not isinstance(v, torch.Tensor) else None) for k, v in inputs.items()))
        const = cache.get(key, inputs)
        if const is None:
            self.check_sites()
            w, negative = self._inputs(omega, batch, device, negative)
            const = self.shared.constant(w, cond, negative)
            const.prepared = {block: block.prepare(const) for block in self.blocks.values()}
            times = None
            if cache.timesteps is not None:  # t's token and each block's t work, all steps at once
                times = self.shared.time_embedding(cache.timesteps.to(p.device)).to(const.tokens.dtype)
                for prep in const.prepared.values():
                    prep.tabulate(times)
                const.table = side_by_side(list(const.prepared.values()))
            cache.put(key, inputs, const, times)
        return const

    # --- attaching to a base model -------------------------------------------------------
    def attach(self, model: nn.Module, extract: Callable[[dict], tuple[int, dict]],
               omega_kwarg: str = "cross_attention_kwargs", routed: bool = True) -> None:
        """Hook every attention module of `model` (adapters on the sites) and add the ω pre-hook.

        ω arrives in `model(..., <omega_kwarg>={"agd_omega": ω})`. When the model passes that
        dict on to its attention modules (`routed`), the context travels inside it; otherwise
        the pre-hook keeps this call's context here for the attention hooks to read.
        """
        if self._attached is not None or attached_adapters(model) is not None:
            raise ModelError("an agd adapter is already attached to this model",
                             hint="detach it first (unload_agd_adapter(pipe) or adapters.detach())")
        modules = dict(model.named_modules())
        missing = sorted(s.name for s in self.sites
                         if not isinstance(modules.get(s.name), ATTENTION_TYPES))
        if missing:
            raise ModelError(f"adapter sites not found in the base model: {missing[:3]}",
                             hint="the adapters were built for a different architecture")
        wanted = {s.name for s in self.sites}
        self._call_context = None
        fallback = None if routed else (lambda: self._call_context)
        handles = []
        for name, module in modules.items():
            if isinstance(module, ATTENTION_TYPES):  # every one: each must drop the `agd` kwarg
                adapter = self.blocks[site_key(name)] if name in wanted else None
                handles += AttentionHook(adapter, fallback).install(module)
        hook = self._omega_hook(model, extract, omega_kwarg, routed)
        handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
        handles.append(FollowModel(model))
        self._attached = Attachment(model, {n: modules[n] for n in wanted}, handles)
        _ATTACHED[model] = weakref.ref(self)

    def _omega_hook(self, model: nn.Module, extract: Callable[[dict], tuple[int, dict]],
                    omega_kwarg: str, routed: bool):
        """The model's pre-hook: `<omega_kwarg>["agd_omega"]` -> the per-call context."""
        sig = inspect.signature(model.forward)
        names = list(sig.parameters)
        # positional arguments map to these names without Signature.bind (tens of µs per call)
        plain = [n for n in names if sig.parameters[n].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]

        limit = plain.index(omega_kwarg) if omega_kwarg in plain else len(plain)

        def pre_hook(mod, args, kwargs):
            if len(args) > limit:
                bound = sig.bind(*args, **kwargs)  # ω's dict passed positionally: the slow way
                arguments, args, kwargs = bound.arguments, (), None
            else:
                arguments = {**dict(zip(plain, args, strict=False)), **kwargs}
            cak = dict(arguments.get(omega_kwarg) or {})
            omega = cak.pop("agd_omega", None)
            negative = cak.pop("agd_negative", None)
            cache = cak.pop("agd_cache", None)
            constant = cak.pop("agd_constant", None)  # a compiled run's part without t
            step = cak.pop("agd_step", None)  # its row of the run's table, a tensor (1,)
            ctx = None
            if constant is not None and self.enabled:
                ctx = self.shared.with_time(constant, arguments["timestep"])
                if step is not None:
                    ctx.row = constant.table.index_select(0, step)[0]
            elif omega is not None and self.enabled:
                batch, cond = extract(arguments)
                device = arguments[names[0]].device
                ctx = self.context(omega, arguments["timestep"], cond, batch, device, negative,
                                   cache)
            if routed and ctx is not None:
                cak["agd"] = ctx
            # unrouted models: kept until the next call (checkpointing recomputes with it)
            self._call_context = None if routed else ctx
            if kwargs is None:
                bound.arguments[omega_kwarg] = cak or None
                return bound.args, bound.kwargs
            return args, {**kwargs, omega_kwarg: cak or None}

        return pre_hook

    def check_sites(self) -> None:
        """Raise if an attention module that carries an adapter was replaced after attaching:
        its adapter would be dropped silently. Not inside a compiled graph: there the module
        tree is fixed when the graph is made, and a lookup per site would be a guard per call."""
        if self._attached is None or torch.compiler.is_compiling():
            return
        model = self._attached.model
        for name, module in self._attached.modules.items():
            try:
                current = model.get_submodule(name)
            except AttributeError:
                current = None
            if current is not module:
                raise ModelError(f"attention module '{name}' of {type(model).__name__} was "
                                 "replaced after the agd adapter was attached; its adapter "
                                 "would no longer run",
                                 hint="attach the agd adapter again after changing the model's "
                                      "modules (load_agd_adapter)")

    def detach(self) -> None:
        """Give the base model back exactly as it was."""
        if self._attached is None:
            return
        for handle in self._attached.handles:
            handle.remove()
        _ATTACHED.pop(self._attached.model, None)
        self._attached = self._call_context = None

    @contextlib.contextmanager
    def disabled(self):
        """Within this block the base runs exactly as without adapters."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    # --- files ----------------------------------------------------------------------------
    def save(self, path: str | Path, metadata: dict) -> None:
        """One safetensors file, written atomically, with self-describing metadata."""
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        meta.update(agd_version=__version__, adapter_config=json.dumps(self.config.to_dict()),
                    signature=self.signature(), sites=json.dumps([[s.name, s.dim] for s in self.sites]),
                    cond_spec=json.dumps(self.cond_spec), format="agd-adapter/1")
        state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in self.state_dict().items()}
        meta["tensors_sha256"] = tensors_sha256(state)  # verified on load
        with atomic_path(path) as tmp:
            save_tensors(state, tmp, metadata=meta)
