"""Prompt sets: text files (.txt/.csv/.jsonl), built-in lists and DiT class specs.

Everything here is validated before any model loads; bad files raise InputError naming the
file (and line) and saying how to fix it.

Built-in sets (`builtin:NAME`, agd_cli/assets/prompts/; a bare NAME that is no file here means
the same): coco500.txt, 500 COCO-2017 captions, the paper's text-to-image prompt set and the
text-to-image presets' default (COCO captions © the COCO Consortium, CC BY 4.0,
https://cocodataset.org/#termsofuse); tiny-prompts.txt for the tiny test presets; negatives-sd.txt
and mnist-negatives.txt, negative prompts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from agd_cli import ASSETS_DIR
from agd_cli.config import checks
from agd_cli.families.spec import FamilySpec
from agd_cli.infra.errors import InputError

if TYPE_CHECKING:
    from agd_cli.config.presets import Preset

logger = logging.getLogger(__name__)

ASSET_PROMPTS = ASSETS_DIR / "prompts"
FORMATS = (".txt", ".csv", ".jsonl")


def _check_file(path: Path, flag: str) -> None:
    """`path` is an existing file (not a folder): one clear error naming `flag` otherwise."""
    if not path.exists():
        raise InputError(f"prompt file not found: {path}", hint=f"check the path given to {flag}")
    if not path.is_file():
        raise InputError(f"prompt file {path} is a folder, not a file" if path.is_dir()
                         else f"prompt file {path} is not a file",
                         hint=f"give {flag} a .txt, .csv or .jsonl file")


def _read_text(path: Path) -> str:
    """A UTF-8 text file (BOM dropped); one clear error when unreadable or not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {e.start})",
                         hint="save it as UTF-8, e.g. `iconv -t UTF-8 FILE > FILE.utf8`") from None
    except OSError as e:
        raise InputError(f"cannot read prompt file {path}: {e.strerror}",
                         hint="check the file's permissions") from None


def _from_txt(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _from_csv(text: str, path: Path) -> list[str]:
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as e:
        raise InputError(f"prompt file {path} is not valid CSV: {e}",
                         hint="one header row with a 'caption' column, one prompt per row") from None
    columns = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    if rows and "caption" not in columns:
        raise InputError(f"prompt file {path} has no 'caption' column (columns: {columns})",
                         hint="name the prompt column 'caption'")
    key = next((k for k in (rows[0] if rows else {}) if k.strip().lower() == "caption"), None)
    checks.csv_rows(rows, text, path, key)
    return [(row.get(key) or "").strip() for row in rows if (row.get(key) or "").strip()]


def _from_jsonl(text: str, path: Path) -> list[str]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"prompt file {path}, line {n}: not valid JSON ({e.msg})",
                             hint='one object per line, e.g. {"prompt": "a red fox"}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise InputError(f"prompt file {path}, line {n}: no string 'prompt' field",
                             hint='one object per line, e.g. {"prompt": "a red fox"}')
        if obj["prompt"].strip():
            prompts.append(obj["prompt"].strip())
    return prompts


def read_prompts(path: str | Path, flag: str = "--prompts") -> list[str]:
    """Prompts of a .txt (one per line), .csv ('caption' column) or .jsonl ('prompt') file;
    `flag` is the option that named it, for the hints."""
    path = Path(path)
    _check_file(path, flag)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"prompt file {path} has an unknown format '{suffix or '(none)'}'",
                         hint="use .txt (one prompt per line), .csv (a 'caption' column) "
                              "or .jsonl (a 'prompt' field)")
    text = _read_text(path)
    if suffix == ".txt":
        prompts = _from_txt(text)
    elif suffix == ".csv":
        prompts = _from_csv(text, path)
    else:
        prompts = _from_jsonl(text, path)
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts",
                         hint="add at least one non-empty prompt")
    for warning in checks.prompt_warnings(prompts, path):
        logger.warning(warning)
    return prompts


def builtin_prompts(spec: str, flag: str = "--prompts") -> list[str]:
    """'builtin:<file>' from agd_cli/assets/prompts/; 'builtin:mnist' is mnist.txt there (the
    mnist teacher's caption phrasings, evaluation.mnist.PROMPTS written out)."""
    name = spec.split(":", 1)[1]
    if name == "mnist":
        name = "mnist.txt"
    path = ASSET_PROMPTS / name
    if not path.is_file():
        shipped = shipped_sets()
        raise InputError(f"unknown built-in prompt set '{spec}'",
                         hint=f"shipped sets: {', '.join('builtin:' + s for s in shipped)}")
    return read_prompts(path)


def shipped_sets() -> list[str]:
    """File names of the built-in prompt sets (agd_cli/assets/prompts/)."""
    if not ASSET_PROMPTS.is_dir():
        return []
    return sorted(p.name for p in ASSET_PROMPTS.iterdir() if p.suffix.lower() in FORMATS)


