"""The `agd` command: a thin Click group whose subcommands load lazily (no torch for --help)."""

from __future__ import annotations

import importlib
import os
import sys

import click

from agd_cli import __version__
from agd_cli.infra.errors import AgdError
from agd_cli.infra.runtime import quiet_libraries

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
@click.option("--workdir", envvar="AGD_WORKDIR",
              default="agd-runs", show_default=True,
              help="Workspace folder holding one run folder per preset (env: AGD_WORKDIR).")
@click.option("--debug", is_flag=True, envvar="AGD_DEBUG", help="Show tracebacks on errors.")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (also the libraries' own "
              "info lines).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr; no progress "
              "bars (results on stdout are unchanged).")
@click.pass_context
def group(ctx: click.Context, workdir: str, debug: bool, verbose: int, quiet: bool) -> None:
    """agd: classifier-free guidance quality at half the cost.

    \b
    Typical use:
      agd collect --preset sdxl --prompts coco500.txt
      agd train
      agd generate "a red fox" -w 6
      agd bench --compare-cfg
    """
    from agd_cli.infra import ui

    verbosity = -1 if quiet else verbose
    ui.setup_logging(verbosity)
    quiet_libraries(verbosity)
    ctx.ensure_object(dict)
    ctx.obj["workdir"] = workdir
    ctx.obj["debug"] = debug


def _report(err: AgdError, as_json: bool) -> None:
    """One error line and a hint on stderr (values shown literally); with --json, one object."""
    from rich.markup import escape

    from agd_cli.infra import ui

    ui.err.print(f"[bold red]error:[/bold red] {escape(err.message)}")
    if err.hint:
        ui.err.print(f"[dim]hint:[/dim] {escape(err.hint)}")
    if as_json:
        ui.emit_json({"error": err.message, "hint": err.hint, "exit_code": err.exit_code})


def _as_agd_error(e: BaseException) -> AgdError:
    """Any exception as the AgdError the user sees (exit code included)."""
    from agd_cli.infra.errors import Interrupted, storage_error

    if isinstance(e, AgdError):
        return e
    if isinstance(e, click.exceptions.Abort | KeyboardInterrupt):
        return Interrupted("interrupted", hint="rerun the same command to resume")
    if isinstance(e, click.ClickException):
        usage = AgdError(e.format_message(), hint="see `agd --help` or `agd COMMAND --help`")
        usage.exit_code = e.exit_code
        return usage
    if isinstance(e, OSError) and (found := storage_error(e)) is not None:
        return found
    if _out_of_memory(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return AgdError(f"out of memory: {first[:300]}",
                        hint="ask for less at once: a smaller --batch-size, --size or -n, or fewer "
                             "--seeds; in agd train also --gradient-checkpointing (--dry-run "
                             "estimates each phase's memory)")
    internal = AgdError(f"internal error: {type(e).__name__}: {e}",
                        hint="rerun with --debug for the traceback and report it")
    internal.exit_code = 1
    return internal


def _out_of_memory(e: BaseException) -> bool:
    """An allocation the machine could not satisfy (CPU or GPU), not a bug in agd."""
    text = str(e)
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or isinstance(e, RuntimeError) and ("can't allocate memory" in text
                                                or "CUDA out of memory" in text))


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the group and turns domain errors into one line, a hint and exit 2."""
    # On a shared or busy CPU, OpenMP's spin-waiting makes multi-threaded torch ops several times
    # slower (a thread spins while its partner is descheduled); passive waiting costs little on
    # an idle machine. Must be set before torch loads OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # a Windows console or a redirect in a legacy code page (cp1252) cannot encode ω, ×, …:
    # shown escaped rather than failing the command (JSON is ASCII anyway)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    quiet_libraries()  # the CLI's choice; importing agd as a library leaves logging alone
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    debug = "--debug" in argv or os.environ.get("AGD_DEBUG") == "1"
    try:
        group.main(args=argv, prog_name="agd", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        if not as_json:
            e.show()  # Click's usage block, as users know it
            sys.exit(e.exit_code)
        _report(_as_agd_error(e), as_json)
        sys.exit(e.exit_code)
    except (Exception, KeyboardInterrupt, click.exceptions.Abort) as e:  # noqa: BLE001 - last line of defence
        if debug and not isinstance(e, KeyboardInterrupt | click.exceptions.Abort):
            raise
        err = _as_agd_error(e)
        _report(err, as_json)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
