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
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from agd_cli import __version__
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.core.adapter_file import AdapterFile, adapter_metadata, read_adapter_file  # noqa: F401
from agd_cli.core.adapter_hooks import (
    _ATTACHED,
    ATTENTION_TYPES,
    Attachment,
    AttentionHook,
    ContextCache,
    FollowModel,
    attached_adapters,
    checked_omega,
    side_by_side,
    site_key,
)
from agd_cli.core.adapter_layers import (
    ADAPTER_CLASSES,
    AgdContext,
    SharedConditioning,
    Site,
)
from agd_cli.infra.errors import ModelError
from agd_cli.infra.io import atomic_path
from agd_cli.infra.tensor_files import save_tensors, tensors_sha256


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
