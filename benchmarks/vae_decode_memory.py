"""Peak memory of VAE decode: the whole batch at once vs one image at a time (slicing) vs tiles.

Builds the preset's VAE from its architecture config with random weights (no download) and, in a
fresh subprocess per variant, decodes a batch of random latents in fp32 under inference mode, as
`Denoiser.decode` does. CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS. "decode adds" =
peak minus the memory held before the decode (weights, libraries, the latents).

    python benchmarks/vae_decode_memory.py --preset sdxl --resolution 1024 --batch 4   # CUDA if present
    python benchmarks/vae_decode_memory.py --preset sdxl --resolution 512 --batch 2 --device cpu --tile 256

Measured here (2 shared CPU cores, peak RSS, the last command): decode adds 1.64 GiB for the
whole batch of 2, 0.98 GiB one image at a time, 0.64 GiB one image at a time in 256 px tiles
(1.9x the time). At 1024² one image is ~4x that; diffusers tiles only above the VAE's 1024 px.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("batched", "sliced", "sliced+tiled")
GiB = 2**30


def measure(preset_name: str, resolution: int, batch: int, variant: str, device: str,
            tile: int | None) -> dict:
    """One decode of `batch` latents; runs inside the measuring subprocess."""
    import torch
    from diffusers import AutoencoderKL

    from agd_cli.config.presets import load_preset
    from agd_cli.families import resolve_device
    from agd_cli.infra.peak_memory import PeakMemory

    dev = resolve_device(device)
    arch = load_preset(preset_name).architecture["vae"]
    torch.manual_seed(0)
    vae = AutoencoderKL(**arch).requires_grad_(False).eval().to(dev)
    if variant != "batched":
        vae.enable_slicing()
    if variant.endswith("tiled"):
        vae.enable_tiling()
        if tile:  # diffusers tiles only above the VAE's sample size; smaller tiles on request
            vae.tile_sample_min_size = tile
            vae.tile_latent_min_size = tile // 2 ** (len(arch["block_out_channels"]) - 1)
    f = 2 ** (len(arch["block_out_channels"]) - 1)
    z = torch.randn(batch, arch["latent_channels"], resolution // f, resolution // f, device=dev)
    with PeakMemory(dev) as mem, torch.inference_mode():
        t0 = time.perf_counter()
        img = vae.decode(z / vae.config.scaling_factor, return_dict=False)[0].float().cpu()
        seconds = time.perf_counter() - t0
    method, before, peak = mem.method, mem.start, mem.peak
    return {"preset": preset_name, "resolution": resolution, "batch": batch, "variant": variant,
            "tile": tile if variant.endswith("tiled") else None, "device": str(dev), "method": method, "seconds": round(seconds, 2),
            "decode_adds_gib": round((peak - before) / GiB, 3), "peak_gib": round(peak / GiB, 3),
            "image_shape": list(img.shape)}


def main(argv: list[str] | None = None) -> None:
    """Measure every variant in its own process; print a table (or one JSON object)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sdxl")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--tile", type=int, default=None, help="tile size in pixels for sliced+tiled")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the subprocess side
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.variant:
        print(json.dumps(measure(a.preset, a.resolution, a.batch, a.variant, a.device, a.tile)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--preset", a.preset, "--resolution", str(a.resolution),
               "--batch", str(a.batch), "--device", a.device, "--variant", variant]
        cmd += ["--tile", str(a.tile)] if a.tile else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        if not a.json:
            r = rows[-1]
            print(f"{r['variant']:>13}  batch {r['batch']}  {r['resolution']}²  decode adds "
                  f"{r['decode_adds_gib']:.2f} GiB  peak {r['peak_gib']:.2f} GiB  {r['seconds']:.1f} s")
    if a.json:
        print(json.dumps({"results": rows}, indent=2))


if __name__ == "__main__":
    main()
