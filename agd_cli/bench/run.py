"""`agd bench`: agd adapters next to real CFG on the same base, seeds and initial noise.

For every prompt, seed and ω each method (agd: 1 NFE/step; cfg: 2 NFE/step, cond+uncond
batched; optional cfg-cutoff and unguided) starts from the same x_T. Reported per method:
median seconds per image (warm-up excluded, device synchronised), NFE, peak memory, speed
ratio to CFG, and agreement with the CFG image in pixel space (PSNR, SSIM). `--quality`
adds the mini paper table (accuracy, FID) on presets that ship an evaluator (mnist).
`--compile` times every method again with the model compiled, next to the eager figures.
The flags are checked and resolved first, in bench_plan.py.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch

from agd_cli.bench.flops import adapter_flops
from agd_cli.bench.memory import run_memory
from agd_cli.bench.negatives import run_negatives
from agd_cli.bench.plan import BenchFlags, BenchPlan, Case, bench_prompts, plan_bench
from agd_cli.bench.quality import run_quality
from agd_cli.bench.report import print_table, speed_verdict, write_grid
from agd_cli.config import checks
from agd_cli.core.conditions import cond_cat
from agd_cli.core.sampling import batch_ranges, initial_noise, sample_images
from agd_cli.evaluation.metrics import psnr, ssim
from agd_cli.evaluation.mnist import load_evaluator
from agd_cli.families import load_with_adapters
from agd_cli.families.precision import preset_half_precision
from agd_cli.infra import ui
from agd_cli.infra.io import write_json
from agd_cli.infra.peak_memory import PeakMemory
from agd_cli.infra.runtime import torch_threads

logger = logging.getLogger(__name__)

METHOD_ORDER = ("agd", "cfg", "cfg-cutoff", "unguided")
MEMORY_MEASURE = {  # how compare() measures each method's memory (infra.peak_memory.PeakMemory, polling)
    "cuda": "CUDA max_memory_allocated during one image of the method, after a warm-up of every "
            "method (tensors only; increase = peak - allocated before it)",
    "cpu": "process peak RSS sampled every 2 ms during one image of the method, after a warm-up "
           "of every method; includes the loaded model and libraries (increase = peak - RSS "
           "before it; memory freed by earlier runs may be reused, so on CPU the increase is a "
           "lower bound)"}


# --- 1. measuring ---------------------------------------------------------------------------
@dataclass
class Generated:
    """One image of one method: pixels (C, H, W) in [0, 1], timings and model evaluations."""

    image: object
    seconds: float
    denoise_seconds: float
    cpu_seconds: float  # process CPU time: steadier than wall time on a shared CPU
    nfe: int


def timed_sample(den, method: str, batch: list, uncond: dict, plan) -> list[Generated]:
    """Sample and decode a batch of cases in one call, timed with the device synchronised;
    each image gets the call's time divided by the batch size."""
    cond = cond_cat([c.cond for c in batch])
    noise = torch.cat([c.noise for c in batch])
    omega = torch.tensor([c.omega for c in batch]) if len(batch) > 1 else batch[0].omega
    null = {k: v.expand(len(batch), *v.shape[1:]) for k, v in uncond.items()}
    got = sample_images(den, cond, null, omega, noise, mode=method, steps=plan.steps,
                        scheduler=plan.scheduler, cutoff=plan.cutoff, guidance=plan.guidance)
    b = len(batch)
    return [Generated(im, got.seconds / b, got.denoise_seconds / b, got.cpu_seconds / b, got.nfe)
            for im in got.images]


# --- 2. the comparison ----------------------------------------------------------------------
def build_cases(den, prompts: list, plan: BenchPlan) -> tuple[list[Case], dict]:
    """Encode each prompt once, draw each seed's x_T once; the text encoders are then freed."""
    conds = {i: den.encode([p]) for i, p in enumerate(prompts)}
    uncond = den.encode_negative(plan.negative_prompt)
    if not (plan.quality or plan.negatives):  # they encode their own prompts later
        den.free_text_encoders()
    shape = den.latent_shape()
    noises = {s: initial_noise(shape, [s]) for s in plan.seeds}
    cases = [Case(p, s, w, conds[i], noises[s]) for i, p in enumerate(prompts)
             for s in plan.seeds for w in plan.omegas]
    return cases, uncond


