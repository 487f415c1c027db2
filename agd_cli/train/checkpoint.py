"""Training checkpoints: safetensors plus a small JSON, written atomically, last N kept.

    checkpoints/step-000250/
      adapters.safetensors    adapter state dict (fp32)
      optimizer.safetensors   optimizer state tensors; its non-tensor structure in the metadata
      state.json              step, LR schedule, RNG states, data position, settings

A checkpoint is built in a hidden temp folder and renamed into place, so after a crash (even
kill -9) every `step-*` folder is complete. No pickles: nothing here runs code when loaded.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from agd_cli.infra.errors import DataError
from agd_cli.infra.io import fsync_file, read_json, write_json
from agd_cli.infra.tensor_files import save_tensors
from agd_cli.train.data import ShuffledSampler
from agd_cli.train.output import read_jsonl, write_jsonl
from agd_cli.train.settings import lr_at

logger = logging.getLogger(__name__)

FORMAT = "agd-checkpoint/1"
DAMAGED = "damaged"  # unreadable checkpoints are moved here on resume
PREFIX = "step-"


# --- optimizer state <-> safetensors --------------------------------------------------------
TENSOR = "__tensor__"  # marks where a tensor sat in the JSON structure


def _split(value, key: str, tensors: dict, seen: set):
    """Tensors (at any depth: bitsandbytes nests its quantisation state) out, JSON left."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        # bitsandbytes shares one quantisation map between parameters; safetensors refuses
        # shared storage, so a repeated tensor is stored as a copy
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[key] = t
        return {TENSOR: key}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{key}.{k}", tensors, seen) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{key}.{i}", tensors, seen) for i, v in enumerate(value)]
    return value


