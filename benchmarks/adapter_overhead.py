"""The adapters' own cost per forward pass, as a fraction of a base forward (random weights).

For each preset (optionally at another resolution, `NAME@RES`) the base UNet/transformer is
built from its config with random weights (no download, no text encoders) and timed on the
same inputs, interleaved so load drift on a shared machine hits every variant alike:

    base        the model with no agd processors attached at all
    adapters    the adapter modules alone (shared embedding + every block), replayed on the
                inputs they saw in an active forward: their own cost, measured directly
    attached    agd processors attached, adapters off (the wrapper's own overhead)
    active      adapters on (what `agd generate` runs: one pass per step)
    cfg pass    the base on the batched cond+uncond pair (what one CFG step costs)

adapter cost = adapters / base (direct) and (active - base) / base (a difference of two noisy
totals), in wall and process CPU time, and in FLOPs (torch's FlopCounterMode: matmuls,
convolutions, attention; machine-independent). active / cfg pass is the agd/CFG time per
sampling step, the best ratio a sampling loop can reach.

    python benchmarks/adapter_overhead.py --threads 1 --preset tiny-sd --preset sd15@256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def build(name: str):
    """A denoiser with random weights and no text encoders, plus fresh adapters (not attached)."""
    import torch

    from agd_cli.families import FAMILY_CLASSES
    from agd_cli.families.base import _seeded
    from agd_cli.presets import load_preset

    preset_name, _, res = name.partition("@")
    preset = load_preset(preset_name)
    if res:
        preset.resolution = int(res)
    arch = preset.architecture
    cls = FAMILY_CLASSES[preset.family]
    if preset.family == "dit":
        from diffusers import DiTTransformer2DModel

        model = _seeded(lambda: DiTTransformer2DModel(**arch["transformer"]))
    else:
        from diffusers import UNet2DConditionModel

        model = _seeded(lambda: UNet2DConditionModel(**arch["unet"]))
    den = cls(preset, model, {}, arch["scheduler"], torch.device("cpu"), torch.float32,
              "random:" + preset.name, arch.get("vae"))
    aset = den.new_adapters()
    aset.requires_grad_(False).eval()
    return den, aset


def inputs(den, batch: int) -> tuple:
    """x_t, t and a condition dict of the family's shapes (random, seeded)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *den.latent_shape(), generator=g)
    c = den.model.config
    if den.family == "dit":
        cond = {"class_labels": torch.arange(batch) % 10}
    else:
        length = den.preset.architecture.get("tokenizer", {}).get("model_max_length", 77)
        cond = {"prompt_embeds": torch.randn(batch, length, c.cross_attention_dim, generator=g)}
        if den.family == "sdxl":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            cond["pooled"] = torch.randn(batch, pooled, generator=g)
            cond["time_ids"] = den._time_ids(batch, None)
    return x, torch.tensor(500), cond


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
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def capture_adapter_calls(den, aset, x, t, cond) -> list[tuple]:
    """(module, args) of every adapter module call (shared embedding, each block) in one forward."""
    calls: list[tuple] = []
    modules = [aset.shared, *aset.blocks.values()]
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append((mod, args))) for m in modules]
    den.forward(x, t, cond, omega=4.0)
    for h in hooks:
        h.remove()
    return calls


def time_round(den, aset, x, t, cond, x2, cond2, calls) -> dict:
    """One timing of every variant (base and cfg pass with the adapters fully detached)."""
    aset.detach()
    den.adapters = None
    sample = {"base": time_call(lambda: den.forward(x, t, cond), den.device),
              "cfg_pass": time_call(lambda: den.forward(x2, t, cond2), den.device)}
    den.attach(aset)
    sample["attached"] = time_call(lambda: den.forward(x, t, cond), den.device)
    sample["active"] = time_call(lambda: den.forward(x, t, cond, omega=4.0), den.device)
    # the adapters' own work, replayed on the inputs they saw: no difference of two noisy totals
    sample["adapters_only"] = time_call(lambda: [mod(*args) for mod, args in calls], den.device)
    return sample


def measure(name: str, repeats: int, batch: int) -> dict:
    """Median seconds per forward of each variant, FLOPs, and the derived overheads."""
    import torch

    from agd_cli.families.base import cond_cat

    den, aset = build(name)
    x, t, cond = inputs(den, batch)
    x2, cond2 = torch.cat([x, x]), cond_cat([cond, cond])
    times: dict[str, list[tuple[float, float]]] = {}
    with torch.no_grad():
        den.attach(aset)
        calls = capture_adapter_calls(den, aset, x, t, cond)
        for r in range(repeats + 1):  # round 0 warms up every variant and is dropped
            for k, v in time_round(den, aset, x, t, cond, x2, cond2, calls).items():
                if r:
                    times.setdefault(k, []).append(v)
        flops = {"active": count_flops(lambda: den.forward(x, t, cond, omega=4.0))}
        aset.detach()
        den.adapters = None
        flops["base"] = count_flops(lambda: den.forward(x, t, cond))
    out = {"model": name, "family": den.family, "latent": list(den.latent_shape()), "batch": batch,
           "repeats": repeats, "adapter_params": sum(p.numel() for p in aset.parameters()),
           "base_params": sum(p.numel() for p in den.model.parameters()), "flops": flops,
           "adapter_flops_pct": 100 * (flops["active"] - flops["base"]) / flops["base"]}
    for clock, i in (("wall", 0), ("cpu", 1)):
        med = {k: statistics.median(v[i] for v in vs) for k, vs in times.items()}
        out[clock] = {"seconds": med,
                      "adapters_only_pct": 100 * med["adapters_only"] / med["base"],
                      "adapter_cost_pct": 100 * (med["active"] - med["base"]) / med["base"],
                      "wrapper_cost_pct": 100 * (med["attached"] - med["base"]) / med["base"],
                      "step_ratio_agd_to_cfg": med["active"] / med["cfg_pass"],
                      "cfg_pass_over_base": med["cfg_pass"] / med["base"]}
    return out


def main(argv: list[str] | None = None) -> None:
    """Measure each --preset and print a table (or --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="preset name, or NAME@RESOLUTION")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from agd_cli.runtime import quiet_libraries

    quiet_libraries()

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.preset or ["tiny-sd", "tiny-sdxl", "tiny-dit"]:
        rows.append(measure(name, args.repeats, args.batch))
        if not args.json:
            _print_row(rows[-1])
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "results": rows}, indent=2))


def _print_row(r: dict) -> None:
    print(f"{r['model']} latent {tuple(r['latent'])} batch {r['batch']}, {r['repeats']} repeats, "
          f"adapters {r['adapter_params'] / 1e6:.3f}M / base {r['base_params'] / 1e6:.1f}M, "
          f"FLOPs base {r['flops']['base'] / 1e9:.3f} G, adapters +{r['adapter_flops_pct']:.2f}%")
    for clock in ("wall", "cpu"):
        c, s = r[clock], r[clock]["seconds"]
        print(f"  {clock:<4}: base {1e3 * s['base']:.2f} ms, active {1e3 * s['active']:.2f} ms, "
              f"attached-off {1e3 * s['attached']:.2f} ms, cfg pass {1e3 * s['cfg_pass']:.2f} ms"
              f", adapters alone {1e3 * s['adapters_only']:.2f} ms = {c['adapters_only_pct']:.1f}% of base"
              f" | active-base {c['adapter_cost_pct']:+.1f}% (wrapper {c['wrapper_cost_pct']:+.1f}%)"
              f", agd/CFG per step {c['step_ratio_agd_to_cfg']:.3f}", flush=True)


if __name__ == "__main__":
    main()
