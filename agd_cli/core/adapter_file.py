"""An agd adapter file, read once per command: its metadata without the tensors, the preset and
ω range it was trained with; the tensors load (checksum verified) only when adapters are built.

    f = AdapterFile.open("agd-runs/sdxl/adapter.safetensors")
    f.preset, f.omega_range, f.negatives      # metadata only: no tensor is read
    den.load_adapters(f)                      # reads and verifies the tensors
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from agd_cli.config.checks import omega_range
from agd_cli.config.presets import SCHEMA, Preset, load_preset, preset_from_record
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.core.guidance_rules import GuidanceRule
from agd_cli.infra.errors import DataError, InputError
from agd_cli.infra.tensor_files import tensors_sha256

FORMAT = "agd-adapter/1"


@dataclass
class AdapterFile:
    """Path and decoded metadata of an adapter file written by `agd train`."""

    path: Path
    meta: dict                                    # JSON fields decoded
    raw: dict = field(default_factory=dict)       # the file's metadata as stored (strings)

    @classmethod
    def open(cls, path: str | Path | AdapterFile) -> AdapterFile:
        """Read the metadata only (safetensors header); refuse a file that is not an adapter."""
        if isinstance(path, AdapterFile):
            return path
        path = Path(path)
        if not path.is_file():
            raise DataError(f"adapter file not found: {path}",
                            hint="train one with `agd train`, or pass --adapter PATH")
        try:
            with safe_open(str(path), "pt") as f:
                raw = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise _unreadable(path, e) from None
        if str(raw.get("format", "")).startswith("agd-adapter/") and raw["format"] != FORMAT:
            raise DataError(f"{path} is an agd adapter file of format '{raw['format']}'; this agd "
                            f"reads '{FORMAT}'",
                            hint="use the agd version that wrote it (`pip install -U agd`), or retrain")
        if raw.get("format") != FORMAT:
            raise DataError(f"{path} is not an agd adapter file (no agd metadata)",
                            hint="pass a file written by `agd train`")
        return cls(path, _checked(path, adapter_metadata(raw)), raw)

    def tensors(self) -> dict:
        """The adapter weights, verified against the checksum in the metadata."""
        try:
            state = load_file(str(self.path))
        except Exception as e:  # noqa: BLE001
            raise _unreadable(self.path, e) from None
        # files written since checksums exist carry one; older files load without
        if "tensors_sha256" in self.raw and tensors_sha256(state) != self.raw["tensors_sha256"]:
            raise DataError(f"adapter file {self.path} is damaged: its tensors do not match the "
                            "checksum in its metadata",
                            hint="copy it again, or rerun `agd train` on its run folder to "
                                 "rewrite it from the last checkpoint")
        return state

    @cached_property
    def preset(self) -> Preset:
        """The preset the adapter was trained with (as recorded in the file)."""
        found = preset_from_record(self.meta)
        if found is None:
            raise DataError(f"adapter {self.path} does not say which preset trained it",
                            hint="retrain it with `agd train`")
        return found

    def base_for(self, preset: str | None) -> Preset:
        """The base to run the adapter on: --preset's (same family: e.g. a fine-tune), else
        the preset it was trained with (also when --preset names that same preset)."""
        if preset is None or preset == self.meta.get("preset"):
            return self.preset
        chosen = load_preset(preset)
        if chosen.family != self.family:
            raise InputError(
                f"adapter {self.path} was trained for '{self.base_model}' (family {self.family}), "
                f"but --preset {chosen.name} is '{chosen.base_source()}' (family {chosen.family})",
                hint="drop --preset to use the base the adapter was trained on")
        return chosen

    @property
    def family(self) -> str | None:
        return self.meta.get("family")

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")

    @property
    def omega_range(self) -> tuple[float, float]:
        """The ω range the adapter was trained on (the preset's, for files that omit it)."""
        lo, hi = self.preset.omega_range
        return float(self.meta.get("omega_min", lo)), float(self.meta.get("omega_max", hi))

    @property
    def guidance(self) -> GuidanceRule:
        """The teacher's rule the adapters learned (files from before the rules: plain CFG)."""
        return GuidanceRule.from_record(self.meta.get("guidance"))

    @property
    def negatives(self) -> bool:
        """Whether the adapter was trained with negative prompts (reads CFG's uncond branch)."""
        return bool((self.meta.get("adapter_config") or {}).get("negatives"))


def _checked(path: Path, meta: dict) -> dict:
    """Metadata whose values later code relies on, checked: a damaged or hand-edited file is
    refused here, naming the field, instead of failing somewhere inside a model."""
    def bad(key: str, value) -> DataError:
        return DataError(f"adapter file {path} has a bad metadata value {key}={value!r}",
                         hint="the file was edited or damaged; use the one `agd train` wrote, or retrain")

    config = meta.get("adapter_config")
    try:
        AdapterConfig(**config)
    except TypeError:
        raise bad("adapter_config", config) from None
    for key, value in config.items():
        if key in SCHEMA["adapter"] and not SCHEMA["adapter"][key](value):
            raise bad(f"adapter_config.{key}", value)
    lo, hi = meta.get("omega_min", 1.0), meta.get("omega_max", 1.0)
    try:
        omega_range(lo, hi)
    except InputError:
        raise bad("omega_min/omega_max", [lo, hi]) from None
    if not isinstance(meta.get("signature"), str):
        raise bad("signature", meta.get("signature"))
    return meta


def _unreadable(path: Path, e: Exception) -> DataError:
    return DataError(f"cannot read adapter file {path}: {e}",
                     hint="the file is corrupt or not a safetensors file")


def read_adapter_file(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, stored metadata) of an agd adapter file, checksum verified."""
    f = AdapterFile.open(path)
    return f.tensors(), f.raw


def adapter_metadata(meta: dict) -> dict:
    """Metadata with JSON fields decoded."""
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out
