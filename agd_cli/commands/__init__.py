"""One module per subcommand; each exposes `command`. Heavy imports stay inside the functions."""

from __future__ import annotations

import functools

import click


def common_options(func):
    """--json and --workdir on every subcommand (a flag here beats the group's --workdir)."""

    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
    @click.option("--workdir", "workdir_override", default=None,
                  help="Workspace folder (overrides agd --workdir / AGD_WORKDIR).")
    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, *args, as_json: bool, workdir_override, **kwargs):
        from agd_cli.checks import workdir as checked_workdir

        obj = ctx.find_root().obj or {}
        workdir = str(checked_workdir(workdir_override or obj.get("workdir", "agd-runs")))
        return func(*args, as_json=as_json, workdir=workdir, **kwargs)

    return wrapper
