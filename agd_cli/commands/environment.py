"""`agd env`: what a bug report needs about this machine, as one dict.

Versions are read from package metadata (nothing heavy is imported for them); torch is imported
for the CUDA facts; bitsandbytes and xformers are tried for real, because "installed" and
"works" differ on these machines (no CUDA kernels, a torch they were not built for).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from agd_cli import __version__

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "bitsandbytes",
            "xformers", "huggingface_hub", "peft", "psutil")
HUB_TIMEOUT_S = 3.0


def versions() -> dict[str, str | None]:
    """Installed version of each package that matters (None: not installed)."""
    out: dict[str, str | None] = {"agd": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cuda_facts() -> dict:
    """CUDA availability, the CUDA torch was built with, and each GPU's name and memory."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": props.name, "total_bytes": total,
                         "free_bytes": free, "capability": f"{props.major}.{props.minor}"})
    return {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
            "gpus": gpus}


def bitsandbytes_facts(cuda: bool) -> dict:
    """Whether one AdamW8bit step runs, on CUDA where there is one, else on the CPU."""
    import torch

    from agd_cli.train.step import adamw8bit_problem

    device = torch.device("cuda" if cuda else "cpu")
    problem = adamw8bit_problem(device)
    return {"device": device.type, "adamw8bit_runs": problem is None, "problem": problem}


def xformers_facts() -> dict:
    """Whether xformers' memory-efficient attention imports."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - not installed, built for another torch, no kernels
        return {"imports": False, "problem": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if str(e) else type(e).__name__}
    return {"imports": True, "problem": None}


def disk_facts(workdir: str | Path) -> dict:
    """Free space on the disk that holds (or will hold) the workspace."""
    from agd_cli.collect.disk import free_bytes

    return {"workdir": str(Path(workdir).resolve()), "free_bytes": free_bytes(Path(workdir))}


def hub_facts(timeout: float = HUB_TIMEOUT_S) -> dict:
    """The hub cache folder, and whether the hub answers within `timeout` s (offline is normal)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    facts = {"cache": str(constants.HF_HUB_CACHE), "endpoint": constants.ENDPOINT,
             "offline_mode": bool(constants.HF_HUB_OFFLINE), "reachable": None, "problem": None}
    if facts["offline_mode"]:
        facts["problem"] = "HF_HUB_OFFLINE is set: not tried"
        return facts
    try:
        with urllib.request.urlopen(constants.ENDPOINT + "/api/models?limit=1", timeout=timeout):
            facts["reachable"] = True
    except (urllib.error.URLError, OSError, ValueError) as e:
        facts["reachable"] = False
        facts["problem"] = f"{type(e).__name__}: {str(getattr(e, 'reason', e))[:160]}"
    return facts


def report(workdir: str | Path) -> dict:
    """Everything `agd env` prints."""
    import psutil

    cuda = cuda_facts()
    return {"versions": versions(),
            "system": {"os": platform.platform(), "machine": platform.machine(),
                       "cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
                       "ram_available_bytes": psutil.virtual_memory().available},
            "cuda": cuda, "bitsandbytes": bitsandbytes_facts(cuda["available"]),
            "xformers": xformers_facts(), "disk": disk_facts(workdir), "hub": hub_facts()}
