"""Tensor files: safetensors writes whose failures name the file, and state-dict checksums.

Apart from io.py so that config code reading JSON loads no torch."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from agd_cli.infra.io import file_mode, naming


def save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file; its I/O failures (e.g. a full disk) as OSError naming the file."""
    try:
        save_file(tensors, str(path), metadata=metadata)
        os.chmod(path, file_mode())  # safetensors creates 0600: others sharing a workspace read it
    except OSError as e:
        raise naming(e, path) from e
    except Exception as e:  # SafetensorError: "... I/O error: No space left ... (os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def tensors_sha256(tensors: dict) -> str:
    """Checksum of a state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
