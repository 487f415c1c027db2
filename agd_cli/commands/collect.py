"""`agd collect`: record the teacher's CFG-guided trajectories (resumable, fp16, K kept steps)."""

from __future__ import annotations

import click

from agd_cli.commands import (
    DEVICE_HELP,
    FLOAT,
    common_options,
    deprecated_alias,
    guidance_options,
)
from agd_cli.config.vocab import DTYPES


@click.command("collect")
@click.option("--preset", required=True,
              help="Preset name (see `agd presets`) or TOML: the base and settings to use.")
@click.option("--base-model", default=None, metavar="FILE|DIR|ID",
              help="The teacher: a single-file .safetensors checkpoint (e.g. a fine-tune), a "
                   "diffusers folder or a hub id (default: the preset's base_model).")
@click.option("--prompts", "prompts", default=None, metavar="FILE",
              help=".txt (one per line), .csv ('caption' column) or .jsonl ('prompt' field); "
                   "default: the preset's prompt set.")
@click.option("--classes", default=None, metavar="SPEC",
              help="Class-conditional (DiT) presets: 'all', a range '0-9' or a list '1,5,7'.")
@click.option("--run", "out", default=None, metavar="DIR",
              help="Run folder (trajectories go to DIR/trajectories); default: WORKDIR/<preset>.")
@deprecated_alias("--out", "--run", "out")
@click.option("--num-per-prompt", type=int, default=None,
              help="Trajectories per prompt [preset; with --negative-prompts its "
                   "num_per_prompt_with_negatives where set].")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the preset's).")
@click.option("--keep-steps", type=int, default=None,
              help="Steps stored per trajectory, spread over the run (default: all, up to the "
                   "preset's keep_steps).")
@click.option("--omega-min", type=FLOAT, default=None, help="Lowest guidance scale ω.")
@click.option("--omega-max", type=FLOAT, default=None, help="Highest guidance scale ω.")
@click.option("--omega-skew", type=FLOAT, default=None, metavar="K",
              help="ω = omega_min + (omega_max − omega_min)·u^K, u uniform: 1 is uniform, 2 "
                   "puts half the trajectories in the lowest quarter of the range [preset, 1].")
@click.option("--batch-size", type=int, default=None, help="Trajectories per batch.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every trajectory's noise and ω.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Model precision on CUDA (CPU computes in fp32) [preset, fp16; storage: fp16].")
@click.option("--shard-index", type=int, default=None, help="This worker's index (0-based).")
@click.option("--num-shards", type=int, default=None,
              help="Number of workers splitting the prompts (accelerate launch sets both).")
@click.option("--negative-prompts", default=None, metavar="FILE",
              help="Negatives for CFG's unconditional branch, same formats as --prompts (DiT: "
                   "classes); default: the preset's list.")
@click.option("--empty-negative-probability", type=FLOAT, default=None, metavar="P",
              help="Share of trajectories that keep the empty prompt (1: no negatives) "
                   "[preset, 0.5].")
@click.option("--negative-only-probability", type=FLOAT, default=None, metavar="P",
              help="Share of the trajectories with a negative whose prompt is the empty prompt, "
                   "so the adapters also learn a negative on its own [preset, 0].")
@click.option("--overwrite", is_flag=True, help="Replace a different collection in the folder.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan and each phase's estimated peak GPU memory (text encoding, "
                   "sampling, VAE decode) for the preset, dtype and batch; loads no weights.")
@guidance_options("The teacher's two-pass rule whose output the adapters learn: cfg, interval, apg, cfg-zero-star or rescale (docs/guidance-rules.md) [preset, cfg].")
@common_options
def command(as_json: bool, workdir: str, **flags) -> None:
    """Record CFG-guided sampling trajectories of the teacher, the data `agd train` learns from.

    Resumable: rerun the same command after an interruption and it continues where it stopped.
    """
    from agd_cli.collect.disk import human_bytes
    from agd_cli.collect.run import run_collect
    from agd_cli.infra import ui

    summary = run_collect(workdir=workdir, **flags)
    if as_json:
        ui.emit_json(summary)
        return
    if summary.get("dry_run"):
        from agd_cli.dry_run import show_collect

        show_collect(summary)
        return
    rate = (f", {summary['trajectories_per_s']:.2f} trajectories/s"
            if summary["trajectories_per_s"] else "")
    state = "complete" if summary["complete"] else (
        f"{summary['trajectories']} of {summary['expected_trajectories']} stored")
    ui.result(f"collected {summary['new_trajectories']} new trajectories{rate}; "
              f"collection {state}: {summary['trajectories']} × {summary['steps_per_trajectory']} "
              f"steps, {human_bytes(summary['bytes_on_disk'])} in {summary['trajectories_dir']}")
