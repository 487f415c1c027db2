"""`agd bench`: agd next to real CFG on the same seeds (speed, memory, agreement, quality)."""

from __future__ import annotations

import click

from agd_cli.commands import (
    DEVICE_HELP,
    FLOAT,
    NamedChoice,
    common_options,
    deprecated_alias,
    guidance_options,
)
from agd_cli.config.vocab import DTYPES, OPTIMIZERS, SCHEDULERS


@click.command("bench")
@click.option("--compare-cfg", is_flag=True,
              help="Compare agd with real CFG on the same base, seeds and noise (the default).")
@click.option("--memory", is_flag=True,
              help="Peak memory of one adapter training step (precision/optimizer flags below).")
@click.option("--run", type=str, default=None,
              help="Run folder (or run name in the workspace) whose adapter to use.")
@click.option("--adapter", type=click.Path(dir_okay=False), help="Adapter file to use.")
@click.option("--preset", default=None,
              help="Preset name or TOML: the base and settings to use (default: the adapter's); "
                   "without --run/--adapter, the adapter of its run folder. --memory: the preset "
                   "measured.")
@click.option("--prompts", type=click.Path(dir_okay=False),
              help="Prompt file (.txt/.csv/.jsonl); default: the preset's built-in set.")
@click.option("--num-prompts", "n", type=int, default=None,
              help="Number of prompts, spread over the set [4].")
@deprecated_alias("-n", "--num-prompts", "n", type=int)
@click.option("--steps", type=int, default=None, help="Sampling steps [preset].")
@click.option("-w", "--omega", "omegas", multiple=True,
              help="Guidance scale(s): -w 2 -w 4 or -w 2,4 [preset default; --quality: 2,4,6,8].")
@click.option("--seeds", multiple=True, help="Seeds: 0,1,2 or 0-3 [0].")
@click.option("--baselines", default=None,
              help="Methods besides agd, from cfg,cfg-cutoff,unguided [cfg,unguided].")
@guidance_options("The two-pass teacher's rule (method cfg): cfg, interval, apg, cfg-zero-star "
                  "or rescale; --quality then adds plain CFG rows [the rule the adapter learned].")
@click.option("--cutoff", type=FLOAT, default=0.5, show_default=True,
              help="cfg-cutoff: fraction of the steps that use CFG.")
@click.option("-b", "--batch-size", type=int, default=1, show_default=True,
              help="Images per sampling call; s/img = call time / batch (1 = latency, "
                   "larger = throughput).")
@click.option("--throughput-batch", type=int, default=16, show_default=True,
              help="Also time every method at this many images per call (throughput), next to "
                   "--batch-size (latency); 0 skips it.")
@click.option("--compile/--no-compile", "compile", default=None,
              help="Also time every method with the model compiled (torch.compile: CUDA graphs "
                   "on CUDA, inductor on the CPU), next to the eager times; compiling is timed "
                   "apart [preset: sampling.compile, off].")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Time every image this many times (steadier medians on a busy machine).")
@click.option("--scheduler", type=NamedChoice(SCHEDULERS, "scheduler"), default=None, help="Sampler [preset].")
@click.option("--out", "grid", type=click.Path(dir_okay=False),
              help="Where to write the comparison grid PNG [RUN/bench/compare-cfg.png].")
@deprecated_alias("--grid", "--out", "grid", type=click.Path(dir_okay=False))
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (1 is steadiest on a busy shared CPU) [torch default].")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Model precision on CUDA (CPU computes in fp32) [the preset's fp16 or bf16; "
                   "--memory: preset].")
@deprecated_alias("--precision", "--dtype", "dtype", type=click.Choice(DTYPES))
@click.option("--quality", is_flag=True,
              help="Add accuracy/FID per method and ω (presets with an evaluator: mnist).")
@click.option("--negative-prompt", default=None,
              help="Negative prompt for CFG's unconditional branch; agd gets it too when its "
                   "adapter was trained with negatives.")
@click.option("--negatives", is_flag=True,
              help="Add the negative-prompt table: accuracy, P(negative digit) and PSNR vs "
                   "CFG + negative (mnist; ω from -w, default the preset's).")
@click.option("--quality-samples", type=int, default=500, show_default=True,
              help="--quality/--negatives: samples per method and ω.")
@click.option("--quality-batch", type=int, default=100, show_default=True,
              help="--quality: images per sampling call.")
