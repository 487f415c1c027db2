"""Terminal output: logs and progress on stderr, data on stdout; honours NO_COLOR."""

from __future__ import annotations

import json
import logging
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
    """A log line on stderr, shown literally (paths like `a[draft]` are not rich markup);
    nothing with -q."""
    if not quiet():
        err.print(escape(message), style=style)


def warn(message: str) -> None:
    """A warning on stderr, shown literally."""
    err.print(f"[yellow]warning:[/yellow] {escape(message)}")


class TerminalHandler(logging.Handler):
    """agd's log records on stderr as the CLI shows them: warnings prefixed, info plain (a
    record's `style` extra colours it), values literal (no rich markup)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                warn(message)
            else:
                info(message, getattr(record, "style", None) or
                     ("dim" if record.levelno < logging.INFO else None))
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def setup_logging(verbosity: int = 0) -> None:
    """The CLI's choice of what reaches the screen: -q (warnings only), default (info), -v
    (debug, and the libraries' own info lines). Library users keep Python's defaults."""
    log = logging.getLogger("agd_cli")
    if not any(isinstance(h, TerminalHandler) for h in log.handlers):
        log.addHandler(TerminalHandler())
    log.propagate = False  # no second copy through a root handler
    log.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0
                 else logging.INFO)


def quiet() -> bool:
    """Whether the user asked for warnings only (-q): progress bars are hidden too."""
    return logging.getLogger("agd_cli").getEffectiveLevel() > logging.INFO


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
        disable=os.environ.get("AGD_NO_PROGRESS") == "1" or quiet(),
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


def console(stdout: bool = False):
    """A console (stderr unless `stdout`) wide enough for the tables even off a terminal."""
    return Console(stderr=not stdout, no_color=_no_color, highlight=False,
                   width=max(err.width, 130))


def gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"
