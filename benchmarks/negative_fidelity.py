"""The negative fidelity gap of several adapter files on the mnist teacher, CFG sampled once.

`agd bench --negatives` measures one adapter file and samples CFG and CFG + negative itself; this
compares several files (e.g. trained without and with `negative_attention`) on the same seeds
and shares the CFG images between them, with the bench's own case sets and statistics:

    OMP_NUM_THREADS=1 python benchmarks/negative_fidelity.py A.safetensors B.safetensors \
        --samples 100 --seed 20000 -w 2,4,6 --out result.json [--cfg-images cfg.pt]

`--cfg-images FILE` keeps the CFG images there (read when present: no adapter file is needed to
make them, so they can be sampled while adapters train, with no adapter file given);
`--agd-images DIR` keeps each file's agd images there, and with `--agd-only` a run only samples
those (one process per file in parallel), a last run with both scores without sampling.

Per case set (close pairs, far pairs, negative only) and ω, per file: PSNR / SSIM of agd +
negative vs CFG + negative and of agd vs CFG (no negative), their gap with a paired bootstrap
interval (bench.fidelity), and agd + negative's accuracy (negative only: d′ rate) against CFG +
negative's in points with a 95 % interval.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from agd_cli.bench.fidelity import agreement, fidelity_gap
from agd_cli.bench.negatives import FAR_PAIRS, negative_cases, negative_only_cases, per_sample
from agd_cli.bench.quality import sample_for_quality
from agd_cli.config.presets import load_preset
from agd_cli.evaluation import mnist
from agd_cli.evaluation.stats import paired_points
from agd_cli.families import load_denoiser, load_with_adapters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapters", nargs="*")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=20000)
    ap.add_argument("-w", "--omega", default="2,4,6")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cfg-images", default=None)
    ap.add_argument("--agd-images", default=None)
    ap.add_argument("--agd-only", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dens = [Lazy(p) for p in a.adapters]  # loaded only when images are missing
    base = load_denoiser(load_preset("mnist"), "cpu")
    evaluator = mnist.load_evaluator(base.device)
    plan = SimpleNamespace(quality_batch=a.batch, quality_seed=a.seed,
                           steps=base.preset.sampling["steps"],
                           scheduler=base.preset.sampling["scheduler"], guidance=None)
    cfg_images = CfgImages(a.cfg_images, base, plan)
    n = a.samples
    sets = {"close_pairs": negative_cases(n), "far_pairs": negative_cases(n, FAR_PAIRS),
            "negative_only": negative_only_cases(n)}
    result = {"seeds": [a.seed, a.seed + n - 1], "adapters": a.adapters, "sets": {}}
    for w in (float(x) for x in a.omega.split(",")):  # ω by ω: the first ω's table first
        for name, cases in sets.items():
            agd = [agd_images(a.agd_images, path, den, name, cases, w, plan)
                   for path, den in zip(a.adapters, dens, strict=True)]
            if a.agd_only:
                continue
            row = compare(a.adapters, agd, cases, evaluator, cfg_images.get(name, cases, w))
            result["sets"].setdefault(name, {})[f"{w:g}"] = row
            print(name, w, json.dumps(row), flush=True)
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)


class CfgImages:
    """CFG's and CFG + negative's images per case set and ω, kept in `path` when given."""

    def __init__(self, path: str | None, base, plan):
        self.path, self.base, self.plan = path, base, plan
        self.images = torch.load(path) if path and Path(path).exists() else {}

    def get(self, name: str, cases, omega: float) -> tuple:
        key = f"{name}/{omega:g}/{self.plan.quality_seed}/{len(cases.prompts)}"
        if key not in self.images:
            self.images[key] = tuple(sample_for_quality(
                self.base, "cfg", omega, cases.prompts, self.plan,
                cases.negatives if negative else None)[0] for negative in (False, True))
            if self.path:
                torch.save(self.images, self.path)
        return self.images[key]


class Lazy:
    """An adapter file's denoiser, loaded on first use."""

    def __init__(self, path: str):
        self.path, self.den = path, None

    def get(self):
        if self.den is None:
            self.den = load_with_adapters(self.path, device="cpu")
        return self.den


def agd_images(folder: str | None, path: str, den, name: str, cases, omega: float, plan) -> tuple:
    """agd's images (with the negative, without it) and NFE per image, kept in `folder`."""
    tag = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
    file = Path(folder or ".") / f"{tag}-{name}-{omega:g}-{plan.quality_seed}-{len(cases.prompts)}.pt"
    if folder and file.exists():
        return torch.load(file)
    got = [sample_for_quality(den.get(), "agd", omega, cases.prompts, plan,
                              cases.negatives if negative else None) for negative in (True, False)]
    out = (got[0][0], got[1][0], got[0][2])
    if folder:
        torch.save(out, file)
    return out


def compare(paths: list[str], sampled: list[tuple], cases, evaluator, cfg_images: tuple) -> dict:
    """Each file's agd with and without the negative against CFG's images (without, with), on
    the same seeds: the gap and the paired accuracy difference."""
    key = cases.score_key
    cfg, cfg_neg = cfg_images
    ref = per_sample(evaluator, cfg_neg, cases)
    row = {"cfg_negative": {key: float(ref.hits.float().mean())}}
    for path, (agd_neg, agd, nfe) in zip(paths, sampled, strict=True):
        s = per_sample(evaluator, agd_neg, cases)
        points, ci = paired_points(s.hits, ref.hits)
        row[path] = {key: float(s.hits.float().mean()), "nfe": nfe,
                     f"{key}_points_vs_cfg_negative": points, f"{key}_points_ci95": ci,
                     **fidelity_gap(agreement(agd_neg, cfg_neg), agreement(agd, cfg))}
    return row


if __name__ == "__main__":
    main()
