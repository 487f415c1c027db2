"""The adapters' own cost per sampling step, as a fraction of a base forward (random weights).

For each preset (optionally at another resolution, `NAME@RES`) the base UNet/transformer is
built from its config with random weights (no download, no text encoders; `mnist`: the shipped
teacher) and timed on the same inputs at each --batch, interleaved so load drift on a shared
machine hits every variant alike:

    base        the model with no adapters attached at all
    attached    adapters attached but off (the hooks' own overhead)
    active      adapters on, as a sampling step runs them (sampling.sample: the run's fixed
                inputs prepared once in a ContextCache, only t's share per step)
    uncached    adapters on, everything recomputed per call (training's path)
    cfg pass    the base on the batched cond+uncond pair (what one CFG step costs)

adapter cost = (active - base) / base in wall and process CPU time, and in FLOPs (torch's
FlopCounterMode: matmuls, convolutions, attention; machine-independent). active / cfg pass is
the agd/CFG time per sampling step, the best ratio a sampling loop can reach. `--flops-only`
builds the model on the meta device (no memory, no compute): real-size FLOPs of any preset.

`--mode compiled` times the same variants with the model compiled as `--compile` runs it
(agd_cli.core.compiling: CUDA graphs on CUDA, inductor on the CPU). A compiled model's hooks are part
of its graph, so there "base" is the model with the adapters attached but not fed ω (the graph
without them); "attached" is then the same call. Compile time is reported apart.

    python benchmarks/adapter_overhead.py --threads 1 --repeats 5   # mnist + tiny presets, batch 1, 4
    python benchmarks/adapter_overhead.py --flops-only --preset sdxl --preset sd15 --preset dit
    # a GPU: SDXL 1024², SD 1.5 512², DiT 256², eager and compiled, batch 1 and 4
    python benchmarks/adapter_overhead.py --device cuda --preset sdxl --preset sd15 --preset dit \
        --mode eager --mode compiled --repeats 20 --json > adapter-overhead.json

UNet (sd, sdxl) and DiT families: the mnist teacher is loaded, the others built from config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def build(name: str, meta: bool = False, device: str = "cpu", dtype: str = "fp32"):
    """A denoiser with random weights (mnist: the shipped teacher), plus fresh adapters, on
    `device` in `dtype` (the adapters in the base's dtype, as `agd generate` loads them)."""
    import contextlib

    import torch

    from agd_cli.config.presets import load_preset
    from agd_cli.families import FAMILY_CLASSES, load_denoiser
    from agd_cli.families.base import TORCH_DTYPES, _seeded

    preset_name, _, res = name.partition("@")
    preset = load_preset(preset_name)
    if res:
        preset.resolution = int(res)
    arch = preset.architecture
    device = torch.device("meta" if meta else device)
    if not (arch.get("unet") or arch.get("transformer")):  # a shipped model: load it
        den = load_denoiser(preset, device=device, dtype=dtype)
    else:
        cls = FAMILY_CLASSES[preset.family]
        # built where it runs (a real-size base initialises in seconds on a GPU, minutes on a CPU)
        with torch.device("meta") if meta else torch.device(device):
            if preset.family == "dit":
                from diffusers import DiTTransformer2DModel

                model = _seeded(lambda: DiTTransformer2DModel(**arch["transformer"]))
            else:
                from diffusers import UNet2DConditionModel

                model = _seeded(lambda: UNet2DConditionModel(**arch["unet"]))
        model = model.to(device, TORCH_DTYPES[dtype])
        den = cls(preset, model, {}, arch["scheduler"], device, TORCH_DTYPES[dtype],
                  preset.base_source(random_weights=True), arch.get("vae"))
    with torch.device("meta") if meta else contextlib.nullcontext():
        aset = den.new_adapters()
    aset.to(den.dtype).requires_grad_(False).eval()
    return den, aset


def inputs(den, batch: int) -> tuple:
    """x_t, t and a condition dict of the family's shapes (random, seeded)."""
    import torch

    g = torch.Generator().manual_seed(0)
    meta = den.device.type == "meta"
    rand = lambda *shape: (torch.empty(*shape, device="meta") if meta else  # noqa: E731
                           torch.randn(*shape, generator=g).to(den.device, den.dtype))
    x = rand(batch, *den.latent_shape())
    c = den.model.config
    if den.family == "dit":
        cond = {"class_labels": torch.arange(batch, device=den.device) % 10}
    else:
        tok = den.text.get("tokenizer")
        length = (tok.model_max_length if tok is not None else
                  den.preset.architecture.get("tokenizer", {}).get("model_max_length", 77))
        cond = {"prompt_embeds": rand(batch, length, c.cross_attention_dim)}
        if den.family == "sdxl":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            cond["pooled"] = rand(batch, pooled)
            cond["time_ids"] = den._time_ids(batch, None)
    return x, torch.tensor(500, device=den.device), cond


def time_call(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. On a shared CPU the process CPU time is
    the steadier measure of the work: it does not count time other processes held the cores."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def count_flops(fn) -> int:
    """FLOPs of one call (torch's FlopCounterMode: matmuls, convolutions, attention)."""
    from agd_cli.bench.flops import flop_counter

    with flop_counter() as counter:  # FlopCounterMode, with the CPU attention kernel counted
        fn()
    return counter.get_total_flops()


def run_cache(den, x, t, cond):
    """A sampling run's ContextCache, primed by one call (the run's first step)."""
    import torch

    from agd_cli.core.adapter_hooks import ContextCache

    # the meta device has no values to look timesteps up by: t's share is then computed per call
    cache = ContextCache(None if t.device.type == "meta" else torch.stack([t + 100, t]))
    den.forward(x, t + 100, cond, omega=4.0, cache=cache)
    return cache


def step(den, x, t, cond, cache):
    """A sampling step at the run's second timestep, as sampling.sample makes it (the loop
    tells the cache its step: no read of t's value, which would wait for a GPU)."""
    cache.next_step = 1 if cache.timesteps is not None else None
    return den.forward(x, t, cond, omega=4.0, cache=cache)


def time_round(den, aset, x, t, cond, x2, cond2, cache) -> dict:
    """One timing of every variant (base and cfg pass with the adapters fully detached)."""
    if den.compiled is not None:
        return time_round_compiled(den, x, t, cond, x2, cond2, cache)
    aset.detach()
    den.adapters = None
    sample = {"base": time_call(lambda: den.forward(x, t, cond), den.device),
              "cfg_pass": time_call(lambda: den.forward(x2, t, cond2), den.device)}
    den.attach(aset)
    sample["attached"] = time_call(lambda: den.forward(x, t, cond), den.device)
    sample["active"] = time_call(lambda: step(den, x, t, cond, cache), den.device)
    sample["uncached"] = time_call(lambda: den.forward(x, t, cond, omega=4.0), den.device)
    return sample


def time_round_compiled(den, x, t, cond, x2, cond2, cache) -> dict:
    """One timing of every variant with the model compiled: the adapters stay attached (their
    hooks are in the graph; without ω it is the base's graph)."""
    sample = {"base": time_call(lambda: den.forward(x, t, cond), den.device),
              "cfg_pass": time_call(lambda: den.forward(x2, t, cond2), den.device)}
    sample["attached"] = sample["base"]
    sample["active"] = time_call(lambda: step(den, x, t, cond, cache), den.device)
    sample["uncached"] = time_call(lambda: den.forward(x, t, cond, omega=4.0), den.device)
    return sample


def measure(name: str, repeats: int, batch: int, flops_only: bool = False,
            device: str = "cpu", dtype: str = "fp32", mode: str = "eager") -> dict:
    """Median seconds per forward of each variant, FLOPs, and the derived overheads."""
    import torch

    from agd_cli.core.conditions import cond_cat

    den, aset = build(name, meta=flops_only, device=device, dtype=dtype)
    x, t, cond = inputs(den, batch)
    x2, cond2 = torch.cat([x, x]), cond_cat([cond, cond])
    times: dict[str, list[tuple[float, float]]] = {}
    with torch.no_grad():
        cache = run_cache(den, x, t, cond)
        flops = {"active": count_flops(lambda: step(den, x, t, cond, cache)),
                 "uncached": count_flops(lambda: den.forward(x, t, cond, omega=4.0))}
        compiled = mode == "compiled" and not flops_only
        if compiled:
            den.compile()
            cache = run_cache(den, x, t, cond)  # a compiled run's cache: no per-step tables
        warmup = 3 if compiled else 1  # compiling, then (CUDA graphs) recording
        for r in range(0 if flops_only else repeats + warmup):  # warm-up rounds are dropped
            for k, v in time_round(den, aset, x, t, cond, x2, cond2, cache).items():
                if r >= warmup:
                    times.setdefault(k, []).append(v)
        compile_info = ({"graphs": den.compiled.graphs, "compile_mode": den.compiled.mode,
                         "compile_seconds": den.compiled.warmup_seconds} if compiled else {})
        den.compiled = None
        aset.detach()
        den.adapters = None
        flops["base"] = count_flops(lambda: den.forward(x, t, cond))
    out = {"model": name, "family": den.family, "device": str(den.device), "dtype": dtype,
           "mode": mode if not flops_only else "flops", **compile_info,
           "latent": list(den.latent_shape()), "batch": batch,
           "repeats": 0 if flops_only else repeats,
           "adapter_params": sum(p.numel() for p in aset.parameters()),
           "base_params": sum(p.numel() for p in den.model.parameters()), "flops": flops,
           "adapter_flops_pct": 100 * (flops["active"] - flops["base"]) / flops["base"],
           "uncached_flops_pct": 100 * (flops["uncached"] - flops["base"]) / flops["base"]}
    for clock, i in (() if flops_only else (("wall", 0), ("cpu", 1))):
        med = {k: statistics.median(v[i] for v in vs) for k, vs in times.items()}
        out[clock] = {"seconds": med,
                      "adapter_cost_pct": 100 * (med["active"] - med["base"]) / med["base"],
                      "uncached_cost_pct": 100 * (med["uncached"] - med["base"]) / med["base"],
                      "wrapper_cost_pct": 100 * (med["attached"] - med["base"]) / med["base"],
                      "step_ratio_agd_to_cfg": med["active"] / med["cfg_pass"],
                      "cfg_pass_over_base": med["cfg_pass"] / med["base"]}
    return out


def main(argv: list[str] | None = None) -> None:
    """Measure each --preset at each --batch and print a table (or --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="preset name, or NAME@RESOLUTION")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, action="append", help="rows per forward [1 and 4]")
    ap.add_argument("--mode", action="append", choices=["eager", "compiled"],
                    help="eager and/or compiled (torch.compile as --compile runs it) [eager]")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--flops-only", action="store_true",
                    help="count FLOPs on the meta device (real sizes, no timing)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="the base's dtype [fp32 on the CPU, bf16 on CUDA: as agd runs them]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from agd_cli.infra.runtime import quiet_libraries

    quiet_libraries()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    rows = []
    # real-size bases are slow to time on a CPU: their FLOPs come from --flops-only
    for name in args.preset or ["mnist", "tiny-sd", "tiny-sdxl", "tiny-dit"]:
        for batch in args.batch or [1, 4]:
            for mode in (["eager"] if args.flops_only else args.mode or ["eager"]):
                rows.append(measure(name, args.repeats, batch, args.flops_only, args.device,
                                    dtype, mode))
                if not args.json:
                    _print_row(rows[-1])
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "device": args.device,
                          "gpu": torch.cuda.get_device_name(args.device)
                          if args.device.startswith("cuda") else None, "results": rows}, indent=2))


def _print_row(r: dict) -> None:
    compiled = (f", compiled ({r['compile_mode']}, {r['graphs']} graphs, "
                f"{r['compile_seconds']:.0f} s)" if r.get("graphs") else "")
    print(f"{r['model']} ({r['device']}, {r['dtype']}{compiled}) latent {tuple(r['latent'])} "
          f"batch {r['batch']}, {r['repeats']} repeats, "
          f"adapters {r['adapter_params'] / 1e6:.3f}M / base {r['base_params'] / 1e6:.1f}M, "
          f"FLOPs base {r['flops']['base'] / 1e9:.3f} G, adapters +{r['adapter_flops_pct']:.2f}% "
          f"(uncached +{r['uncached_flops_pct']:.2f}%)")
    for clock in ("wall", "cpu"):
        if clock not in r:
            continue
        c, s = r[clock], r[clock]["seconds"]
        print(f"  {clock:<4}: base {1e3 * s['base']:.2f} ms, active {1e3 * s['active']:.2f} ms "
              f"({c['adapter_cost_pct']:+.1f}%), uncached {1e3 * s['uncached']:.2f} ms "
              f"({c['uncached_cost_pct']:+.1f}%), attached-off {c['wrapper_cost_pct']:+.1f}%, "
              f"cfg pass {1e3 * s['cfg_pass']:.2f} ms, agd/CFG per step "
              f"{c['step_ratio_agd_to_cfg']:.3f}", flush=True)


if __name__ == "__main__":
    main()
