"""Peak memory of one `agd train` step: AdamW8bit vs AdamW, gradient checkpointing on vs off.

With `--device meta` no GPU is needed: the step runs on the meta device (shapes, no data) and
the figures are live tensor bytes plus FLOPs per sample (agd_cli/estimate.py); the table then
also says which setting is fastest with the headroom asked for (default 4 GiB on 24 GiB).

Builds the preset's base at real size with random weights, in a fresh subprocess per
configuration, and runs one full training step (forward with adapters, L2 loss, backward,
optimizer step) twice: the peak covers the first step and the steady-state second one.
CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS. "training adds" = peak minus the memory
held before the first step (weights, adapters, libraries).

    python benchmarks/train_memory.py --preset sdxl                       # 1024², CUDA if present
    python benchmarks/train_memory.py --preset sdxl --resolution 512 --device cpu
    python benchmarks/train_memory.py --preset tiny-sd --precision fp32 --json out.json
    python benchmarks/train_memory.py --preset sdxl --device meta --optimizers adamw8bit \
        --batch-sizes 1,2,4,8                                             # no GPU: estimate
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agd_cli.train.probe import measure_train_step  # noqa: E402

GiB = 2**30


def run_grid(preset: str, precision: str, batch_sizes: list[int], device: str,
             resolution: int | None, optimizers: list[str], checkpointing: list[bool]) -> list[dict]:
    """One isolated measurement per (optimizer, checkpointing, batch size)."""
    rows = []
    for opt, ckpt, batch in itertools.product(optimizers, checkpointing, batch_sizes):
        t0 = time.perf_counter()
        r = measure_train_step(preset, precision=precision, optimizer=opt, checkpointing=ckpt,
                               batch_size=batch, device=device, resolution=resolution)
        r["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"  {opt:9s} checkpointing={'on ' if ckpt else 'off'} batch {batch}  peak "
              f"{r['peak_bytes'] / GiB:7.2f} GiB  (training adds {r['step_bytes'] / GiB:6.2f} GiB)"
              f"  {r['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
        rows.append(r)
    return rows


def choose(rows: list[dict], budget_gib: float, headroom_gib: float) -> dict | None:
    """The setting with the fewest FLOPs per sample whose peak leaves the headroom; ties go to
    the larger batch (fewer, fuller kernel launches)."""
    fits = [r for r in rows if r["peak_bytes"] / GiB <= budget_gib - headroom_gib]
    if not fits or fits[0].get("flops_per_sample") is None:
        return None
    return min(fits, key=lambda r: (round(r["flops_per_sample"] / 1e11), -r["batch_size"]))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def table(rows: list[dict]) -> str:
    """A Markdown table of the measurements."""
    r0 = rows[0]
    head = (f"{r0['preset']} · {r0['resolution']}² (latent {'×'.join(map(str, r0['latent_shape']))}) · "
            f"{r0['precision']} · {r0['device']} · "
            f"base {_count(r0['base_params'])} params ({r0['weights_bytes'] / GiB:.2f} GiB), "
            f"adapters {_count(r0['adapter_params'])} · {r0['method']}")
    lines = [head, "",
             "| optimizer | grad. checkpointing | batch | peak | training adds | optimizer state "
             "| TFLOP / sample | step time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opt = r["optimizer"] + ("" if r["optimizer"] == r["optimizer_requested"]
                                else f" (asked {r['optimizer_requested']})")
        flops = r.get("flops_per_sample")
        tflop = "–" if flops is None else f"{flops / 1e12:.2f}"
        step = "–" if r["seconds_step"] is None else f"{r['seconds_step']:.1f} s"
        lines.append(f"| {opt} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{r['batch_size']} | {r['peak_bytes'] / GiB:.2f} GiB | "
                     f"{r['step_bytes'] / GiB:.2f} GiB | {r['optimizer_state_bytes'] / 2**20:.1f} MiB | "
                     f"{tflop} | {step} |")
    return "\n".join(lines)


def main() -> None:
    """Parse the flags, measure the grid, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl")
    p.add_argument("--precision", default="bf16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batch-sizes", default="1", help="e.g. 1,2,4,8")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or meta (no GPU needed)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the preset's)")
    p.add_argument("--optimizers", default="adamw8bit,adamw")
    p.add_argument("--checkpointing", default="on,off", help="on, off or on,off")
    p.add_argument("--budget-gib", type=float, default=24.0, help="GPU memory to plan for")
    p.add_argument("--headroom-gib", type=float, default=4.0, help="memory to leave free")
    p.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    a = p.parse_args()
    rows = run_grid(a.preset, a.precision, [int(b) for b in a.batch_sizes.split(",")], a.device,
                    a.resolution, a.optimizers.split(","),
                    [c == "on" for c in a.checkpointing.split(",")])
    print(table(rows))
    best = choose(rows, a.budget_gib, a.headroom_gib)
    if best is not None:
        print(f"\nfewest FLOPs per sample with ≥ {a.headroom_gib:g} GiB free of {a.budget_gib:g}: "
              f"checkpointing {'on' if best['gradient_checkpointing'] else 'off'}, batch "
              f"{best['batch_size']} ({best['peak_bytes'] / GiB:.2f} GiB, "
              f"{best['flops_per_sample'] / 1e12:.2f} TFLOP/sample)")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=2) + "\n")

if __name__ == "__main__":
    main()
