"""`agd collect`'s plan: the flags as given (`CollectFlags`), checked and resolved against the
preset into one `CollectSettings` (`resolve_settings`) before any model loads, and which worker
of a sharded collection this process is. `agd_cli.collect.run` records what the plan says."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from agd_cli.collect.disk import (
    DISK_MARGIN,
    DISK_RESERVE,
    block_size,
    estimate_bytes_per_trajectory,
    estimate_collection_bytes,
    free_bytes,
    human_bytes,
)
from agd_cli.collect.store import worker_ids
from agd_cli.config import checks
from agd_cli.config.presets import Preset, load_preset
from agd_cli.config.prompts import load_negative_set, load_prompt_set, prompts_sha256
from agd_cli.config.workspace import run_dir
from agd_cli.core.guidance_rules import GuidanceRule
from agd_cli.families import resolve_device
from agd_cli.infra.errors import InputError

logger = logging.getLogger(__name__)

ENCODE_CHUNK = 64  # prompts per text-encoder call

MAX_TRAJECTORIES = 10_000_000  # per collection; ids are listed in memory


@dataclass
class CollectFlags:
    """`agd collect`'s flags as given; None takes the preset's value (see resolve_settings)."""

    preset: str | Preset
    prompts: str | None = None
    classes: str | None = None
    out: str | None = None
    num_per_prompt: int | None = None
    steps: int | None = None
    keep_steps: int | None = None
    omega_min: float | None = None
    omega_max: float | None = None
    batch_size: int | None = None
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    shard_index: int | None = None
    num_shards: int | None = None
    overwrite: bool = False
    workdir: str = "agd-runs"
    base_model: str | None = None
    negative_prompts: str | None = None
    empty_negative_probability: float | None = None
    negative_only_probability: float | None = None
    omega_skew: float | None = None
    dry_run: bool = False  # plan and estimate memory only (agd_cli.dry_run): nothing loads
    guidance: str | None = None       # the teacher's rule [preset, cfg]
    guidance_params: dict = field(default_factory=dict)  # its parameters' flags (None: preset)


@dataclass
class CollectSettings:
    """The plan of one collect worker: flags resolved against the preset (flag > preset >
    default) and checked; built by resolve_settings before anything loads."""

    preset: Preset
    prompts: list
    prompt_source: str
    num_per_prompt: int
    steps: int
    keep_steps: int
    omega_min: float
    omega_max: float
    batch_size: int
    seed: int
    device: str | None
    dtype: str
    shard_index: int
    num_shards: int
    run: Path
    overwrite: bool
    accelerate_state: object | None = None
    ids: list[int] = field(default_factory=list)  # this worker's trajectory ids
    negatives: list = field(default_factory=list)  # CFG's unconditional branch, besides ""
    negative_source: str | None = None
    empty_negative_probability: float = 1.0  # share of trajectories that keep the empty prompt
    # share of the trajectories with a negative whose prompt is the empty prompt (null condition)
    negative_only_probability: float = 0.0
    omega_skew: float = 1.0  # ω = lo + (hi − lo)·u^skew (1: uniform)
    guidance: GuidanceRule = field(default_factory=GuidanceRule)  # the teacher's two-pass rule

    @property
    def scheduler(self) -> str:
        return self.preset.sampling["scheduler"]

    @property
    def base_model(self) -> str:
        """What the denoiser will report as its source (random-weight bases: 'random:<preset>')."""
        return self.preset.base_source()

    def identity(self) -> dict:
        """The manifest keys that say which collection this is (TrajectoryStore.IDENTITY_KEYS)."""
        return {"preset": self.preset.name, "base_model": self.base_model,
                "prompts_sha256": prompts_sha256(self.prompts), "seed": self.seed,
                "steps": self.steps, "keep_steps": self.keep_steps,
                "omega_min": self.omega_min, "omega_max": self.omega_max,
                "num_per_prompt": self.num_per_prompt, "scheduler": self.scheduler,
                # None without negatives: collections from before negatives existed still resume
                "negatives_sha256": prompts_sha256(self.negatives) if self.negatives else None,
                "empty_negative_probability":
                    self.empty_negative_probability if self.negatives else None,
                "negative_only_probability": self.negative_only_probability or None,
                # None when uniform: collections from before the skew still resume
                "omega_skew": None if self.omega_skew == 1 else self.omega_skew,
                # None for plain CFG: collections from before the rules read as (and resume as) CFG
                "guidance": None if self.guidance.name == "cfg" else self.guidance.record()}


# --- 1. inputs ---------------------------------------------------------------------------------
def _worker(shard_index: int | None, num_shards: int | None):
    """(index, count, accelerate state or None): from the flags, else from `accelerate launch`."""
    if shard_index is None and num_shards is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # accelerate launch / torchrun
            state = PartialState()
            if state.num_processes > 1:
                return state.process_index, state.num_processes, state
            # accelerate runs CPU-only launches as one process group of size 1; the launcher's
            # rank still splits the prompts (no barrier then, so no --overwrite)
            return int(os.environ.get("RANK", "0")), world, None
        return 0, 1, None
    if shard_index is None or num_shards is None:
        raise InputError("--shard-index and --num-shards go together",
                         hint="e.g. --shard-index 0 --num-shards 4 on the first of four GPUs")
    checks.integer("--num-shards", num_shards, 1, "--num-shards 4")
    if not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index {shard_index} is out of range for --num-shards {num_shards}",
                         hint=f"use a shard index from 0 to {num_shards - 1}")
    return shard_index, num_shards, None


def _worker_device(device: str | None, num: int, state) -> str | None:
    """--device; auto: a resumed or accelerate-launched worker's own GPU. Checked here."""
    device = None if device == "auto" else device
    if device is None and state is not None:
        device = str(state.device)
    elif device is None and num > 1 and "LOCAL_RANK" in os.environ:
        if torch.cuda.is_available():  # one GPU per launched process
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    resolve_device(device)  # an unknown device or missing CUDA fails here, before the plan
    return device


