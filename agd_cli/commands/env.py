"""`agd env`: versions, CUDA, GPUs, bitsandbytes/xformers, disk and hub, for bug reports."""

from __future__ import annotations

import click

from agd_cli.commands import common_options


@click.command("env")
@common_options
def command(as_json: bool, workdir: str) -> None:
    """Print what a bug report needs: versions, CUDA and GPUs, whether bitsandbytes' kernels
    and xformers work, free disk in the workspace, the hub cache and whether the hub answers."""
    from agd_cli.commands.environment import report
    from agd_cli.infra import ui

    facts = report(workdir)
    if as_json:
        ui.emit_json(facts)
        return
    for line in _lines(facts):
        ui.result(line)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _lines(f: dict) -> list[str]:
    v, s, c = f["versions"], f["system"], f["cuda"]
    bnb, xf, disk, hub = f["bitsandbytes"], f["xformers"], f["disk"], f["hub"]
    lines = ["versions: " + ", ".join(f"{k} {v[k] or '-'}" for k in v),
             f"system: {s['os']} ({s['machine']}), {s['cpus']} CPUs, RAM {_gib(s['ram_bytes'])} "
             f"({_gib(s['ram_available_bytes'])} available)",
             f"cuda: {'available' if c['available'] else 'not available'} "
             f"(torch built for CUDA {c['torch_cuda'] or '-'})"]
    lines += [f"  gpu {g['index']}: {g['name']}, {_gib(g['total_bytes'])} "
              f"({_gib(g['free_bytes'])} free), compute {g['capability']}" for g in c["gpus"]]
    lines += [f"bitsandbytes AdamW8bit on {bnb['device']}: "
              + ("runs" if bnb["adamw8bit_runs"] else f"does not run ({bnb['problem']})"),
              "xformers: " + ("imports" if xf["imports"] else f"unavailable ({xf['problem']})"),
              f"workspace: {disk['workdir']}, {_gib(disk['free_bytes'])} free",
              f"hub: cache {hub['cache']}; " + {True: "reachable", False: "unreachable",
                                                  None: "not tried"}[hub["reachable"]]
              + (f" ({hub['problem']})" if hub["problem"] else "")]
    return lines
