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
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from agd_cli.adapter_file import AdapterFile, adapter_metadata, read_adapter_file  # noqa: F401
from agd_cli.errors import ModelError
from agd_cli.presets import AdapterConfig


@dataclass(frozen=True)
class Site:
    """An attention module that gets an adapter: its dotted name and output width."""

    name: str
    dim: int


@dataclass
class AgdContext:
    """Per-call adapter inputs: context tokens (B, n, D), a pooled vector (B, D), and the gain
    (B, 1, 1) every adapter output is multiplied by. In a cached sampling run (ContextCache)
    `prepared` maps each cross-attention adapter to its run-constant inputs (`prepare`), and
    `step` picks this call's timestep in their tables."""

    tokens: torch.Tensor
    vector: torch.Tensor
    gain: torch.Tensor
    prepared: dict | None = None
    step: int | None = None  # this call's row in the run's per-timestep tables (cached runs)


class OmegaEmbedding(nn.Module):
    """Smooth embedding of ω: sin/cos at low, fixed frequencies plus log ω, then an MLP.

    The official code used Fourier(1000·ω) with N(0,1) frequencies — effectively a hash of ω.
    Frequencies here span 0.05–2 rad per unit ω, so nearby ω give nearby embeddings.
    """

    def __init__(self, dim: int, n_freq: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(math.log10(0.05), math.log10(2.0), n_freq),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq + 2, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, omega: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, D)
        w = omega.float()[:, None]
        ang = w * self.freqs[None, :]
        feats = torch.cat([ang.sin(), ang.cos(), w.clamp_min(1e-3).log(), w / 10], dim=1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class SharedConditioning(nn.Module):
    """The one (ω, t, condition) embedding per model, shared by all blocks."""

    def __init__(self, cfg: AdapterConfig, cond_spec: dict):
        super().__init__()
        d = cfg.context_dim
        self.inputs = set(cfg.inputs)
        self.kind = cfg.kind
        self.omega_gain = cfg.omega_gain
        self.omega_range = tuple(cfg.omega_range) if cfg.omega_range is not None else None
        self.omega = OmegaEmbedding(d)
        self.time_proj = Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time = TimestepEmbedding(128, d)
        # only the condition parts this adapter kind reads, so every parameter gets a gradient
        use_cond = "condition" in self.inputs
        tokens = use_cond and bool(cond_spec.get("token_dim"))
        pooled = use_cond and bool(cond_spec.get("pooled_dim")) and cfg.kind == "offset"
        classes = use_cond and bool(cond_spec.get("num_classes"))
        self.token_proj = nn.Linear(cond_spec["token_dim"], d) if tokens and not pooled else None
        self.pooled_proj = nn.Linear(cond_spec["pooled_dim"], d) if pooled else None
        self.class_emb = nn.Embedding(cond_spec["num_classes"] + 1, d) if classes else None
        # the negative condition: the same projections, then a map of its own (initialised to
        # −I, the sign it has in CFG's ε_c − ε_neg: a shared projection plus a type embedding
        # alone could not subtract inside the softmax average) and a type embedding
        negatives = cfg.negatives and use_cond
        self.negative_proj = nn.Linear(d, d, bias=False) if negatives else None
        self.negative_type = nn.Parameter(torch.zeros(d)) if negatives else None

    def _cond_vector(self, cond: dict, batch: int, like: torch.Tensor) -> torch.Tensor:
        if self.class_emb is not None and cond.get("class_labels") is not None:
            return self.class_emb(cond["class_labels"].long().view(batch))
        if self.pooled_proj is not None and cond.get("pooled") is not None:
            return self.pooled_proj(cond["pooled"].to(like.dtype))
        if self.token_proj is not None and cond.get("tokens") is not None:
            return self.token_proj(cond["tokens"].to(like.dtype)).mean(dim=1)
        return torch.zeros_like(like)

    @property
    def wants_negative(self) -> bool:
        """Trained with negatives: every call needs the unconditional branch's condition."""
        return self.negative_proj is not None

    def _negative_parts(self, negative: dict | None, batch: int, like: torch.Tensor):
        """(context tokens (B, n, D), vector (B, D)) of the negative condition."""
        if negative is None:
            raise ModelError("these adapters were trained with negative prompts and need CFG's "
                             "unconditional condition with every call (agd_negative)",
                             hint="pass the negative (or the empty prompt's / null class's) "
                                  "condition, as agd generate and agd_cli.api do")
        mark = lambda x: self.negative_proj(x) + self.negative_type  # noqa: E731
        vec = self._cond_vector(negative, batch, like)
        if self.kind == "offset":
            return None, mark(vec)
        if self.token_proj is not None and negative.get("tokens") is not None:
            return mark(self.token_proj(negative["tokens"].to(like.dtype))), torch.zeros_like(like)
        return mark(vec)[:, None], torch.zeros_like(like)

    TIME_TOKEN = 1  # context tokens: [ω, t, condition..., negative...]; only t changes per step

    def forward(self, omega: torch.Tensor, timestep: torch.Tensor, cond: dict,
                negative: dict | None = None) -> AgdContext:
        return self.with_time(self.constant(omega, cond, negative), timestep)

    def constant(self, omega: torch.Tensor, cond: dict, negative: dict | None = None) -> AgdContext:
        """The context without t: tokens [ω, condition..., negative...], vector ω + condition,
        gain. Fixed over a sampling run, so a ContextCache computes it once per run."""
        batch = omega.shape[0]
        # beyond the trained range the embedding's features would be unseen (agd collapsed at
        # ω 10 of a 1–6 range): it sees the nearest trained ω, the gain below carries the rest
        seen = omega.float().clamp(*self.omega_range) if self.omega_range else omega
        w = self.omega(seen)  # (B, D)
        zeros = torch.zeros_like(w)
        w = w if "omega" in self.inputs else zeros
        c_vec = self._cond_vector(cond, batch, w) if "condition" in self.inputs else zeros
        parts = [w[:, None]]
        if "condition" in self.inputs and self.token_proj is not None and cond.get("tokens") is not None:
            parts.append(self.token_proj(cond["tokens"].to(w.dtype)))  # (B, L, D)
        else:
            parts.append(c_vec[:, None])
        if self.wants_negative:
            neg_tokens, neg_vec = self._negative_parts(negative, batch, w)
            parts += [neg_tokens] if neg_tokens is not None else []
            c_vec = c_vec + neg_vec
        # CFG's correction is (ω − 1)·(ε_c − ε_u): scaling the adapters by (ω − 1) makes agd at
        # ω = 1 exactly the conditional base, as CFG is, and lets them learn the difference term
        gain = (omega.float() - 1.0) if self.omega_gain else torch.ones_like(omega.float())
        return AgdContext(tokens=torch.cat(parts, dim=1), vector=w + c_vec,
                          gain=gain.to(w.dtype).view(batch, 1, 1))

    def time_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        """t's context token (N,) -> (N, D); zeros when the adapters do not read t."""
        dtype = next(self.time.parameters()).dtype
        t = self.time(self.time_proj(timestep.float().view(-1)).to(dtype))
        return t if "timestep" in self.inputs else torch.zeros_like(t)

    def with_time(self, const: AgdContext, timestep: torch.Tensor | None = None,
                  t: torch.Tensor | None = None, step: int | None = None) -> AgdContext:
        """The full per-call context: `const` with t's embedding (or `t`, (B, D)) inserted as
        token TIME_TOKEN."""
        tokens = const.tokens
        if t is None:
            t = self.time_embedding(timestep.view(-1).expand(tokens.shape[0])).to(tokens.dtype)
        i = self.TIME_TOKEN
        return AgdContext(tokens=torch.cat([tokens[:, :i], t[:, None], tokens[:, i:]], dim=1),
                          vector=const.vector + t, gain=const.gain, prepared=const.prepared,
                          step=step)


@dataclass
class PreparedAttention:
    """A cross-attention adapter's work on the context tokens that stay fixed over a sampling
    run (all but t's), done once per run. `folded`: the query and output maps are folded into
    the keys and values (scores = hidden·M, output = softmax·VW), which costs fewer FLOPs when
    the block is narrow (heads·L·C < hidden·(C + L)); otherwise plain keys and values."""

    folded: bool
    keys: torch.Tensor    # K (B, Lc, h) | M = Wq_hᵀ·K_hᵀ/√d (B, C, H, Lc)
    values: torch.Tensor  # gain·V (B, Lc, h) | gain·(V_h·Wo_hᵀ + b/H) (B, H, Lc, C)
    bias: torch.Tensor    # gain·b (B, 1, C) | gain·b/H (B, 1, 1, C)
    t_keys: torch.Tensor     # t's embedding -> its key: Wk (h, D) | its column of M (C·H, D)
    t_values: torch.Tensor   # t's embedding -> its value: Wv (h, D) | its rows of VW (H·C, D)
    key_table: torch.Tensor | None = None    # t_keys applied to every timestep of the run (S, ·)
    value_table: torch.Tensor | None = None  # t_values likewise

    def tabulate(self, times: torch.Tensor) -> None:
        """Apply the t maps to the embeddings (S, D) of all the run's timesteps at once."""
        self.key_table, self.value_table = times @ self.t_keys.T, times @ self.t_values.T

    def time_parts(self, ctx: AgdContext) -> tuple[torch.Tensor, torch.Tensor]:
        """t's key and (ungained) value for this call, (B or 1, ·), from the tables if it can."""
        if ctx.step is not None and self.key_table is not None:
            return self.key_table[ctx.step][None], self.value_table[ctx.step][None]
        t = ctx.tokens[:, SharedConditioning.TIME_TOKEN]  # (B, D)
        return F.linear(t, self.t_keys), F.linear(t, self.t_values)


class CrossAttentionAdapter(nn.Module):
    """Block tokens (queries) attend to the context tokens [ω, t, prompt]; residual output."""

    def __init__(self, dim: int, cfg: AdapterConfig):
        super().__init__()
        h = cfg.hidden_dim
        self.heads = cfg.heads
        self.q = nn.Linear(dim, h, bias=False)
        self.k = nn.Linear(cfg.context_dim, h, bias=False)
        self.v = nn.Linear(cfg.context_dim, h, bias=False)
        self.out = nn.Linear(h, dim)

    def forward(self, hidden: torch.Tensor, ctx: AgdContext) -> torch.Tensor:
        b, n, _ = hidden.shape  # (B, N, C)
        split = lambda x: x.view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(hidden)), split(self.k(ctx.tokens)), split(self.v(ctx.tokens))
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, h/heads)
        return self.out(a.transpose(1, 2).reshape(b, n, -1))

    # --- a sampling run: the constant tokens' work once, then only t's token per step ---------
    def prepare(self, tokens: torch.Tensor, gain: torch.Tensor) -> PreparedAttention:
        """The run-constant part for constant context `tokens` (B, Lc, D) and `gain` (B, 1, 1);
        key/value slot 0 is left for t's token, written by every step (`apply`)."""
        heads, (dim, h) = self.heads, self.out.weight.shape
        d, length = h // heads, tokens.shape[1] + 1  # + t's token
        slot = lambda y, axis: torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y], axis)  # noqa: E731
        k, v = self.k(tokens), self.v(tokens)  # (B, Lc, h)
        if heads * length * dim >= h * (dim + length):
            return PreparedAttention(False, slot(k, 1), slot(gain * v, 1), gain * self.out.bias,
                                     self.k.weight, self.v.weight)
        wq = self.q.weight.view(heads, d, dim)  # (H, d, C)
        wo = self.out.weight.view(dim, heads, d)  # (C, H, d)
        kh, vh = k.view(*k.shape[:2], heads, d), v.view(*v.shape[:2], heads, d)
        scale = d ** -0.5
        g = gain[..., None]  # (B, 1, 1, 1)
        per_head_bias = self.out.bias / heads  # softmax rows sum to 1 per head: H·(b/H) = b
        return PreparedAttention(
            True, slot(torch.einsum("hdc,blhd->bchl", wq, kh) * scale, 3),
            slot(g * (torch.einsum("blhd,chd->bhlc", vh, wo) + per_head_bias), 2),
            g * per_head_bias,
            torch.einsum("hdc,hde->che", wq, self.k.weight.view(heads, d, -1)).reshape(dim * heads, -1) * scale,
            torch.einsum("chd,hde->hce", wo, self.v.weight.view(heads, d, -1)).reshape(heads * dim, -1))

    def apply(self, hidden: torch.Tensor, ctx: AgdContext, prep: PreparedAttention,
              residual: torch.Tensor) -> torch.Tensor:
        """residual + gain·adapter(hidden), from `prep` and this call's t token: equal to the
        forward within float rounding. Writes t's key and value into `prep`'s slot 0 (the run's
        own buffers, used without autograd) instead of concatenating per step."""
        x = hidden.to(prep.values.dtype)
        b, n, dim = x.shape[0], x.shape[1], self.out.out_features
        key_t, value_t = prep.time_parts(ctx)
        keys, values = prep.keys, prep.values
        if not prep.folded:
            keys[:, 0] = key_t
            values[:, 0] = ctx.gain[:, 0] * value_t
            split = lambda y: y.view(b, -1, self.heads, y.shape[-1] // self.heads).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(split(self.q(x)), split(keys), split(values))
            delta = F.linear(a.transpose(1, 2).reshape(b, n, -1), self.out.weight) + prep.bias
            return residual + delta.to(residual.dtype)
        keys[..., 0] = key_t.view(-1, dim, self.heads)
        values[:, :, :1] = torch.addcmul(prep.bias, value_t.view(-1, self.heads, 1, dim),
                                         ctx.gain[..., None])
        scores = torch.bmm(x, keys.view(b, dim, -1)).view(b, n, self.heads, -1)  # (B, N, H, L)
        attn = scores.softmax(-1, dtype=torch.float32).to(x.dtype).view(b, n, -1)
        if residual.dtype == x.dtype and residual.shape == (b, n, dim):
            return torch.baddbmm(residual, attn, values.view(b, -1, dim))
        return residual + torch.bmm(attn, values.view(b, -1, dim)).to(residual.dtype)


class OffsetAdapter(nn.Module):
    """A per-block vector from the shared (ω, t, condition) embedding (paper: best for DiT)."""

    def __init__(self, dim: int, cfg: AdapterConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.context_dim, cfg.hidden_dim), nn.SiLU(),
                                 nn.Linear(cfg.hidden_dim, dim))

    def forward(self, hidden: torch.Tensor, ctx: AgdContext) -> torch.Tensor:
        return self.net(ctx.vector)[:, None, :]  # (B, 1, C), broadcast over tokens


