"""What `agd bench` will do, decided before any weights load: its flags (`BenchFlags`), each
checked and resolved once against the adapter file and its preset into a `BenchPlan`, and the
prompts the comparison runs on. bench.py measures; quality.py and negative_bench.py score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agd_cli.config import checks, workspace
from agd_cli.config.prompts import load_prompt_set, read_prompts
from agd_cli.core.adapter_file import AdapterFile
from agd_cli.core.compiling import check_compile
from agd_cli.core.guidance_rules import GuidanceRule
from agd_cli.evaluation import mnist
from agd_cli.families import resolve_device
from agd_cli.infra.errors import DataError, InputError

BASELINES = ("cfg", "cfg-cutoff", "unguided")
DEFAULT_BASELINES = "cfg,unguided"
QUALITY_OMEGAS = (2.0, 4.0, 6.0, 8.0)
QUALITY_PRESETS = ("mnist",)  # presets that ship an evaluator (agd_cli.evaluation.mnist)
EVALUATED_TEACHERS = ("builtin:mnist/teacher",)  # ... and their teachers: a renamed copy counts


def check_quality_preset(preset, flag: str = "--quality") -> None:
    """Refuse `flag` (--quality, --negatives) on a preset without an evaluator, before any
    weights load."""
    if preset.name not in QUALITY_PRESETS and preset.base_model not in EVALUATED_TEACHERS:
        raise InputError(f"{flag} needs a preset with an evaluator; the adapter's preset is "
                         f"'{preset.name}'",
                         hint=f"{flag} works on: {', '.join(QUALITY_PRESETS)} (train one with "
                              f"`agd collect --preset mnist && agd train`); drop {flag} here")
    if not mnist.CLASSIFIER_PATH.is_file():
        raise DataError(f"the mnist evaluator is missing: {mnist.CLASSIFIER_PATH}",
                        hint="reinstall agd; the digit classifier ships inside the package")


@dataclass
class Case:
    """One (prompt, seed, ω) point: every method starts from this noise."""

    prompt: object
    seed: int
    omega: float
    cond: dict
    noise: object


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
    negatives: bool = False             # the negative-prompt table (agd_cli.bench.negatives)
    negative_omegas: list[float] = field(default_factory=list)
    file: AdapterFile | None = None     # the adapter file, its metadata read once
    guidance: GuidanceRule = GuidanceRule()  # the two-pass teacher's rule (method cfg)
    compile: bool = False               # also time every method with the model compiled


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
    dtype: str | None = None             # the comparison's model dtype (None: the preset's)
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
    guidance: str | None = None          # the two-pass teacher's rule [the adapter's]
    guidance_params: dict | None = None
    compile: bool | None = None          # --compile / --no-compile; None: the preset's


def plan_bench(f: BenchFlags) -> BenchPlan:
    """Check every flag and find the adapter and its preset; no model weights load here."""
    methods = ["agd", *parse_baselines(f.baselines)]
    for flag, value, least in (("--num-prompts", f.n, 1), ("--steps", f.steps, 1),
                               ("--repeats", f.repeats, 1), ("--batch-size", f.batch_size, 1),
                               ("--quality-samples", f.quality_samples, 2),
                               ("--quality-batch", f.quality_batch, 1),
                               ("--throughput-batch", f.throughput_batch, 0)):
        checks.optional_integer(flag, value, least)
    checks.seed(f.quality_seed, "--quality-seed")
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
        check_quality_preset(p, "--quality" if f.quality else "--negatives")
    default_omega = [p.sampling["default_omega"]]
    if f.steps is not None:
        checks.sampling_steps(f.steps, checks.preset_scheduler_config(p))
    run_folder = path.parent if path.name == workspace.ADAPTER else Path(f.workdir) / p.name
    out_dir = checks.writable_folder(run_folder / "bench", "the bench folder")
    if f.grid is not None:
        checks.writable_folder(Path(f.grid).parent, "--grid's folder")
    compile_model = p.sampling.get("compile", False) if f.compile is None else f.compile
    if compile_model:
        check_compile(resolve_device(f.device))
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
                     negative_omegas=checks.omega_list(f.omegas, default_omega), file=file,
                     guidance=GuidanceRule.at_inference(f.guidance, f.guidance_params,
                                                        file.guidance, p.collect),
                     compile=bool(compile_model))


# --- 2. prompts -----------------------------------------------------------------------------
def spread(items: Sequence, n: int) -> list:
    """n items spread evenly over the list (all of them when n ≥ len)."""
    if n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def bench_prompts(preset, prompts_file: list | None, n: int) -> list:
    """The prompts (or DiT classes) to compare on: --prompts FILE or the preset's own set, read
    exactly as `agd collect` reads it (a builtin set, a prompt file, or DiT class ids)."""
    if prompts_file is not None:
        return spread(prompts_file, n)
    return spread(load_prompt_set(preset)[0], n)
