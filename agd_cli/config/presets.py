"""Presets: TOML files describing a base model, its sampler, adapters and stage defaults.

A preset is validated against SCHEMA before any model loads: an unknown key or a bad value
raises InputError naming the key and the value. Command-line flags override preset values.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agd_cli import ASSETS_DIR, PACKAGE_DIR
from agd_cli.config.checks import is_finite, is_int, omega_range
from agd_cli.config.vocab import (
    ADAPTER_INPUTS,
    ADAPTER_KINDS,
    CHECKPOINT_SUFFIXES,
    DTYPES,
    FAMILIES,
    GUIDANCE_RULES,
    LORA_TARGETS,
    OPTIMIZERS,
    RANDOM_BASE,
    SCHEDULERS,
)
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.infra.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



def _preset_dir() -> Path:
    """Shipped presets: agd_cli/_presets in an installed wheel, the repository's presets/ in a
    clone or an editable install."""
    installed = PACKAGE_DIR / "_presets"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "presets"


PRESET_DIR = _preset_dir()


def is_single_file(source: str) -> bool:
    """A base model given as one checkpoint file rather than a folder or hub id."""
    return source.lower().endswith(CHECKPOINT_SUFFIXES) and not Path(source).is_dir()


def is_random_base(source: object) -> bool:
    """Whether a recorded base model names seeded random weights ("random:<preset>")."""
    return str(source).startswith(RANDOM_BASE)


def _positive(v: Any) -> bool:
    """a finite number > 0"""
    return is_finite(v) and v > 0


def _fraction(v: Any) -> bool:
    """a number in [0, 1)"""
    return is_finite(v) and 0 <= v < 1


def _nonneg(v: Any) -> bool:
    """a finite number >= 0"""
    return is_finite(v) and v >= 0


def _probability(v: Any) -> bool:
    """a number from 0 to 1"""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1


def _open_unit(v: Any) -> bool:
    """a number in (-1, 1)"""
    return is_finite(v) and -1 < v < 1


def _nonneg_int(v: Any) -> bool:
    """an integer >= 0"""
    return is_int(v) and v >= 0


def _pos_int(v: Any) -> bool:
    """an integer > 0"""
    return is_int(v) and v > 0


def _str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _name(v: Any) -> bool:
    """a name of letters, digits, '.', '_' or '-' (it names the run folder, so no path)"""
    return isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", v) is not None


def _revision(v: Any) -> bool:
    """a branch, tag, commit or pull-request ref of the hub repository (e.g. "refs/pr/1")"""
    return isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}", v) is not None


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _one_of(options: tuple[str, ...]):
    def check(v: Any) -> bool:
        return v in options

    check.__doc__ = "one of " + ", ".join(options)
    return check


CARD_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)\s*", re.IGNORECASE)


def _card_size(v: Any) -> bool:
    """a GPU memory size such as "24GB" (the card the preset's defaults are sized for)"""
    return isinstance(v, str) and CARD_SIZE.fullmatch(v) is not None


def _above_one(v: Any) -> bool:
    return v is None or (_positive(v) and v > 1)


_above_one.__doc__ = "a number > 1 (LoRA strength 1 stands for this ω)"


def _inputs(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(x in ADAPTER_INPUTS for x in v)


_inputs.__doc__ = "a non-empty list from " + ", ".join(ADAPTER_INPUTS)

# section -> key -> (validator, description used in error messages)
SCHEMA: dict[str, dict[str, Any]] = {
    "": {
        "name": _name, "family": _one_of(FAMILIES), "base_model": _str, "description": _str,
        "resolution": _pos_int, "pixel_space": _bool, "prompts": _str, "revision": _revision,
    },
    "sampling": {
        "scheduler": _one_of(SCHEDULERS), "steps": _pos_int,
        "omega_min": _positive, "omega_max": _positive, "default_omega": _positive,
        "compile": _bool,  # generate and bench: torch.compile the model (--compile / --no-compile)
    },
    "adapter": {
        "kind": _one_of(ADAPTER_KINDS), "hidden_dim": _pos_int, "context_dim": _pos_int,
        "heads": _pos_int, "inputs": _inputs, "init": _one_of(("xavier", "zero")),
        "omega_gain": _bool, "negative_attention": _bool, "lora_rank": _pos_int,
        "lora_w_ref": _above_one, "lora_targets": _one_of(LORA_TARGETS),
    },
    "collect": {
        "num_per_prompt": _pos_int, "num_per_prompt_with_negatives": _pos_int,
        "batch_size": _pos_int, "keep_steps": _pos_int, "dtype": _one_of(DTYPES),
        "negative_prompts": _str,
        "empty_negative_probability": _probability, "negative_only_probability": _probability,
        "omega_skew": _positive,
        # the teacher's rule and its parameters (agd_cli.core.guidance_rules.PARAMETERS)
        "guidance": _one_of(GUIDANCE_RULES), "interval_start": _probability,
        "interval_stop": _probability, "interval_ramp": _probability, "apg_eta": _probability,
        "apg_momentum": _open_unit,
        "apg_norm_threshold": _nonneg, "zero_init_steps": _nonneg_int, "rescale_phi": _probability,
    },
    "train": {
        "lr": _positive, "batch_size": _pos_int, "grad_accum": _pos_int, "steps": _pos_int,
        "optimizer": _one_of(OPTIMIZERS), "precision": _one_of(DTYPES),
        "gradient_checkpointing": _bool, "warmup_steps": _nonneg_int,
        "val_fraction": _fraction, "checkpoint_every": _pos_int, "keep_checkpoints": _pos_int,
        "preview_every": _nonneg_int, "weight_decay": _nonneg, "omega_loss_power": _nonneg,
        "negative_swap_share": _probability,
    },
    "memory": {"profile": _card_size, "vae_tiling": _bool},
    # a part that runs in its own precision in half-precision runs (a text encoder trained in
    # bf16 beside an fp16 transformer); fp32 runs stay fp32
    "dtypes": {"text_encoder": _one_of(DTYPES), "text_encoder_2": _one_of(DTYPES),
               "text_encoder_3": _one_of(DTYPES)},
}
ARCH_KEYS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae",
             "scheduler", "tokenizer")


@dataclass
class Preset:
    """A validated preset. `raw` keeps the TOML as parsed, for manifests and metadata."""

    name: str
    family: str
    base_model: str
    resolution: int
    description: str = ""
    pixel_space: bool = False
    prompts: str | None = None
    revision: str | None = None  # the hub revision of base_model (None: the main branch)
    sampling: dict = field(default_factory=dict)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    collect: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    dtypes: dict = field(default_factory=dict)  # part -> dtype name ([dtypes])
    architecture: dict = field(default_factory=dict)
    source: Path | None = None
    raw: dict = field(default_factory=dict)

    @property
    def omega_range(self) -> tuple[float, float]:
        return float(self.sampling["omega_min"]), float(self.sampling["omega_max"])

    def base_source(self, random_weights: bool = False) -> str:
        """What a loaded base reports as its source: the resolved base model, or
        'random:<preset>' for seeded random weights (built from the architecture config)."""
        source = self.resolve_base_model()
        return RANDOM_BASE + self.name if random_weights or source == "config" else source

    def with_base_model(self, base_model: str | None) -> Preset:
        """This preset with `--base-model` in place of its base_model (checked, paths made
        absolute); the preset's own revision goes with the base it named."""
        if base_model is None:
            return self
        if not base_model.strip():
            raise InputError("--base-model is empty", hint="give a .safetensors file, a diffusers "
                                                           "folder or a hub id")
        path = Path(base_model).expanduser()
        if is_single_file(base_model) and not path.is_file():
            raise InputError(f"--base-model: checkpoint file '{base_model}' not found",
                             hint="check the path; a diffusers folder or a hub id also works")
        resolved = str(path.resolve()) if path.exists() else base_model
        if resolved == self.base_model:
            return self
        raw = {k: v for k, v in self.raw.items() if k != "revision"}
        return dataclasses.replace(self, base_model=resolved, revision=None, raw=raw)

    def resolve_base_model(self) -> str:
        """A local folder (relative paths are taken from the preset's folder) or a hub id."""
        bm = self.base_model
        if bm.startswith("builtin:"):
            return str(ASSETS_DIR / bm.split(":", 1)[1])
        if bm == "config":
            return bm
        if self.source is not None and not Path(bm).is_absolute():
            local = self.source.parent / bm
            if local.exists():
                return str(local)
        return bm


DEFAULTS: dict[str, dict] = {
    "sampling": {"scheduler": "ddim", "steps": 50, "compile": False},
    "collect": {"num_per_prompt": 1, "batch_size": 4, "dtype": "fp16",
                "empty_negative_probability": 0.5, "negative_only_probability": 0.0,
                "omega_skew": 1.0, "guidance": "cfg"},
    "train": {"lr": 1e-4, "batch_size": 8, "grad_accum": 1, "steps": 2000,
              "optimizer": "adamw8bit", "precision": "bf16", "gradient_checkpointing": True,
              "warmup_steps": 100, "val_fraction": 0.1, "checkpoint_every": 500,
              "keep_checkpoints": 2, "preview_every": 0, "weight_decay": 0.0,
              "omega_loss_power": 0.0},
    "memory": {"profile": "24GB", "vae_tiling": False},
}


def _bad(where: str, key: str, value: Any, check) -> InputError:
    expected = (check.__doc__ or check.__name__.strip("_")).strip()
    return InputError(f"preset {where}: bad value for '{key}': {value!r}",
                      hint=f"'{key}' must be {expected}")


def validate(data: dict, where: str) -> None:
    """Check every key and value of a parsed preset against SCHEMA."""
    for key, value in data.items():
        if isinstance(value, dict) and key in SCHEMA and key != "":
            for sub, sval in value.items():
                check = SCHEMA[key].get(sub)
                if check is None:
                    raise InputError(f"preset {where}: unknown key '{key}.{sub}' (value {sval!r})",
                                     hint=f"known keys in [{key}]: {', '.join(SCHEMA[key])}")
                if not check(sval):
                    raise _bad(where, f"{key}.{sub}", sval, check)
        elif key == "architecture":
            if not isinstance(value, dict) or any(k not in ARCH_KEYS for k in value):
                bad = [k for k in (value if isinstance(value, dict) else {}) if k not in ARCH_KEYS]
                raise InputError(f"preset {where}: unknown architecture part(s) {bad or value!r}",
                                 hint=f"known parts: {', '.join(ARCH_KEYS)}")
        elif key in SCHEMA[""]:
            if not SCHEMA[""][key](value):
                raise _bad(where, key, value, SCHEMA[""][key])
        else:
            known = [k for k in SCHEMA[""]] + [k for k in SCHEMA if k] + ["architecture"]
            raise InputError(f"preset {where}: unknown key '{key}' (value {value!r})",
                             hint=f"known top-level keys: {', '.join(known)}")
    for required in ("name", "family", "base_model", "resolution"):
        if required not in data:
            raise InputError(f"preset {where}: missing key '{required}'",
                             hint="see the shipped presets (`agd presets`) for examples")
    s = data.get("sampling", {})
    for k in ("omega_min", "omega_max"):
        if k not in s:
            raise InputError(f"preset {where}: missing key 'sampling.{k}'",
                             hint="the guidance-scale range adapters are trained on, e.g. 1 and 12")
    omega_range(s["omega_min"], s["omega_max"], where)


def from_dict(data: dict, source: Path | None = None) -> Preset:
    """Validate a parsed TOML dict and fill in defaults."""
    where = str(source) if source else data.get("name", "<dict>")
    validate(data, where)
    merged = {k: {**DEFAULTS.get(k, {}), **data.get(k, {})} for k in
              ("sampling", "collect", "train", "memory")}
    merged["collect"].setdefault("keep_steps", merged["sampling"]["steps"])
    merged["sampling"].setdefault("default_omega",
                                  round((s := merged["sampling"])["omega_min"] * 0.5
                                        + s["omega_max"] * 0.5, 2))
    return Preset(
        name=data["name"], family=data["family"], base_model=data["base_model"],
        resolution=data["resolution"], description=data.get("description", ""),
        pixel_space=data.get("pixel_space", False), prompts=data.get("prompts"),
        sampling=merged["sampling"], adapter=AdapterConfig(**data.get("adapter", {})),
        collect=merged["collect"], train=merged["train"], memory=merged["memory"],
        revision=data.get("revision"), dtypes=dict(data.get("dtypes", {})),
        architecture=copy.deepcopy(data.get("architecture", {})), source=source,
        raw=copy.deepcopy(data),
    )


def preset_from_record(record: dict) -> Preset | None:
    """The preset an adapter file or a collection was made with, from its metadata: the TOML
    it recorded (base model as resolved then), else the shipped preset it names; None if none."""
    raw = record.get("preset_toml")
    if isinstance(raw, dict):
        preset = from_dict(raw)
        if record.get("base_model") and not is_random_base(record["base_model"]):
            preset.base_model = record["base_model"]  # already resolved when it was recorded
        return preset
    if record.get("preset"):
        return load_preset(record["preset"])
    return None


def builtin_names() -> list[str]:
    """Names of the presets shipped with agd."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name_or_path: str) -> Preset:
    """Load a shipped preset by name, or the user's own TOML file by path."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or path.exists()):
        path = PRESET_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise InputError(f"unknown preset '{name_or_path}'",
                             hint=f"choose one of {', '.join(builtin_names())}, "
                                  "or give the path of a .toml file")
    if path.is_dir():
        raise InputError(f"preset '{name_or_path}' is a folder, not a .toml file",
                         hint="give the path of a preset .toml file, or a shipped preset's name")
    if not path.is_file():
        raise InputError(f"preset file not found: {path}", hint="check the path")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"preset {path} is not valid TOML: {e}",
                         hint="fix the syntax; see the shipped presets (`agd presets`) for examples") from None
    return from_dict(data, source=path.resolve())
