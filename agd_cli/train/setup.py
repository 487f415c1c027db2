"""Before `agd train`'s loop: where (the run folder and its collections), what (the preset
they were recorded with), and on what (the frozen base with fresh adapters, this process's device
and the process group). The loop itself lives in train.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch
from accelerate import Accelerator

from agd_cli.collect.store import TrajectoryStore
from agd_cli.config.presets import Preset, load_preset, preset_from_record
from agd_cli.config.workspace import latest_collection
from agd_cli.families import load_denoiser, resolve_device
from agd_cli.families.attention import use_fast_attention
from agd_cli.infra import hardware
from agd_cli.infra.errors import DataError, InputError
from agd_cli.train.data import collection_root, unique_roots
from agd_cli.train.phase_memory import card, choose_checkpointing, quiet_casts, training_step
from agd_cli.train.probe import measure_in_process

if TYPE_CHECKING:
    from agd_cli.train.settings import TrainSettings

logger = logging.getLogger(__name__)


def locate(run: str | None, data: tuple | list, workdir: str) -> tuple[Path, list[Path]]:
    """(run folder that receives the results, trajectory folders to train on)."""
    if run:
        run_path = Path(run)
        if not data and not run_path.is_dir():
            raise DataError(f"run folder '{run}' not found",
                            hint="pass a folder written by `agd collect`, leave out --run, or name the "
                                 "collection with --data (a new --run folder is then created)")
        # with --data, --run may only name where the results go (a new folder: no collection)
        own = [collection_root(run_path)] if not data or (run_path / "trajectories").is_dir() else []
        return run_path, unique_roots(own + list(data))
    if data:
        roots = unique_roots(data)
        return roots[0].parent, roots
    run_path = latest_collection(workdir)
    return run_path, [collection_root(run_path)]


def recorded_preset(roots: list[Path], override: str | None) -> Preset:
    """The preset the collection was recorded with; --preset may override it for the same base."""
    configs = [TrajectoryStore(r).manifest().get("config", {}) for r in roots]
    bases = {(c.get("family"), c.get("base_model")) for c in configs}
    if len(bases) > 1:
        raise DataError(f"the collections were recorded with different base models: {sorted(map(str, bases))}",
                        hint="train on collections of one base model at a time")
    cfg = configs[0]
    recorded = preset_from_record(cfg)
    if override is None:
        if recorded is None:
            raise DataError(f"collection {roots[0]} does not say which preset recorded it",
                            hint="pass --preset NAME")
        return recorded
    chosen = load_preset(override)
    if recorded is not None and (chosen.family != recorded.family
                                 or chosen.resolve_base_model() != recorded.resolve_base_model()
                                 or chosen.architecture != recorded.architecture):
        raise InputError(f"--preset {override} uses base '{chosen.base_model}' ({chosen.family}), "
                         f"but the collection was recorded with preset '{recorded.name}' "
                         f"(base '{recorded.base_model}', {recorded.family})",
                         hint="train with the preset the trajectories came from (leave out --preset)")
    return chosen


def prepare_denoiser(preset: Preset, device: torch.device, settings: TrainSettings):
    """Frozen base in half precision and eval mode, fast attention, fresh fp32 adapters."""
    den = load_denoiser(preset, device=device, dtype=settings.precision, text=False)
    if use_fast_attention(den) == "xformers":  # only where it is the same model
        logger.info("attention: xformers")
    if settings.gradient_checkpointing:
        if not getattr(den.model, "_supports_gradient_checkpointing", False):
            raise InputError(f"--gradient-checkpointing: {type(den.model).__name__} does not support it",
                             hint="pass --no-gradient-checkpointing")
        den.model.enable_gradient_checkpointing()
    torch.manual_seed(settings.seed)  # identical initial adapters in every process
    den.new_adapters(settings.adapter).train()
    return den


CPU_CHECKED_ABOVE = 64  # batches up to the presets' own sizes are not estimated


def check_cpu_memory(preset: Preset, settings: TrainSettings, device: torch.device) -> None:
    """Refuse a batch too large for this machine's free memory before training: on the CPU the
    OS kills a process that runs out (exit 137, no message, mid-step). One training step at
    this batch is estimated on the meta device (estimate.py: shapes only, seconds); only
    batches above the presets' sizes are checked."""
    if device.type != "cpu" or settings.batch_size <= CPU_CHECKED_ABOVE:
        return
    try:
        est = measure_in_process(preset, settings.precision, settings.optimizer,
                                 settings.gradient_checkpointing, settings.batch_size, "meta", None)
    except Exception as e:  # noqa: BLE001 - a model the estimate cannot build is not the user's error
        logger.warning(f"could not estimate the memory of a training step at batch size "
                f"{settings.batch_size} ({type(e).__name__}); training without the check")
        return
    need, free = est["peak_bytes"], psutil.virtual_memory().available
    if need > free:
        fits = max(1, int(settings.batch_size * free / need))
        raise InputError(f"batch size {settings.batch_size}: one training step needs about "
                         f"{need / 2**30:.1f} GiB on the CPU; this machine has "
                         f"{free / 2**30:.1f} GiB free",
                         hint=f"use --batch-size {fits} or less (with --grad-accum "
                              f"{-(-settings.batch_size // fits)} for as many samples per step)")


def fit_gpu_memory(preset: Preset, settings: TrainSettings, device: torch.device,
                   explicit: bool | None) -> None:
    """On CUDA, before the first step: compare one step's estimated peak memory (meta device,
    phase_memory.training_step) with the card's free memory (hardware.free_memory) and turn on
    gradient checkpointing where only that fits, said in one line; refuse, naming the flags
    that would fit, where neither does or where --no-gradient-checkpointing was asked for
    (`explicit`: the flag as given, None when it was not)."""
    if device.type != "cuda" or hardware.free_memory(device) is None:
        return
    c = card(preset, device)

    def estimate(on: bool):
        return training_step(preset, settings.precision, settings.optimizer, on,
                             settings.batch_size)

    logger.info(f"checking that a training step fits {device} (estimated on the meta device)…")
    try:
        with quiet_casts():
            choice = choose_checkpointing(estimate, c, settings.gradient_checkpointing, explicit)
    except Exception as e:  # noqa: BLE001 - a model the estimate cannot build is not the user's error
        logger.warning(f"could not estimate the memory of a training step ({type(e).__name__}); "
                "training without the check")
        return
    if choice.action == "refuse":
        raise InputError(f"training does not fit {device}: {choice.message}", hint=choice.hint)
    if choice.action == "turn on":
        settings.gradient_checkpointing = True
        logger.info(choice.message)


def process_accelerator(device: str):
    """HF accelerate state: device placement and the process group (no-op for one process)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(dev)  # one process: accelerate's device is "the current GPU"
    return Accelerator(cpu=dev.type == "cpu")


def process_device(acc) -> torch.device:
    """This process's device with its index (cuda:N as asked, or the one accelerate assigned)."""
    dev = acc.device
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev
