"""Process-wide settings for agd's own entry points (the CLI, tool scripts): quiet library logs.

Importing agd as a library changes no global logging: only entry points call quiet_libraries()."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Keep library chatter (bitsandbytes kernel notices, dtype-cast notes) off the user's screen."""
    for name in ("bitsandbytes", "diffusers", "transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")

