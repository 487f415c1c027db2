"""`agd bench --memory`: peak memory of one adapter training step (train.probe measures it)."""

from __future__ import annotations

import logging

from rich.table import Table

from agd_cli.bench.plan import BenchFlags
from agd_cli.config import checks, workspace
from agd_cli.config.presets import load_preset
from agd_cli.core.adapter_file import AdapterFile
from agd_cli.infra.ui import console, gib
from agd_cli.train.probe import measure_train_step

logger = logging.getLogger(__name__)


def memory_args(preset, precision: str | None, optimizer: str | None,
                checkpointing: bool | None, batch_size: int | None, device: str | None) -> dict:
    """measure_train_step's arguments: the flags, else the preset's training defaults."""
    checks.optional_integer("--train-batch-size", batch_size)
    t = preset.train
    return {"preset_name": preset.name, "precision": precision or t["precision"],
            "optimizer": optimizer or t["optimizer"],
            "checkpointing": t["gradient_checkpointing"] if checkpointing is None else checkpointing,
            "batch_size": batch_size or t["batch_size"], "device": device or "auto"}


def run_memory(f: BenchFlags) -> dict:
    """`agd bench --memory`: peak memory of one adapter training step (measure_train_step)."""
    p = (load_preset(f.preset) if f.preset
         else AdapterFile.open(workspace.find_adapter(f.workdir, f.adapter, f.run)).preset)
    args = memory_args(p, f.precision, f.optimizer, f.checkpointing, f.train_batch_size, f.device)
    logger.info(f"measuring one training step of {p.name} in a fresh process…")
    result = {**args, **measure_train_step(**args)}
    if f.show_table:
        t = Table(title=f"one adapter training step of {p.name}")
        t.add_column("quantity")
        t.add_column("value", justify="right")
        for k, v in result.items():
            t.add_row(k, gib(v) if k.endswith("bytes") and isinstance(v, int) else str(v))
        console().print(t)
    return result


