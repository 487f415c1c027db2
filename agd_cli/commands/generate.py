"""`agd generate`: sample with trained adapters, one forward pass per step."""

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
from agd_cli.config.vocab import DTYPES, SCHEDULERS


@click.command("generate")
@click.argument("prompts", nargs=-1)
@click.option("-w", "--omega", type=FLOAT, default=None,
              help="Guidance scale ω (default: the preset's default_omega).")
@click.option("--adapter", type=click.Path(dir_okay=False), default=None,
              help="Adapter file (default: the most recently trained one in the workspace).")
@click.option("--run", "run", type=str, default=None,
              help="Run folder (or run name in the workspace) whose adapter to use.")
@click.option("--preset", type=str, default=None,
              help="Preset name or TOML: the base and settings to use (default: the adapter's; "
                   "same family, e.g. a fine-tune); without --run/--adapter, the adapter of its "
                   "run folder.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the preset's).")
@click.option("--scheduler", type=NamedChoice(SCHEDULERS, "scheduler"), default=None,
              help="Sampler (default: the preset's).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the first image; image k of a prompt uses seed + k.")
@click.option("-n", "--num-images", type=int, default=1, show_default=True,
              help="Images per prompt.")
@click.option("--batch-size", type=int, default=None, help="Images per model call (default 4).")
@click.option("--size", type=str, default=None, help="WIDTHxHEIGHT in pixels (default: the preset's).")
@click.option("--out", type=click.Path(), default=None,
              help="Output folder, or a .png file for a single image (default: RUN/samples). "
                   "A rerun resumes: an image already there from the same settings is kept and "
                   "skipped. Nothing else is overwritten: in a folder a new image gets a -2, -3… "
                   "suffix; an existing .png from other settings is refused.")
@click.option("--mode", type=click.Choice(["agd", "cfg"]), default=None,
              help="[agd] agd: one pass per step with the adapters; cfg: real two-pass CFG on the same "
                   "base with adapters off, for comparison.")
@deprecated_alias("--cfg", "--mode cfg", "mode", is_flag=True, flag_value="cfg")
@guidance_options("--mode cfg's two-pass rule: cfg, interval, apg, cfg-zero-star or rescale "
                  "[the rule the adapter learned].")
@click.option("--negative-prompt", type=str, default=None,
              help="Negative prompt (DiT: a class). One pass per step with an adapter trained "
                   "with negatives, else real CFG.")
@click.option("--compile/--no-compile", "compile", default=None,
              help="torch.compile the model: CUDA graphs on CUDA, inductor on the CPU; the first "
                   "batch of each size compiles (minutes) [preset: sampling.compile, off].")
@click.option("--offload", is_flag=True,
              help="Model CPU offload: each model moves to the GPU only while it runs.")
@click.option("--device", type=str, default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Model precision on CUDA (CPU computes in fp32) [the preset's fp16 or bf16].")
@common_options
def command(prompts: tuple[str, ...], as_json: bool, workdir: str, **flags) -> None:
    """Generate images for PROMPTS with a trained adapter: one forward pass per step.

    \b
    For DiT presets the prompts are ImageNet class ids or names.
    Examples:
      agd generate "a red fox" -w 6
      agd generate "a red fox" -w 6 --mode cfg     # real CFG, for comparison
      agd generate 207 360 --run agd-runs/dit -n 4
    """
    from agd_cli.generate.run import run_generate
    from agd_cli.infra import ui

    flags["cfg"] = (flags.pop("mode") or "agd") == "cfg"
    summary = run_generate(list(prompts), workdir=workdir, **flags)
    if as_json:
        ui.emit_json(summary)
        return
    for path in summary["images"]:
        ui.result(path)
    per_step = "1 pass per step" if summary["mode"] == "agd" else "2 passes per step"
    rule = summary["guidance"]["name"]
    if rule != "cfg":
        per_step += f", rule {rule}" if summary["mode"] == "cfg" else f", taught {rule}"
    if summary["negative_prompt"] is not None:
        per_step += f", negative prompt {summary['negative_prompt']!r}"
    made = len(summary["images"]) - summary["skipped"]
    kept = f" ({summary['skipped']} kept from an earlier run)" if summary["skipped"] else ""
    compiled = (f", compiled ({summary['compile_seconds']:.1f} s compiling)"
                if summary["compile"] else "")
    ui.info(f"{made} image(s) made{kept}, ω={summary['omega']:g}, {summary['steps']} "
            f"{summary['scheduler']} steps, {summary['nfe']} NFE each ({summary['mode']}, "
            f"{per_step}), {summary['seconds_per_image']:.3f} s/image{compiled}")