def compare(den, cases: list[Case], uncond: dict, plan: BenchPlan) -> tuple[dict, dict]:
    """Warm up every method, measure each one's memory on one batch, then time every batch with
    the methods interleaved, so that load drift on a shared machine hits all methods alike."""
    batches = batch_ranges(len(cases), plan.batch_size)
    first = [cases[i] for i in batches[0]]
    order = [m for m in METHOD_ORDER if m in plan.methods]
    for m in order:  # warm-up: first-call allocations and lazy inits count for no method
        timed_sample(den, m, first, uncond, plan)
    memory = {}
    for m in order:
        with PeakMemory(den.device, poll=True) as mem:
            timed_sample(den, m, first, uncond, plan)
        memory[m] = {"peak_memory_bytes": mem.peak, "memory_increase_bytes": mem.increase,
                     "what": MEMORY_MEASURE["cuda" if den.device.type == "cuda" else "cpu"]}
    results: dict[str, list[list[Generated]]] = {m: [[] for _ in cases] for m in plan.methods}
    with ui.progress() as bar:
        task = bar.add_task("compare", total=len(cases) * len(plan.methods) * plan.repeats)
        for idx in batches:
            for m in plan.methods:
                for _ in range(plan.repeats):
                    for i, g in zip(idx, timed_sample(den, m, [cases[i] for i in idx], uncond, plan),
                                    strict=True):
                        results[m][i].append(g)
                    bar.advance(task, len(idx))
    return results, memory


LATENCY_MEANING = ("batch 1 (latency): one image per call, the wait for a single image; "
                   "fixed per-call costs weigh most here")
THROUGHPUT_MEANING = ("batch {b} (throughput): {b} images per call, the cost per image of bulk "
                      "generation; compute dominates and CFG's second pass costs nearly a full pass")


def throughput(den, cases: list[Case], uncond: dict, plan: BenchPlan) -> dict:
    """Seconds per image with `throughput_batch` rows per call (the cases repeated to fill it)."""
    return speed_at(den, cases, uncond, plan, plan.throughput_batch)


def speed_at(den, cases: list[Case], uncond: dict, plan: BenchPlan, batch: int) -> dict:
    """Seconds per image with `batch` rows per call, over the cases in turn (repeated to fill a
    batch): every method warmed up first (that call's seconds reported apart as warmup_seconds:
    with --compile, compiling its graph), then timed `repeats` times, methods interleaved, in
    reverse order every other round (a method timed right after another pays for its caches)."""
    rounds = max(1, len(cases) // batch)
    batches = [[cases[(r * batch + i) % len(cases)] for i in range(batch)] for r in range(rounds)]
    order = [m for m in METHOD_ORDER if m in plan.methods]
    warmup = {}
    for m in order:
        t0 = time.perf_counter()
        timed_sample(den, m, batches[0], uncond, plan)
        warmup[m] = time.perf_counter() - t0
        if den.compiled is not None and den.compiled.cuda_graphs:
            timed_sample(den, m, batches[0], uncond, plan)  # a CUDA graph is recorded on call 2
    runs: dict[str, list[Generated]] = {m: [] for m in order}
    with ui.progress() as bar:
        task = bar.add_task(f"batch {batch}", total=len(order) * plan.repeats * rounds)
        for r in range(plan.repeats):
            for i, rows in enumerate(batches):
                for m in order if (r * len(batches) + i) % 2 == 0 else order[::-1]:
                    runs[m].append(timed_sample(den, m, rows, uncond, plan)[0])
                    bar.advance(task)
    meaning = LATENCY_MEANING if batch == 1 else THROUGHPUT_MEANING.format(b=batch)
    out = timing_summary(runs, batch, meaning)
    for m in order:
        out["methods"][m]["warmup_seconds"] = warmup[m]
    return out


def compiled_speed(den, cases: list[Case], uncond: dict, plan: BenchPlan) -> dict:
    """--compile: the latency and throughput timings again with the model compiled (inductor;
    CUDA graphs on CUDA), compile time apart; the model is eager again afterwards."""
    den.compile()
    try:
        out = {"mode": den.compiled.mode, "latency": speed_at(den, cases, uncond, plan,
                                                              plan.batch_size)}
        if plan.throughput_batch:
            out["throughput"] = speed_at(den, cases, uncond, plan, plan.throughput_batch)
        out.update(graphs=den.compiled.graphs, warmup_seconds=den.compiled.warmup_seconds)
    finally:
        den.compiled = None  # --quality and --negatives sample eagerly (their own batch sizes)
    return out


def timing_summary(runs: dict[str, list[Generated]], batch: int, meaning: str) -> dict:
    """Median seconds per image per method and the ratios to CFG and unguided sampling."""
    methods = {m: {"seconds_per_image": statistics.median(g.seconds for g in rs),
                   "cpu_seconds_per_image": statistics.median(g.cpu_seconds for g in rs),
                   "nfe": rs[0].nfe, "timed_calls": len(rs)} for m, rs in runs.items()}
    out: dict = {"batch_size": batch, "meaning": meaning, "methods": methods}
    for ref in ("cfg", "unguided"):
        if ref in methods:
            for clock in ("seconds", "cpu_seconds"):
                key = "ratio_agd_to_" + ref + ("_cpu" if clock == "cpu_seconds" else "")
                out[key] = (methods["agd"][f"{clock}_per_image"]
                            / max(methods[ref][f"{clock}_per_image"], 1e-12))
    if "cfg" in methods and "unguided" in methods:  # ≈ 1: the second row is free; ≈ 2: full price
        for clock, suffix in (("seconds", ""), ("cpu_seconds", "_cpu")):
            out["cfg_pair_over_one_row" + suffix] = (
                methods["cfg"][f"{clock}_per_image"]
                / max(methods["unguided"][f"{clock}_per_image"], 1e-12))
    return out


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs))