def _join(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def optimizer_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and a JSON-able structure."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(state_dict, "opt", tensors, set())
    return tensors, structure


def optimizer_state_dict(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    """The inverse of optimizer_tensors (parameter ids back to ints, as optimizers expect)."""
    sd = _join(structure, tensors)
    sd["state"] = {int(k): v for k, v in sd["state"].items()}
    return sd


# --- RNG states -------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every RNG a training step may touch: torch CPU and CUDA, Python's `random`."""
    state = {"torch": _b64(torch.get_rng_state()), "python": _jsonable(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() saved (CUDA states only where there are as many devices)."""
    torch.set_rng_state(_unb64(state["torch"]))
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])


def _jsonable(obj):
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


# --- folders ------------------------------------------------------------------------------------
def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest step first."""
    root = Path(root)
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def clean_stale(root: str | Path) -> None:
    """Remove temp folders of checkpoints whose writer was killed."""
    for p in Path(root).glob(f".{PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; Windows cannot open a folder (its renames need no folder fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _write_files(tmp: Path, step: int, adapter_state: dict, optimizer: dict, state: dict) -> None:
    """The three files of a checkpoint, fsynced, in folder `tmp`."""
    tmp.mkdir(parents=True)
    save_tensors({k: v.detach().float().cpu().contiguous() for k, v in adapter_state.items()},
                 tmp / "adapters.safetensors")
    tensors, structure = optimizer_tensors(optimizer)
    save_tensors(tensors, tmp / "optimizer.safetensors",
                 metadata={"structure": json.dumps(structure), "format": FORMAT})
    write_json(tmp / "state.json", {"format": FORMAT, "step": step, **state})
    for f in tmp.iterdir():
        fsync_file(f)


def save_checkpoint(root: str | Path, step: int, adapter_state: dict, optimizer: dict,
                    state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`."""
    root = Path(root)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, step, adapter_state, optimizer, state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk keeps no half checkpoint
        raise
    if final.exists():  # a rerun reaching the same step: swap, then drop the old one
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for stale in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict]:
    """(adapter state, optimizer state dict, state.json) of a checkpoint folder."""
    path = Path(path)
    try:
        state = read_json(path / "state.json")
        adapters = load_file(str(path / "adapters.safetensors"))
        with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
            structure = json.loads(f.metadata()["structure"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - json, OS and safetensors errors alike
        raise DataError(f"checkpoint {path} is unreadable: {type(e).__name__}: {e}",
                        hint="delete that folder to resume from an older one, "
                             "or pass --no-resume to start over") from None
    if state.get("format") != FORMAT:
        raise DataError(f"checkpoint {path} has unknown format {state.get('format')!r}",
                        hint="pass --no-resume to start over")
    return adapters, optimizer_state_dict(tensors, structure), state


def latest_checkpoint(root: str | Path, set_aside: bool = False
                      ) -> tuple[Path, tuple[dict, dict, dict]] | None:
    """The newest readable checkpoint and its contents.

    Unreadable newer ones are named loudly and, with `set_aside` (the run's one writer), moved
    to checkpoints/damaged/: kept as evidence, and no longer "newest" for keep-last-N pruning.
    """
    for path in reversed(checkpoint_dirs(root)):
        try:
            return path, load_checkpoint(path)
        except DataError as e:
            where = f"; moved it to {move_aside(path)}" if set_aside else ""
            logger.warning(f"{e.message}{where}; trying an older checkpoint")
    return None


def move_aside(path: Path, aside: Path | None = None) -> Path:
    """Move a damaged checkpoint (or file) into `aside` (default: `damaged/` beside it), never
    over older evidence."""
    aside = aside or path.parent / DAMAGED
    aside.mkdir(parents=True, exist_ok=True)
    dest, n = aside / path.name, 1
    while dest.exists():
        n += 1
        dest = aside / f"{path.name}-{n}"
    os.replace(path, dest)
    return dest


# --- a training run's checkpoints -------------------------------------------------------------
class RunCheckpoints:
    """The checkpoints of one training run: save its complete state, resume it, start over.

    It reads and restores the trainer's state (adapters, optimizer, loss scaler, sampler
    position, step, validation figures, metrics log); `check_resumable(path, state)` is the
    trainer's word on whether a checkpoint belongs to this run (RESUME_KEYS in train.py)."""

    def __init__(self, trainer, check_resumable):
        self.tr = trainer
        self.dir = trainer.run / "checkpoints"
        self.check_resumable = check_resumable

    def save(self) -> None:
        """Checkpoint the complete training state (main process writes, the others wait)."""
        tr, s = self.tr, self.tr.s
        if tr.main:
            scaler = tr.update.scaler
            state = {"lr_schedule": {"kind": "warmup-cosine", "base_lr": s.lr,
                                     "warmup_steps": s.warmup_steps,
                                     "total_steps": s.steps, "next_lr": lr_at(tr.step, s)},
                     "rng": rng_state(), "data_position": tr.sampler.state(),
                     "identity": tr.identity(), "settings": s.describe(),
                     "optimizer_used": tr.optimizer_name,
                     "scaler": scaler.state_dict() if scaler else None,
                     "val_loss": tr.last_val, "val_loss_no_adapter": tr.val_no_adapter}
            save_checkpoint(self.dir, tr.step, tr.den.adapters.state_dict(),
                            tr.opt.state_dict(), state, s.keep_checkpoints)
        tr.barrier()

    def start_over(self) -> None:
        """--no-resume: old checkpoints and metrics of this run folder go."""
        if self.tr.main:
            if self.dir.exists():
                logger.info(f"--no-resume: removing the old checkpoints in {self.dir}")
                shutil.rmtree(self.dir)
            self.tr.metrics_path.unlink(missing_ok=True)
        self.tr.barrier()

    def resume(self) -> bool:
        """Continue from the newest readable checkpoint, if any; False when starting fresh."""
        tr = self.tr
        if tr.main:
            clean_stale(self.dir)
        tr.barrier()
        had_checkpoints = bool(checkpoint_dirs(self.dir))
        found = latest_checkpoint(self.dir, set_aside=tr.main)
        if found is None:
            if tr.main:
                self._restart_metrics(had_checkpoints)
            return False
        path, (adapter_state, opt_state, state) = found
        self.check_resumable(path, state)
        self._restore(adapter_state, opt_state, state)
        if tr.main:
            logger.info(f"resuming from step {tr.step} ({path})")
        return True

    def _restore(self, adapter_state: dict, opt_state: dict, state: dict) -> None:
        """Put the trainer where the checkpoint left it; the metrics log back to that step."""
        tr = self.tr
        tr.den.adapters.load_state_dict(adapter_state)
        tr.opt.load_state_dict(opt_state)
        set_rng_state(state["rng"])
        pos = state["data_position"]
        tr.sampler = ShuffledSampler(tr.sampler.indices, tr.s.seed, pos["epoch"], pos["offset"])
        if tr.update.scaler and state.get("scaler"):
            tr.update.scaler.load_state_dict(state["scaler"])
        tr.step = tr.resumed_from = int(state["step"])
        tr.last_val, tr.val_no_adapter = state.get("val_loss"), state.get("val_loss_no_adapter")
        tr.records = [r for r in read_jsonl(tr.metrics_path) if r.get("step", 0) <= tr.step]
        if tr.main:  # drop what the killed run logged after its last checkpoint
            write_jsonl(tr.metrics_path, tr.records)

    def _restart_metrics(self, lost_checkpoints: bool) -> None:
        """A fresh start logs from step 0: an old log goes (aside, if checkpoints were lost)."""
        metrics = self.tr.metrics_path
        if not lost_checkpoints or not metrics.is_file():
            metrics.unlink(missing_ok=True)  # a run killed before its first checkpoint
            return
        kept = move_aside(metrics, self.dir / DAMAGED)
        logger.warning(f"no readable checkpoint in {self.dir}: training starts again at step 0; "
                f"the old metrics log was moved to {kept}")

    def last_step(self) -> int | None:
        """Step of the newest checkpoint on disk (what a rerun resumes from)."""
        found = checkpoint_dirs(self.dir)
        return int(found[-1].name.split("-")[-1]) if found else None
