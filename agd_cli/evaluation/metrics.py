"""Pixel-space agreement metrics (PSNR, SSIM) in plain torch: no downloaded metric weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; JSON has no inf, so cap it


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(a.shape)}")
    return a.detach().double().cpu(), b.detach().double().cpu()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image of two (N, C, H, W) batches, capped at 100."""
    a, b = _check_pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    floor = data_range**2 * 10 ** (-PSNR_CAP_DB / 10)  # the MSE at which PSNR hits the cap
    return (10 * torch.log10(data_range**2 / mse.clamp_min(floor))).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): Gaussian 11x11 window, σ 1.5,
    K1 0.01, K2 0.03, valid region only, mean over pixels and channels.

    Images smaller than the window use the largest odd window that fits (σ scaled with it).
    """
    a, b = _check_pair(a, b)
    n, c, h, w = a.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre
    g = _gaussian_window(size, sigma * size / window)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=c)  # depthwise, 'valid'

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()
