"""The real-size check on a CUDA machine: the sdxl preset at 1024², random weights, no downloads.

Runs, in one process, the four stages a 24 GB user runs, with the preset's own defaults:

  1. collect 4 trajectories           (agd collect --preset sdxl, 50 DDIM steps)
  2. train 20 steps                   (agd train: bf16 base, AdamW8bit, the preset's batch)
  3. generate 2 images                (agd generate, 1 NFE per step, VAE decode at 1024²)
  4. bench --compare-cfg: batch 1 and the batch-16 throughput pass (agd vs real CFG, same seeds);
     with --compile also compiled (CUDA graphs), side by side, and the latency/compute verdict

and reports per stage the peak `torch.cuda.max_memory_reserved` / `max_memory_allocated`,
seconds per step, the agd/CFG time ratios, and whether xformers and 8-bit AdamW were used,
as one JSON file. Weights are random (seeded) and built from the preset's architecture, so the
memory and speed are those of the real model; the images are noise.

    python benchmarks/gpu_check.py                      # -> gpu-check.json
    python benchmarks/gpu_check.py --device cuda:1 --out check.json --bench-steps 50
    python benchmarks/gpu_check.py --preset tiny-sdxl --device cpu   # a dry run of the code
    python benchmarks/gpu_check.py --compile          # bench eager and compiled (issue 32)

The adapters' own cost per model call, eager and compiled, batch 1 and 4, is
benchmarks/adapter_overhead.py (--device cuda --preset sdxl --mode eager --mode compiled).

CI never runs it (no GPU there); on an H200 the stages took 36 + 69 + 25 + 121 s. On the CPU
the memory figures are left out (null): only a dry run of the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: random weights
os.environ.setdefault("AGD_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

PROMPTS = ["a red fox standing in fresh snow", "a lighthouse on a cliff at dusk",
           "a bowl of ramen on a wooden table", "an astronaut riding a horse on the moon"]
GiB = 2**30


def random_weights(name: str):
    """A preset with random weights built from its own architecture section (seed 0)."""
    from agd_cli.presets import from_dict, load_preset

    raw = dict(load_preset(name).raw)
    raw.update(name=f"{name}-random", base_model="config",
               description=f"{name} at real size with random weights (benchmarks/gpu_check.py)")
    return from_dict(raw)


def stage(name: str, device, run):
    """Run one stage with fresh CUDA peak counters; its summary plus memory and wall time."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    print(f"[gpu_check] {name} …", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    summary = run()
    if cuda:
        torch.cuda.synchronize(device)
    out = {"wall_seconds": round(time.perf_counter() - t0, 2),
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 2) if cuda else None,
           "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 2) if cuda else None,
           "summary": summary}
    # each stage's figures as soon as it ends: a run stopped later still tells what it measured
    print(f"[gpu_check] {name} done: {json.dumps(out, default=str)}", file=sys.stderr, flush=True)
    return out


def run_stages(preset_name: str, device: str, workdir: Path, train_steps: int,
               bench_steps: int, compile_model: bool = False) -> dict:
    """The four stages, in order, on one device; one dict of results."""
    import torch

    from agd_cli.bench import run_bench
    from agd_cli.collect import run_collect
    from agd_cli.generate import run_generate
    from agd_cli.train import run_train

    dev = torch.device(device)
    preset = random_weights(preset_name)
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    run = workdir / preset.name
    common = {"device": device, "workdir": str(workdir)}
    out = {"collect": stage("collect", dev, lambda: run_collect(
        preset, prompts=str(prompts), num_per_prompt=1, **common))}
    c = out["collect"]["summary"]
    batches = -(-c["new_trajectories"] // preset.collect["batch_size"])
    out["collect"]["seconds_per_step"] = round(c["collect_seconds"] / (batches * c["sampling_steps"]), 4)
    out["train"] = stage("train", dev, lambda: run_train(run=str(run), steps=train_steps,
                                                          resume=False, **common))
    t = out["train"]["summary"]
    out["train"]["seconds_per_step"] = round(t["seconds"] / max(t["steps"], 1), 3)
    out["generate"] = stage("generate", dev, lambda: run_generate(
        PROMPTS[:2], run=str(run), **common))
    g = out["generate"]["summary"]
    out["generate"]["seconds_per_image"] = round(out["generate"]["wall_seconds"] / 2, 2)
    # one bench run times batch 1 (latency) and the throughput batch (16) side by side
    out["bench"] = stage("bench", dev, lambda: run_bench(
        compare_cfg=True, run=str(run), prompts=str(prompts), n=4, steps=bench_steps,
        batch_size=1, show_table=False, compile=compile_model, **common))
    b = out["bench"]["summary"]
    for key in ("latency", "throughput"):
        out["bench"][key] = {"batch_size": b[key]["batch_size"],
                             "ratio_agd_to_cfg": b[key]["ratio_agd_to_cfg"],
                             "ratio_agd_to_unguided": b[key]["ratio_agd_to_unguided"]}
    out["bench"]["speed_verdict"] = b["speed_verdict"]  # eager and compiled rows, one sentence
    out["used"] = {"attention_collect": c.get("attention"), "optimizer_train": t["optimizer"],
                   "adamw8bit": t["optimizer"] == "adamw8bit", "xformers": _xformers_used(c),
                   "images": g.get("images")}
    return out


def _xformers_used(collect_summary: dict) -> bool:
    return "xformers" in str(collect_summary.get("attention") or "").lower()


def main() -> None:
    """Parse the flags, run the stages, write the JSON file."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl", help="a preset with an [architecture] section")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu: a dry run)")
    p.add_argument("--out", default="gpu-check.json", help="the JSON file to write")
    p.add_argument("--workdir", default=None, help="run folder (default: a temporary one)")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--bench-steps", type=int, default=20,
                   help="sampling steps per bench image (the preset's 50 takes longer)")
    p.add_argument("--compile", action="store_true",
                   help="bench: also time every method compiled (CUDA graphs), next to eager")
    a = p.parse_args()
    import torch

    from agd_cli.environment import report as env_report

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
                 "this check needs a GPU. `agd env` says what torch sees.")
    with tempfile.TemporaryDirectory(prefix="agd-gpu-check-") as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = {"env": env_report(workdir), "preset": f"{a.preset}, random weights",
                  "stages": run_stages(a.preset, a.device, workdir, a.train_steps,
                                       a.bench_steps, a.compile)}
    Path(a.out).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    s = result["stages"]
    for name in ("collect", "train", "generate", "bench"):
        print(f"{name:9s} peak reserved {s[name]['peak_reserved_gib']} GiB, allocated "
              f"{s[name]['peak_allocated_gib']} GiB, {s[name]['wall_seconds']:.1f} s")
    lat, thr = s["bench"]["latency"], s["bench"]["throughput"]
    print(f"agd/CFG time: batch {lat['batch_size']} {lat['ratio_agd_to_cfg']:.2f}, batch "
          f"{thr['batch_size']} {thr['ratio_agd_to_cfg']:.2f}; used: {s['used']}; wrote {a.out}")
    for row in s["bench"]["speed_verdict"]["rows"]:
        print(f"  {row['variant']:8s} batch {row['batch_size']:2d}: agd/CFG {row['agd_to_cfg']:.3f}, "
              f"agd/unguided {row['agd_to_unguided']:.3f}, CFG pair {row['cfg_pair_over_one_row']:.2f} "
              f"× one row ({row['bound']}-bound)")
    print(s["bench"]["speed_verdict"]["sentence"])


if __name__ == "__main__":
    main()
