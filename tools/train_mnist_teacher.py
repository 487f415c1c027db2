#!/usr/bin/env python
"""Train the embedded ``mnist`` teacher: a tiny pixel-space text-to-image diffusion model.

The teacher is a diffusers ``UNet2DConditionModel`` (32x32x1 pixels, cross-attention
on the 16x16 and 8x8 levels) conditioned on a small ``CLIPTextModel`` over a
character-level ``CLIPTokenizer`` (:func:`agd_cli.evaluation.mnist.build_char_tokenizer`). Both
are trained jointly from random init on the 4000 training digits of the seeded
split (:func:`agd_cli.evaluation.mnist.load_digits_split`) with captions in varied phrasings
(:func:`agd_cli.evaluation.mnist.caption_for`) and caption dropout to ``""`` so that
classifier-free guidance (CFG) exists.

Text encoding convention (the ``sd`` family uses exactly this)::

    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    cond = text_encoder(ids).last_hidden_state      # uncond = encoding of ""

Noise schedule: DDPM, 1000 steps, ``squaredcos_cap_v2`` (the cosine schedule of
Nichol & Dhariwal: the linear schedule destroys a 32x32 image too early, wasting
most timesteps on near-pure noise), ``prediction_type="v_prediction"``,
``clip_sample=False``, ``timestep_spacing="trailing"``.

Why v and not ε: with the cosine schedule alpha_bar is ~1e-3..1e-6 over the
first sampling steps, and an ε-model's x0 estimate (x - sqrt(1-a) ε)/sqrt(a)
amplifies its (small) ε error 15-600x there. A teacher this small, trained this
briefly, then commits to garbage low frequencies in the first DDIM steps: in our
runs every ε variant (clipped or not, leading or trailing spacing) drew grey,
speckled backgrounds (90 % of border pixels above -0.8; classifier accuracy ~10 %
at any ω) although it denoised real digits noised to t=900 cleanly. A v-model
predicts ~-x0 at high noise, so nothing is amplified; the same budget gives clean
digits. CFG is unchanged: v is affine in ε for a fixed x_t, so
v_u + ω (v_c - v_u) is exactly the CFG ε combination. No x0 clipping is needed
(and clipping with an unclipped ε direction hurt the ε runs); "trailing" makes a
20-50 step DDIM schedule start at t=999, which matches x_T ~ N(0, 1). Every sampler
that builds ``DDIMScheduler.from_config(scheduler_config)`` gets these settings.

Two things make the short run learn the text condition early: a Min-SNR-γ loss
weighting (Hang et al. 2023; γ=5) and an auxiliary linear "digit probe" on the
mean of the text encoder's token states (11 classes: 0-9 and the empty prompt),
trained alone for a few hundred cheap steps first and then jointly with weight
0.1, so that all phrasings of a digit map to the same direction. The probe is
discarded; the text encoder is still trained from random init together with the UNet.

The training budget is deliberately small: the teacher should draw the prompted
digit reliably under CFG (ω≈4) but clearly less often without it (ω=1), so that
guidance -- and its distillation -- matters. After training, the script samples
with DDIM (eta 0) at ω = 1, 2, 4, 6 and reports the digit classifier's accuracy
and digit FID (``agd_cli/assets/mnist/classifier.safetensors``; train that first
with ``tools/train_digit_classifier.py``).

Usage::

    python tools/train_mnist_teacher.py [--steps N] [--seed 0] [--out agd_cli/assets/mnist/teacher]

Progress goes to stderr, a JSON summary to stdout (and ``<out>/training.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

# With other processes sharing the cores, OpenMP's default spin-waiting makes 2-thread
# torch ops 5-10x slower (a thread spins while its partner is descheduled); passive
# waiting costs little when the machine is idle. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agd_cli.evaluation.mnist import (  # noqa: E402
    CAPTION_TEMPLATES,
    CLASSIFIER_PATH,
    DIGIT_WORDS,
    PROMPTS,
    TEACHER_DIR,
    build_char_tokenizer,
    caption_for,
    digit_of,
    load_digits_split,
)

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32, 64),  # 1.06 M params: ~15 min of training on 2 CPU cores
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=2,  # diffusers legacy naming: this is the number of heads (2 heads of 8 / 16 dims)
    norm_num_groups=8,
)
TEXT_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    clip_sample=False,
    timestep_spacing="trailing",
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_models(seed: int, max_length: int = 32, channels: tuple[int, ...] | None = None, **scheduler_overrides):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_char_tokenizer(max_length)
    torch.manual_seed(seed)
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            max_position_embeddings=max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **TEXT_CONFIG,
        )
    )
    cfg = dict(UNET_CONFIG)
    if channels:
        cfg["block_out_channels"] = tuple(channels)
    unet = UNet2DConditionModel(cross_attention_dim=TEXT_CONFIG["hidden_size"], **cfg)
    sched = DDPMScheduler(**{**SCHEDULER_CONFIG, **scheduler_overrides})
    return tok, te, unet, sched


def tokenize(tok, prompts: list[str]) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def cfg_sample(unet, te, tok, sched_config, prompts, omega, steps=25, seed=0, batch_size=200, bf16=False):
    """DDIM (eta 0) samples with CFG out = out_u + ω (out_c - out_u) on the model output (ε or v: the same
    guidance); x_T ~ N(0, 1), final image clamped to [-1, 1]; ω = 1 is the conditional model alone."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(sched_config)
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.randn(len(prompts), 1, 32, 32, generator=gen)
    cond_all = te(tokenize(tok, list(prompts))).last_hidden_state
    uncond1 = te(tokenize(tok, [""])).last_hidden_state
    images = []
    for i in range(0, len(prompts), batch_size):
        x = x_all[i : i + batch_size]
        cond = cond_all[i : i + batch_size]
        n = x.shape[0]
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if omega == 1.0:
                    out = unet(x, t, cond).sample.float()
                else:
                    o = unet(torch.cat([x, x]), t, torch.cat([uncond1.expand(n, -1, -1), cond])).sample.float()
                    ou, oc = o.chunk(2)
                    out = ou + omega * (oc - ou)
            x = sched.step(out, t, x, eta=0.0).prev_sample
        images.append(x.clamp(-1, 1))
    return torch.cat(images)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=900, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--channels", default=",".join(map(str, UNET_CONFIG["block_out_channels"])),
                    help="UNet block_out_channels (3 values, multiples of 8)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995, help="EMA decay of the shipped weights (0 = off)")
    ap.add_argument("--caption-dropout", type=float, default=0.15, help="probability of the empty caption")
    ap.add_argument("--prediction-type", choices=("v_prediction", "epsilon"), default=SCHEDULER_CONFIG["prediction_type"])
    ap.add_argument("--clip-sample", action=argparse.BooleanOptionalAction, default=SCHEDULER_CONFIG["clip_sample"])
    ap.add_argument("--min-snr-gamma", type=float, default=5.0,
                    help="Min-SNR-γ loss weighting min(SNR, γ)/SNR for ε-prediction (0 = plain MSE)")
    ap.add_argument("--aux-weight", type=float, default=0.1,
                    help="weight of the auxiliary digit-probe loss on the text encoder output (0 = off)")
    ap.add_argument("--text-pretrain-steps", type=int, default=200,
                    help="steps of the auxiliary digit-probe loss alone before joint training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPUs with avx512_bf16)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop training early (and say so) after this many minutes; 0 = no limit")
    ap.add_argument("--eval-samples", type=int, default=200, help="samples per ω for the report (0 = skip)")
    ap.add_argument("--eval-steps", type=int, default=25, help="DDIM steps for the report")
    ap.add_argument("--eval-omegas", default="1,2,4,6")
    ap.add_argument("--out", type=Path, default=TEACHER_DIR)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t_start = time.time()
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train, _, _ = load_digits_split(seed=args.seed)
    tok, te, unet, sched = build_models(args.seed, channels=tuple(int(c) for c in args.channels.split(",")),
                                        prediction_type=args.prediction_type, clip_sample=args.clip_sample)
    v_pred = args.prediction_type == "v_prediction"
    log(f"data {tuple(x_train.shape)}; unet {sum(p.numel() for p in unet.parameters()) / 1e6:.3f}M params, "
        f"text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.3f}M params")

    # all captions are short; cache the token ids of every (template, digit) + ""
    captions = {c: None for c in [""] + [t.format(n=d, w=DIGIT_WORDS[d]) for t in CAPTION_TEMPLATES for d in range(10)]}
    cap_list = list(captions)
    cap_ids = tokenize(tok, cap_list)
    cap_index = {c: i for i, c in enumerate(cap_list)}
    assert all(len(tok(c).input_ids) <= tok.model_max_length for c in cap_list), "caption longer than model_max_length"

    # Auxiliary digit probe on the mean of the text encoder's token states (11 classes: 0-9 and "").
    # It only shapes the text encoder (all phrasings of a digit -> one direction) so that the UNet
    # can start using the condition early in this short run; the probe is discarded.
    cap_label = torch.tensor([10 if c == "" else digit_of(c) for c in cap_list])
    probe = torch.nn.Linear(TEXT_CONFIG["hidden_size"], 11)
    if args.aux_weight > 0 and args.text_pretrain_steps > 0:
        popt = torch.optim.AdamW(list(te.parameters()) + list(probe.parameters()), lr=args.lr)
        for _ in range(args.text_pretrain_steps):
            sel = torch.randint(0, len(cap_list), (128,), generator=gen)
            ploss = F.cross_entropy(probe(te(cap_ids[sel]).last_hidden_state.mean(1)), cap_label[sel])
            popt.zero_grad(set_to_none=True)
            ploss.backward()
            popt.step()
        with torch.no_grad():
            pacc = float((probe(te(cap_ids).last_hidden_state.mean(1)).argmax(1) == cap_label).float().mean())
        log(f"text encoder warm-up: {args.text_pretrain_steps} probe steps, loss {ploss.item():.4f}, "
            f"probe accuracy on all {len(cap_list)} captions {pacc:.3f}")

    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params + list(probe.parameters()), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)  # signal-to-noise ratio per timestep

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    ema_unet = copy.deepcopy(unet).requires_grad_(False) if args.ema > 0 else unet
    ema_te = copy.deepcopy(te).requires_grad_(False) if args.ema > 0 else te
    alphas_cumprod = sched.alphas_cumprod

    unet.train()
    te.train()
    n = len(x_train)
    perm = torch.randperm(n, generator=gen)
    pos = 0
    loss_avg = None
    steps_done = 0
    stopped_early = False
    t_train = time.time()
    for step in range(args.steps):
        if pos + args.batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0 = x_train[idx]
        labels = y_train[idx].tolist()
        caps = ["" if rng.random() < args.caption_dropout else caption_for(d, rng) for d in labels]
        ids = cap_ids[[cap_index[c] for c in caps]]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        ac = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            cond = te(ids).last_hidden_state
            pred = unet(xt, t, cond).sample
        target = ac.sqrt() * noise - (1 - ac).sqrt() * x0 if v_pred else noise
        per = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        if args.min_snr_gamma > 0:  # Min-SNR-γ: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v
            per = per * (snr[t].clamp(max=args.min_snr_gamma) / (snr[t] + 1 if v_pred else snr[t]))
        loss = per.mean()
        if args.aux_weight > 0:
            labels_t = torch.tensor([10 if c == "" else d for c, d in zip(caps, labels, strict=True)])
            loss = loss + args.aux_weight * F.cross_entropy(probe(cond.float().mean(1)), labels_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if args.ema > 0:
            # warm-started EMA: short runs should not average in the random init
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for src, dst in ((unet, ema_unet), (te, ema_te)):
                    for ps, pd in zip(src.parameters(), dst.parameters(), strict=True):
                        pd.lerp_(ps, 1 - d)
        lv = loss.item()
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        steps_done = step + 1
        if steps_done % 50 == 0 or steps_done == args.steps:
            el = time.time() - t_train
            eta = el / steps_done * (args.steps - steps_done)
            log(f"step {steps_done:5d}/{args.steps}  loss {loss_avg:.4f}  lr {lr_at(step):.2e}  "
                f"{el / steps_done:.2f}s/step  elapsed {el / 60:.1f}min  eta {eta / 60:.1f}min")
        if args.max_minutes and time.time() - t_start > args.max_minutes * 60:
            log(f"WARNING: --max-minutes {args.max_minutes} reached, stopping after {steps_done} steps")
            stopped_early = True
            break
    train_seconds = time.time() - t_train

    ema_unet.eval()
    ema_te.eval()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    ema_unet.save_pretrained(args.out / "unet", safe_serialization=True)
    ema_te.save_pretrained(args.out / "text_encoder", safe_serialization=True)
    tok.save_pretrained(args.out / "tokenizer")
    sched.save_pretrained(args.out / "scheduler")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    log(f"saved teacher to {args.out} ({size / 2**20:.2f} MiB) after {train_seconds / 60:.1f} min of training")

    summary = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps_done": steps_done,
        "stopped_early": stopped_early,
        "final_loss_ema": round(loss_avg or float("nan"), 5),
        "train_seconds": round(train_seconds, 1),
        "teacher_bytes": size,
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "text_encoder_params": sum(p.numel() for p in te.parameters()),
    }

    if args.eval_samples > 0:
        if not CLASSIFIER_PATH.is_file():
            log(f"no evaluator at {CLASSIFIER_PATH}; run tools/train_digit_classifier.py first -- skipping the report")
        else:
            summary["eval"] = evaluate(args.out, args.eval_samples, args.eval_steps,
                                       [float(w) for w in args.eval_omegas.split(",")], args.seed, args.bf16)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


