"""The `agd` command: a thin Click group whose subcommands load lazily (no torch for --help)."""

from __future__ import annotations

import importlib
import os
import sys

import click

from agd_cli import __version__
from agd_cli.errors import AgdError

# name -> (module, one-line help shown by `agd --help` without importing the module)
COMMANDS = {
    "collect": ("agd_cli.commands.collect", "Record CFG-guided trajectories of the teacher."),
    "train": ("agd_cli.commands.train", "Train guidance adapters on collected trajectories."),
    "generate": ("agd_cli.commands.generate", "Sample with adapters: one forward pass per step."),
    "bench": ("agd_cli.commands.bench", "Speed, memory and agreement of agd against real CFG."),
    "presets": ("agd_cli.commands.presets", "List the model presets."),
    "env": ("agd_cli.commands.env", "Versions, CUDA, GPUs and hub access, for bug reports."),
}


class LazyGroup(click.Group):
    """Imports a subcommand's module only when that subcommand runs or shows its help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name][0]).command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, short) for name, (_, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agd")
@click.option("--workdir", type=click.Path(file_okay=False), envvar="AGD_WORKDIR",
              default="agd-runs", show_default=True,
              help="Workspace folder holding one run folder per preset (env: AGD_WORKDIR).")
@click.option("--debug", is_flag=True, envvar="AGD_DEBUG", help="Show tracebacks on errors.")
@click.pass_context
def group(ctx: click.Context, workdir: str, debug: bool) -> None:
    """agd: classifier-free guidance quality at half the cost.

    \b
    Typical use:
      agd collect --preset sdxl --prompts coco500.txt
      agd train
      agd generate "a red fox" -w 6
      agd bench --compare-cfg
    """
    ctx.ensure_object(dict)
    ctx.obj["workdir"] = workdir
    ctx.obj["debug"] = debug


def _report(err: AgdError, as_json: bool) -> None:
    from agd_cli import ui

    ui.err.print(f"[bold red]error:[/bold red] {err.message}", markup=True)
    if err.hint:
        ui.err.print(f"[dim]hint:[/dim] {err.hint}")
    if as_json:
        ui.emit_json({"error": err.message, "hint": err.hint})


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the group and turns domain errors into one line, a hint and exit 2."""
    # On a shared or busy CPU, OpenMP's spin-waiting makes multi-threaded torch ops several times
    # slower (a thread spins while its partner is descheduled); passive waiting costs little on
    # an idle machine. Must be set before torch loads OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    debug = "--debug" in argv or os.environ.get("AGD_DEBUG") == "1"
    try:
        group.main(args=argv, prog_name="agd", standalone_mode=False)
    except AgdError as err:
        if debug:
            raise
        _report(err, as_json)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - last line of defence: no traceback without --debug
        if debug:
            raise
        _report(AgdError(f"internal error: {type(e).__name__}: {e}",
                         "rerun with --debug for the traceback and report it"), as_json)
        sys.exit(1)


if __name__ == "__main__":
    main()
