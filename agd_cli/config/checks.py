"""Checks of user values: flags, preset TOML values, prompt files and the folders a run writes.

Each check raises InputError naming the flag and the value literally, with a hint, and runs
before any model loads or anything is written (like diffusers' `check_inputs`). Numbers must be
finite: Click and TOML both accept `nan` and `inf`, which would otherwise poison data silently.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agd_cli.config.vocab import DTYPES, OPTIMIZERS, SCHEDULERS
from agd_cli.infra.errors import InputError
from agd_cli.infra.io import read_json

DEFAULT_TRAIN_TIMESTEPS = 1000  # diffusers' default num_train_timesteps


# --- predicates (also used by the preset schema) ---------------------------------------------
def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A real number (int or float, not bool) that is neither NaN nor ±inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- numbers ------------------------------------------------------------------------------------
def integer(flag: str, value: Any, minimum: int = 1, example: str | None = None) -> int:
    """An integer flag ≥ `minimum`."""
    if not is_int(value) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer ≥ {minimum}")
        raise InputError(f"{flag} must be {kind}, got {value!r}",
                         hint=f"for example {example or f'{flag} {max(minimum, 1)}'}")
    return value


def optional_integer(flag: str, value: Any, minimum: int = 1) -> int | None:
    """None (the flag was not given), else an integer flag ≥ `minimum`."""
    return None if value is None else integer(flag, value, minimum)


def number(flag: str, value: Any, low: float = 0.0, high: float = math.inf,
           low_open: bool = True, high_open: bool = False, example: str | None = None) -> float:
    """A finite number in the interval between `low` and `high` (open or closed ends)."""
    ok = is_finite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        span = f"a finite number > {low:g}" if high == math.inf and low_open else (
            f"a finite number in {left}{low:g}, {high:g}{right}")
        raise InputError(f"{flag} must be {span}, got {_literal(value)}",
                         hint=f"for example {example or f'{flag} 1'}")
    return float(value)


def probability(flag: str, value: Any, hint: str) -> float:
    """A share from 0 to 1 (bools are not numbers here)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise InputError(f"{flag} must be from 0 to 1, got {_literal(value)}", hint=hint)
    return float(value)


def omega_range(lo: Any, hi: Any, where: str = "") -> tuple[float, float]:
    """ω_min ≤ ω_max, both finite and > 0 (`where`: the preset file, when they came from it)."""
    names = ("sampling.omega_min", "sampling.omega_max") if where else ("--omega-min", "--omega-max")
    prefix = f"preset {where}: " if where else ""
    for name, value in zip(names, (lo, hi), strict=True):
        if not (is_finite(value) and value > 0):
            raise InputError(f"{prefix}{name} must be a finite number > 0, got {_literal(value)}",
                             hint="the paper uses ω ~ U[1, 12] for text-to-image, U[1, 6] for DiT")
    if lo > hi:
        raise InputError(f"{prefix}{names[0]} {lo:g} is larger than {names[1]} {hi:g}",
                         hint="swap the two values")
    return float(lo), float(hi)


def omega(value: Any, flag: str = "-w/--omega") -> float:
    """A guidance scale ω: finite and > 0."""
    if not (is_finite(value) and value > 0):
        raise InputError(f"{flag} must be a finite number > 0, got {_literal(value)}",
                         hint="ω = 1 is the conditional model alone; typical values are 2–12")
    return float(value)


MAX_SEED = 2**32 - 1  # as numpy's; derived seeds (seed + image index) stay well inside 64 bits
MAX_SEEDS = 100_000   # seeds one --seeds list may expand to (each is a sampling run)


def seed(value: Any, flag: str = "--seed") -> int:
    """A seed: an integer from 0 to MAX_SEED, the same range in every command."""
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        raise InputError(f"{flag} must be an integer from 0 to {MAX_SEED}, got {value!r}",
                         hint=f"for example {flag} 0")
    return value


