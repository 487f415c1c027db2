"""agd: Adapter Guidance Distillation (arXiv 2503.07274) as a command-line tool."""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"  # the shipped mnist teacher, evaluator and prompt files
