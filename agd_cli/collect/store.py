"""On-disk trajectory collections: a manifest plus atomic, checksummed safetensors shards.

    trajectories/manifest.json        run identity ("config") and, once finalised, "shards"
    trajectories/shard-<tag>.safetensors
    trajectories/shard-<tag>.json     sidecar: ids, counts, bytes, sha256 — a shard counts as
                                      complete only once its sidecar exists

Tensors of a shard with N trajectories of K kept steps (fp16 unless noted):
    x (N, K, C, H, W)          model input x_t at each kept step
    target (N, K, C, H, W)     CFG-guided model output ε̃ (or ṽ) at that step
    timesteps (N, K) int64     omega (N,) float32
    prompt_index (N,) int64    trajectory_id (N,) int64; prompt_index -1: the empty prompt
    cond_row (N,) int64        row of this trajectory's condition in the cond.* tensors
    cond.<key> (U, ...)        condition of each distinct prompt in the shard (stored once);
                               the null condition last where a trajectory pairs its negative
                               with the empty prompt (--negative-only-probability)
    uncond.<key> (V, ...)      CFG's unconditional branch: row 0 the null condition (empty
                               prompt / null class), then each distinct negative of the shard
    uncond_row (N,) int64      row of this trajectory's unconditional branch (absent in shards
                               from before negatives: then row 0)
    negative_index (N,) int64  index into the manifest's negative_prompts, -1 for none
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from agd_cli.infra.errors import DataError
from agd_cli.infra.io import atomic_path, read_json, write_json
from agd_cli.infra.tensor_files import save_tensors

DAMAGED = "damaged"  # where resume moves shards that fail their checksum
IDENTITY_KEYS = ("preset", "base_model", "prompts_sha256", "seed", "steps", "keep_steps",
                 "omega_min", "omega_max", "num_per_prompt", "scheduler", "negatives_sha256",
                 "empty_negative_probability", "negative_only_probability", "omega_skew",
                 "guidance")


# what an identity key left out (None) means, for messages: off, or uniform ω
UNSET = {"negatives_sha256": "no negatives", "empty_negative_probability": "no negatives",
         "negative_only_probability": 0.0, "omega_skew": 1.0, "guidance": "cfg"}


# the JSON type of each manifest field a reader relies on; a field may be absent (older
# manifests), and null where it means "unset" (UNSET, and the optional ones below)
_NUMBER = (int, float)
MANIFEST_FIELDS = {"config": dict, "shards": list, "trajectories": int, "bytes_on_disk": int}
CONFIG_FIELDS = {
    "preset": str, "base_model": str, "family": str, "prompts_sha256": str, "seed": int,
    "steps": int, "keep_steps": int, "omega_min": _NUMBER, "omega_max": _NUMBER,
    "num_per_prompt": int, "scheduler": str, "negatives_sha256": str,
    "empty_negative_probability": _NUMBER, "negative_only_probability": _NUMBER,
    "omega_skew": _NUMBER, "prompts": list, "negative_prompts": list, "prompt_source": str,
    "negative_source": str, "resolution": int, "latent_shape": list, "kept_step_indices": list,
    "total_trajectories": int, "preset_toml": dict, "base_model_source": str, "dtype": str,
    "storage_dtype": str, "prediction_type": str, "guidance": dict}
NULLABLE = {*UNSET, "negative_source", "prompt_source", "preset_toml", "base_model_source"}


def _bad_field(fields: dict, types: dict) -> tuple[str, object] | None:
    """The first (field, value) whose value is not of its JSON type, or None."""
    for key, kind in types.items():
        value = fields.get(key)
        if key not in fields or (value is None and key in NULLABLE):
            continue
        if isinstance(value, bool) or not isinstance(value, kind):  # true is no number
            return key, value
    return None


def check_manifest(path: Path, m) -> dict:
    """The manifest `m` read from `path`, if its fields have their types; else DataError."""
    hint = ("the manifest is damaged: restore it from a backup, or recollect into a new folder "
            "(--out) or with --overwrite")
    if not isinstance(m, dict):
        raise DataError(f"{path} holds {_type_name(type(m))}, not a JSON object: it is no "
                        "trajectory manifest", hint=hint)
    bad = _bad_field(m, MANIFEST_FIELDS) or _bad_field(m.get("config", {}), CONFIG_FIELDS)
    if bad:
        key, value = bad
        where = key if key in MANIFEST_FIELDS else f"config.{key}"
        raise DataError(f"{path}: field '{where}' is {json.dumps(value)[:80]}, "
                        f"expected {_type_name(CONFIG_FIELDS.get(key, MANIFEST_FIELDS.get(key)))}",
                        hint=hint)
    return m


def _type_name(kind) -> str:
    names = {int: "an integer", str: "a string", list: "a list", dict: "an object",
             _NUMBER: "a number", float: "a number", bool: "a boolean", type(None): "null"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _shape_facts(config: dict) -> dict:
    """What shapes a collection's samples, as far as a manifest config records it (older ones
    lack some): family and resolution, and from the recorded preset its pixel space and
    architecture."""
    facts = {k: config[k] for k in ("family", "resolution") if config.get(k) is not None}
    preset = config.get("preset_toml")
    if isinstance(preset, dict) and preset:
        facts |= {"pixel_space": preset.get("pixel_space", False),
                  "architecture": preset.get("architecture")}
    return facts


def _shown(key: str, value) -> str:
    unset = UNSET.get(key)
    return str(unset) if value is None and unset is not None else repr(value)


def _reason(e: Exception) -> str:
    """An error's first line, short (a decode error quotes the offending bytes)."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_fault(shard: Path, info: dict | None) -> str | None:
    """Why a shard does not match its sidecar, or None when it does."""
    if not isinstance(info, dict):
        return "unreadable sidecar"
    if info.get("file") != shard.name:  # e.g. a copied sidecar: its trajectories are elsewhere
        return f"its sidecar describes {info.get('file')!r}, not this shard"
    if not shard.is_file():
        return "shard file missing"
    if shard.stat().st_size != info.get("bytes"):
        return f"{shard.stat().st_size} bytes, {info.get('bytes')} expected"
    if sha256_file(shard) != info.get("sha256"):
        return "checksum mismatch"
    return None


