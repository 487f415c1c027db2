"""The negative fidelity gap of several adapter files on the mnist teacher, CFG sampled once.

`agd bench --negatives` measures one adapter file and samples CFG and CFG + negative itself; this
compares several files (e.g. trained without and with `negative_attention`) on the same seeds
and shares the CFG images between them, with the bench's own case sets and statistics:

    OMP_NUM_THREADS=1 python benchmarks/negative_fidelity.py A.safetensors B.safetensors \
        --samples 100 --seed 20000 -w 2,4,6 --out result.json

Per case set (close pairs, far pairs, negative only) and ω, per file: PSNR / SSIM of agd +
negative vs CFG + negative and of agd vs CFG (no negative), their gap with a paired bootstrap
interval (bench.fidelity), and agd + negative's accuracy (negative only: d′ rate) against CFG +
negative's in points with a 95 % interval.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from agd_cli.bench.fidelity import agreement, fidelity_gap
from agd_cli.bench.negatives import FAR_PAIRS, negative_cases, negative_only_cases, per_sample
from agd_cli.bench.quality import sample_for_quality
from agd_cli.evaluation import mnist
from agd_cli.evaluation.stats import paired_points
from agd_cli.families import load_with_adapters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapters", nargs="+")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=20000)
    ap.add_argument("-w", "--omega", default="2,4,6")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dens = [load_with_adapters(p, device="cpu") for p in a.adapters]
    evaluator = mnist.load_evaluator(dens[0].device)
    plan = SimpleNamespace(quality_batch=a.batch, quality_seed=a.seed,
                           steps=dens[0].preset.sampling["steps"],
                           scheduler=dens[0].preset.sampling["scheduler"], guidance=None)
    n = a.samples
    sets = {"close_pairs": negative_cases(n), "far_pairs": negative_cases(n, FAR_PAIRS),
            "negative_only": negative_only_cases(n)}
    result = {"seeds": [a.seed, a.seed + n - 1], "adapters": a.adapters, "sets": {}}
    for name, cases in sets.items():
        for w in (float(x) for x in a.omega.split(",")):
            row = compare(dens, a.adapters, cases, w, plan, evaluator)
            result["sets"].setdefault(name, {})[f"{w:g}"] = row
            print(name, w, json.dumps(row), flush=True)
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)


def compare(dens: list, paths: list[str], cases, omega: float, plan, evaluator) -> dict:
    """CFG and CFG + negative once (the first file's base), then each file's agd with and
    without the negative, on the same seeds: the gap and the paired accuracy difference."""
    key = cases.score_key

    def sample(den, mode: str, negative: bool):
        return sample_for_quality(den, mode, omega, cases.prompts, plan,
                                  cases.negatives if negative else None)

    cfg, _, _ = sample(dens[0], "cfg", False)
    cfg_neg, _, cfg_nfe = sample(dens[0], "cfg", True)
    ref = per_sample(evaluator, cfg_neg, cases)
    row = {"cfg_negative": {key: float(ref.hits.float().mean()), "nfe": cfg_nfe}}
    for path, den in zip(paths, dens, strict=True):
        agd_neg, _, nfe = sample(den, "agd", True)
        agd, _, _ = sample(den, "agd", False)
        s = per_sample(evaluator, agd_neg, cases)
        points, ci = paired_points(s.hits, ref.hits)
        row[path] = {key: float(s.hits.float().mean()), "nfe": nfe,
                     f"{key}_points_vs_cfg_negative": points, f"{key}_points_ci95": ci,
                     **fidelity_gap(agreement(agd_neg, cfg_neg), agreement(agd, cfg))}
    return row


if __name__ == "__main__":
    main()
