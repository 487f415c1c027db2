"""`agd presets`: list the shipped presets with their adapter/base parameter ratio."""

from __future__ import annotations

import click

from agd_cli.commands import common_options


@click.command("presets")
@click.option("--preset", "only", multiple=True, help="Only these presets (name or TOML path).")
@common_options
def command(only: tuple[str, ...], as_json: bool, workdir: str) -> None:
    """List every preset: family, base model, resolution, adapter kind and size."""
    from rich.table import Table

    from agd_cli.config.presets import builtin_names, load_preset
    from agd_cli.families import count_parameters
    from agd_cli.infra import ui

    rows = []
    for name in only or builtin_names():
        p = load_preset(name)
        counts = count_parameters(p)
        lo, hi = p.omega_range
        rows.append({"name": p.name, "family": p.family, "base_model": p.base_model,
                     "resolution": p.resolution, "adapter_kind": p.adapter.kind,
                     "omega_range": [lo, hi], "steps": p.sampling["steps"], **counts,
                     "description": p.description})
    if as_json:
        ui.emit_json({"presets": rows})
        return
    table = Table(title="agd presets")
    for col in ("name", "family", "base model", "res", "ω range", "adapter", "adapter/base"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["family"], r["base_model"], str(r["resolution"]),
                      f"{r['omega_range'][0]:g}–{r['omega_range'][1]:g}", r["adapter_kind"],
                      f"{r['adapter_params'] / 1e6:.2f}M / {r['base_params'] / 1e6:.1f}M "
                      f"= {100 * r['ratio']:.2f}%")
    from rich.console import Console

    Console(no_color=ui._no_color, width=max(Console().width, 130)).print(table)
