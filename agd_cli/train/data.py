"""Training data: collected trajectories indexed by (trajectory, kept step), read shard-wise.

Small tensors (timesteps, ω, condition rows, prompt embeddings) are loaded once; prompt
embeddings are stored once per distinct prompt and gathered per batch by row index. x and the
guided target are read per batch from memory-mapped safetensors slices, or held in RAM when
the whole collection fits comfortably. Validation is split by trajectory, never by step: steps
of one trajectory are strongly correlated, so a step split would leak.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from agd_cli.collect.store import IDENTITY_KEYS, TrajectoryStore
from agd_cli.core.guidance_rules import GuidanceRule
from agd_cli.infra.errors import DataError

logger = logging.getLogger(__name__)

REQUIRED = ("x", "target", "timesteps", "omega", "trajectory_id", "cond_row")
RAM_FRACTION = 0.25  # hold x/target in RAM when they take at most this share of physical memory


def collection_root(path: str | Path) -> Path:
    """A trajectories folder from a run folder or the trajectories folder itself."""
    path = Path(path)
    if (path / "trajectories" / "manifest.json").is_file():
        return path / "trajectories"
    if (path / "manifest.json").is_file():
        return path
    raise DataError(f"no trajectory collection in '{path}' (no manifest.json)",
                    hint="pass a run folder written by `agd collect` (or its trajectories/ folder)")


def common_guidance(manifests: list[dict], stores) -> GuidanceRule:
    """The teacher's rule of every collection (none recorded: CFG); mixed rules are refused,
    since the adapters would learn two targets for the same (x_t, t, ω)."""
    rules = [GuidanceRule.from_record(m.get("config", {}).get("guidance")) for m in manifests]
    for rule, store in zip(rules, stores, strict=True):
        if rule != rules[0]:
            raise DataError(f"collection {store.root} was made with guidance {rule.label()}, "
                            f"{stores[0].root} with {rules[0].label()}",
                            hint="train on collections made with one rule (agd collect --guidance)")
    return rules[0]


@dataclass
class Batch:
    """One batch: model input, guided target, timesteps, ω, the condition rows and the rows of
    CFG's unconditional branch (the trajectory's negative, or the null condition)."""

    x: torch.Tensor          # (B, C, H, W) float32
    target: torch.Tensor     # (B, C, H, W) float32
    timesteps: torch.Tensor  # (B,) int64
    omega: torch.Tensor      # (B,) float32
    cond: dict               # key -> (B, ...)
    uncond: dict | None = None  # key -> (B, ...)

    def __len__(self) -> int:
        return self.x.shape[0]


class _Shard:
    """One shard: its lazy handle, and x/target in RAM once `load()` was called."""

    def __init__(self, handle, path: Path):
        self.handle, self.path = handle, path
        self.x = self.target = None

    def load(self) -> None:
        """Hold x and target in RAM."""
        self.x, self.target = self.handle.get_tensor("x"), self.handle.get_tensor("target")

    def read(self, rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x and target at (row, step) pairs: one gather in RAM, else one mmap slice each."""
        if self.x is not None:
            return self.x[rows, steps], self.target[rows, steps]
        xs, ts = self.handle.get_slice("x"), self.handle.get_slice("target")
        pairs = list(zip(rows.tolist(), steps.tolist(), strict=True))
        return (torch.cat([xs[r:r + 1, k] for r, k in pairs]),
                torch.cat([ts[r:r + 1, k] for r, k in pairs]))


