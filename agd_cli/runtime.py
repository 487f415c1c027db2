"""Process-wide settings applied before the ML libraries load: quiet their logs."""

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


quiet_libraries()
