"""Condition dicts: the encoded prompt of a family (embeddings, masks, pooled vectors, class ids)
as {name: tensor with the batch first}, selected, concatenated and moved as one."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
