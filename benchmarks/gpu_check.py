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

With --families it checks every real preset instead (benchmarks/family_checks.py: text-encoder
dtypes after load, e.g. T5's `wo` in fp32; the attention processors per family; non-finite
outputs of encode, CFG, adapters and decode; the bf16 -> fp16 training fallback):

    python benchmarks/gpu_check.py --families                  # -> gpu-check-families.json
    python benchmarks/gpu_check.py --families --presets dit,pixart-sigma
    python benchmarks/gpu_check.py --families --tiny --device cpu   # a dry run of the code

`--phases` checks every real preset instead (or those of `--presets`), each at real size with
random weights through agd's own collect path: the peak allocated / reserved memory of text
encoding, CFG sampling, VAE decode and one training step against `agd collect/train
--dry-run`'s estimate, seconds per step, and NaN/inf in every output:

    python benchmarks/gpu_check.py --phases --out phases.json            # all eight presets
    python benchmarks/gpu_check.py --phases --presets sd35-large,sdxl
    python benchmarks/gpu_check.py --phases --presets tiny-sd,tiny-sd3 --device cpu   # the code
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
    from agd_cli.config.presets import from_dict, load_preset

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

    from agd_cli.bench.run import run_bench
    from agd_cli.collect.run import run_collect
    from agd_cli.generate.run import run_generate
    from agd_cli.train.run import run_train

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


