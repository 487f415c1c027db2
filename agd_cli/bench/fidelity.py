"""The negative fidelity gap (`agd bench --negatives`): how much less faithfully agd reproduces
CFG + negative than it reproduces CFG without one, on the same seeds and prompts.

Per seed i: PSNR (and SSIM) of agd + negative against CFG + negative, and of agd against CFG
(no negative on either). The gap is mean(agd vs CFG) − mean(agd + negative vs CFG + negative),
in dB (SSIM: in its own units), with a 95 % paired bootstrap interval (both resampled with the
same seeds). 0: the adapters follow the negative as faithfully as the prompt; positive: less.
"""

from __future__ import annotations

import torch
from rich.table import Table

from agd_cli.evaluation.metrics import psnr, ssim
from agd_cli.evaluation.stats import bootstrap_ci
from agd_cli.infra.ui import console

METRICS = {"psnr": psnr, "ssim": ssim}
UNITS = {"psnr": "dB", "ssim": ""}


def agreement(images: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR and SSIM of two batches in the model range [-1, 1], as [0, 1] images."""
    a, b = (images + 1) / 2, (reference + 1) / 2
    return {name: metric(a, b).double() for name, metric in METRICS.items()}


def fidelity_gap(with_negative: dict, without: dict) -> dict:
    """The gap from per-seed agreements (`agreement`) of agd + negative vs CFG + negative and of
    agd vs CFG: both means, their difference (without − with) and its paired 95 % interval."""
    out = {}
    for name in METRICS:
        a, b = without[name], with_negative[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: {len(a)} seeds without the negative, {len(b)} with it")
        gap = lambda i, a=a, b=b: float((a[i] - b[i]).mean())  # noqa: E731
        out[f"{name}_with_negative"] = float(b.mean())
        out[f"{name}_without_negative"] = float(a.mean())
        out[f"{name}_gap"] = gap(slice(None))
        out[f"{name}_gap_ci95"] = bootstrap_ci(len(a), gap)
    return out


def print_fidelity_table(sets: dict[str, dict]) -> None:
    """One row per case set and ω: agreement with and without the negative, and the gap."""
    t = Table(title="negative fidelity gap: agd vs CFG (no negative) minus agd + negative vs "
                    "CFG + negative, same seeds; 95 % paired bootstrap intervals",
              caption="0: agd follows the negative as faithfully as the prompt")
    for col in ("case set", "ω", "PSNR + neg", "PSNR no neg", "PSNR gap", "SSIM + neg",
                "SSIM no neg", "SSIM gap"):
        t.add_column(col, justify="left" if col == "case set" else "right")
    for label, q in sets.items():
        for w, rows in q["by_omega"].items():
            f = rows["agd-negative"]["fidelity"]
            cells = []
            for name in METRICS:
                lo, hi = f[f"{name}_gap_ci95"]
                digits = 2 if name == "psnr" else 3
                unit = f" {UNITS[name]}" if UNITS[name] else ""
                cells += [f"{f[name + '_with_negative']:.{digits}f}",
                          f"{f[name + '_without_negative']:.{digits}f}",
                          f"{f[name + '_gap']:+.{digits}f}{unit} [{lo:+.{digits}f}, {hi:+.{digits}f}]"]
            t.add_row(label, w, *cells)
    console().print(t)
