"""The training loss curve as a PNG drawn with Pillow (no matplotlib dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from agd_cli.infra.images import _font, save_png

SIZE = (860, 500)
MARGIN = (78, 40, 24, 56)  # left, top, right, bottom
COLORS = {"train": (160, 190, 230), "smooth": (31, 90, 180), "val": (220, 110, 20),
          "base": (120, 120, 120), "grid": (228, 228, 228), "axis": (60, 60, 60)}


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as training dashboards show it)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = max(hi - lo, 1e-12)
    step = 10 ** math.floor(math.log10(span / n))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= n)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


class _Axes:
    """Maps (step, loss) to pixels; y is logarithmic when the losses span over a decade."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float]):
        ys = [y for y in ys if y > 0 and math.isfinite(y)] or [1.0]
        self.log = max(ys) / min(ys) > 10
        f = math.log10 if self.log else float
        self.x0, self.x1 = min(xs), max(max(xs), min(xs) + 1)
        lo, hi = f(min(ys)), f(max(ys))
        pad = 0.05 * (hi - lo or 1)
        self.y0, self.y1 = lo - pad, hi + pad
        self.f = f
        w, h = SIZE
        self.box = (MARGIN[0], MARGIN[1], w - MARGIN[2], h - MARGIN[3])

    def __call__(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        px = left + (x - self.x0) / (self.x1 - self.x0) * (right - left)
        py = bottom - (self.f(max(y, 1e-30)) - self.y0) / (self.y1 - self.y0) * (bottom - top)
        return px, py

    def yticks(self) -> list[float]:
        """Decades on a log axis, round numbers on a linear one."""
        if self.log:
            return [10.0 ** e for e in range(math.floor(self.y0), math.ceil(self.y1) + 1)
                    if self.y0 <= e <= self.y1] or [10 ** self.y0]
        return _nice_ticks(self.y0, self.y1)


def _frame(draw: ImageDraw.ImageDraw, ax: _Axes, font, title: str) -> None:
    left, top, right, bottom = ax.box
    for y in ax.yticks():
        py = ax(ax.x0, y)[1]
        draw.line([(left, py), (right, py)], fill=COLORS["grid"])
        draw.text((left - 6, py), f"{y:.3g}", fill=COLORS["axis"], font=font, anchor="rm")
    for x in _nice_ticks(ax.x0, ax.x1, 8):
        px = ax(x, 1)[0]
        draw.line([(px, bottom), (px, bottom + 4)], fill=COLORS["axis"])
        draw.text((px, bottom + 6), f"{x:g}", fill=COLORS["axis"], font=font, anchor="mt")
    draw.rectangle(ax.box, outline=COLORS["axis"])
    draw.text(((left + right) / 2, SIZE[1] - 8), "optimizer step", fill=COLORS["axis"],
              font=font, anchor="mb")
    draw.text((8, top - 24), "L2 loss vs CFG target" + (" (log scale)" if ax.log else ""),
              fill=COLORS["axis"], font=font)
    draw.text(((left + right) / 2, 8), title, fill="black", font=font, anchor="mt")


def _dashed(draw, a, b, color, dash: int = 8) -> None:
    (x0, y0), (x1, _) = a, b
    x = x0
    while x < x1:
        draw.line([(x, y0), (min(x + dash, x1), y0)], fill=color, width=2)
        x += 2 * dash


def loss_curve(records: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Train loss (raw and smoothed), validation loss and the no-adapter baseline, as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    base = [r["val_loss_no_adapter"] for r in records if r.get("val_loss_no_adapter") is not None]
    points = train + val + [(0, b) for b in base[-1:]]
    if not points:
        raise ValueError("no loss records to plot")
    ax = _Axes([p[0] for p in points], [p[1] for p in points])
    img = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(img)
    font, _ = _font(12)
    _frame(draw, ax, font, title)
    legend = []
    if base:
        y = ax(ax.x0, base[-1])[1]
        _dashed(draw, (ax.box[0], y), (ax.box[2], y), COLORS["base"])
        legend.append(("no adapter (base cond.)", COLORS["base"]))
    if len(train) > 1:
        draw.line([ax(s, v) for s, v in train], fill=COLORS["train"], width=1)
        sm = smooth([v for _, v in train])
        draw.line([ax(s, v) for (s, _), v in zip(train, sm, strict=True)], fill=COLORS["smooth"], width=2)
        legend += [("train", COLORS["train"]), ("train (smoothed)", COLORS["smooth"])]
    if val:
        if len(val) > 1:
            draw.line([ax(s, v) for s, v in val], fill=COLORS["val"], width=2)
        for s, v in val:
            px, py = ax(s, v)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLORS["val"])
        legend.append(("validation", COLORS["val"]))
    for i, (label, color) in enumerate(legend):
        x, y = ax.box[2] - 170, ax.box[1] + 10 + 16 * i
        draw.line([(x, y), (x + 20, y)], fill=color, width=3)
        draw.text((x + 26, y), label, fill="black", font=font, anchor="lm")
    return save_png(img, path, {"agd": "loss curve"})