def run_families(a) -> None:
    """--families: benchmarks/family_checks.py on the chosen presets; JSON file and a table."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import family_checks

    names = (a.presets.split(",") if a.presets
             else family_checks.TINY_PRESETS if a.tiny else family_checks.REAL_PRESETS)
    from agd_cli.config.presets import load_preset

    make = load_preset if a.tiny else random_weights  # tiny presets are random already
    results = family_checks.run_family_checks(
        names, a.device, make, log=lambda line: print(line, file=sys.stderr, flush=True))
    out = a.out if a.out != "gpu-check.json" else "gpu-check-families.json"
    Path(out).write_text(json.dumps({"device": a.device, "presets": results}, indent=2,
                                    default=str) + "\n", encoding="utf-8")
    print(family_checks.table(results))
    print(f"wrote {out}")
    if not all(r["ok"] for r in results.values()):
        sys.exit(1)


# --- every real preset: peak memory per phase against the dry run's estimate (issue 31) --------
REAL_PRESETS = ("sdxl", "sd15", "sd21", "sd35-medium", "sd35-large", "pixart-sigma",
                "sana-1600m", "dit")
PHASE_STEPS = 4  # sampling steps measured per preset: the peak of a step does not grow with more


def _finite(*tensors) -> bool:
    """Whether every floating-point tensor (or dict of them) holds only finite values."""
    import torch

    flat = [v for t in tensors for v in (t.values() if isinstance(t, dict) else [t])]
    return all(bool(torch.isfinite(v).all()) for v in flat
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def _measured(device, run) -> tuple[object, dict]:
    """(run()'s result, {allocated and reserved peak GiB, seconds}) with fresh peak counters."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = run()
    if cuda:
        torch.cuda.synchronize(device)
    peak = {"seconds": round(time.perf_counter() - t0, 3),
            "allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 2) if cuda else None,
            "reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 2) if cuda else None}
    return out, peak


def _against(estimate_gib: float | None, peak: dict) -> dict:
    """A phase's measured peak next to its dry-run estimate; ratio = allocated / estimate."""
    got = peak["allocated_gib"]
    ratio = round(got / estimate_gib, 3) if got is not None and estimate_gib else None
    return {**peak, "estimate_gib": estimate_gib, "ratio_to_estimate": ratio}


def check_phases(name: str, device: str, workdir: Path) -> dict:
    """One real preset at real size with random weights, through agd's own collect path: text
    encoding (one chunk of prompts, the encoders alone), CFG sampling of one batch (seconds per
    step), VAE decode of one image, and one training step, each measured against the dry run's
    estimate (phase_memory), every output checked for NaN/inf."""
    from agd_cli.collect.plan import ENCODE_CHUNK, CollectFlags, resolve_settings
    from agd_cli.train.phase_memory import collect_phases, quiet_casts, training_step

    preset = random_weights(name)
    prompts = workdir / f"{name}-prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    what = {"classes": "0-3"} if preset.family == "dit" else {"prompts": str(prompts)}
    s = resolve_settings(CollectFlags(preset, steps=PHASE_STEPS, device=device,
                                      workdir=str(workdir), **what))
    t = preset.train
    with quiet_casts():
        est = {p.name: round(p.peak_bytes / GiB, 2) for p in collect_phases(
            preset, s.dtype, s.batch_size, PHASE_STEPS, ENCODE_CHUNK)}
        est["training step"] = round(training_step(
            preset, t["precision"], t["optimizer"], t["gradient_checkpointing"],
            t["batch_size"]).peak_bytes / GiB, 2)
    phases = _collect_path_phases(s, est)  # its model is gone when it returns
    phases["training step"] = _training_phase(preset, device, est["training step"])
    return {"preset": name, "dtype": s.dtype, "batch_size": s.batch_size, "phases": phases,
            "all_finite": all(p["finite"] for p in phases.values())}


def _collect_path_phases(s, est: dict) -> dict:
    """Text encoding, sampling and VAE decode, measured through collect's own functions."""
    import torch

    from agd_cli.collect.plan import ENCODE_CHUNK
    from agd_cli.collect.run import collect_batch, encode_conditions
    from agd_cli.collect.store import keep_indices
    from agd_cli.families import load_denoiser
    from agd_cli.families.base import TORCH_DTYPES
    from agd_cli.infra.errors import NonFiniteError
    from agd_cli.train.probe import _default_dtype

    dev, phases = torch.device(s.device), {}
    with _default_dtype(TORCH_DTYPES[s.dtype]):  # random init straight in the run's dtype
        den = load_denoiser(s.preset, device=s.device, dtype=s.dtype)
    if den.text:  # the encoders alone (the denoiser waits on the CPU), one chunk of prompts
        chunk = (PROMPTS * ENCODE_CHUNK)[:ENCODE_CHUNK]
        cond, peak = _measured(dev, lambda: den.encode(chunk))
        phases["text encoding"] = {**_against(est.get("text encoding"), peak),
                                   "finite": _finite(cond)}
    table, row_of, uncond = encode_conditions(den, s.prompts, list(range(len(s.prompts))))
    ids, keep = s.ids[:s.batch_size], keep_indices(s.steps, s.keep_steps)
    try:
        tensors, peak = _measured(dev, lambda: collect_batch(den, s, ids, table, row_of, uncond,
                                                             keep))
        finite, refused = _finite(tensors), None
    except NonFiniteError as e:  # collect's own guard: the measurement is lost, the fact kept
        tensors, finite, refused = None, False, e.message
        peak = {"allocated_gib": None, "reserved_gib": None, "seconds": None}
    phases["sampling"] = {**_against(est.get("sampling"), peak), "finite": finite,
                          "refused": refused, "seconds_per_step": None if refused else
                          round(peak["seconds"] / s.steps, 4)}
    if not s.preset.pixel_space and tensors is not None:
        images, peak = _measured(dev, lambda: den.decode(tensors["x_final"][:1]))
        phases["VAE decode"] = {**_against(est.get("VAE decode"), peak),
                                "finite": _finite(images)}
    return phases


def _training_phase(preset, device: str, estimate_gib: float) -> dict:
    """Two real training steps of the preset's defaults (memory.measure_in_process)."""
    import math

    import torch

    from agd_cli.train.probe import measure_in_process

    t = preset.train
    train, peak = _measured(torch.device(device), lambda: measure_in_process(
        preset, t["precision"], t["optimizer"], t["gradient_checkpointing"], t["batch_size"],
        device, None))
    return {**_against(estimate_gib, peak), "seconds_per_step": train["seconds_step"],
            "finite": all(math.isfinite(v) for v in train["losses"]),
            "optimizer": train["optimizer"]}


def run_phase_checks(names: list[str], device: str, workdir: Path) -> dict:
    """check_phases for each preset, one after the other; each preset's figures on stderr as
    soon as they are in (a run stopped later still tells what it measured)."""
    import torch

    results = {}
    for name in names:
        print(f"[gpu_check] phases of {name} …", file=sys.stderr, flush=True)
        try:
            results[name] = check_phases(name, device, workdir)
        except Exception as e:  # noqa: BLE001 - one preset's failure is its result, not the end
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[gpu_check] {name}: {json.dumps(results[name], default=str)}", file=sys.stderr,
              flush=True)
    return results


def phase_table(results: dict) -> str:
    """A Markdown table: preset, phase, estimate, measured allocated / reserved, s/step, finite."""
    rows = ["| preset | phase | dry-run estimate | measured allocated / reserved | s/step | finite |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | — | — | {r['error']} | — | — |")
            continue
        for phase, p in r["phases"].items():
            rows.append(f"| {name} | {phase} | {p['estimate_gib']} GiB | {p['allocated_gib']} / "
                        f"{p['reserved_gib']} GiB | {p.get('seconds_per_step') or '—'} | "
                        f"{'yes' if p['finite'] else 'NO'} |")
    return "\n".join(rows)


def main() -> None:
    """Parse the flags, run the stages (or --families), write the JSON file."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl", help="a preset with an [architecture] section")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu: a dry run)")
    p.add_argument("--out", default="gpu-check.json", help="the JSON file to write")
    p.add_argument("--workdir", default=None, help="run folder (default: a temporary one)")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--bench-steps", type=int, default=20,
                   help="sampling steps per bench image (the preset's 50 takes longer)")
    p.add_argument("--families", action="store_true",
                   help="check every real preset (dtypes after load, attention, non-finite "
                        "outputs, bf16 fallback) instead of the four stages")
    p.add_argument("--tiny", action="store_true",
                   help="with --families: the tiny presets (a dry run, e.g. --device cpu)")
    p.add_argument("--phases", action="store_true",
                   help="instead of the four stages: each phase's peak memory against the dry "
                        "run's estimate, seconds per step and NaN/inf checks, for --presets")
    p.add_argument("--presets", default=None,
                   help="with --families or --phases: comma-separated preset names (default: "
                        "every real one)")
    p.add_argument("--compile", action="store_true",
                   help="bench: also time every method compiled (CUDA graphs), next to eager")
    a = p.parse_args()
    import torch

    from agd_cli.commands.environment import report as env_report

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
                 "this check needs a GPU. `agd env` says what torch sees.")
    if a.families:
        run_families(a)
        return
    if a.phases:
        return main_phases(a)
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


def main_phases(a) -> None:
    """--phases: run_phase_checks on --presets; JSON to --out, the table on stdout."""
    from agd_cli.commands.environment import report as env_report

    names = [n.strip() for n in (a.presets or ",".join(REAL_PRESETS)).split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="agd-gpu-phases-") as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = {"env": env_report(workdir), "phases": run_phase_checks(names, a.device, workdir)}
    Path(a.out).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(phase_table(result["phases"]))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
