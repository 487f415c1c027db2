"""Terminal output: logs and progress on stderr, data on stdout; honours NO_COLOR."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from agd_cli.infra.io import json_safe

_no_color = "NO_COLOR" in os.environ
err = Console(stderr=True, no_color=_no_color, highlight=False, soft_wrap=True)


def info(message: str, style: str | None = None) -> None:
    """A log line on stderr, shown literally (paths like `a[draft]` are not rich markup)."""
    err.print(escape(message), style=style)


def warn(message: str) -> None:
    """A warning on stderr, shown literally."""
    err.print(f"[yellow]warning:[/yellow] {escape(message)}")


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
    """The one JSON object a command prints on stdout with --json (strict JSON: no NaN)."""
    text = json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False)  # no bare NaN
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def result(line: str) -> None:
    """A result line for people, on stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
