"""What a training run writes besides its checkpoints.

The metrics log (`train/metrics.jsonl`, one JSON line per step or validation), the preview
grids (CFG vs adapters from the same noise), and at the end the adapter file, the loss plot and
the summary `agd train --json` prints. The loop that produces them lives in train.py, the
checkpoints in checkpoint.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from agd_cli.config.workspace import ADAPTER
from agd_cli.core.sampling import initial_noise, sample_images
from agd_cli.infra.images import make_grid, save_png, to_pil
from agd_cli.infra.io import atomic_path, json_line, naming
from agd_cli.train.plots import loss_curve

logger = logging.getLogger(__name__)


def gap_closed(val_loss: float | None, no_adapter: float | None) -> float | None:
    """Share of the no-adapter error the adapters remove: 1 − val / val_no_adapter."""
    if val_loss is None or not no_adapter:
        return None
    return 1.0 - val_loss / no_adapter


def fmt_loss(v: float | None) -> str:
    """A loss for the progress bar: 4 significant digits, or – when there is none yet."""
    return "–" if v is None else f"{v:.4g}"


# --- the metrics log ------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a line cut by kill -9 is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by kill -9
            out.append(json.loads(line))
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Rewrite a JSONL file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json_line(r) + "\n" for r in records), encoding="utf-8")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record; a full disk names the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json_line(record) + "\n")
    except OSError as e:  # a full disk names no file by itself
        raise naming(e, path) from e


# --- previews ---------------------------------------------------------------------------------------
class Previews:
    """Preview grids of a run: the teacher's CFG row (sampled once) over the adapters' row."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._cfg = None  # the teacher's images do not change during training

    @torch.no_grad()
    def write(self, den, data, step: int) -> Path | None:
        """One PNG for `step` (None when the collection has no unconditional branch)."""
        if data.uncond is None:
            return None
        sp = den.preset.sampling
        rows = preview_rows(data.cond, data.uncond)
        n = len(rows)
        cond = {k: v[rows] for k, v in data.cond.items()}
        uncond = {k: v[:1].expand(n, *v.shape[1:]) for k, v in data.uncond.items()}
        noise = initial_noise(data.sample_shape, range(n))
        omega = float(sp["default_omega"])
        kw = {"steps": sp["steps"], "scheduler": sp["scheduler"]}
        if self._cfg is None:
            self._cfg = sample_images(den, cond, uncond, omega, noise, mode="cfg", **kw).images
        agd = sample_images(den, cond, uncond, omega, noise, mode="agd", **kw).images
        grid = make_grid([[to_pil(i) for i in self._cfg], [to_pil(i) for i in agd]],
                         row_labels=[f"CFG ω={omega:g}", f"agd, step {step}"])
        return save_png(grid, self.folder / f"preview-step-{step:06d}.png",
                        {"step": step, "omega": omega, "seeds": list(range(n))})


def preview_rows(cond: dict, null: dict, n: int = 4) -> list[int]:
    """The first n prompts' rows of the condition table, skipping rows that are the null
    condition (the empty prompt of negative-only trajectories), unless nothing else is there."""
    total = next(iter(cond.values())).shape[0]
    prompts = [i for i in range(total)
               if not all(torch.equal(v[i], null[k][0]) for k, v in cond.items())]
    return (prompts or list(range(total)))[:n]


# --- the end of a run -------------------------------------------------------------------------------
def run_summary(tr, seconds: float, train_loss: float | None) -> dict:
    """The summary `agd train --json` prints."""
    s = tr.s
    return {
        "run": str(tr.run), "adapter": str(adapter_path(tr)), "steps": tr.step,
        "val_loss": tr.last_val, "val_loss_no_adapter": tr.val_no_adapter,
        "gap_closed": gap_closed(tr.last_val, tr.val_no_adapter), "train_loss": train_loss,
        "params": sum(p.numel() for p in tr.den.adapters.parameters()),
        "seconds": round(seconds, 2), "resumed_from": tr.resumed_from,
        "optimizer": tr.optimizer_name, "precision": s.precision,
        "batch_size": s.batch_size, "grad_accum": s.grad_accum, "lr": s.lr,
        "gradient_checkpointing": s.gradient_checkpointing, "seed": s.seed,
        "trajectories": {"train": tr.n_train_traj, "val": tr.n_val_traj},
        "samples": {"train": tr.n_train, "val": tr.n_val},
        "device": str(tr.device), "processes": tr.world,
        "metrics": str(tr.metrics_path), "loss_plot": str(tr.run / "train" / "loss.png")}


def adapter_path(tr) -> Path:
    """Where the run's adapter file goes."""
    return tr.run / ADAPTER


def write_adapter(tr, summary: dict) -> None:
    """The adapter file with its metadata, and the loss curve (main process only)."""
    s = tr.s
    meta = tr.den.adapter_metadata(
        train_steps=tr.step, val_loss=tr.last_val, val_loss_no_adapter=tr.val_no_adapter,
        gap_closed=summary["gap_closed"], lr=s.lr, batch_size=s.batch_size * s.grad_accum,
        optimizer=tr.optimizer_name, seed=s.seed, trajectories=tr.data.num_trajectories,
        collections=[str(st.root) for st in tr.data.stores],
        guidance=tr.data.guidance.record(), **negatives_metadata(tr.data, s.adapter))
    tr.den.adapters.save(adapter_path(tr), meta)
    if tr.records:
        loss_curve(tr.records, summary["loss_plot"],
                   title=f"agd train · {tr.den.preset.name} · {tr.step} steps")


def negatives_metadata(data, adapter) -> dict:
    """What the adapter file records about the negatives it was trained with."""
    if not adapter.negatives:
        return {}
    configs = [m["config"] for m in data.manifests
               if m.get("config", {}).get("negative_prompts")]
    return {"negatives": {
        "negative_prompts": [n for c in configs for n in c["negative_prompts"]],
        "negative_source": ", ".join(str(c.get("negative_source")) for c in configs),
        "empty_negative_probability": configs[0].get("empty_negative_probability"),
        "negative_only_probability": configs[0].get("negative_only_probability") or 0.0}}


def announce(tr, roots: list[Path], preset_flag: str | None) -> None:
    """The run in a few log lines: what trains on what, with which settings, where."""
    s = tr.s
    origin = "--preset" if preset_flag else "recorded with the collection"
    logger.info(f"training {s.adapter.kind} adapters for preset '{tr.den.preset.name}' ({origin}) "
            f"({sum(p.numel() for p in tr.params):,} params) on {tr.data.num_trajectories} "
            f"trajectories from {', '.join(map(str, roots))}: {tr.n_train_traj} train / "
            f"{tr.n_val_traj} val trajectories ({tr.n_train} / {tr.n_val} samples)")
    logger.info(f"steps {s.steps}, batch {s.batch_size} × accum {s.grad_accum}, lr {s.lr:g}, "
            f"{tr.optimizer_name}, {s.precision}, gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}, {tr.world} process(es) on "
            f"{tr.device}; results in {tr.run}")
    if tr.device.type == "cpu" and s.precision != "fp32":
        logger.info(f"note: on CPU the base computes in fp32 ({s.precision} applies on CUDA)")
    if tr.resumed_from is None and tr.step == 0:
        logger.info(f"starting from fresh adapters (seed {s.seed})")
