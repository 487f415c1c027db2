"""Classifier-free guidance math: the one place it is written down."""

from __future__ import annotations

import torch


def as_omega(omega: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Guidance scale(s) as a (B,) float tensor on `like`'s device."""
    w = torch.as_tensor(omega, dtype=torch.float32, device=like.device)
    if w.ndim == 0:
        w = w.expand(batch)
    if w.shape != (batch,):
        raise ValueError(f"omega has shape {tuple(w.shape)}, expected ({batch},)")
    return w


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor,
                omega: float | torch.Tensor) -> torch.Tensor:
    """CFG: out = uncond + ω·(cond − uncond), per sample ω (Ho & Salimans 2022, eq. 6).

    Works in any linear parametrisation of the model output (ε or v). ω = 1 gives `cond`.
    """
    w = as_omega(omega, cond.shape[0], cond).to(cond.dtype)
    w = w.view(-1, *([1] * (cond.ndim - 1)))
    return uncond + w * (cond - uncond)