def preset_num_per_prompt(p: Preset, negatives: bool) -> int:
    """The preset's trajectories per prompt; with a negatives list its
    `num_per_prompt_with_negatives` where it has one (a negative is one more input to learn)."""
    if negatives and "num_per_prompt_with_negatives" in p.collect:
        return p.collect["num_per_prompt_with_negatives"]
    return p.collect["num_per_prompt"]


def resolve_settings(f: CollectFlags) -> CollectSettings:
    """Check every flag against the preset (flag > preset > default); nothing loads or is written."""
    p = load_preset(f.preset) if isinstance(f.preset, str) else f.preset
    p = p.with_base_model(f.base_model)
    prompt_list, source = load_prompt_set(p, f.prompts, f.classes)
    negatives, negative_source, empty_p = load_negative_set(p, f.negative_prompts,
                                                            f.empty_negative_probability)
    steps, keep_steps, num_per_prompt, batch_size = f.steps, f.keep_steps, f.num_per_prompt, f.batch_size
    seed, dtype, overwrite, out = f.seed, f.dtype, f.overwrite, f.out
    steps = checks.integer("--steps", p.sampling["steps"] if steps is None else steps)
    checks.sampling_steps(steps, checks.preset_scheduler_config(p))
    keep = checks.integer("--keep-steps", min(p.collect["keep_steps"], steps)
                          if keep_steps is None else keep_steps)
    if keep > steps:
        raise InputError(f"--keep-steps {keep} is more than the {steps} sampling steps",
                         hint=f"use --keep-steps {steps} (all) or fewer, or raise --steps")
    npp = checks.integer("--num-per-prompt", preset_num_per_prompt(p, bool(negatives))
                         if num_per_prompt is None else num_per_prompt)
    if len(prompt_list) * npp > MAX_TRAJECTORIES:
        raise InputError(f"--num-per-prompt {npp} makes {len(prompt_list) * npp:,} trajectories, "
                         f"more than one collection holds ({MAX_TRAJECTORIES:,})",
                         hint="collect fewer (the paper: 500 prompts × 1–16), e.g. --num-per-prompt 16")
    batch = checks.integer("--batch-size", p.collect["batch_size"] if batch_size is None else batch_size)
    lo, hi = checks.omega_range(p.sampling["omega_min"] if f.omega_min is None else f.omega_min,
                                p.sampling["omega_max"] if f.omega_max is None else f.omega_max)
    skew = checks.number("--omega-skew", p.collect["omega_skew"] if f.omega_skew is None
                         else f.omega_skew, example="--omega-skew 2 (1: ω uniform)")
    checks.seed(seed)
    dtype = dtype or p.collect.get("dtype", "fp16")
    checks.dtype(dtype)
    index, num, state = _worker(f.shard_index, f.num_shards)
    if overwrite and num > 1 and state is None:
        raise InputError("--overwrite cannot be combined with --num-shards > 1 (workers would "
                         "delete each other's shards)",
                         hint="delete the old folder first, or collect into a new one with --out")
    device = _worker_device(f.device, num, state)
    run = checks.writable_folder(out, "--out") if out else run_dir(checks.workdir(f.workdir), p.name)
    if not out:
        checks.writable_folder(run, "the run folder")
    s = CollectSettings(p, prompt_list, source, npp, steps, keep, lo, hi, batch, seed, device,
                        dtype, index, num, run, overwrite, state)
    s.omega_skew = skew
    s.guidance = GuidanceRule.resolve(f.guidance, f.guidance_params, p.collect)
    s.ids = worker_ids(len(prompt_list), npp, index, num)
    s.negatives, s.negative_source, s.empty_negative_probability = negatives, negative_source, empty_p
    s.negative_only_probability = resolve_negative_only(p, f.negative_only_probability,
                                                        bool(negatives))
    return s


