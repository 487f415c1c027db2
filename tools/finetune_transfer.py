#!/usr/bin/env python
"""Transfer to a fine-tune: do a guidance LoRA and agd adapters trained on the mnist teacher still
work on a briefly fine-tuned copy of it? (issue 33; docs/lora.md "Transfer to a fine-tune")

``finetune``: copies the teacher and trains its UNet (text encoder, tokenizer and scheduler kept)
for a few hundred steps on a shifted set: the 4000 training digits thickened by a 2x2 max-pool
dilation (strokes one pixel wider). Same objective as tools/train_mnist_teacher.py: v-prediction,
Min-SNR-γ 5 weighting, caption dropout 0.15 to "", captions in varied phrasings.

``evaluate``: on held-out seeds (sample i on seed quality_seed + i, the same noise in every method),
per ω: CFG of the fine-tune (2 passes), each adapter file on the fine-tune (1 pass) and, with
--original-cfg, CFG of the original (how far the fine-tune moved the images); accuracy and digit FID
with agd's evaluator (agd_cli.bench.quality.sample_for_quality, as `agd bench --quality` does), and
PSNR of each method to CFG of the fine-tune on the same seeds; "ink", the share of pixels above
mid-grey, tells whether a method draws the fine-tune's thicker strokes (real digits 0.10,
thickened 0.15). Run on the original teacher's folder it gives the no-transfer baseline
(adapters vs CFG of the base they were trained on).

Usage::

    OMP_NUM_THREADS=1 python tools/finetune_transfer.py finetune --out /tmp/h33t/teacher-ft --steps 300
    OMP_NUM_THREADS=1 python tools/finetune_transfer.py evaluate --finetune /tmp/h33t/teacher-ft \\
        --adapter agd=RUN/adapter.safetensors --adapter lora=RUN2/adapter.safetensors -w 2,4,6 -n 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mnist_teacher import log, tokenize  # noqa: E402

from agd_cli.bench.quality import sample_for_quality  # noqa: E402
from agd_cli.config.presets import load_preset  # noqa: E402
from agd_cli.evaluation.metrics import psnr  # noqa: E402
from agd_cli.evaluation.mnist import (  # noqa: E402
    PROMPTS,
    TEACHER_DIR,
    caption_for,
    digit_of,
    load_digits_split,
    load_evaluator,
)
from agd_cli.families import load_denoiser, load_with_adapters  # noqa: E402


def thicken(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool dilation (stride 1) of [-1, 1] digits, white strokes on black: strokes one pixel wider."""
    return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-1.0), kernel_size=2, stride=1)