class TrajectoryStore:
    """A collection folder (`<run>/trajectories`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        if not self.exists():
            raise DataError(f"no trajectory collection in {self.root} (manifest.json missing)",
                            hint="run `agd collect` first")
        try:
            m = read_json(self.manifest_path)
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
            raise DataError(f"cannot read {self.manifest_path}: {_reason(e)}",
                            hint="the file is damaged; recollect with --overwrite") from None
        return check_manifest(self.manifest_path, m)

    def check_same(self, config: dict) -> None:
        """The existing collection must be this one to be resumed: the same IDENTITY_KEYS, and
        samples of the same shape (a preset edited under the same name: another resolution,
        architecture or family) where the manifest records it."""
        old = self.manifest().get("config", {})
        for key in IDENTITY_KEYS:
            if old.get(key) == config.get(key):
                continue
            if key == "prompts_sha256" and "prompt_source" in config:  # which sets, not hashes
                what = (f"prompts: {old.get('prompt_source')!r} ({len(old.get('prompts', []))} "
                        f"prompts) there, {config['prompt_source']!r} "
                        f"({len(config.get('prompts', []))} prompts) now")
            else:
                what = f"{key}: {_shown(key, old.get(key))} there, {_shown(key, config.get(key))} now"
            raise self._different(what)
        now = _shape_facts(config)
        for key, value in _shape_facts(old).items():
            if now.get(key) != value:
                raise self._different(f"{key}: {value!r} there, {now.get(key)!r} now")

    def _different(self, what: str) -> DataError:
        return DataError(f"{self.root} already holds a different collection ({what})",
                         hint="rerun with the same settings to resume, use --out for a new "
                              "folder, or --overwrite to replace it")

    def init(self, config: dict, overwrite: bool = False) -> None:
        """Create the manifest, or check that an existing one describes the same collection."""
        if self.exists() and not overwrite:
            self.check_same(config)
            return
        if overwrite and self.root.exists():
            for p in self.root.glob("shard-*"):
                p.unlink()
        write_json(self.manifest_path, {"config": config, "shards": []})

    def discard_if_empty(self) -> None:
        """A collection that never stored a shard leaves nothing behind (a failed start)."""
        if self.exists() and not list(self.root.glob("shard-*")):
            self.manifest_path.unlink()
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only if nothing else is in it

    def clean_partial(self, tag_prefix: str = "") -> None:
        """Remove leftovers of an interrupted write: temp files and shards without sidecar.

        `tag_prefix` limits it to one writer's shards (parallel collect workers).
        """
        temps = ".*.tmp-*" if not tag_prefix else f".shard-{tag_prefix}*.tmp-*"
        for p in self.root.glob(temps):
            p.unlink(missing_ok=True)
        for p in self.root.glob(f"shard-{tag_prefix}*.safetensors"):
            if not p.with_suffix(".json").exists():
                p.unlink(missing_ok=True)

    def shards(self) -> list[dict]:
        """Sidecar infos of all complete shards, in name order (unreadable sidecars skipped)."""
        return [info for _, info in self._sidecars() if info is not None]

    def _sidecars(self) -> list[tuple[Path, dict | None]]:
        out = []
        for p in sorted(self.root.glob("shard-*.json")):
            try:
                info = read_json(p)
            except (OSError, ValueError):
                info = None
            out.append((p, info if isinstance(info, dict) else None))
        return out

    def damaged(self) -> list[tuple[Path, str, list[int]]]:
        """Shards whose bytes do not match their sidecar: (sidecar, reason, trajectory ids)."""
        found = []
        for sidecar, info in self._sidecars():
            reason = _shard_fault(sidecar.with_suffix(".safetensors"), info)
            if reason:
                found.append((sidecar, reason, list((info or {}).get("trajectory_ids", []))))
        return found

    def set_aside(self, sidecars: list[Path]) -> Path:
        """Move damaged shards and their sidecars into trajectories/damaged/ (kept as evidence)."""
        aside = self.root / DAMAGED
        aside.mkdir(exist_ok=True)
        for sidecar in sidecars:
            for p in (sidecar, sidecar.with_suffix(".safetensors")):
                if p.exists():
                    os.replace(p, aside / p.name)
        return aside

    def completed(self, excluding: Sequence[Path] = ()) -> set[int]:
        """Trajectory ids already stored in complete shards (but those of the `excluding`
        sidecars: damaged ones, about to be set aside)."""
        skip = set(excluding)
        return {i for p, info in self._sidecars() if info is not None and p not in skip
                for i in info.get("trajectory_ids", [])}

    def write_shard(self, tag: str, tensors: dict[str, torch.Tensor], trajectory_ids: list[int],
                    metadata: dict | None = None) -> dict:
        """Write a shard atomically, then its sidecar (which marks it complete)."""
        path = self.root / f"shard-{tag}.safetensors"
        with atomic_path(path) as tmp:
            save_tensors({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                         metadata={k: str(v) for k, v in (metadata or {}).items()})
        x = tensors["x"]
        info = {"file": path.name, "trajectories": len(trajectory_ids),
                "trajectory_ids": [int(i) for i in trajectory_ids], "steps": int(x.shape[1]),
                "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        write_json(path.with_suffix(".json"), info)
        return info

    def finalize(self) -> dict:
        """Rewrite the manifest with the shard list and totals."""
        m = self.manifest()
        m["shards"] = self.shards()
        m["trajectories"] = sum(s["trajectories"] for s in m["shards"])
        m["bytes_on_disk"] = sum(s["bytes"] for s in m["shards"])
        write_json(self.manifest_path, m)
        return m

    def open_shard(self, info: dict, verify: bool = False):
        """A lazy safetensors handle of a shard (memory-mapped; read tensors or slices)."""
        path = self.root / info["file"]
        if not path.is_file():
            raise DataError(f"shard {path} is listed but missing", hint="recollect with --overwrite")
        fault = _shard_fault(path, info) if verify else None
        if fault:
            raise DataError(f"shard {path} is corrupt or truncated ({fault})",
                            hint="rerun the `agd collect` command that made it: it sets damaged "
                                 "shards aside and redoes them")
        try:
            return safe_open(str(path), "pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise DataError(f"cannot read shard {path}: {e}",
                            hint="delete it and its .json sidecar, then rerun `agd collect`") from None


# --- which trajectories, and their seeded ω, noise and negative (no model needed) -------------
def keep_indices(steps: int, keep: int) -> list[int]:
    """A spread subset of `keep` step indices out of `steps`, always including the first."""
    if keep >= steps:
        return list(range(steps))
    return sorted({int(i) for i in torch.linspace(0, steps - 1, keep).round().long()})


def trajectory_seed(seed: int, trajectory_id: int, stream: str) -> int:
    """A 63-bit seed for one random stream ('noise', 'omega') of one trajectory."""
    digest = hashlib.sha256(f"agd:{seed}:{trajectory_id}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def trajectory_uniforms(seed: int, ids: list[int], stream: str):
    """One U[0, 1) draw per trajectory from its own seeded generator of `stream`, (N,) float32."""
    u = [torch.rand(1, generator=torch.Generator().manual_seed(trajectory_seed(seed, i, stream)))
         for i in ids]
    return torch.cat(u) if ids else torch.zeros(0)


def trajectory_omegas(seed: int, ids: list[int], lo: float, hi: float, skew: float = 1.0):
    """ω = lo + (hi − lo)·u^skew, u ~ U[0, 1), per trajectory, (N,) float32, from per-id seeded
    generators: skew 1 is uniform, skew 2 puts half the trajectories below lo + (hi − lo)/4."""
    u = trajectory_uniforms(seed, ids, "omega")
    return lo + (hi - lo) * (u if skew == 1 else u.pow(skew))


def trajectory_negatives(seed: int, ids: list[int], count: int, empty_probability: float):
    """Each trajectory's negative: -1 (the empty prompt) with `empty_probability`, else an index
    into the negative list; (N,) int64 from per-id seeded generators."""
    out = []
    for i in ids:
        g = torch.Generator().manual_seed(trajectory_seed(seed, i, "negative"))
        empty = count == 0 or torch.rand(1, generator=g).item() < empty_probability
        out.append(-1 if empty else int(torch.randint(count, (1,), generator=g)))
    return torch.tensor(out, dtype=torch.long)


def trajectory_negative_only(seed: int, ids: list[int], negative_index, probability: float):
    """Which trajectories pair their negative with the empty prompt instead of their prompt:
    (N,) bool, True only where there is a negative, from per-id seeded generators."""
    draws = trajectory_uniforms(seed, ids, "negative-only")
    return (negative_index >= 0) & (draws.double() < probability)  # as the float draws compared


def worker_ids(num_prompts: int, num_per_prompt: int, index: int, num: int) -> list[int]:
    """Trajectory ids of worker `index` of `num`: every num-th prompt, all its trajectories."""
    return [p * num_per_prompt + j for p in range(index, num_prompts, num)
            for j in range(num_per_prompt)]