def resolve_negative_only(p: Preset, flag: float | None, negatives: bool) -> float:
    """--negative-only-probability, else the preset's; 0 without negatives (nothing to pair)."""
    value = checks.probability(
        "--negative-only-probability",
        p.collect["negative_only_probability"] if flag is None else flag,
        hint="e.g. 0.1: one in ten trajectories with a negative has no prompt")
    return value if negatives else 0.0


# --- 2. plan -----------------------------------------------------------------------------------


def plan_collection(s: CollectSettings, store, redo: set[int] = frozenset()) -> list[int]:
    """Print what will be done and check the disk can hold it; returns the ids still to collect.

    `redo`: ids of damaged shards, stored but to be collected again."""
    done = set() if (s.overwrite or not store.exists()) else store.completed() - redo
    remaining = [i for i in s.ids if i not in done]
    est = estimate_bytes_per_trajectory(s.preset, s.keep_steps, s.num_per_prompt)
    need = estimate_collection_bytes(est, len(remaining), s.batch_size, block_size(store.root))
    free = free_bytes(store.root)
    if s.overwrite and store.exists():
        free += sum(info["bytes"] for info in store.shards())  # --overwrite deletes them first
    total = len(s.prompts) * s.num_per_prompt
    worker = f" · worker {s.shard_index + 1} of {s.num_shards}" if s.num_shards > 1 else ""
    logger.info(f"plan: {s.preset.name} · {len(s.prompts)} prompts × {s.num_per_prompt} = {total} "
            f"trajectories{worker} · {len(remaining)} to do, {len(s.ids) - len(remaining)} done · "
            f"{s.keep_steps} of {s.steps} {s.scheduler} steps kept · "
            f"ω {omega_law(s)} · seed {s.seed} · teacher {s.guidance.label()}")
    if s.negatives:
        alone = (f"; {s.negative_only_probability:g} of those with a negative have no prompt"
                 if s.negative_only_probability else "")
        logger.info(f"negatives: {len(s.negatives)} from {s.negative_source}, the empty prompt with "
                f"probability {s.empty_negative_probability:g}{alone}")
    shape = "×".join(map(str, est["latent_shape"] or ["?"]))
    logger.info(f"disk: ~{human_bytes(need)} needed ({human_bytes(est['bytes'])} per trajectory: "
            f"2 × {s.keep_steps} × {shape} fp16), {human_bytes(free)} free at {store.root}")
    if need is not None and need * DISK_MARGIN + DISK_RESERVE > free:
        raise InputError(f"not enough disk space at {store.root}: the collection needs "
                         f"~{human_bytes(need)} plus a {round(DISK_MARGIN * 100 - 100)} % margin "
                         f"and {human_bytes(DISK_RESERVE)} kept free; {human_bytes(free)} are free",
                         hint="free some space, collect elsewhere with --run DIR, keep fewer steps "
                              "(--keep-steps) or split the prompts (--shard-index/--num-shards)")
    return remaining


def omega_law(s: CollectSettings) -> str:
    """How collect draws ω, in words."""
    if s.omega_skew == 1:
        return f"~ U[{s.omega_min:g}, {s.omega_max:g}]"
    return f"= {s.omega_min:g} + {s.omega_max - s.omega_min:g}·u^{s.omega_skew:g}, u ~ U[0, 1)"