def resolve_spec(spec: str, flag: str = "--prompts") -> str:
    """A prompt spec as given, or 'builtin:NAME' for a bare NAME that is no file here but a
    built-in set (README's `--prompts coco500.txt`); said in one line when it happens."""
    if spec.startswith("builtin:") or Path(spec).exists() or spec not in shipped_sets():
        return spec
    logger.info(f"{flag} {spec}: no such file here; using the built-in set builtin:{spec}")
    return f"builtin:{spec}"


def read_prompt_spec(spec: str, flag: str = "--prompts") -> list[str]:
    """The prompts of a file or a built-in set (resolve_spec already applied)."""
    return builtin_prompts(spec, flag) if spec.startswith("builtin:") else read_prompts(spec, flag)


def parse_classes(spec: str, num_classes: int) -> list[int | str]:
    """DiT classes: 'all', a range '0-9', a list '1,5,7' (mixable), or class names.

    Names stay strings; the model resolves them (it knows the label table).
    """
    text = str(spec).strip()
    if text.lower() == "all":
        return list(range(num_classes))
    out: list[int | str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and lo.strip().isdigit() and hi.strip().isdigit():
            a, b = int(lo), int(hi)
            if a > b:
                raise InputError(f"bad class range '{part}' in --classes", hint="write it low-high, e.g. 0-9")
            out.extend(range(a, b + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            out.append(part)
    bad = [c for c in out if isinstance(c, int) and c >= num_classes]
    if bad:
        raise InputError(f"class id {bad[0]} in --classes '{spec}' is out of range",
                         hint=f"class ids go from 0 to {num_classes - 1}")
    if not out:
        raise InputError(f"--classes '{spec}' names no class", hint="e.g. --classes all, 0-9 or 1,5,7")
    return out


def prompts_sha256(prompts: list) -> str:
    """Identity of a prompt set: the hash of its parsed content (line endings/BOM don't matter)."""
    return hashlib.sha256(json.dumps([str(p) for p in prompts]).encode("utf-8")).hexdigest()


# --- the prompt sets of a preset (collect, bench) ----------------------------------------------
def _num_classes(preset: Preset) -> int:
    return FamilySpec(preset).num_classes


def load_prompt_set(preset: Preset, prompts: str | None = None,
                    classes: str | None = None) -> tuple[list, str]:
    """The prompts (or DiT classes) to collect for, and a label saying where they came from."""
    if prompts is not None and classes is not None:
        raise InputError("--prompts and --classes were both given",
                         hint="--classes is for class-conditional (dit) presets; give one of them")
    if classes is not None:
        if preset.family != "dit":
            raise InputError(f"--classes given, but preset '{preset.name}' is text-conditional "
                             f"(family {preset.family})", hint="give --prompts FILE instead")
        return parse_classes(classes, _num_classes(preset)), f"classes:{classes}"
    spec = prompts if prompts is not None else preset.prompts
    if not spec:
        raise InputError(f"no prompts given and preset '{preset.name}' has no default prompt set",
                         hint="pass --prompts FILE (.txt, .csv or .jsonl)"
                              + (" or --classes all" if preset.family == "dit" else ""))
    if preset.family == "dit" and prompts is None and not spec.startswith("builtin:"):
        return parse_classes(spec, _num_classes(preset)), f"classes:{spec}"
    spec = resolve_spec(spec)
    items = read_prompt_spec(spec)
    if preset.family == "dit":  # a file of class ids or names, one per line
        items = parse_classes(",".join(items), _num_classes(preset))
    return items, spec if spec.startswith("builtin:") else str(Path(spec))


def load_negative_set(preset: Preset, spec: str | None,
                      empty_probability: float | None) -> tuple[list, str | None, float]:
    """(negatives, where they came from, P(empty prompt)): --negative-prompts FILE, else the
    preset's list. A probability of 1 means no negatives, as before negatives existed."""
    p = checks.probability(
        "--empty-negative-probability",
        preset.collect["empty_negative_probability"] if empty_probability is None else empty_probability,
        hint="e.g. 0.5: half the trajectories use the empty prompt, half a negative")
    spec = spec if spec is not None else preset.collect.get("negative_prompts")
    if spec is None or p == 1:
        return [], None, 1.0
    spec = resolve_spec(spec, "--negative-prompts")
    try:
        items = read_prompt_spec(spec, "--negative-prompts")
    except InputError as e:
        raise InputError(f"--negative-prompts: {e.message}", hint=e.hint) from None
    if preset.family == "dit":  # a file of class ids or names, one per line
        items = parse_classes(",".join(items), _num_classes(preset))
    return items, spec if spec.startswith("builtin:") else str(Path(spec)), float(p)