def evaluate(folder: Path, n_samples: int, steps: int, omegas: list[float], seed: int, bf16: bool = False) -> dict:
    """Reload the saved teacher offline and report accuracy / digit FID per ω."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from agd_cli.evaluation.mnist import load_evaluator

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    te = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    sched_config = DDPMScheduler.from_pretrained(folder / "scheduler").config
    ev = load_evaluator()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_samples)]
    digits = [digit_of(p) for p in prompts]
    res = {"samples_per_omega": n_samples, "ddim_steps": steps, "prompts": "agd_cli.evaluation.mnist.PROMPTS cycled", "omega": {}}
    for w in omegas:
        t0 = time.time()
        imgs = cfg_sample(unet, te, tok, sched_config, prompts, w, steps=steps, seed=seed + 1, bf16=bf16)
        acc = ev.accuracy(imgs, digits)
        fid = ev.fid(imgs)
        res["omega"][f"{w:g}"] = {"accuracy": round(acc, 4), "fid": round(fid, 3)}
        log(f"ω={w:g}: accuracy {acc:.3f}  digit-FID {fid:.2f}  ({n_samples} samples, {steps} DDIM steps, "
            f"{time.time() - t0:.0f}s)")
    return res


if __name__ == "__main__":
    raise SystemExit(main())