class TrajectoryData:
    """Every complete shard of one or more collections; samples are (trajectory, step) pairs."""

    def __init__(self, roots: Sequence[str | Path], verify: bool = True,
                 in_memory: bool | None = None, processes: int = 1):
        self.stores = [TrajectoryStore(r) for r in unique_roots(roots)]
        self.manifests = [s.manifest() for s in self.stores]
        self.guidance = common_guidance(self.manifests, self.stores)  # the rule the targets follow
        self._shards: list[_Shard] = []
        self._first: tuple[Path, dict] | None = None  # the first shard and its sample shapes
        self._seen: dict[tuple[str, int], Path] = {}  # (collection identity, id) -> its shard
        parts: dict[str, list] = {k: [] for k in ("omega", "timesteps", "cond_row", "uncond_row",
                                                   "key", "shard", "row")}
        cond_parts: dict[str, list] = {}
        uncond_parts: dict[str, list] = {}
        rows_so_far = [0, 0]  # condition rows, unconditional rows
        for c, store in enumerate(self.stores):
            infos = store.shards()
            if not infos:
                raise DataError(f"collection {store.root} has no complete shards",
                                hint="run (or resume) `agd collect` until it writes some")
            if verify:
                check_shards(store)
            identity = _identity(self.manifests[c], store.root)
            for info in infos:
                self._add_shard(store, info, (c, identity), parts, cond_parts, uncond_parts,
                                rows_so_far)
        self.omega = torch.cat(parts["omega"]).float()                  # (T,)
        self.cond_row = torch.cat(parts["cond_row"]).long()             # (T,)
        self.shard_of = torch.cat(parts["shard"]).long()                # (T,)
        self.row_in_shard = torch.cat(parts["row"]).long()              # (T,)
        self.keys = [k for chunk in parts["key"] for k in chunk]        # (collection, id) per T
        self.cond = {k: torch.cat(v) for k, v in cond_parts.items()}    # key -> (U, ...)
        self.uncond_row = torch.cat(parts["uncond_row"]).long()         # (T,)
        self.uncond_table = {k: torch.cat(v) for k, v in uncond_parts.items()}  # key -> (V, ...)
        # the null condition: row 0 of the first shard (every shard starts with it)
        self.uncond = {k: v[:1] for k, v in self.uncond_table.items()} or None
        self.has_negatives = any(m.get("config", {}).get("negative_prompts") for m in self.manifests)
        self._timesteps = _common_dtype(parts["timesteps"])            # per shard (N, K)
        self.samples = self._index()                                    # (S, 2) traj, step
        self.sample_shape = tuple(self._shards[0].handle.get_slice("x").get_shape()[2:])
        self._maybe_load(in_memory, processes)

    def _add_shard(self, store, info, collection: tuple[int, str], parts, cond_parts,
                   uncond_parts, offsets: list[int]) -> None:
        """Read a shard's small tensors; `offsets` (condition rows, unconditional rows so far)
        grow by what it adds. `collection`: (index, identity); a trajectory already read (the
        same collection twice, a copy of it) is used once."""
        path = store.root / info["file"]
        handle = store.open_shard(info)
        names = set(handle.keys())
        missing = [k for k in REQUIRED if k not in names]
        if missing:
            raise DataError(f"shard {path} lacks tensor(s) {missing}",
                            hint="it was not written by `agd collect`; recollect it")
        self._check_alike(handle, names, path)
        ids = handle.get_tensor("trajectory_id").long()
        keep = self._new_trajectories(ids, collection[1], path)
        if not keep.any():
            return
        s = len(self._shards)
        self._shards.append(_Shard(handle, path))
        parts["omega"].append(handle.get_tensor("omega")[keep])
        parts["timesteps"].append(handle.get_tensor("timesteps"))  # int64, or float; per row
        parts["cond_row"].append(handle.get_tensor("cond_row").long()[keep] + offsets[0])
        # shards from before negatives hold one unconditional row and no uncond_row
        uncond_row = (handle.get_tensor("uncond_row").long() if "uncond_row" in names
                      else torch.zeros(len(ids), dtype=torch.long))
        parts["uncond_row"].append(uncond_row[keep] + offsets[1])
        parts["key"].append([(collection[0], int(i)) for i in ids[keep]])
        parts["shard"].append(torch.full((int(keep.sum()),), s))
        parts["row"].append(torch.arange(len(ids))[keep])
        added = [0, 0]
        for name in sorted(names):
            for k, (prefix, table) in enumerate((("cond.", cond_parts), ("uncond.", uncond_parts))):
                if name.startswith(prefix):
                    t = handle.get_tensor(name)
                    table.setdefault(name[len(prefix):], []).append(t)
                    added[k] = t.shape[0]
        offsets[0] += added[0]
        offsets[1] += added[1]

    def _check_alike(self, handle, names: set[str], path: Path) -> None:
        """Every shard holds samples (and conditions) of the first shard's shapes."""
        shapes = {k: tuple(handle.get_slice(k).get_shape()[1:]) for k in names
                  if k.startswith(("cond.", "uncond."))}
        shapes["x"] = tuple(handle.get_slice("x").get_shape()[2:])
        if self._first is None:
            self._first = (path, shapes)
            return
        first, want = self._first
        if shapes == want:
            return
        what = ("samples" if shapes["x"] != want["x"] else
                "conditions" if shapes.keys() == want.keys() else "other condition tensors")
        differ = [k for k in sorted(set(want) | set(shapes)) if want.get(k) != shapes.get(k)]
        key = "x" if what == "samples" else differ[0]
        raise DataError(f"shard {path} holds {what} of shape {_shape(shapes.get(key))}"
                        f"{'' if key == 'x' else f' ({key})'}, but {first} holds "
                        f"{_shape(want.get(key))}: one training run needs one sample shape",
                        hint="train on collections made with the same preset and resolution "
                             "(or collect again with it)")

    def _new_trajectories(self, ids: torch.Tensor, identity: str, path: Path) -> torch.Tensor:
        """(N,) bool: which of a shard's trajectories were not read before; warns of repeats."""
        keep = torch.ones(len(ids), dtype=torch.bool)
        first = None
        for r, i in enumerate(ids.tolist()):
            seen = self._seen.setdefault((identity, i), path)
            if seen != path:
                keep[r], first = False, first or seen
        if first is not None:
            logger.warning(f"shard {path} repeats {int((~keep).sum())} trajectories of {first} (a copy "
                    "of the same collection?): training on each once")
        return keep

    def _index(self) -> torch.Tensor:
        """(trajectory, step) for every kept step of every trajectory."""
        steps = torch.tensor([t.shape[1] for t in self._timesteps])[self.shard_of]
        traj = torch.repeat_interleave(torch.arange(len(steps)), steps)
        first = torch.cumsum(steps, 0) - steps
        step = torch.arange(len(traj)) - first[traj]
        return torch.stack([traj, step], dim=1)

    def _maybe_load(self, in_memory: bool | None, processes: int) -> None:
        big = sum(s.path.stat().st_size for s in self._shards)
        if in_memory is None:  # every process of a multi-process run holds its own copy
            in_memory = big * processes <= RAM_FRACTION * psutil.virtual_memory().total
        self.in_memory = in_memory
        if in_memory:
            for s in self._shards:
                s.load()
        else:
            logger.info(f"collection is {big / 2**30:.1f} GiB: reading batches from memory-mapped shards")

    # --- sizes and splits ------------------------------------------------------------------
    @property
    def num_trajectories(self) -> int:
        """Trajectories in all collections (train and validation)."""
        return len(self.keys)

    def __len__(self) -> int:
        return self.samples.shape[0]

    @property
    def config(self) -> dict:
        """The first collection's manifest config (preset, base model, ω range, ...)."""
        return self.manifests[0].get("config", {})

    def split(self, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample indices (train, val), split by trajectory with a seeded permutation."""
        order = sorted(range(len(self.keys)), key=lambda i: self.keys[i])  # independent of file order
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))
        n_val = round(val_fraction * len(order))
        if val_fraction > 0 and len(order) >= 2:
            n_val = min(max(n_val, 1), len(order) - 1)
        val_traj = torch.tensor([order[i] for i in perm[:n_val].tolist()], dtype=torch.long)
        is_val = torch.isin(self.samples[:, 0], val_traj)
        idx = torch.arange(len(self))
        return idx[~is_val], idx[is_val]

    def trajectories_in(self, sample_idx: torch.Tensor) -> int:
        """How many distinct trajectories the given samples come from."""
        return int(self.samples[sample_idx, 0].unique().numel())

    # --- reading -----------------------------------------------------------------------------
    def batch(self, sample_idx: torch.Tensor) -> Batch:
        """The samples at `sample_idx`, in that order."""
        traj, step = self.samples[sample_idx, 0], self.samples[sample_idx, 1]
        shard = self.shard_of[traj]
        x = torch.empty((len(traj), *self.sample_shape))
        target = torch.empty_like(x)
        t = torch.empty(len(traj), dtype=self._timesteps[0].dtype)
        for s in shard.unique().tolist():
            sel = (shard == s).nonzero().view(-1)
            rows = self.row_in_shard[traj[sel]]
            xs, ts = self._shards[s].read(rows, step[sel])
            x[sel], target[sel] = xs.float(), ts.float()
            t[sel] = self._timesteps[s][rows, step[sel]]
        cond = {k: v[self.cond_row[traj]] for k, v in self.cond.items()}
        uncond = {k: v[self.uncond_row[traj]] for k, v in self.uncond_table.items()} or None
        return Batch(x, target, t, self.omega[traj], cond, uncond)


def unique_roots(roots: Sequence[str | Path]) -> list[Path]:
    """The collection folders of `roots`, each once: the same folder named twice (another
    spelling, a link to it) would count every trajectory twice and leak into validation."""
    out: dict[str, Path] = {}
    for r in roots:
        root = collection_root(r)
        key = os.path.normcase(str(root.resolve()))
        if key in out:
            logger.warning(f"'{r}' is the collection {out[key]} again: reading it once")
        else:
            out[key] = root
    return list(out.values())


def check_shards(store: TrajectoryStore) -> None:
    """Refuse shards that do not match their sidecar: the check `agd collect` repairs on resume
    (checksum, size, a missing file, a sidecar copied from another shard)."""
    damaged = store.damaged()
    if damaged:
        sidecar, reason, _ = damaged[0]
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise DataError(f"shard {sidecar.with_suffix('.safetensors')} is damaged: {reason}{more}",
                        hint="rerun the `agd collect` command that made the collection: it sets "
                             "damaged shards aside and redoes them")


def _identity(manifest: dict, root: Path) -> str:
    """What makes a trajectory id name one trajectory: the collection's identity (the same in a
    copy of it), else, for a manifest that does not record it, the folder."""
    config = manifest.get("config", {})
    if config.get("prompts_sha256") is None or config.get("seed") is None:
        return os.path.normcase(str(root.resolve()))
    return json.dumps({k: config.get(k) for k in IDENTITY_KEYS}, sort_keys=True)


def _shape(shape) -> str:
    return "(none)" if shape is None else "x".join(map(str, shape)) or "()"


def _common_dtype(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Integer timesteps stay int64 unless some collection stored float ones."""
    if any(t.is_floating_point() for t in tensors):
        return [t.float() for t in tensors]
    return [t.long() for t in tensors]


class ShuffledSampler:
    """Seeded epoch-wise permutations of the training samples (shuffled across trajectories).

    The position is (epoch, offset): each epoch's permutation is rebuilt from (seed, epoch), so
    a resumed run continues with exactly the batches an uninterrupted run would have drawn.
    """

    def __init__(self, indices: torch.Tensor, seed: int, epoch: int = 0, offset: int = 0):
        if len(indices) == 0:
            raise DataError("no training samples left after the validation split",
                            hint="collect more trajectories or lower --val-fraction")
        self.indices, self.seed = indices, seed
        self.epoch, self.offset = epoch, offset
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def next(self, size: int) -> torch.Tensor:
        """The next `size` sample indices, continuing into the next epoch when one ends."""
        out = []
        while size > 0:
            take = self._perm[self.offset:self.offset + size]
            out.append(take)
            size -= len(take)
            self.offset += len(take)
            if self.offset >= len(self._perm):
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(out)

    def state(self) -> dict:
        """The data position a checkpoint stores."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}
