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


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped (B, 1, …) to broadcast over `like`'s (B, …) samples."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor,
                omega: float | torch.Tensor) -> torch.Tensor:
    """CFG: out = uncond + ω·(cond − uncond), per sample ω (Ho & Salimans 2022, eq. 6).

    Works in any linear parametrisation of the model output (ε or v). ω = 1 gives `cond`.
    """
    w = as_omega(omega, cond.shape[0], cond).to(cond.dtype)
    w = per_sample(w, cond)
    return uncond + w * (cond - uncond)


def swapped_roles(guided: torch.Tensor, cond: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """CFG's output with prompt and negative swapped, from the guided output ε̃ = ε_n + ω·(ε_c −
    ε_n) and the prompt's ε_c at the same x: ε_c + ω·(ε_n − ε_c) = ε_c − ω·(ε̃ − ε_c)/(ω − 1).
    `omega` (B,) must stay away from 1 (the difference is divided by ω − 1)."""
    w = per_sample(omega.to(guided), guided)
    difference = (guided - cond) / (w - 1)  # ε_c − ε_n
    return cond - w * difference
