"""Paired statistics on the same seeds: differences with 95 % intervals (normal and bootstrap)."""

from __future__ import annotations

import torch

BOOTSTRAP_ROUNDS = 200  # resamples for the FID difference's interval (seeded: reproducible)


def paired_difference(evaluator, a: tuple, b: tuple) -> dict:
    """agd − CFG on the same seeds, with 95 % intervals: accuracy in points (normal interval of
    the per-sample paired differences) and FID (paired bootstrap: both sets resampled with the
    same indices). An interval that holds 0 means this many samples cannot tell them apart."""
    (hits_a, feats_a), (hits_b, feats_b) = a, b
    acc, acc_ci = paired_points(hits_a, hits_b)
    fid = evaluator.fid_of_features
    return {"accuracy_points": acc, "accuracy_points_ci95": acc_ci,
            "fid": fid(feats_a) - fid(feats_b),
            "fid_ci95": bootstrap_ci(len(hits_a), lambda i: fid(feats_a[i]) - fid(feats_b[i]))}


def paired_points(a, b) -> tuple[float, list[float]]:
    """Mean of a − b (per-sample 0/1 outcomes on the same seeds) in points, and its 95 % interval."""
    d = a.float() - b.float()
    n = len(d)
    half = 1.96 * float(d.std()) / n ** 0.5 if n > 1 else float("nan")
    mean = float(d.mean())
    return 100 * mean, [100 * (mean - half), 100 * (mean + half)]


def bootstrap_ci(n: int, statistic) -> list[float]:
    """95 % interval of `statistic(indices)` over BOOTSTRAP_ROUNDS resamples of range(n) (seeded)."""
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([statistic(torch.randint(n, (n,), generator=g))
                           for _ in range(BOOTSTRAP_ROUNDS)], dtype=torch.float64)
    return values.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
