"""Where `agd generate` writes: image file names, what a folder already holds, and the lock
that keeps two runs writing one folder from replacing each other's images."""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
from pathlib import Path

from filelock import FileLock

from agd_cli.core.adapter_file import AdapterFile
from agd_cli.infra.errors import InputError, Interrupted
from agd_cli.infra.images import read_png_metadata


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe version of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s[:limit].rstrip("-") or "image"


def holds_image(path: Path, settings: str) -> bool:
    """Whether `path` is a complete PNG made with these settings (a rerun keeps it)."""
    try:
        return read_png_metadata(path).get("settings") == settings  # decodes it all: no torn file
    except (OSError, SyntaxError, ValueError):  # not a PNG, damaged, unreadable: not this image
        return False


def _numbered(folder: Path, stem: str) -> list[Path]:
    """The files a folder holds under one image name: STEM.png, STEM-2.png, … in that order."""
    name = re.compile(re.escape(stem) + r"(?:-(\d+))?\.png")
    found = [(int(m.group(1) or 1), p) for p in folder.glob(f"{stem}*.png")
             if (m := name.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def image_stem(job, omega: float, mode: str) -> str:
    """PROMPT-seedS-wΩ[-cfg]: a job's file name before any -K."""
    return f"{slug(job.prompt)}-seed{job.seed}-w{omega:g}" + ("-cfg" if mode == "cfg" else "")


def image_path(folder: Path, single: Path | None, stem: str, taken: set[Path],
               settings: str) -> tuple[Path, bool]:
    """(path, done): the image already made with these settings (a rerun skips it), else a new
    name: --out FILE.png, else PROMPT-seedS-wΩ[-cfg][-K].png; never overwrites another image."""
    if single is not None:
        if single.exists() and not holds_image(single, settings):
            raise InputError(f"--out '{single}' already exists and is not this image (it was not "
                             "made with the same prompt, seed, ω and settings)",
                             hint=f"pick a new name, e.g. --out "
                                  f"{single.with_name(single.stem + '-2.png')}, or delete it first")
        return single, single.exists()
    for path in _numbered(folder, stem):
        if path not in taken and holds_image(path, settings):
            taken.add(path)
            return path, True
    path, k = folder / f"{stem}.png", 2
    while path.exists() or path in taken:
        path, k = folder / f"{stem}-{k}.png", k + 1
    taken.add(path)
    return path, False


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold an OS file lock for writing images into `folder`, shared by every agd generate on
    this machine (the lock file lives in the temp folder, not among the images). Where the temp
    folder cannot hold it (read-only, full) the write goes ahead unlocked, as before the lock."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    lock = FileLock(str(Path(tempfile.gettempdir()) / f"agd-generate-{key}.lock"))
    try:
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def still_free(path: Path, settings: str, stem: str, single: bool) -> Path:
    """The planned `path`, or (when another agd generate writing the same folder has put
    another image there since this run planned) the next free STEM-K name; a single --out
    FILE.png is refused as at planning. Called under the folder's lock."""
    if not path.exists() or holds_image(path, settings):
        return path
    if single:
        raise InputError(f"--out '{path}' was written by another process while this image was "
                         "being made", hint="pick a new name with --out and rerun")
    k = 2
    while path.exists() and not holds_image(path, settings):
        path, k = path.with_name(f"{stem}-{k}.png"), k + 1
    return path


def negative_mode(file: AdapterFile) -> tuple[str, str]:
    """(mode, note): agd when the adapter was trained with negatives (one pass per step), else
    real CFG. The note is said later, once the prompts have passed their checks."""
    if file.negatives:
        return "agd", "negative prompt: one pass per step (the adapter was trained with negatives)"
    return "cfg", ("note: this adapter was trained without negative prompts, so this run uses real "
                   "CFG (2 passes per step) with the negative prompt; collect and train again "
                   "with --negative-prompts to get one pass")


def interrupted(plan) -> Interrupted:
    """Ctrl-C (`plan`: generate.run.Plan): what is written, and that a rerun skips it."""
    done, total = sum(j.done for j in plan.jobs), len(plan.jobs)
    return Interrupted(f"interrupted: {done} of {total} image(s) are written in "
                       f"{plan.single or plan.folder}",
                       hint=f"rerun the same command to resume: it keeps the {done} written and "
                            f"makes the other {total - done}")
