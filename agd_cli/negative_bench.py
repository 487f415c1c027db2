"""`agd bench --negatives`: does agd follow a negative prompt the way CFG does? (mnist evaluator)

Each sample prompts digit d with a visually close digit d′ as the negative (7/1, 3/8, 4/9, 5/6,
both ways). On the same seeds and noise: unguided, CFG without the negative, CFG with it, agd
with it and agd without it. Reported per method and ω: the digit classifier's accuracy on d,
its mean probability of d′ (a negative that works pushes it down), and PSNR against
CFG-with-negative (agd with the negative should agree with it better than agd without).
"""

from __future__ import annotations

from agd_cli import ui

CLOSE_PAIRS = ((7, 1), (3, 8), (4, 9), (5, 6))
# label -> (sampling mode, whether the negative replaces the empty prompt)
METHODS = {"cfg": ("cfg", False), "cfg-negative": ("cfg", True),
           "agd-negative": ("agd", True), "agd": ("agd", False)}
LABELS = {"unguided": "unguided", "cfg": "CFG", "cfg-negative": "CFG + negative",
          "agd-negative": "agd + negative", "agd": "agd (no negative)"}
REFERENCE = "cfg-negative"


def negative_cases(n: int) -> tuple[list[str], list[str], list[int], list[int]]:
    """(prompts, negatives, digits, negative digits) of n samples cycling over the close pairs."""
    from agd_cli.mnist import CAPTION_TEMPLATES, DIGIT_WORDS

    pairs = [p for a, b in CLOSE_PAIRS for p in ((a, b), (b, a))]
    chosen = [pairs[i % len(pairs)] for i in range(n)]
    caption = lambda d: CAPTION_TEMPLATES[0].format(n=d, w=DIGIT_WORDS[d])  # noqa: E731
    return ([caption(d) for d, _ in chosen], [caption(dn) for _, dn in chosen],
            [d for d, _ in chosen], [dn for _, dn in chosen])


def score(evaluator, images, digits: list[int], negative_digits: list[int], reference=None) -> dict:
    """Accuracy on the prompted digit, mean probability of the negative digit, PSNR vs reference."""
    import torch

    from agd_cli.metrics import psnr

    log_probs = evaluator.logits(images).log_softmax(dim=1)  # (N, 10)
    log_p_neg = log_probs[torch.arange(len(negative_digits)), torch.tensor(negative_digits)]
    # the mean probability is dominated by a few confused images; the mean log-probability
    # also shows how far the confident ones are pushed away from d′
    out = {"accuracy": evaluator.accuracy(images, digits),
           "negative_probability": float(log_p_neg.exp().mean()),
           "negative_log_probability": float(log_p_neg.mean())}
    if reference is not None:  # images are in the model range [-1, 1]
        out["psnr_vs_cfg_negative"] = float(psnr((images + 1) / 2, (reference + 1) / 2).mean())
    return out


def run_negatives(den, plan, show_table: bool = True) -> dict:
    """The negative-prompt table: every method on the same seeds, at each of plan.negative_omegas."""
    from agd_cli import mnist
    from agd_cli.quality import sample_for_quality

    if not den.adapters.wants_negative:
        ui.warn("this adapter was trained without negatives: 'agd + negative' ignores the negative")
    evaluator = mnist.load_evaluator(den.device)
    prompts, negatives, digits, neg_digits = negative_cases(plan.quality_samples)
    by_omega: dict = {}
    with ui.progress() as bar:
        task = bar.add_task("negatives", total=1 + len(METHODS) * len(plan.negative_omegas))
        unguided, spi, nfe = sample_for_quality(den, "unguided", 1.0, prompts, plan)
        bar.advance(task)
        for omega in plan.negative_omegas:
            images = {}
            for label, (mode, negative) in METHODS.items():
                images[label], _, nfe_m = sample_for_quality(den, mode, omega, prompts, plan,
                                                             negatives if negative else None)
                by_omega.setdefault(f"{omega:g}", {})[label] = {"nfe": nfe_m}
                bar.advance(task)
            ref = images[REFERENCE]
            for label, ims in images.items():
                by_omega[f"{omega:g}"][label].update(
                    score(evaluator, ims, digits, neg_digits, None if label == REFERENCE else ref))
    summary = {"unguided": {**score(evaluator, unguided, digits, neg_digits), "nfe": nfe},
               "by_omega": by_omega,
               "settings": {"samples_per_row": len(prompts), "steps": plan.steps,
                            "pairs": [list(p) for p in CLOSE_PAIRS], "both_ways": True,
                            "prompt": "a handwritten d", "negative": "a handwritten d′",
                            "seeds": f"0-{len(prompts) - 1}",
                            "adapter_trained_with_negatives": den.adapters.wants_negative}}
    if show_table:
        print_negatives_table(summary)
    return summary


def print_negatives_table(q: dict) -> None:
    """Rows per ω: CFG, CFG + negative, agd + negative, agd; columns accuracy, P(d′), PSNR, NFE."""
    from rich.table import Table

    from agd_cli.bench_report import console

    info = q["settings"]
    t = Table(title=f"negative prompts: prompt digit d, negative a close digit d′ "
                    f"({', '.join(f'{a}/{b}' for a, b in info['pairs'])}, both ways); "
                    f"{info['samples_per_row']} samples per row, {info['steps']} steps")
    for col in ("method", "ω", "accuracy", "P(d′)", "mean log P(d′)", "PSNR vs CFG + neg",
                "NFE/img"):
        t.add_column(col, justify="left" if col == "method" else "right")
    rows = [(LABELS["unguided"], "1", q["unguided"])]
    rows += [(LABELS[label], w, e) for w, es in q["by_omega"].items() for label, e in es.items()]
    for label, w, e in rows:
        p = e.get("psnr_vs_cfg_negative")
        t.add_row(label, w, f"{e['accuracy']:.3f}", f"{e['negative_probability']:.4f}",
                  f"{e['negative_log_probability']:.2f}", "—" if p is None else f"{p:.2f} dB",
                  str(e["nfe"]))
    console().print(t)
