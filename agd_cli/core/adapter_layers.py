"""The adapter layers (AGD, arXiv 2503.07274 §3): the shared (ω, t, condition) embedding and the
per-block adapters it feeds. `agd_cli.core.adapters` attaches them to a base model (hooks, per-run
cache, files); this module holds only the torch modules and the per-call context they read.

  * cross_attention: block tokens attend to [ω, t, prompt tokens] (paper: best for SD/SDXL);
  * offset: a vector from (ω, t, class/pooled condition) added after self-attention (DiT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.infra.errors import ModelError


@dataclass(frozen=True)
class Site:
    """An attention module that gets an adapter: its dotted name and output width."""

    name: str
    dim: int


@dataclass
class AgdContext:
    """Per-call adapter inputs: context tokens (B, n, D), a pooled vector (B, D), and the gain
    (B, 1, 1) every adapter output is multiplied by. In a cached sampling run (ContextCache)
    `prepared` maps each adapter to its run-constant inputs (`prepare`), `table` holds every
    adapter's t entries at each of the run's steps, and `step` (eager) or `row` (compiled: the
    step is a tensor there, not a constant of the graph) picks this call's."""

    tokens: torch.Tensor
    vector: torch.Tensor
    gain: torch.Tensor
    prepared: dict | None = None
    step: int | None = None  # this call's row in the run's per-timestep tables (cached runs)
    table: torch.Tensor | None = None  # (S, B, Σ): the tables of all prepared adapters, side by side
    row: torch.Tensor | None = None    # (B, Σ): this call's row of `table` (compiled calls)
    # negative_attention: the negative's encoder states (B, L, D), its K/V per site (run cache)
    negative_states: torch.Tensor | None = None
    negative_kv: dict | None = None

    def entries(self, prep) -> torch.Tensor | None:
        """The prepared adapter's t entries for this call from `row`, shaped as its table's."""
        if self.row is None or prep.columns is None:
            return None
        start, stop, shape = prep.columns  # plain numbers: a tensor read here is a graph input
        return self.row[:, start:stop].view(self.row.shape[0], *shape)


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
        self.negative_attention = negatives and cfg.negative_attention and cfg.kind == "cross_attention"

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
        if self.kind != "offset" and self.token_proj is not None and negative.get("tokens") is not None:
            return mark(self.token_proj(negative["tokens"].to(like.dtype))), torch.zeros_like(like)
        vec = mark(self._cond_vector(negative, batch, like))  # only where it is used
        return (None, vec) if self.kind == "offset" else (vec[:, None], torch.zeros_like(like))

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
        ctx = AgdContext(tokens=torch.cat(parts, dim=1), vector=w + c_vec,
                         gain=gain.to(w.dtype).view(batch, 1, 1))
        if self.negative_attention:  # the base's own response to it, per site (hooks)
            ctx.negative_states, ctx.negative_kv = negative.get("tokens"), {}
        return ctx

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
                          step=step, table=const.table, negative_states=const.negative_states,
                          negative_kv=const.negative_kv)


@dataclass
class PreparedAttention:
    """A cross-attention adapter's work on the context tokens that stay fixed over a sampling
    run (all but t's), done once per run, held in one buffer whose slot 0 (last-but-one axis
    plain, last axis folded) is t's, so that a step writes t's keys and values with one copy.
    `folded`: the query and output maps are folded into the keys and values (scores = hidden·M,
    output = softmax·VW), which costs fewer FLOPs when the block is narrow (heads·L·C <
    hidden·(C + L)); else plain keys and values [K | gain·V]."""

    folded: bool
    # plain [K | gain·V] (B, L, 2h); folded [M | (gain·(V_h·Wo_hᵀ + b/H))ᵀ] (B, 2, C, H, L),
    # M = Wq_hᵀ·K_hᵀ/√d: the values stored transposed, laid out as the keys
    buffer: torch.Tensor
    bias: torch.Tensor    # gain·b (B, 1, C) | gain·b/H (B, C, 1)
    gain: torch.Tensor    # (B, 1, 1)
    t_keys: torch.Tensor     # t's embedding -> its key: Wk (h, D) | its column of M (C·H, D)
    t_values: torch.Tensor   # t's embedding -> its value: Wv (h, D) | its column of VWᵀ (C·H, D)
    # t's slot-0 entries at every step of the run, gained, as `write_time` stores them:
    # (S, B, 2h) | (S, B, 2, C, H); tens of MB at SDXL's sizes, batch 16. A view of the run's
    # table of all adapters (AgdContext.table), whose `columns` it is
    table: torch.Tensor | None = None
    heads: int = 1
    columns: tuple | None = None  # (start, stop, entry shape): its part of the run's table

    def __post_init__(self) -> None:
        """The views every step reads and writes, made once per run: each view op a step
        skips is one dispatch less, and a GPU at batch 1 waits on dispatch, not arithmetic."""
        self.slot = self.buffer[..., 0] if self.folded else self.buffer[:, 0]
        self.keys, self.values = self._views(self.buffer)

    def _views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values `apply` reads from a buffer: folded (B, C, H·L) and (B, H·L, C),
        plain per head (B, H, L, d) twice."""
        b = buffer.shape[0]
        if self.folded:
            c = buffer.shape[2]
            return buffer[:, 0].view(b, c, -1), buffer[:, 1].view(b, c, -1).transpose(1, 2)
        h = buffer.shape[-1] // 2
        heads = lambda y: y.view(b, -1, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        return heads(buffer[..., :h]), heads(buffer[..., h:])

    def call_keys_values(self, ctx: AgdContext) -> tuple[torch.Tensor, torch.Tensor]:
        """This call's keys and values, t's entries in slot 0. Eagerly t's entries are written
        into the run's buffer (one copy, from the table); inside a compiled graph they are taken
        from the step's row of the run's table (else computed from this call's t token) and
        joined on, the buffer left as it is: a graph that writes its inputs is not replayed as
        a CUDA graph."""
        if not torch.compiler.is_compiling():
            self.write_time(ctx)
            return self.keys, self.values
        entry = ctx.entries(self)  # from the run's table, or from this call's t token
        if entry is None:
            entry = self.time_entries(ctx.tokens[:, SharedConditioning.TIME_TOKEN],
                                      self.gain.view(-1))
        if self.folded:
            return self._views(torch.cat([entry[..., None], self.buffer[..., 1:]], dim=-1))
        return self._views(torch.cat([entry[:, None], self.buffer[:, 1:]], dim=1))

    def time_entries(self, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """t's slot-0 entries for t's embeddings (…, D) and gains g (broadcastable to t's
        leading shape): plain [key | g·value] (…, 2h); folded the key column and the value
        column g·value + g·b/H, (…, 2, C, H)."""
        key, value = t @ self.t_keys.T, t @ self.t_values.T
        lead = torch.broadcast_shapes(key.shape[:-1], g.shape)
        if not self.folded:
            return torch.cat([key.expand(*lead, -1), g[..., None] * value], dim=-1)
        c, heads = self.buffer.shape[2], self.buffer.shape[3]
        key, value = key.view(*key.shape[:-1], c, heads), value.view(*value.shape[:-1], c, heads)
        return torch.stack([key.expand(*lead, c, heads), g[..., None, None] * value + self.bias],
                           dim=-3)

    def tabulate(self, times: torch.Tensor) -> None:
        """t's entries for the embeddings (S, D) of all the run's timesteps at once, (S, B, …)."""
        self.table = self.time_entries(times[:, None], self.gain.view(1, -1))

    def write_time(self, ctx: AgdContext) -> None:
        """Write this call's t entries into slot 0 of the run's buffer (used without autograd):
        from the table when the call is at one of the run's steps."""
        if ctx.step is not None and self.table is not None:
            self.slot.copy_(self.table[ctx.step])
            return
        # per-sample timesteps, or one the run did not tabulate: t's token, per sample
        self.slot.copy_(self.time_entries(ctx.tokens[:, SharedConditioning.TIME_TOKEN],
                                          self.gain.view(-1)))


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
        # negative_attention: the base's (negative − prompt) output here (B, N, C) into `a`,
        # zero at first (no nn.Linear: AdapterSet would initialise it), as if without the lever
        self.negative_map = nn.Parameter(torch.zeros(h, dim)) if (
            cfg.negatives and cfg.negative_attention) else None

    def forward(self, hidden: torch.Tensor, ctx: AgdContext,
                signal: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = hidden.shape  # (B, N, C)
        split = lambda x: x.view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(hidden)), split(self.k(ctx.tokens)), split(self.v(ctx.tokens))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        if signal is not None:
            a = a + F.linear(signal.to(a.dtype), self.negative_map)
        return self.out(a)

    # --- a sampling run: the constant tokens' work once, then only t's token per step ---------
    def prepare(self, const: AgdContext) -> PreparedAttention:
        """The run-constant part for the constant context (tokens (B, Lc, D), gain (B, 1, 1));
        key/value slot 0 is left for t's token, written by every step (`apply`)."""
        tokens, gain = const.tokens, const.gain
        heads, (dim, h) = self.heads, self.out.weight.shape
        d, length = h // heads, tokens.shape[1] + 1  # + t's token
        slot = lambda y, axis: torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y], axis)  # noqa: E731
        k, v = self.k(tokens), self.v(tokens)  # (B, Lc, h)
        if heads * length * dim >= h * (dim + length):
            kv = slot(torch.cat([k, gain * v], dim=-1), 1)
            return PreparedAttention(False, kv, gain * self.out.bias, gain,
                                     self.k.weight, self.v.weight, heads=heads)
        wq = self.q.weight.view(heads, d, dim)  # (H, d, C)
        wo = self.out.weight.view(dim, heads, d)  # (C, H, d)
        kh, vh = k.view(*k.shape[:2], heads, d), v.view(*v.shape[:2], heads, d)
        scale = d ** -0.5
        g = gain[..., None]  # (B, 1, 1, 1)
        per_head_bias = (self.out.bias / heads)[:, None, None]  # softmax rows sum to 1 per head
        m = torch.einsum("hdc,blhd->bchl", wq, kh) * scale  # (B, C, H, Lc)
        vw = g * (torch.einsum("blhd,chd->bchl", vh, wo) + per_head_bias)  # (B, C, H, Lc)
        wv = self.v.weight.view(heads, d, -1)
        return PreparedAttention(
            True, slot(torch.stack([m, vw], dim=1), 4), gain * per_head_bias[..., 0], gain,
            torch.einsum("hdc,hde->che", wq, self.k.weight.view(heads, d, -1)).reshape(dim * heads, -1) * scale,
            torch.einsum("chd,hde->che", wo, wv).reshape(dim * heads, -1), heads=heads)

    def apply(self, hidden: torch.Tensor, ctx: AgdContext, prep: PreparedAttention,
              residual: torch.Tensor, signal: torch.Tensor | None = None) -> torch.Tensor:
        """residual + gain·adapter(hidden), from `prep` and this call's t: equal to the forward
        within float rounding, in as few kernels and views as it can (each costs a dispatch,
        and on a GPU a launch)."""
        if signal is not None:  # the base's response to the negative, through `out` unbiased
            extra = F.linear(F.linear(signal.to(prep.values.dtype), self.negative_map),
                             self.out.weight)
            residual = residual + (prep.gain * extra).to(residual.dtype)
        x = hidden.to(prep.values.dtype)
        b, n, dim = x.shape[0], x.shape[1], self.out.out_features
        keys, values = prep.call_keys_values(ctx)
        fused = residual.dtype == x.dtype and residual.shape == (b, n, dim) and residual.is_contiguous()
        if prep.folded:
            scores = torch.bmm(x, keys).view(b, n, self.heads, -1)  # (B, N, H, L)
            attn = scores.softmax(-1, dtype=torch.float32).to(x.dtype).view(b, n, -1)
            if fused:
                return torch.baddbmm(residual, attn, values)
            return residual + torch.bmm(attn, values).to(residual.dtype)
        h = self.q.out_features
        q = F.linear(x, self.q.weight).view(b, n, self.heads, h // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, keys, values)
        a = a.transpose(1, 2).reshape(b * n, h)
        if fused:  # residual + a·Woᵀ in one kernel, then the gained bias
            out = torch.addmm(residual.view(b * n, dim), a, self.out.weight.T)
            return out.view(b, n, dim).add_(prep.bias)
        delta = F.linear(a, self.out.weight).view(b, n, dim) + prep.bias
        return residual + delta.to(residual.dtype)


class OffsetAdapter(nn.Module):
    """A per-block vector from the shared (ω, t, condition) embedding (paper: best for DiT)."""

    def __init__(self, dim: int, cfg: AdapterConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.context_dim, cfg.hidden_dim), nn.SiLU(),
                                 nn.Linear(cfg.hidden_dim, dim))

    def forward(self, hidden: torch.Tensor, ctx: AgdContext) -> torch.Tensor:
        return self.net(ctx.vector)[:, None, :]  # (B, 1, C), broadcast over tokens

    # --- a sampling run: the offset depends on (ω, t, condition) alone, so each step's offset
    # is computed for the whole run at once and a step adds one row ----------------------------
    def prepare(self, const: AgdContext) -> PreparedOffset:
        return PreparedOffset(self.net, const.vector, const.gain)

    def apply(self, hidden: torch.Tensor, ctx: AgdContext, prep: PreparedOffset,
              residual: torch.Tensor) -> torch.Tensor:
        if ctx.step is not None and prep.table is not None:
            offset = prep.table.select(0, ctx.step)  # (B, 1, C), gained
        else:  # compiled: the step's row of the run's table; else from this call's t
            offset = ctx.entries(prep)
            if offset is None:
                offset = ctx.gain * self(hidden, ctx)
        return residual + offset.to(residual.dtype)


@dataclass
class PreparedOffset:
    """An offset adapter's run: the constant (ω, condition) vector (B, D) and gain (B, 1, 1);
    `tabulate` makes gain·offset for every timestep of the run, (S, B, 1, C)."""

    net: nn.Module
    vector: torch.Tensor
    gain: torch.Tensor
    table: torch.Tensor | None = None
    columns: tuple | None = None  # (start, stop, entry shape): its part of the run's table

    def tabulate(self, times: torch.Tensor) -> None:
        self.table = self.gain[None] * self.net(self.vector[None] + times[:, None])[:, :, None]


ADAPTER_CLASSES = {"cross_attention": CrossAttentionAdapter, "offset": OffsetAdapter}
