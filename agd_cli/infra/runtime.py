"""Process-wide settings for agd's own entry points (the CLI, tool scripts): quiet library logs,
torch's CPU threads for a block of work.

Importing agd as a library changes no global logging: only entry points call quiet_libraries()."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings


def quiet_libraries() -> None:
    """Keep library chatter (bitsandbytes kernel notices, dtype-cast notes) off the user's screen."""
    for name in ("bitsandbytes", "diffusers", "transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # tqdm bars of weight loading (transformers, diffusers) would break agd's rich display
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")


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
