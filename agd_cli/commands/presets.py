"""`agd presets`: list the shipped presets (read from their TOML alone: fast, no torch)."""

from __future__ import annotations

import click

from agd_cli.commands import common_options

TEST_PREFIX = "tiny-"  # random-weight presets built from config, for tests and demos


@click.command("presets")
@click.option("--preset", "only", multiple=True, help="Only these presets (name or TOML path).")
@click.option("--all", "show_all", is_flag=True,
              help="Also list the tiny-* test presets (random weights built from config).")
@click.option("--params", is_flag=True,
              help="Count base and adapter parameters (builds each model on the meta device: "
                   "seconds per preset).")
@common_options
def command(only: tuple[str, ...], show_all: bool, params: bool, as_json: bool,
            workdir: str) -> None:
    """List the presets: family, base model, resolution, ω range, adapter kind (and size)."""
    from agd_cli.config.presets import builtin_names, load_preset
    from agd_cli.infra import ui

    names = only or [n for n in builtin_names() if show_all or not n.startswith(TEST_PREFIX)]
    rows = [_row(load_preset(name), params) for name in names]
    if as_json:
        ui.emit_json({"presets": rows})
        return
    _print_table(rows, params)
    if not only and not show_all:
        ui.info(f"{TEST_PREFIX}* test presets hidden: `agd presets --all` lists them")


def _row(p, params: bool) -> dict:
    lo, hi = p.omega_range
    row = {"name": p.name, "family": p.family, "base_model": p.base_model,
           "resolution": p.resolution, "adapter_kind": p.adapter.kind, "omega_range": [lo, hi],
           "steps": p.sampling["steps"], "description": p.description}
    if params:
        from agd_cli.families import count_parameters

        row.update(count_parameters(p))
    return row


def _print_table(rows: list[dict], params: bool) -> None:
    from rich.table import Table

    from agd_cli.infra.ui import console

    table = Table(title="agd presets")
    for col in ("name", "family", "base model", "res", "ω range", "adapter",
                *(["adapter/base"] if params else [])):
        table.add_column(col)
    for r in rows:
        size = ([f"{r['adapter_params'] / 1e6:.2f}M / {r['base_params'] / 1e6:.1f}M "
                 f"= {100 * r['ratio']:.2f}%"] if params else [])
        table.add_row(r["name"], r["family"], r["base_model"], str(r["resolution"]),
                      f"{r['omega_range'][0]:g}–{r['omega_range'][1]:g}", r["adapter_kind"], *size)
    console(stdout=True).print(table)
