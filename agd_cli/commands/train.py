"""`agd train`: train guidance adapters on collected trajectories (flags beat preset values)."""

from __future__ import annotations

import click

from agd_cli.commands import DEVICE_HELP, FLOAT, NamedChoice, common_options, deprecated_alias
from agd_cli.config.vocab import ADAPTER_KINDS, DTYPES, OPTIMIZERS


@click.command("train")
@click.option("--run", "run", type=click.Path(file_okay=False),
              help="Run folder with trajectories/ (default: the most recent collection); "
                   "results are written here (with --data: created if missing).")
@click.option("--data", "data", multiple=True, type=click.Path(file_okay=False),
              help="A collection (run folder or its trajectories/); repeat to train on several.")
@click.option("--preset", help="Preset name or TOML: the base and settings to use (default: the "
                                "collection's).")
@click.option("--max-steps", "steps", type=int, help="Optimizer steps (preset default).")
@deprecated_alias("--steps", "--max-steps", "steps", type=int)
@click.option("--batch-size", type=int, help="Samples per micro-batch, split across processes.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--lr", type=FLOAT, help="Peak learning rate (linear warmup, then cosine).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS),
              help="adamw8bit (bitsandbytes; falls back to adamw where it does not run) or adamw.")
@click.option("--dtype", "precision", type=click.Choice(DTYPES), default=None,
              help="Base weights and autocast dtype on CUDA (CPU computes in fp32) [preset].")
@deprecated_alias("--precision", "--dtype", "precision", type=click.Choice(DTYPES))
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute base activations in the backward pass (preset default).")
@click.option("--val-fraction", type=FLOAT, help="Share of trajectories held out for validation.")
@click.option("--checkpoint-every", type=int, help="Validate and checkpoint every N steps.")
@click.option("--keep-checkpoints", type=int, help="Keep the last N checkpoints.")
@click.option("--preview-every", type=int, help="CFG-vs-adapter preview images every N steps (0: off).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the last checkpoint of the run folder, if any.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Adapter init, validation split and data order.")
@click.option("--adapter-kind", type=NamedChoice(ADAPTER_KINDS, "adapter kind"), help="Adapter kind (preset default).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--dry-run", is_flag=True,
              help="Print the settings and one training step's estimated peak GPU memory (with "
                   "--preset, also before any collection); loads no weights.")
@common_options
def command(as_json: bool, workdir: str, **flags) -> None:
    """Train guidance adapters on collected CFG trajectories; the base stays frozen.

    \b
    With no arguments: the most recent collection in the workspace, the preset's
    defaults, resuming from the last checkpoint if there is one. Several GPUs:
      accelerate launch --multi_gpu --num_processes N -m agd_cli.cli train ...
    (on CPU-only machines the same command starts N CPU processes joined by gloo)
    """
    from agd_cli.infra import ui
    from agd_cli.train.run import run_train

    summary = run_train(workdir=workdir, **flags)
    if summary.get("dry_run"):
        from agd_cli.dry_run import show_train

        ui.emit_json(summary) if as_json else show_train(summary)
        return
    if as_json:
        if summary["processes"] == 1 or _is_main():
            ui.emit_json(summary)
        return
    if not _is_main():
        return
    gap = summary["gap_closed"]
    val = ("no validation split" if summary["val_loss"] is None else
           f"val loss {summary['val_loss']:.4g} vs {summary['val_loss_no_adapter']:.4g} "
           f"without adapters ({100 * gap:.1f}% of the gap closed)")
    ui.result(f"adapter: {summary['adapter']} ({summary['params']:,} params, "
              f"{summary['steps']} steps, {summary['seconds']:.1f} s)")
    ui.result(val)


def _is_main() -> bool:
    from accelerate.state import PartialState

    return PartialState().is_main_process