def size(text: str | None, flag: str = "--size") -> tuple[int, int] | None:
    """'WxH' (or one number for a square) -> (height, width), the order of sizes in agd."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×X*]\s*(\d+))?\s*", str(text))
    if not m:
        raise InputError(f"bad {flag} '{text}'",
                         hint=f"use WIDTHxHEIGHT, e.g. {flag} 1024x768, or one number")
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
    if w < 1 or h < 1:
        raise InputError(f"bad {flag} '{text}': width and height must be positive",
                         hint=f"e.g. {flag} 512x512")
    return h, w


def _comma_split(values: Sequence, flag: str, example: str) -> list[str]:
    """The comma-separated parts of repeated flag values; an empty part is an error."""
    for value in values:
        if any(not p.strip() for p in str(value).split(",")):
            raise InputError(f"{flag} '{value}' has an empty value", hint=f"e.g. {example}")
    return [p.strip() for v in values for p in str(v).split(",")]


def omega_list(values: Sequence, default: Sequence[float]) -> list[float]:
    """Guidance scales from repeated -w flags, each maybe a comma list (bench); finite and > 0."""
    out = []
    for part in _comma_split(values, "-w", "-w 2 -w 4 or -w 2,4"):
        try:
            w = float(part)
        except ValueError:
            raise InputError(f"bad guidance scale '{part}' in -w", hint="give numbers, e.g. -w 2 -w 4 or -w 2,4") from None
        if not (math.isfinite(w) and w > 0):
            raise InputError(f"guidance scale {part} must be a positive number",
                             hint="a finite ω > 0; ω = 1 is the conditional model alone, 2–12 is typical")
        out.append(w)
    return list(dict.fromkeys(out)) or [float(w) for w in default]


def seed_list(values: Sequence, default: Sequence[int] = (0,)) -> list[int]:
    """Seeds from --seeds: '0,1,2', ranges '0-3', or repeated flags."""
    out: list[int] = []
    for part in _comma_split(values, "--seeds", "--seeds 0,1,2 or --seeds 0-7"):
        lo, sep, hi = part.partition("-")
        try:
            seeds = range(int(lo), int(hi) + 1) if sep and lo else [int(part)]
        except ValueError:
            raise InputError(f"bad seed '{part}' in --seeds", hint="e.g. --seeds 0,1,2 or --seeds 0-7") from None
        if (sep and lo and int(lo) > int(hi)) or not all(0 <= s <= MAX_SEED for s in (seeds[0], seeds[-1])):
            raise InputError(f"bad seed '{part}' in --seeds",
                             hint=f"seeds are integers from 0 to {MAX_SEED}, ranges low-high")
        if len(out) + len(seeds) > MAX_SEEDS:
            raise InputError(f"--seeds '{part}' makes more than {MAX_SEEDS:,} seeds",
                             hint="each seed is a sampling run: give fewer, e.g. --seeds 0-7")
        out.extend(seeds)
    return list(dict.fromkeys(out)) or list(default)


# --- names from the vocabulary (agd_cli.config.presets: DTYPES, SCHEDULERS, OPTIMIZERS) -------------
def choice(value: Any, options: Sequence[str], what: str) -> str:
    """One of `options`, else an error naming the value and the choices."""
    if value not in options:
        raise InputError(f"unknown {what} '{value}'", hint=f"use one of {', '.join(options)}")
    return value


def dtype(value: Any, what: str = "dtype") -> str:
    """fp16, bf16 or fp32."""
    return choice(value, DTYPES, what)


def scheduler(value: Any) -> str:
    """A sampler name (agd_cli.core.sampling.SCHEDULER_CLASSES maps each to diffusers)."""
    return choice(value, SCHEDULERS, "scheduler")


def optimizer(value: Any) -> str:
    return choice(value, OPTIMIZERS, "optimizer")


def _literal(value: Any) -> str:
    """A value as the user wrote it (a flag's text, kept by commands.FloatFlag), else shown."""
    if hasattr(value, "text"):
        return value.text
    return repr(value) if not isinstance(value, float) else f"{value:g}"


# --- sampling steps against the model's noise schedule ------------------------------------------
def train_timesteps(scheduler_config: dict | None) -> int:
    """Length of the training noise schedule (diffusers' num_train_timesteps)."""
    return int((scheduler_config or {}).get("num_train_timesteps", DEFAULT_TRAIN_TIMESTEPS))


def preset_scheduler_config(preset) -> dict | None:
    """The preset's scheduler config without loading weights: its TOML or a local model folder."""
    if preset.architecture.get("scheduler"):
        return preset.architecture["scheduler"]
    src = Path(preset.resolve_base_model())
    path = src / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return read_json(path)
    return None  # a hub id: checked again once the scheduler config is loaded


def sampling_steps(steps: int, scheduler_config: dict | None, flag: str = "--steps") -> int:
    """Sampling steps must fit the schedule the model was trained with."""
    total = train_timesteps(scheduler_config)
    if steps > total:
        raise InputError(f"{flag} {steps} is more than the model's {total} training timesteps",
                         hint=f"use {flag} {total} or fewer (20–50 is typical)")
    return steps


# --- folders a run writes -----------------------------------------------------------------------
def nearest_existing(path: str | Path) -> Path:
    """`path` or its closest ancestor that exists (what a new folder would be created in)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def writable_folder(path: str | Path, flag: str) -> Path:
    """`path` is (or can be created as) a folder this process may write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} '{path}' is a file, not a folder",
                         hint=f"give a folder path for {flag}")
    probe = nearest_existing(path)
    if not probe.is_dir():
        raise InputError(f"cannot create {flag} '{path}': '{probe}' is a file, not a folder",
                         hint=f"choose another path for {flag}, one that is not below a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {flag} '{path}': no write permission on '{probe}'",
                         hint=f"choose a {flag} you can write to, or fix its permissions")
    return path


