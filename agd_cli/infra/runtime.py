"""Process-wide settings for agd's own entry points (the CLI, tool scripts): quiet library logs,
torch's CPU threads for a block of work.

Importing agd as a library changes no global logging: only entry points call quiet_libraries()."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings


def quiet_libraries(verbosity: int = 0) -> None:
    """Keep library chatter (bitsandbytes kernel notices, dtype-cast notes, deprecation warnings
    raised inside diffusers) off the user's screen; -v (verbosity > 0) lets their info through.
    Hub download progress stays visible (a first download is minutes of silence otherwise),
    except with -q (verbosity < 0)."""
    level = logging.INFO if verbosity > 0 else logging.ERROR
    for name in ("bitsandbytes", "diffusers", "transformers", "accelerate", "huggingface_hub",
                 "kernels"):
        logging.getLogger(name).setLevel(level)
    if verbosity <= 0:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if verbosity < 0:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    # huggingface_hub deprecation raised from inside diffusers on every hub load
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    # bitsandbytes' kernels-community notice on import, printed on every command
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    warnings.filterwarnings("ignore", message=".*publisher trust.*")


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch CPU threads for a block; on a busy shared CPU fewer threads than cores avoids the
    spin-wait collapse of oversubscribed thread pools."""
    import torch  # lazily: the CLI imports this module, and `agd --help` loads no torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