ADAPTER_CLASSES = {"cross_attention": CrossAttentionAdapter, "offset": OffsetAdapter}


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

    def get(self, key: tuple, inputs: dict) -> AgdContext | None:
        if (self.constant is None or key != self.key or inputs.keys() != self.inputs.keys()
                or any(v is not self.inputs[k] for k, v in inputs.items())
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
        if self.times is None or not (timestep.numel() == 1 or timestep.stride(0) == 0):
            return None  # no tables, or per-sample timesteps
        return self._rows.get(float(timestep.view(-1)[0]))


def _versions(inputs: dict) -> tuple:
    """In-place changes bump a tensor's version: a cached input changed in place is a miss."""
    return tuple(v._version if isinstance(v, torch.Tensor) else None for v in inputs.values())


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
        w = torch.as_tensor(omega, dtype=torch.float32, device=device).view(-1).expand(batch)
        if negative is not None:  # one row serves the whole batch
            negative = {k: v.to(p.device).expand(batch, *v.shape[1:]) if v.shape[0] == 1
                        else v.to(p.device) for k, v in negative.items() if v is not None}
        return w.to(p.device), negative

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
            const.prepared = {block: block.prepare(const.tokens, const.gain)
                              for block in self.blocks.values()
                              if isinstance(block, CrossAttentionAdapter)}
            times = None
            if cache.timesteps is not None:  # t's token and each block's t work, all steps at once
                times = self.shared.time_embedding(cache.timesteps.to(p.device)).to(const.tokens.dtype)
                for prep in const.prepared.values():
                    prep.tabulate(times)
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
            ctx = None
            if omega is not None and self.enabled:
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
        its adapter would be dropped silently."""
        if self._attached is None:
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
        from agd_cli import __version__
        from agd_cli.io import atomic_path, save_tensors, tensors_sha256

        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        meta.update(agd_version=__version__, adapter_config=json.dumps(self.config.to_dict()),
                    signature=self.signature(), sites=json.dumps([[s.name, s.dim] for s in self.sites]),
                    cond_spec=json.dumps(self.cond_spec), format="agd-adapter/1")
        state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in self.state_dict().items()}
        meta["tensors_sha256"] = tensors_sha256(state)  # verified on load
        with atomic_path(path) as tmp:
            save_tensors(state, tmp, metadata=meta)
