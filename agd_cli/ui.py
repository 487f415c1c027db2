"""Terminal output: logs and progress on stderr, data on stdout; honours NO_COLOR."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_no_color = "NO_COLOR" in os.environ
err = Console(stderr=True, no_color=_no_color, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    """A log line on stderr."""
    err.print(message)


def warn(message: str) -> None:
    """A warning on stderr."""
    err.print(f"[yellow]warning:[/yellow] {message}")


def progress(*extra_columns: Any) -> Progress:
    """A rich progress bar on stderr: description, bar, count, elapsed, ETA, extra fields."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=os.environ.get("AGD_NO_PROGRESS") == "1",
    )


def emit_json(obj: dict) -> None:
    """The one JSON object a command prints on stdout with --json."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def result(line: str) -> None:
    """A result line for people, on stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