def agreement(images, reference, cases: list[Case]) -> dict:
    """PSNR and SSIM against the CFG images from the same noise, mean overall and per ω."""
    a, b = torch.stack(images), torch.stack(reference)
    p, s = psnr(a, b).tolist(), ssim(a, b).tolist()
    by_omega = {}
    for w in dict.fromkeys(c.omega for c in cases):
        idx = [i for i, c in enumerate(cases) if c.omega == w]
        by_omega[f"{w:g}"] = {"psnr": _mean([p[i] for i in idx]), "ssim": _mean([s[i] for i in idx])}
    return {"psnr": _mean(p), "ssim": _mean(s), "by_omega": by_omega}


def summarize(results: dict, memory: dict, cases: list[Case]) -> dict:
    """Per-method medians, NFE, memory, speed ratio to CFG and agreement with CFG."""
    methods = {}
    cfg_images = [runs[0].image for runs in results["cfg"]]
    for m, per_case in results.items():
        runs = [g for rs in per_case for g in rs]
        nfes = sorted({g.nfe for g in runs})
        methods[m] = {
            "seconds_per_image": statistics.median(g.seconds for g in runs),
            "denoise_seconds_per_image": statistics.median(g.denoise_seconds for g in runs),
            "cpu_seconds_per_image": statistics.median(g.cpu_seconds for g in runs),
            "nfe": nfes[0] if len(nfes) == 1 else nfes,
            "images": len(per_case), "timed_runs": len(runs),
            "peak_memory_bytes": memory[m]["peak_memory_bytes"],
            "memory_increase_bytes": memory[m]["memory_increase_bytes"],
            "agreement": None if m == "cfg" else
            agreement([rs[0].image for rs in per_case], cfg_images, cases),
        }
    cfg_s = methods["cfg"]["seconds_per_image"]
    cfg_d = methods["cfg"]["denoise_seconds_per_image"]
    cfg_c = methods["cfg"]["cpu_seconds_per_image"]
    for entry in methods.values():
        entry["speed_ratio_to_cfg"] = entry["seconds_per_image"] / cfg_s
        entry["denoise_ratio_to_cfg"] = entry["denoise_seconds_per_image"] / cfg_d
        entry["cpu_ratio_to_cfg"] = entry["cpu_seconds_per_image"] / max(cfg_c, 1e-9)
    return methods


