"""agd: Adapter Guidance Distillation (arXiv 2503.07274) as a command-line tool."""

__version__ = "0.1.0"
