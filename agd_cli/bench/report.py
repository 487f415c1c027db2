"""`agd bench`'s report: the comparison grid (PNG) and the tables on stderr.

The numbers come from bench.py (the comparison), quality.py (`--quality`) and memory.py
(`--memory`); this module only lays them out.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from PIL import Image
from rich.table import Table

from agd_cli.infra.images import make_grid, save_png, to_pil
from agd_cli.infra.ui import console, gib

if TYPE_CHECKING:
    from agd_cli.bench.plan import BenchPlan, Case

logger = logging.getLogger(__name__)

GRID_COLUMNS = {"cfg": "CFG", "agd": "agd", "unguided": "unguided", "cfg-cutoff": "CFG cutoff",
                "cfg-plain": "plain CFG"}
MIN_CELL = 128  # grid cells are upscaled (nearest) to at least this many pixels


def upscaled(row: list) -> list:
    """PIL images of one grid row, upscaled (nearest) so the largest side is ≥ MIN_CELL."""
    k = max(1, -(-MIN_CELL // max(row[0].size)))  # ceil: tiny images stay visible
    return [im.resize((im.width * k, im.height * k), Image.NEAREST) for im in row]


def _case_label(case: Case, many_omegas: bool) -> str:
    text = str(case.prompt) if not isinstance(case.prompt, int) else f"class {case.prompt}"
    text = text if len(text) <= 40 else text[:39] + "…"
    return f"{text}\nω = {case.omega:g}" if many_omegas else text


def write_grid(results: dict, cases: list[Case], plan: BenchPlan) -> dict:
    """Rows: prompts (× ω) at the first seed; columns CFG | agd | unguided | CFG cutoff."""
    cols = [m for m in ("cfg", "agd", "unguided", "cfg-cutoff") if m in plan.methods]
    keep = [i for i, c in enumerate(cases) if c.seed == plan.seeds[0]]
    rows = []
    for i in keep:
        rows.append(upscaled([to_pil(results[m][i][0].image) for m in cols]))
    row_labels = [_case_label(cases[i], len(plan.omegas) > 1) for i in keep]
    col_labels = [GRID_COLUMNS[m] for m in cols]
    grid = make_grid(rows, row_labels, col_labels)
    save_png(grid, plan.grid, {"agd": "bench --compare-cfg", "seed": plan.seeds[0],
                               "steps": plan.steps, "omegas": plan.omegas})
    return {"path": str(plan.grid), "rows": len(rows), "cols": len(cols), "row_labels": row_labels,
            "col_labels": col_labels, "cell": list(rows[0][0].size), "size": list(grid.size)}


def print_table(report: dict) -> None:
    """The comparison as a rich table on stderr."""
    cpu = report["device"] == "cpu"
    t = Table(title=f"agd vs CFG — {report['preset']} on {report['device']}, "
                    f"{report['steps']} steps, ω {', '.join(f'{w:g}' for w in report['omegas'])}, "
                    f"{report['methods']['cfg']['images']} images/method"
                    + (f", negative prompt {report['negative_prompt']!r}"
                       if report.get("negative_prompt") else ""))
    cols = ["method", "NFE/img", "s/img (median)", "× CFG", *(["CPU s/img", "× CFG (CPU)"] if cpu else []),
            "peak mem (+increase)", "PSNR vs CFG", "SSIM vs CFG"]
    for col in cols:
        t.add_column(col, justify="left" if col == "method" else "right")
    for m in ("cfg", "agd", "cfg-cutoff", "unguided"):
        e = report["methods"].get(m)
        if e is None:
            continue
        agr = e["agreement"]
        cpu_cells = [f"{e['cpu_seconds_per_image']:.4f}", f"{e['cpu_ratio_to_cfg']:.2f}"] if cpu else []
        t.add_row(m, str(e["nfe"]), f"{e['seconds_per_image']:.4f}", f"{e['speed_ratio_to_cfg']:.2f}",
                  *cpu_cells, f"{gib(e['peak_memory_bytes'])} (+{gib(e['memory_increase_bytes'])})",
                  f"{agr['psnr']:.2f} dB" if agr else "—", f"{agr['ssim']:.4f}" if agr else "—")
    console().print(t)
    logger.info(f"timing: {report['timing']}", extra={"style": "dim"})
    logger.info(f"memory: {report['memory_measure']}", extra={"style": "dim"})
    if report.get("throughput"):
        print_speed_table(report)
    if report.get("compiled"):
        print_compiled_table(report)
    if report.get("speed_verdict", {}).get("sentence"):
        logger.info(report["speed_verdict"]["sentence"])


def print_speed_table(report: dict) -> None:
    """Latency (batch 1) and throughput (batch 16) side by side, with what each means."""
    parts = [report["latency"], report["throughput"]]
    cpu = report["device"] == "cpu"
    clock = "CPU s/img" if cpu else "s/img"
    key = "cpu_seconds_per_image" if cpu else "seconds_per_image"
    t = Table(title=f"speed per image — {report['preset']} on {report['device']}, "
                    f"{report['steps']} steps, {report.get('threads') or '?'} threads")
    t.add_column("method")
    for part in parts:
        for col in (f"batch {part['batch_size']}: {clock}", "× CFG", "× unguided"):
            t.add_column(col, justify="right")
    for m in ("cfg", "agd", "cfg-cutoff", "unguided"):
        if m not in parts[0]["methods"]:
            continue
        cells = []
        for part in parts:
            e, ms = part["methods"][m], part["methods"]
            cells += [f"{e[key]:.4f}", f"{e[key] / ms['cfg'][key]:.2f}",
                      f"{e[key] / ms['unguided'][key]:.2f}" if "unguided" in ms else "—"]
        t.add_row(m, *cells)
    console().print(t)
    for part in parts:
        logger.info(part["meaning"] + ".", extra={"style": "dim"})
    for note in idle_device_notes(parts, key):
        logger.info(note, extra={"style": "yellow"})
    flops = report["adapter_overhead"]
    logger.info("adapter FLOPs per step: " + ", ".join(
        f"+{v['adapter_flops_pct']:.2f} % at batch {b}" for b, v in flops["by_batch"].items())
        + f" of the base ({flops['params_pct']:.1f} % of its parameters)", extra={"style": "dim"})


def idle_device_notes(parts: list[dict], key: str = "seconds_per_image") -> list[str]:
    """Why agd saves little at a batch where CFG's second row is nearly free: the device is
    not busy there (per-call and per-kernel costs set the time, not arithmetic; an H200 runs
    SDXL at 1024² so up to batch 4), and what one pass per step then costs is its extra kernels."""
    notes = []
    for part in parts:
        ms = part["methods"]
        if "unguided" not in ms or "cfg" not in ms or "agd" not in ms:
            continue
        pair = ms["cfg"][key] / ms["unguided"][key]
        if pair < 1.5:
            notes.append(f"batch {part['batch_size']}: CFG's batched pair costs only {pair:.2f} × "
                         f"one pass here, so the device is not busy at this batch and one pass "
                         f"per step saves little (agd/CFG {ms['agd'][key] / ms['cfg'][key]:.2f}); "
                         f"it pays off where the device is busy: larger batches or images (on a "
                         f"GPU, also a smaller card).")
    return notes


# CFG's batched pair over one row: below LATENCY_BOUND the second row is nearly free (the device
# waits on launches and per-call costs); from COMPUTE_BOUND on it costs nearly a full pass
LATENCY_BOUND, COMPUTE_BOUND = 1.5, 1.8


def bound_of(pair: float) -> str:
    """'latency', 'compute' or 'partly compute': what sets the time of a call at this size."""
    if pair < LATENCY_BOUND:
        return "latency"
    return "compute" if pair >= COMPUTE_BOUND else "partly compute"


def speed_verdict(speed: dict, device_type: str, preset: str) -> dict:
    """Eager and compiled side by side (agd/CFG, agd/unguided, CFG's pair over one row) at each
    timed batch, and one sentence on what agd gains at the latency batch on this device."""
    suffix = "_cpu" if device_type == "cpu" else ""  # the CPU's process time: steadier
    variants = [("eager", speed)] + ([("compiled", speed["compiled"])] if "compiled" in speed else [])
    rows = []
    for variant, parts in variants:
        for part in (parts.get("latency"), parts.get("throughput")):
            if part is None or "cfg_pair_over_one_row" not in part:
                continue
            pair = part["cfg_pair_over_one_row" + suffix]
            rows.append({"variant": variant, "batch_size": part["batch_size"],
                         "agd_to_cfg": part["ratio_agd_to_cfg" + suffix],
                         "agd_to_unguided": part["ratio_agd_to_unguided" + suffix],
                         "cfg_pair_over_one_row": pair, "bound": bound_of(pair)})
    first = [r for r in rows if r["batch_size"] == speed["latency"]["batch_size"]]
    return {"clock": "process CPU time" if suffix else "wall time", "rows": rows,
            "sentence": _verdict_sentence(first[-1], device_type, preset) if first else None}


def _verdict_sentence(row: dict, device_type: str, preset: str) -> str:
    where = f"At batch {row['batch_size']} ({row['variant']}) this {device_type.upper()} is"
    pair, ratio = row["cfg_pair_over_one_row"], row["agd_to_cfg"]
    if row["bound"] == "latency":
        return (f"{where} latency-bound for {preset}: CFG's pair costs {pair:.2f} × one row, so "
                f"agd gains little over CFG here (agd/CFG {ratio:.2f}); larger batches or images "
                f"make it compute-bound, where agd halves the time.")
    if row["bound"] == "compute":
        return (f"{where} compute-bound for {preset}: CFG's pair costs {pair:.2f} × one row, so "
                f"agd's one pass halves CFG's time (agd/CFG {ratio:.2f}).")
    return (f"{where} partly compute-bound for {preset}: CFG's pair costs {pair:.2f} × one row, "
            f"so agd saves part of CFG's second pass (agd/CFG {ratio:.2f}).")


def print_compiled_table(report: dict) -> None:
    """Eager and compiled timings side by side (`--compile`), then the verdict sentence."""
    verdict = report["speed_verdict"]
    t = Table(title=f"eager vs compiled — {report['preset']} on {report['device']} "
                    f"({verdict['clock']})")
    for col in ("model", "batch", "agd/CFG", "agd/unguided", "CFG pair / one row", "bound",
                "compile s"):
        t.add_column(col, justify="left" if col in ("model", "bound") else "right")
    compiled = report.get("compiled", {})
    for r in verdict["rows"]:
        part = compiled.get("latency" if r["batch_size"] == report["latency"]["batch_size"]
                            else "throughput") if r["variant"] == "compiled" else None
        warm = sum(e.get("warmup_seconds", 0.0) for e in part["methods"].values()) if part else None
        t.add_row(r["variant"], str(r["batch_size"]), f"{r['agd_to_cfg']:.3f}",
                  f"{r['agd_to_unguided']:.3f}", f"{r['cfg_pair_over_one_row']:.2f}", r["bound"],
                  f"{warm:.1f}" if warm is not None else "—")
    console().print(t)
