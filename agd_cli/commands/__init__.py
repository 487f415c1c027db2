"""One module per subcommand; each exposes `command`. Heavy imports stay inside the functions."""

from __future__ import annotations

import functools

import click

# The flag vocabulary (docs/usage.md, "The four commands"): one name per concept in every command.
DEVICE_HELP = "cpu, cuda, cuda:N or auto (CUDA when present, else the CPU)."


class WrittenFloat(float):
    """A float flag's value that remembers how it was written: an error names `1e309`, not the
    `inf` it converts to."""

    text: str


class FloatFlag(click.ParamType):
    """click's float, keeping the text (checks._literal shows it)."""

    name = "float"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            number = WrittenFloat(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a number", param, ctx)
        number.text = str(value).strip()
        return number


FLOAT = FloatFlag()


class NamedChoice(click.Choice):
    """A closed set of names, listed in --help; a bad one is agd's own error (exit 2), naming
    the value as written: "unknown scheduler 'plms'", hint: the names to choose from."""

    def __init__(self, choices, what: str):
        super().__init__(choices)
        self.what = what

    def convert(self, value, param, ctx):
        from agd_cli.config.checks import choice

        return choice(value, self.choices, self.what)

# the two-pass rules' parameter flags (agd_cli.core.guidance_rules.PARAMETERS has the ranges)
GUIDANCE_FLAGS = (
    ("--interval-start", "interval: first guided step, a fraction of the steps [preset, 0.2]."),
    ("--interval-stop", "interval: guidance stops at this fraction of the steps [preset, 0.8]."),
    ("--interval-ramp", "interval: ω ramps over this fraction of the steps at each edge (0: a "
                        "hard switch) [preset, 0]."),
    ("--apg-eta", "apg: weight of the update's part parallel to the cond prediction [0]."),
    ("--apg-momentum", "apg: momentum of the update's running average, in (-1, 1) [-0.5]."),
    ("--apg-norm-threshold", "apg: clip the update's norm to this (0: off) [0]."),
    ("--zero-init-steps", "cfg-zero-star: first steps whose prediction is zeroed [1]."),
    ("--rescale-phi", "rescale: blend of the std-matched output, from 0 to 1 [0.7]."),
)


def guidance_options(rule_help: str):
    """--guidance RULE and the rules' parameter flags; the command gets `guidance` and
    `guidance_params` ({key: value or None})."""
    from agd_cli.config.vocab import GUIDANCE_RULES

    def decorate(func):
        @click.option("--guidance", type=NamedChoice(GUIDANCE_RULES, "guidance rule"),
                      default=None, help=rule_help)
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            keys = [flag[2:].replace("-", "_") for flag, _ in GUIDANCE_FLAGS]
            kwargs["guidance_params"] = {k: kwargs.pop(k) for k in keys}
            return func(*args, **kwargs)

        for flag, text in reversed(GUIDANCE_FLAGS):
            kind = int if flag == "--zero-init-steps" else FLOAT
            wrapper = click.option(flag, type=kind, default=None, help=text)(wrapper)
        return wrapper

    return decorate


# hidden option name -> (old flag, new flag, the new flag's parameter name)
DEPRECATED: dict[str, tuple[str, str, str]] = {}


def deprecated_alias(old: str, new: str, dest: str, *decls: str, **attrs):
    """A hidden option `old` that still works as `new` (one note on stderr when used)."""
    name = "deprecated_" + old.lstrip("-").replace("-", "_").split("/")[0] + "_" + dest
    DEPRECATED[name] = (old.split("/")[0], new, dest)
    return click.option(*(decls or (old,)), name, hidden=True, default=None, **attrs)


def _apply_deprecated(kwargs: dict) -> None:
    """Move each used deprecated flag's value to its new name (the new name wins if both)."""
    from agd_cli.infra import ui

    for name in [k for k in kwargs if k in DEPRECATED]:
        value = kwargs.pop(name)
        if value is None:
            continue
        old, new, dest = DEPRECATED[name]
        ui.warn(f"{old} is deprecated, use {new}")
        if kwargs.get(dest) is None:
            kwargs[dest] = value


def common_options(func):
    """--json, --workdir, -v and -q on every subcommand (a flag here beats the group's); maps
    deprecated flag names to the current ones."""

    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
    @click.option("-v", "--verbose", count=True, help="More detail on stderr.")
    @click.option("-q", "--quiet", is_flag=True,
                  help="Only warnings and errors on stderr, no progress bars.")
    @click.option("--workdir", "workdir_override", default=None,
                  help="Workspace folder (overrides agd --workdir / AGD_WORKDIR).")
    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, *args, as_json: bool, workdir_override, verbose: int,
                quiet: bool, **kwargs):
        from agd_cli.config.checks import workdir as checked_workdir
        from agd_cli.infra import ui
        from agd_cli.infra.runtime import quiet_libraries

        if verbose or quiet:
            ui.setup_logging(-1 if quiet else verbose)
            quiet_libraries(-1 if quiet else verbose)

        obj = ctx.find_root().obj or {}
        chosen = obj.get("workdir", "agd-runs") if workdir_override is None else workdir_override
        workdir = str(checked_workdir(chosen))
        _apply_deprecated(kwargs)
        return func(*args, as_json=as_json, workdir=workdir, **kwargs)

    return wrapper