def workdir(path: str | Path) -> Path:
    """The workspace folder: a folder (or nothing yet), never a file."""
    if not str(path).strip():
        raise InputError(f"--workdir {str(path)!r} is empty",
                         hint="give a folder, e.g. --workdir agd-runs (the default)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--workdir '{path}' is a file, not a folder",
                         hint="pass a folder with --workdir (or AGD_WORKDIR); it is created if missing")
    return path


# --- prompt files -------------------------------------------------------------------------------
def csv_rows(rows: Sequence[dict], text: str, path: Path, key: str) -> None:
    """A stray quote makes CSV swallow later lines into one field: find it and name its line."""
    for row in rows:
        cell = row.get(key) or ""
        if "\n" in cell or "\r" in cell:
            line = _line_of(text, cell)
            raise InputError(f"prompt file {path}, line {line}: a prompt spans several lines "
                             f"(an unbalanced quote?): {_short(cell)!r}",
                             hint="close the quote, or double a quote inside a quoted field (\"\")")
    lines = sum(1 for ln in text.splitlines()[1:] if ln)
    if lines != len(rows):
        raise InputError(f"prompt file {path} has {lines} data lines but parses as {len(rows)} rows",
                         hint="look for an unbalanced double quote; one prompt per line")


def _line_of(text: str, cell: str) -> int:
    first = cell.splitlines()[0] if cell.strip() else cell
    at = text.find(first)
    return text.count("\n", 0, at) + 1 if at >= 0 else 0


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def prompt_warnings(prompts: Sequence[str], path: Path) -> list[str]:
    """Duplicate prompts and prompts holding control characters: one warning each kind."""
    out = []
    seen: dict[str, int] = {}
    dups = [n for n, p in enumerate(prompts, 1) if seen.setdefault(p, n) != n]
    if dups:
        out.append(f"prompt file {path}: {len(dups)} duplicate prompt(s), first: "
                   f"prompt {dups[0]} {_short(prompts[dups[0] - 1])!r}")
    ctrl = [n for n, p in enumerate(prompts, 1) if any(ord(c) < 32 or ord(c) == 127 for c in p)]
    if ctrl:
        out.append(f"prompt file {path}: {len(ctrl)} prompt(s) hold control characters, first: "
                   f"prompt {ctrl[0]} {_short(prompts[ctrl[0] - 1])!r}")
    return out
