"""Images: tensors to PIL, PNG files with text metadata, labelled comparison grids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from agd_cli.infra.io import atomic_path

LABEL_FONT_SIZE = 12
PAD = 4  # pixels between cells and around labels


def to_pil(image) -> Image.Image:
    """One image tensor (C, H, W) in [0, 1] -> PIL: 1 channel gives grayscale ("L"), 3 RGB."""
    x = torch.as_tensor(image).detach().float().cpu()
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image tensor (C, H, W) with C in 1/3/4, got {tuple(x.shape)}")
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr, mode="RGB" if arr.shape[2] == 3 else "RGBA")


def png_metadata(metadata: dict) -> PngInfo:
    """PNG tEXt chunks (iTXt for non-Latin-1 text) from a dict; values become strings."""
    info = PngInfo()
    for key, value in metadata.items():
        text = value if isinstance(value, str) else _text(value)
        try:
            text.encode("latin-1")
            info.add_text(str(key), text)
        except UnicodeEncodeError:  # prompts may hold any character: iTXt is UTF-8
            info.add_itxt(str(key), text)
    return info


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def save_png(image, path: str | Path, metadata: dict | None = None) -> Path:
    """Write a PNG atomically (a PIL image or a (C, H, W) tensor) with text metadata."""
    img = image if isinstance(image, Image.Image) else to_pil(image)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=png_metadata(metadata or {}))
    return path


def read_png_metadata(path: str | Path) -> dict[str, str]:
    """The text metadata of a PNG file (tEXt, zTXt and iTXt chunks)."""
    with Image.open(path) as img:
        img.load()
        return dict(getattr(img, "text", {}) or {})


# Fonts with Greek glyphs (ω) tried first; Pillow's built-in font draws ω as a box
UNICODE_FONTS = ("DejaVuSans.ttf", "Arial Unicode.ttf", "arial.ttf", "LiberationSans-Regular.ttf")
ASCII_FALLBACK = str.maketrans({"ω": "w", "×": "x", "–": "-", "—": "-", "≤": "<=", "≥": ">="})


def _font(size: int = LABEL_FONT_SIZE) -> tuple[ImageFont.ImageFont, bool]:
    """(font, draws non-ASCII): a system font with Greek glyphs if any, else Pillow's own."""
    for name in UNICODE_FONTS:
        try:
            return ImageFont.truetype(name, size), True
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size), False
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default(), False


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def make_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] | None = None,
              col_labels: Sequence[str] | None = None, pad: int = PAD,
              background: str = "white") -> Image.Image:
    """A labelled grid: rows of PIL images, a label left of each row and above each column.

    Cells are as large as the largest image; smaller images are centred. Rows may be ragged.
    Labels may hold newlines. Grayscale images are shown as RGB.
    """
    if not rows or not any(rows):
        raise ValueError("make_grid needs at least one image")
    n_cols = max(len(r) for r in rows)
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"{len(col_labels)} column labels for {n_cols} columns")
    cell_w = max(im.width for r in rows for im in r)
    cell_h = max(im.height for r in rows for im in r)
    font, unicode_ok = _font()
    if not unicode_ok:
        row_labels = [s.translate(ASCII_FALLBACK) for s in row_labels] if row_labels else None
        col_labels = [s.translate(ASCII_FALLBACK) for s in col_labels] if col_labels else None
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((_text_size(probe, s, font)[0] for s in row_labels or []), default=0)
    label_h = max((_text_size(probe, s, font)[1] for s in col_labels or []), default=0)
    # column labels wider than a cell widen every column so labels never overlap
    col_w = max([cell_w] + [_text_size(probe, s, font)[0] for s in col_labels or []])
    left = label_w + 2 * pad if row_labels else pad
    top = label_h + 2 * pad if col_labels else pad
    width = left + n_cols * (col_w + pad)
    height = top + len(rows) * (cell_h + pad)
    grid = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels or []):
        tw, _ = _text_size(draw, label, font)
        draw.multiline_text((left + j * (col_w + pad) + (col_w - tw) // 2, pad), label,
                            fill="black", font=font, align="center")
    for i, row in enumerate(rows):
        y = top + i * (cell_h + pad)
        if row_labels:
            _, th = _text_size(draw, row_labels[i], font)
            draw.multiline_text((pad, y + max(0, (cell_h - th) // 2)), row_labels[i],
                                fill="black", font=font)
        for j, im in enumerate(row):
            x = left + j * (col_w + pad) + (col_w - im.width) // 2
            grid.paste(im.convert("RGB"), (x, y + (cell_h - im.height) // 2))
    return grid