# --- 3. the stage -----------------------------------------------------------------------------
def run_compare(den, plan: BenchPlan) -> dict:
    """The speed / memory / agreement comparison; returns the report (without quality)."""
    prompts = bench_prompts(plan.preset, plan.prompts_file, plan.n)
    lo, hi = plan.preset.omega_range
    outside = [w for w in plan.omegas if not lo <= w <= hi]
    if outside:
        logger.warning(f"ω {', '.join(f'{w:g}' for w in outside)} outside the trained range "
                f"{lo:g}–{hi:g}: agd extrapolates there")
    if plan.negative_prompt and not den.adapters.wants_negative:
        logger.warning(f"negative prompt {plan.negative_prompt!r}: this adapter was trained without "
                "negatives, so agd ignores it (CFG uses it)")
    cases, uncond = build_cases(den, prompts, plan)
    results, memory = compare(den, cases, uncond, plan)
    methods = summarize(results, memory, cases)
    agd = methods["agd"]
    latency = timing_summary({m: [g for rs in per_case for g in rs] for m, per_case in results.items()},
                             plan.batch_size, LATENCY_MEANING if plan.batch_size == 1 else
                             THROUGHPUT_MEANING.format(b=plan.batch_size))
    speed = {"latency": latency}
    if plan.throughput_batch:
        speed["throughput"] = throughput(den, cases, uncond, plan)
    if plan.compile:
        speed["compiled"] = compiled_speed(den, cases, uncond, plan)
    speed["speed_verdict"] = speed_verdict(speed, den.device.type, plan.preset.name)
    speed["adapter_overhead"] = adapter_flops(den, cases[0], uncond, [plan.batch_size,
                                                              plan.throughput_batch or plan.batch_size])
    return {
        "adapter": str(plan.adapter), "preset": plan.preset.name, "family": plan.preset.family,
        "base_model": den.source, "device": str(den.device), "dtype": str(den.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads() if den.device.type == "cpu" else None,
        "steps": plan.steps, "scheduler": plan.scheduler, "omegas": plan.omegas, "seeds": plan.seeds,
        "prompts": [str(p) for p in prompts], "cutoff": plan.cutoff if "cfg-cutoff" in plan.methods else None,
        "negative_prompt": plan.negative_prompt, "guidance": plan.guidance.record(),
        "adapter_guidance": plan.file.guidance.record(),
        "adapter_trained_with_negatives": den.adapters.wants_negative,
        "methods": methods, "ratio_agd_to_cfg": agd["speed_ratio_to_cfg"],
        "denoise_ratio_agd_to_cfg": agd["denoise_ratio_to_cfg"],
        "cpu_ratio_agd_to_cfg": agd["cpu_ratio_to_cfg"],
        "agreement": agd["agreement"],
        "batch_size": plan.batch_size,
        **speed,
        "vae_decode": den.vae_decode(),
        "timing": "median over images (and --repeats) of noise→pixels (sampling loop + decode; "
                  f"text encoding excluded), batch {plan.batch_size} per call (s/img = call time / batch); "
                  "warm-up and memory-probe calls excluded"
                  + (", CUDA synchronised" if den.device.type == "cuda" else
                     "; CPU s/img is the process CPU time, which does not count time other "
                     "processes held the cores"),
        "memory_measure": memory["agd"]["what"],
        "grid": write_grid(results, cases, plan),
    }


def run_bench(flags: BenchFlags | None = None, /, **kwargs) -> dict:
    """`agd bench`: --compare-cfg (speed, memory, agreement; --quality) and/or --memory.

    `run_bench(preset="tiny-sd", steps=4)` takes BenchFlags' fields as keywords."""
    f = flags if flags is not None else BenchFlags(**kwargs)
    show_table = f.show_table
    checks.optional_integer("--threads", f.threads)
    plan = None
    if f.compare_cfg or f.quality or f.negatives:  # every flag is checked before anything runs
        plan = plan_bench(f)
    report: dict = {}
    with torch_threads(f.threads):
        if f.memory:
            report["memory"] = run_memory(f)
        if plan is None:
            return report
        logger.info(f"loading {plan.preset.name} with adapters from {plan.adapter}")
        den = load_with_adapters(plan.file, device=f.device, base=plan.preset,
                                 dtype=f.dtype or preset_half_precision(plan.preset))
        report.update(run_compare(den, plan))
        if show_table:
            print_table(report)
        if plan.quality or plan.negatives:  # one digit classifier for both tables
            evaluator = load_evaluator(den.device)
        if plan.quality:
            report["quality"] = run_quality(den, plan, show_table, evaluator)
        if plan.negatives:
            report["negatives"] = run_negatives(den, plan, show_table, evaluator)
    report["report"] = str(plan.out_dir / "compare-cfg.json")
    write_json(plan.out_dir / "compare-cfg.json", report)
    return report
