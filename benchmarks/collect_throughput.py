"""Collection throughput: `agd collect` against a naive loop like the official code's, side by side.

The naive loop collects one trajectory at a time in fp32, encodes the prompt (and the empty
prompt) again for every trajectory, calls the model twice per step (cond, then uncond) and stores
every step's x_t and guided target as raw fp32 arrays; `--naive-decode` also decodes the final
latent with the VAE, as the official code does. Both sides use the same teacher, scheduler,
steps, ω range and seeds; model loading is excluded from both timings.

    python benchmarks/collect_throughput.py --preset tiny-sd --prompts 8 --num-per-prompt 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AGD_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def naive_collect(preset, prompts: list[str], num_per_prompt: int, steps: int, seed: int,
                  out: Path, decode: bool) -> dict:
    """One trajectory at a time, fp32, two model calls per step, every step stored raw fp32."""
    import numpy as np
    import torch

    from agd_cli.collect.store import trajectory_omegas, trajectory_seed
    from agd_cli.core.guidance import cfg_combine
    from agd_cli.core.sampling import initial_noise, make_scheduler
    from agd_cli.families import load_denoiser

    den = load_denoiser(preset, device="cpu", dtype="fp32")
    lo, hi = preset.omega_range
    if decode:
        den.vae_model()  # loaded before the clock starts, like the model
    start, nbytes = time.perf_counter(), 0
    with torch.no_grad():
        for p, prompt in enumerate(prompts):
            for j in range(num_per_prompt):
                tid = p * num_per_prompt + j
                cond, uncond = den.encode([prompt]), den.encode_null(1)  # again per trajectory
                omega = trajectory_omegas(seed, [tid], lo, hi)
                x = initial_noise(den.latent_shape(), [trajectory_seed(seed, tid, "noise")])
                sched = make_scheduler(preset.sampling["scheduler"], den.scheduler_config)
                sched.set_timesteps(steps)
                x = x * sched.init_noise_sigma
                shape = (steps, *x.shape[1:])
                xs = np.lib.format.open_memmap(out / f"{tid}-x.npy", "w+", np.float32, shape)
                ts = np.lib.format.open_memmap(out / f"{tid}-eps.npy", "w+", np.float32, shape)
                for i, t in enumerate(sched.timesteps):
                    model_input = sched.scale_model_input(x, t)
                    eps_c = den.predict(model_input, t, cond).float()
                    eps_u = den.predict(model_input, t, uncond).float()
                    target = cfg_combine(eps_u, eps_c, omega)
                    xs[i], ts[i] = model_input[0].numpy(), target[0].numpy()
                    x = sched.step(target, t, x, return_dict=False)[0]
                xs.flush()
                ts.flush()
                nbytes += (out / f"{tid}-x.npy").stat().st_size + (out / f"{tid}-eps.npy").stat().st_size
                if decode:
                    den.decode(x)
    seconds = time.perf_counter() - start
    n = len(prompts) * num_per_prompt
    return {"trajectories": n, "seconds": seconds, "bytes_per_trajectory": nbytes / n,
            "nfe": den.nfe}


def agd_collect(preset, prompt_file: Path, num_per_prompt: int, steps: int, seed: int,
                batch_size: int, out: Path) -> dict:
    """The real `agd collect` (Python API), into a fresh folder."""
    from agd_cli.collect.run import run_collect

    s = run_collect(preset, prompts=str(prompt_file), num_per_prompt=num_per_prompt, steps=steps,
                    seed=seed, batch_size=batch_size, out=str(out), device="cpu")
    return {"trajectories": s["new_trajectories"], "seconds": s["collect_seconds"],
            "bytes_per_trajectory": s["bytes_per_trajectory"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-sd")
    ap.add_argument("--prompts", type=int, default=8, help="number of prompts (COCO-like list)")
    ap.add_argument("--num-per-prompt", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's")
    ap.add_argument("--batch-size", type=int, default=8, help="agd collect's trajectories per batch")
    ap.add_argument("--resolution", type=int, default=None, help="override the preset's (bigger latents)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--naive-decode", action="store_true", help="naive loop also decodes (VAE)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from agd_cli.config.presets import load_preset

    torch.set_num_threads(args.threads)
    preset = load_preset(args.preset)
    if args.resolution:
        preset.resolution = args.resolution
    steps = args.steps or preset.sampling["steps"]
    prompts = ([str(i) for i in range(args.prompts)] if preset.family == "dit"  # class ids
               else [f"a photo of object number {i} on a table" for i in range(args.prompts)])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "naive").mkdir()
        prompt_file = tmp / "prompts.txt"
        prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        agd_collect(preset, prompt_file, 1, 1, args.seed, 1, tmp / "warmup")  # imports, first call
        rows = {"naive loop (1 traj, fp32, 2 calls/step, all steps fp32)":
                naive_collect(preset, prompts, args.num_per_prompt, steps, args.seed, tmp / "naive",
                              args.naive_decode),
                f"agd collect (batch {args.batch_size}, 1 batched CFG call/step, fp16 store)":
                agd_collect(preset, prompt_file, args.num_per_prompt, steps, args.seed,
                            args.batch_size, tmp / "agd")}
    _print_table(args, preset, steps, rows)


def _print_table(args, preset, steps: int, rows: dict) -> None:
    naive = next(iter(rows.values()))
    print(f"\npreset {preset.name} @ {preset.resolution}px, {args.prompts} prompts x "
          f"{args.num_per_prompt}, {steps} steps, {args.threads} torch thread(s), CPU")
    print(f"{'method':<66} {'traj':>5} {'s':>8} {'traj/s':>8} {'speedup':>8} {'bytes/traj':>11}")
    for name, r in rows.items():
        tps = r["trajectories"] / r["seconds"]
        speed = tps / (naive["trajectories"] / naive["seconds"])
        print(f"{name:<66} {r['trajectories']:>5} {r['seconds']:>8.2f} {tps:>8.2f} "
              f"{speed:>7.2f}x {r['bytes_per_trajectory']:>11,.0f}")


if __name__ == "__main__":
    main()
