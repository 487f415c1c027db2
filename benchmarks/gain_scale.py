"""Is agd's under-shoot at low ω a scale error? Sample with the adapters' gain scaled to
κ·(ω − 1) and compare with real CFG from the same seeds: accuracy (the shipped digit classifier)
and the mean squared difference to CFG's sample. `mnist` adapters only; a trial, not an agd
option (docs/experiments.md: "Is the under-shoot a scale error?").

    python benchmarks/gain_scale.py ADAPTER -w 1.25,1.5,2,3 --kappa 1,1.25,1.5,2 -n 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

CAPTIONS = ["a handwritten {}", "the digit {}"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def scaled_gain(kappa: list[float]):
    """Patch SharedConditioning.constant so the gain it returns is multiplied by kappa[0]."""
    from agd_cli.core import adapter_layers

    original = adapter_layers.SharedConditioning.constant

    def constant(self, omega, cond, negative=None):
        ctx = original(self, omega, cond, negative)
        ctx.gain = ctx.gain * kappa[0]
        return ctx

    adapter_layers.SharedConditioning.constant = constant


def _rows(cond: dict, rows) -> dict:
    return {k: v[rows] for k, v in cond.items()}


def main() -> None:
    import torch

    from agd_cli.core.sampling import initial_noise, sample
    from agd_cli.evaluation.mnist import load_evaluator
    from agd_cli.families import load_with_adapters

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter")
    ap.add_argument("-w", "--omega", default="1.25,1.5,2,3,4,6,8,10")
    ap.add_argument("--kappa", default="1,1.25,1.5,2")
    ap.add_argument("-n", "--samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=900000, help="sample i uses seed + i")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    kappa = [1.0]
    scaled_gain(kappa)
    den, ev = load_with_adapters(a.adapter, device="cpu"), load_evaluator("cpu")
    digits = [i % 10 for i in range(a.samples)]
    prompts = [CAPTIONS[i % 2].format(d if i % 2 == 0 else WORDS[d]) for i, d in enumerate(digits)]
    cond, uncond = den.encode(prompts), den.encode_null(a.samples)
    noise = initial_noise(den.latent_shape(), [a.seed + i for i in range(a.samples)])

    def run(mode: str, omega: float) -> torch.Tensor:
        out = []
        for rows in torch.arange(a.samples).split(100):
            out.append(sample(den, _rows(cond, rows), _rows(uncond, rows), omega, noise[rows],
                              mode=mode, steps=den.preset.sampling["steps"], scheduler="ddim").x)
        return torch.cat(out)

    with torch.no_grad():
        for omega in (float(w) for w in a.omega.split(",")):
            kappa[0] = 1.0
            ref = run("cfg", omega)
            cells = [f"ω {omega:g}: CFG accuracy {ev.accuracy(ref, digits):.3f}"]
            for k in (float(k) for k in a.kappa.split(",")):
                kappa[0] = k
                x = run("agd", omega)
                cells.append(f"κ {k:g}: {ev.accuracy(x, digits):.3f} / "
                             f"{(x - ref).pow(2).mean().item():.4f}")
            print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
