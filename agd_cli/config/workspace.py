"""The workspace: one run folder per preset under ./agd-runs (or --workdir / AGD_WORKDIR).

    agd-runs/<preset>/
      trajectories/      manifest.json + shard-*.safetensors (+ .json sidecars)   [collect]
      checkpoints/       step-*/ adapters + optimizer + RNG states                 [train]
      adapter.safetensors, train/metrics.jsonl, train/loss.png                     [train]
      samples/*.png                                                                [generate]
      bench/                                                                       [bench]
"""

from __future__ import annotations

import logging
from pathlib import Path

from agd_cli.config.presets import load_preset
from agd_cli.infra.errors import DataError, InputError

logger = logging.getLogger(__name__)

TRAJECTORIES = "trajectories"
ADAPTER = "adapter.safetensors"


def run_dir(workdir: str | Path, preset_name: str) -> Path:
    """The run folder of a preset (not created here)."""
    return Path(workdir) / preset_name


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def latest_collection(workdir: str | Path) -> Path:
    """The run folder whose trajectory collection was written most recently."""
    found = _newest(list(Path(workdir).glob(f"*/{TRAJECTORIES}/manifest.json")))
    if found is None:
        raise DataError(f"no collection found in workspace '{workdir}'",
                        hint="run `agd collect --preset NAME --prompts FILE` first, "
                             "or pass --run DIR / --workdir")
    run = found.parent.parent
    logger.info(f"using the most recent collection: {run}")
    return run


def latest_adapter(workdir: str | Path) -> Path:
    """The most recently trained adapter file in the workspace."""
    found = _newest(list(Path(workdir).glob(f"*/{ADAPTER}")))
    if found is None:
        raise DataError(f"no trained adapter found in workspace '{workdir}'",
                        hint="run `agd train` first, or pass --adapter FILE / --run DIR")
    logger.info(f"using the most recent adapter: {found}")
    return found


def find_adapter(workdir: str | Path, adapter: str | None = None, run: str | None = None,
                 preset: str | None = None) -> Path:
    """--adapter FILE, --run DIR (or a run name in the workspace), else the run folder of
    --preset when it holds an adapter, else the most recently trained adapter."""
    if adapter and run:
        raise InputError(f"both --adapter '{adapter}' and --run '{run}' given",
                         hint="pass one of them (or neither, for the newest adapter in the workspace)")
    if adapter:
        return Path(adapter)
    if run:
        folder = Path(run)
        if not folder.is_dir() and (Path(workdir) / run).is_dir():
            folder = Path(workdir) / run  # `--run tiny-sd` names a run in the workspace
        return adapter_in(folder)
    if preset:
        own = run_dir(workdir, load_preset(preset).name) / ADAPTER
        if own.is_file():
            logger.info(f"using the adapter of preset {Path(preset).stem}'s run: {own}")
            return own
    return latest_adapter(workdir)


def adapter_in(run: str | Path) -> Path:
    """The adapter file of a run folder (error if the run has none)."""
    path = Path(run) / ADAPTER
    if not path.is_file():
        raise DataError(f"run folder '{run}' has no {ADAPTER}",
                        hint="train it with `agd train --run DIR` first")
    return path
