"""The base's own response to the negative at a cross-attention site (`AdapterConfig.
negative_attention`): the frozen attention module's output for the negative's keys and values,
with the query of the prompt's call, minus that call's output. A cheap, exact signal of what
CFG's unconditional branch sees at the site, inside the one pass: one small attention per site.

  * the query: the output of the module's own `to_q` on this call's hidden states, caught by a
    forward hook on `to_q` (`QueryCatcher`), so it is not computed twice; recomputed only when a
    processor did not call `to_q`;
  * the keys and values: the negative's encoder states through the module's own `to_k`/`to_v`
    (and its `norm_cross`/`norm_k`), once per sampling run in a cached eager run (held in the
    run's context, `AgdContext.negative_kv`), per call in training and inside a compiled graph
    (a graph that fills a dict would not replay); the same numbers either way;
  * the output: as diffusers' attention processors make it (SDPA, to_out, residual, rescale).

The adapter maps the difference (negative − prompt, (B, N, C)) into its attention output
(`CrossAttentionAdapter.negative_map`), scaled by the same (ω − 1) gain as the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agd_cli.infra.errors import ModelError


class QueryCatcher:
    """A forward hook on an attention module's `to_q` that keeps this call's query."""

    def __init__(self):
        self.query: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.query = output

    def take(self) -> torch.Tensor | None:
        query, self.query = self.query, None
        return query


def _heads(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, L, H·d) -> (B, H, L, d) with the module's heads."""
    return x.view(x.shape[0], -1, module.heads, x.shape[-1] // module.heads).transpose(1, 2)


def negative_keys_values(module: nn.Module, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative's keys and values at `module`, per head (B, H, L, d), as its processor makes
    them from encoder states (B, L, D)."""
    if states.shape[-1] != module.to_k.in_features:
        raise ModelError(f"the negative's encoder states are {states.shape[-1]} wide; attention "
                         f"module {type(module).__name__} takes {module.to_k.in_features}",
                         hint="adapters with negative_attention need the base's own text "
                              "encoder states for the negative (agd_negative's 'tokens')")
    dtype = module.to_k.weight.dtype
    states = states.to(dtype)
    if getattr(module, "norm_cross", None):
        states = module.norm_encoder_hidden_states(states)
    key, value = _heads(module, module.to_k(states)), _heads(module, module.to_v(states))
    if getattr(module, "norm_k", None) is not None:
        key = module.norm_k(key)
    return key, value


def base_response(module: nn.Module, hidden: torch.Tensor, query: torch.Tensor | None,
                  key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The module's output (B, N, C) for `hidden` (B, N, C) attending to (key, value); `query`:
    its to_q output on `hidden` when the prompt's call made one."""
    if getattr(module, "group_norm", None) is not None or getattr(module, "spatial_norm", None) is not None:
        raise ModelError(f"negative_attention does not support {type(module).__name__} with a "
                         "group or spatial norm", hint="train adapters without negative_attention")
    if query is None or query.shape[:-1] != hidden.shape[:-1]:
        query = module.to_q(hidden.to(module.to_q.weight.dtype))
    q = _heads(module, query)
    if getattr(module, "norm_q", None) is not None:
        q = module.norm_q(q)
    a = F.scaled_dot_product_attention(q, key.to(q.dtype), value.to(q.dtype))
    out = module.to_out[0](a.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1))
    if len(module.to_out) > 1:
        out = module.to_out[1](out)  # dropout (off in eval; the base is frozen, p 0 in SD)
    if getattr(module, "residual_connection", False):
        out = out + hidden.to(out.dtype)
    return out / getattr(module, "rescale_output_factor", 1.0)


def negative_signal(module: nn.Module, hidden: torch.Tensor, main: torch.Tensor, ctx,
                    query: torch.Tensor | None) -> torch.Tensor:
    """The base's output for the negative minus its output for the prompt (`main`), (B, N, C):
    the site's share of CFG's ε_neg − ε_c. K/V from the run's cache where there is one."""
    if ctx.negative_states is None:
        raise ModelError("these adapters read the base's response to the negative "
                         "(negative_attention) and need the negative's encoder states",
                         hint="pass the negative (or the empty prompt's) condition as "
                              "agd_negative, as agd generate and agd_cli.api do")
    cache = ctx.negative_kv if not torch.compiler.is_compiling() else None
    kv = cache.get(module) if cache is not None else None
    if kv is None:
        with torch.no_grad():  # the base is frozen and the negative is data: constants
            kv = negative_keys_values(module, ctx.negative_states)
        if cache is not None:
            cache[module] = kv
    return base_response(module, hidden, query, *kv).to(main.dtype) - main
