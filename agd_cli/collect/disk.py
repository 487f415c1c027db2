"""Disk a trajectory collection takes, estimated from configs alone (no weights), and the free
space and block size of the disk that will hold it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from agd_cli.config import checks
from agd_cli.config.presets import Preset, load_preset
from agd_cli.families.spec import FamilySpec

DISK_MARGIN = 1.10         # refuse unless free space exceeds the estimate by 10 % …
DISK_RESERVE = 64 * 2**20  # … plus 64 MiB: the disk is shared with everything else
FS_BLOCK = 4096            # allocation unit most file systems round a file up to
SHARD_HEADER = 2048        # safetensors JSON header of a shard (~20 tensors and metadata)
SIDECAR = 512              # a shard's .json sidecar and manifest entry, without the ids
MANIFEST_BASE = 64 * 1024  # the manifest's config, prompts and preset


def estimate_bytes_per_trajectory(preset: str | Preset, keep_steps: int | None = None,
                                  num_per_prompt: int | None = None) -> dict:
    """Bytes one trajectory takes on disk at these settings, without loading any weights.

    Returns {"bytes", "latent_shape", "keep_steps", "tensors": {name: [shape, dtype]}}; the
    prompt's condition is stored once and shared by its `num_per_prompt` trajectories.
    """
    preset = load_preset(preset) if isinstance(preset, str) else preset
    k = keep_steps or preset.collect["keep_steps"]
    npp = num_per_prompt or preset.collect["num_per_prompt"]
    spec = FamilySpec(preset)
    shape, layout = spec.latent_shape(), spec.cond_layout()
    if shape is None or layout is None:
        return {"bytes": None, "latent_shape": None, "keep_steps": k, "tensors": {}}
    tensors = {"x": [[k, *shape], "float16"], "target": [[k, *shape], "float16"],
               "x_final": [list(shape), "float16"], "timesteps": [[k], "int64"],
               "omega": [[], "float32"], "prompt_index": [[], "int64"],
               "trajectory_id": [[], "int64"], "cond_row": [[], "int64"],
               "uncond_row": [[], "int64"], "negative_index": [[], "int64"]}
    size = {"float16": 2, "float32": 4, "int64": 8}
    total = sum(math.prod(s) * size[d] for s, d in tensors.values())
    cond_bytes = sum(math.prod(s) * nbytes for s, nbytes in layout.values())
    for key, (s, nbytes) in layout.items():
        tensors[f"cond.{key} (per prompt)"] = [list(s), {2: "float16", 4: "float32"}.get(nbytes, "int64")]
    total += cond_bytes / npp
    return {"bytes": int(round(total)), "latent_shape": list(shape), "keep_steps": k,
            "tensors": tensors, "cond_bytes_per_prompt": cond_bytes}


def estimate_collection_bytes(est: dict, trajectories: int, batch_size: int,
                              block: int = FS_BLOCK) -> int | None:
    """Disk a collection of `trajectories` takes: tensors plus what each shard adds on top.

    Per shard: the unconditional condition and (worst case) one prompt's condition split
    across two shards, the safetensors header, the .json sidecar, its manifest entry, and
    file-system rounding of both files up to a whole block.
    """
    if est["bytes"] is None:
        return None
    shards = -(-trajectories // batch_size)
    per_shard = (2 * est["cond_bytes_per_prompt"] + SHARD_HEADER + SIDECAR
                 + 24 * batch_size + 2 * block)  # ids in sidecar and manifest, rounding
    return est["bytes"] * trajectories + shards * per_shard + MANIFEST_BASE


def human_bytes(n: float | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, like disk vendors and `df -H`)."""
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int:
    """Free space on the disk that will hold `path` (its nearest existing ancestor)."""
    return shutil.disk_usage(checks.nearest_existing(path)).free


def block_size(path: Path) -> int:
    """The file system's allocation block (st_blksize; Windows has none: assume 4 KiB)."""
    stat = checks.nearest_existing(path).stat()
    return max(getattr(stat, "st_blksize", FS_BLOCK) or FS_BLOCK, FS_BLOCK)