@click.option("--quality-seed", type=int, default=0, show_default=True,
              help="--quality: sample i uses seed QUALITY_SEED + i (judge on seeds you did not "
                   "tune on).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
              help="--memory: optimizer [preset].")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", "checkpointing",
              default=None, help="--memory: gradient checkpointing [preset].")
@deprecated_alias("--checkpointing/--no-checkpointing", "--gradient-checkpointing", "checkpointing")
@click.option("--train-batch-size", type=int, default=None,
              help="--memory: training batch size [preset].")
@common_options
def command(compare_cfg: bool, memory: bool, as_json: bool, workdir: str, **kwargs) -> None:
    """Speed, memory and agreement of agd against real CFG on the same seeds.

    \b
    For each prompt, seed and ω: agd (1 NFE/step), CFG (2 NFE/step, batched) and the
    baselines start from the same noise. Prints median seconds per image, NFE, peak memory,
    speed ratio to CFG and PSNR/SSIM against the CFG image; writes RUN/bench/compare-cfg.json
    and a labelled grid (rows prompts; columns CFG | agd | unguided | CFG cutoff).

    \b
    Examples:
      agd bench --compare-cfg
      agd bench --compare-cfg --preset mnist --quality
      agd bench --preset mnist --negatives --negative-prompt "a handwritten 1"
      agd bench --compare-cfg -w 2,4,6 --seeds 0-3 --baselines cfg,cfg-cutoff,unguided
      agd bench --compare-cfg --compile --threads 1
      agd bench --memory --preset sdxl --optimizer adamw8bit --train-batch-size 4
    """
    from agd_cli.bench.run import run_bench
    from agd_cli.infra import ui

    compare = compare_cfg or kwargs["quality"] or kwargs["negatives"] or not memory
    _check_mode_options(click.get_current_context(), compare, memory)
    dtype = kwargs.pop("dtype")  # one --dtype: compare's model dtype, --memory's training one
    report = run_bench(compare_cfg=compare, memory=memory, workdir=workdir,
                       dtype=dtype, precision=dtype, **kwargs)
    if as_json:
        ui.emit_json(report)
        return
    if "methods" in report:
        m, agr = report["methods"], report["agreement"]
        ui.result(f"agd {m['agd']['seconds_per_image']:.4f} s/img ({m['agd']['nfe']} NFE), "
                  f"CFG {m['cfg']['seconds_per_image']:.4f} s/img ({m['cfg']['nfe']} NFE): "
                  f"agd/CFG time {report['ratio_agd_to_cfg']:.2f}")
        ui.result(f"agreement with CFG: PSNR {agr['psnr']:.2f} dB, SSIM {agr['ssim']:.4f}")
        ui.result(f"report: {report['report']}")
        ui.result(f"grid: {report['grid']['path']}")
    if "memory" in report:
        peak = {k: v for k, v in report["memory"].items() if k.endswith("bytes")}
        ui.result("training step memory: " + ", ".join(f"{k} {v}" for k, v in peak.items()))


# Options that belong to one mode only: given to the other, they are refused, not ignored.
MEMORY_ONLY = ("optimizer", "checkpointing", "train_batch_size")
COMPARE_ONLY = ("prompts", "n", "steps", "omegas", "seeds", "baselines", "cutoff", "batch_size",
                "throughput_batch", "repeats", "scheduler", "grid", "threads", "quality",
                "negative_prompt", "negatives", "quality_samples", "quality_batch", "quality_seed", "guidance",
                "interval_start", "interval_stop", "interval_ramp", "apg_eta", "apg_momentum",
                "apg_norm_threshold", "zero_init_steps", "rescale_phi")


def _check_mode_options(ctx: click.Context, compare: bool, memory: bool) -> None:
    """Refuse an option the chosen mode(s) would silently ignore (exit 2, the option named)."""
    from agd_cli.infra.errors import InputError

    given = {p.name: p.opts[0] for p in ctx.command.params
             if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE}
    wrong = ([(n, "--memory") for n in MEMORY_ONLY if n in given and not memory]
             + [(n, "--compare-cfg") for n in COMPARE_ONLY if n in given and not compare])
    if wrong:
        name, mode = wrong[0]
        raise InputError(f"{given[name]} applies to `agd bench {mode}` only",
                         hint=f"add {mode}, or drop {given[name]}")