def finetune(out: Path, steps: int, lr: float, batch_size: int, seed: int, caption_dropout: float = 0.15,
             min_snr_gamma: float = 5.0) -> dict:
    """Copy the teacher to `out` and train its UNet on thickened digits (text encoder frozen)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(TEACHER_DIR, out)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    te = CLIPTextModel.from_pretrained(out / "text_encoder").eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    x_train, y_train, _, _ = load_digits_split(seed=0)
    x_train = thicken(x_train)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    ac_all = sched.alphas_cumprod
    snr = ac_all / (1 - ac_all)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    unet.train()
    t0, loss_avg = time.time(), None
    for step in range(steps):
        idx = torch.randint(0, len(x_train), (batch_size,), generator=gen)
        x0 = x_train[idx]
        caps = ["" if rng.random() < caption_dropout else caption_for(d, rng) for d in y_train[idx].tolist()]
        with torch.no_grad():
            cond = te(tokenize(tok, caps)).last_hidden_state
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        ac = ac_all[t].view(-1, 1, 1, 1)
        pred = unet(ac.sqrt() * x0 + (1 - ac).sqrt() * noise, t, cond).sample
        target = ac.sqrt() * noise - (1 - ac).sqrt() * x0  # v-prediction
        per = (pred - target).pow(2).mean(dim=(1, 2, 3)) * (snr[t].clamp(max=min_snr_gamma) / (snr[t] + 1))
        loss = per.mean()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if (step + 1) % 25 == 0:
            log(f"step {step + 1}/{steps} loss {loss_avg:.4f} {(time.time() - t0) / (step + 1):.2f}s/step")
    unet.eval()
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    summary = {"finetune": {"data": "4000 training digits, 2x2 max-pool dilation", "steps": steps, "lr": lr,
                            "batch_size": batch_size, "seed": seed, "trained": "unet only",
                            "caption_dropout": caption_dropout, "min_snr_gamma": min_snr_gamma,
                            "final_loss_ema": round(loss_avg, 5), "seconds": round(time.time() - t0, 1)}}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _images(den, method: str, omega: float, prompts: list, plan) -> torch.Tensor:
    images, _, _ = sample_for_quality(den, method, omega, prompts, plan)
    return images


def evaluate(finetuned: Path, adapters: dict[str, Path], omegas: list[float], n: int, seed: int,
             original_cfg: bool = False, batch: int = 100) -> dict:
    """Accuracy, digit FID and PSNR to CFG(fine-tune) per ω: CFG of the fine-tune (2 passes, plain CFG)
    and each adapter file on it (1 pass); sample i on seed `seed` + i. With `finetuned` the original
    teacher folder this is the no-transfer baseline (and its cfg(ft) row is CFG of the original)."""
    original = load_preset("mnist")
    tuned = dataclasses.replace(original, base_model=str(finetuned.resolve()), source=None)
    plan = SimpleNamespace(quality_batch=batch, quality_seed=seed, steps=original.sampling["steps"],
                           scheduler=original.sampling["scheduler"], guidance=None)
    evaluator = load_evaluator("cpu")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    digits = [digit_of(p) for p in prompts]
    dens = {"cfg(ft)": ("cfg-plain", lambda: load_denoiser(tuned, device="cpu"))}
    if original_cfg:
        dens["cfg(original)"] = ("cfg-plain", lambda: load_denoiser(original, device="cpu"))
    for name, path in adapters.items():
        dens[f"{name}(ft)"] = ("agd", lambda path=path: load_with_adapters(path, device="cpu", base=tuned))
    rows: dict = {name: {} for name in dens}
    reference: dict = {}
    for name, (method, load) in dens.items():
        den = load()
        for w in omegas:
            t0 = time.time()
            images = _images(den, method, w, prompts, plan)
            if name == "cfg(ft)":
                reference[w] = images
            hits = evaluator.correct(images, digits)
            rows[name][f"{w:g}"] = {
                "accuracy": round(float(hits.float().mean()), 4),
                "fid": round(evaluator.fid_of_features(evaluator.features(images)), 3),
                "psnr_to_cfg_ft": round(float(psnr((images + 1) / 2, (reference[w] + 1) / 2).mean()), 2),
                "ink": round(float((images > 0).float().mean()), 4)}  # stroke thickness: share of bright pixels
            log(f"{name} ω={w:g}: {rows[name][f'{w:g}']} ({time.time() - t0:.0f}s)")
        del den
    return {"settings": {"samples_per_omega": n, "seeds": [seed, seed + n - 1], "steps": plan.steps,
                         "finetune": str(finetuned), "adapters": {k: str(v) for k, v in adapters.items()}},
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ft = sub.add_parser("finetune")
    ft.add_argument("--out", type=Path, required=True)
    ft.add_argument("--steps", type=int, default=300)
    ft.add_argument("--lr", type=float, default=5e-4)
    ft.add_argument("--batch-size", type=int, default=64)
    ft.add_argument("--seed", type=int, default=1)
    ev = sub.add_parser("evaluate")
    ev.add_argument("--finetune", type=Path, required=True)
    ev.add_argument("--adapter", action="append", default=[], help="NAME=FILE, repeatable")
    ev.add_argument("-w", "--omega", default="2,4,6")
    ev.add_argument("-n", "--samples", type=int, default=200)
    ev.add_argument("--quality-seed", type=int, default=0)
    ev.add_argument("--original-cfg", action="store_true", help="also CFG of the original teacher")
    ev.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "finetune":
        print(json.dumps(finetune(args.out, args.steps, args.lr, args.batch_size, args.seed)))
    else:
        adapters = dict((a.split("=", 1)[0], Path(a.split("=", 1)[1])) for a in args.adapter)
        res = evaluate(args.finetune, adapters, [float(w) for w in args.omega.split(",")], args.samples,
                       args.quality_seed, args.original_cfg)
        if args.out:
            args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
