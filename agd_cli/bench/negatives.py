"""`agd bench --negatives`: does agd follow a negative prompt the way CFG does? (mnist evaluator)

Three case sets, each on the same seeds and noise with the same methods: unguided, CFG without the
negative, CFG with it, agd with it and agd without it, at each ω of plan.negative_omegas.

- close pairs: the prompt is digit d, the negative a visually close digit d′ (7/1, 3/8, 4/9, 5/6,
  both ways). Reported: the classifier's accuracy on d, its mean probability of d′ and PSNR
  against CFG-with-negative. A close negative does not lower P(d′) under CFG: it replaces the
  push away from nothing by a weaker push away from a similar digit.
- far pairs (JSON `far_pairs`): the same with a visually distant d′ (FAR_PAIRS, both ways).
- negative only: the prompt is "" and the negative "a handwritten d′", d′ = 0–9 cycling. CFG
  without the negative is unguided sampling here; a negative that works makes the digit
  classifier label fewer images d′. Reported: that rate, the mean probability of d′ and PSNR
  against CFG-with-negative (agd with the negative should agree with it better than agd without).

Per set and ω, the negative fidelity gap (bench.fidelity, on `agd-negative`'s `fidelity`): PSNR and
SSIM of agd + negative vs CFG + negative next to agd vs CFG without one, their paired difference.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import NamedTuple

import torch
from rich.table import Table

from agd_cli.bench.fidelity import agreement, fidelity_gap, print_fidelity_table
from agd_cli.bench.quality import sample_for_quality
from agd_cli.evaluation import mnist
from agd_cli.evaluation.metrics import psnr
from agd_cli.evaluation.mnist import CAPTION_TEMPLATES, DIGIT_WORDS
from agd_cli.evaluation.stats import bootstrap_ci, paired_points
from agd_cli.infra import ui
from agd_cli.infra.ui import console

logger = logging.getLogger(__name__)

CLOSE_PAIRS = ((7, 1), (3, 8), (4, 9), (5, 6))
FAR_PAIRS = ((0, 1), (2, 4), (6, 7), (8, 1))  # shapes with little in common (chosen by eye)
# label -> (sampling mode, whether the negative replaces the empty prompt)
METHODS = {"cfg": ("cfg", False), "cfg-negative": ("cfg", True),
           "agd-negative": ("agd", True), "agd": ("agd", False)}
LABELS = {"unguided": "unguided", "cfg": "CFG", "cfg-negative": "CFG + negative",
          "agd-negative": "agd + negative", "agd": "agd (no negative)"}
REFERENCE = "cfg-negative"


class CaseSet(NamedTuple):
    """One sample per index: its prompt, negative, prompted digit (None: no digit) and d′."""
    prompts: list[str]
    negatives: list[str]
    digits: list[int] | None
    negative_digits: list[int]

    @property
    def score_key(self) -> str:
        """The first score: accuracy on the prompted digit, or without one the rate of d′."""
        return "accuracy" if self.digits is not None else "negative_rate"


def caption(d: int) -> str:
    return CAPTION_TEMPLATES[0].format(n=d, w=DIGIT_WORDS[d])  # "a handwritten d"


def negative_cases(n: int, pairs=CLOSE_PAIRS) -> CaseSet:
    """n samples cycling over `pairs`, both ways: prompt d, negative d′."""
    pairs = [p for a, b in pairs for p in ((a, b), (b, a))]
    chosen = [pairs[i % len(pairs)] for i in range(n)]
    return CaseSet([caption(d) for d, _ in chosen], [caption(dn) for _, dn in chosen],
                   [d for d, _ in chosen], [dn for _, dn in chosen])


def negative_only_cases(n: int) -> CaseSet:
    """n samples with the empty prompt and the negative "a handwritten d′", d′ = i % 10."""
    digits = [i % 10 for i in range(n)]
    return CaseSet([""] * n, [caption(d) for d in digits], None, digits)


class PerSample(NamedTuple):
    """A method's per-seed scores: the classifier's hit (prompted digit; no digits: d′) and
    log P(d′); the paired comparison with CFG + negative reads them."""
    hits: object
    log_p_neg: object


def per_sample(evaluator, images, cases: CaseSet) -> PerSample:
    logits = evaluator.logits(images)  # the classifier runs once for both scores
    log_p_neg = logits.log_softmax(dim=1)[torch.arange(len(cases.negative_digits)),
                                          torch.tensor(cases.negative_digits)]
    # no prompted digit: the same classifier rate, of d′ (lower = the negative works)
    labels = cases.digits if cases.digits is not None else cases.negative_digits
    return PerSample(evaluator.hits(logits, labels), log_p_neg)


def score(s: PerSample, cases: CaseSet, images=None, reference=None) -> dict:
    """Accuracy on the prompted digit (no digits: the rate of d′ instead), mean probability of
    the negative digit, PSNR vs reference."""
    log_p_neg = s.log_p_neg
    out = {cases.score_key: float(s.hits.float().mean())}
    # the mean probability is dominated by a few confused images; the mean log-probability
    # also shows how far the confident ones are pushed away from d′
    out.update(negative_probability=float(log_p_neg.exp().mean()),
               negative_log_probability=float(log_p_neg.mean()))
    if reference is not None:  # images are in the model range [-1, 1]
        out["psnr_vs_cfg_negative"] = float(psnr((images + 1) / 2, (reference + 1) / 2).mean())
    return out


def run_methods(den, plan, evaluator, cases: CaseSet, omega: float, advance) -> dict:
    """Every method of METHODS at one ω on the same noise, scored against CFG + negative."""
    images, nfe = {}, {}
    for label, (mode, negative) in METHODS.items():
        images[label], _, nfe[label] = sample_for_quality(
            den, mode, omega, cases.prompts, plan, cases.negatives if negative else None)
        advance()
    ref = images[REFERENCE]
    scores = {label: per_sample(evaluator, ims, cases) for label, ims in images.items()}
    rows = {label: {"nfe": nfe[label], **score(scores[label], cases, ims,
                                               None if label == REFERENCE else ref)}
            for label, ims in images.items()}
    rows["agd-negative"]["vs_cfg_negative"] = {
        **paired(scores["agd-negative"], scores[REFERENCE], cases),
        **ratio_over_no_negative(scores)}
    # the method's own fidelity on the same scores: agd without the negative against CFG without it
    rows["agd"]["vs_cfg"] = paired(scores["agd"], scores["cfg"], cases)
    with_negative = agreement(images["agd-negative"], ref)
    without = agreement(images["agd"], images["cfg"])
    rows["agd-negative"]["ssim_vs_cfg_negative"] = float(with_negative["ssim"].mean())
    rows["agd"].update(psnr_vs_cfg=float(without["psnr"].mean()),
                       ssim_vs_cfg=float(without["ssim"].mean()))
    rows["agd-negative"]["fidelity"] = fidelity_gap(with_negative, without)
    return rows


def ratio_over_no_negative(scores: dict) -> dict:
    """(agd + negative's mean P(d′) / CFG + negative's) ÷ (agd's / CFG's), paired bootstrap over
    the same seeds: 1 when agd follows the negative as closely as it follows CFG without one."""
    p = {label: s.log_p_neg.exp() for label, s in scores.items()}

    def value(i=slice(None)) -> float:
        return float(p["agd-negative"][i].mean() / p[REFERENCE][i].mean()
                     / (p["agd"][i].mean() / p["cfg"][i].mean()))

    return {"negative_probability_ratio_over_no_negative": value(),
            "negative_probability_ratio_over_no_negative_ci95": bootstrap_ci(len(p["agd"]), value)}


def paired(a: PerSample, b: PerSample, cases: CaseSet) -> dict:
    """agd against CFG with the same negative (or none) on the same seeds, with 95 % intervals:
    the accuracy (or d′ rate) difference in points, and the ratio of mean P(d′) (paired bootstrap)."""
    key = cases.score_key
    points, ci = paired_points(a.hits, b.hits)
    pa, pb = a.log_p_neg.exp(), b.log_p_neg.exp()
    ratio = lambda i: float(pa[i].mean() / pb[i].mean())  # noqa: E731
    return {f"{key}_points": points, f"{key}_points_ci95": ci,
            "negative_probability_ratio": float(pa.mean() / pb.mean()),
            "negative_probability_ratio_ci95": bootstrap_ci(len(pa), ratio)}


def run_case_set(den, plan, evaluator, cases: CaseSet, settings: dict, advance) -> dict:
    """{"unguided", "by_omega", "settings"} for one case set."""
    unguided, _, nfe = sample_for_quality(den, "unguided", 1.0, cases.prompts, plan)
    advance()
    by_omega = {f"{omega:g}": run_methods(den, plan, evaluator, cases, omega, advance)
                for omega in plan.negative_omegas}
    n = len(cases.prompts)
    return {"unguided": {**score(per_sample(evaluator, unguided, cases), cases), "nfe": nfe},
            "by_omega": by_omega,
            "settings": {"samples_per_row": n, "steps": plan.steps, **settings,
                         "seeds": [plan.quality_seed, plan.quality_seed + n - 1],
                         "adapter_trained_with_negatives": den.adapters.wants_negative}}


def run_negatives(den, plan, show_table: bool = True, evaluator=None) -> dict:
    """Both negative-prompt tables: every method on the same seeds, at each of plan.negative_omegas.
    The close-pair set is the top level; the negative-only set is under "negative_only"."""
    if not den.adapters.wants_negative:
        logger.warning("this adapter was trained without negatives: 'agd + negative' ignores the negative")
    evaluator = mnist.load_evaluator(den.device) if evaluator is None else evaluator
    n = plan.quality_samples
    pairs = lambda p: {"pairs": [list(x) for x in p], "both_ways": True,  # noqa: E731
                       "prompt": "a handwritten d", "negative": "a handwritten d′"}
    sets = ((negative_cases(n), pairs(CLOSE_PAIRS)), (negative_cases(n, FAR_PAIRS), pairs(FAR_PAIRS)),
            (negative_only_cases(n), {"prompt": "", "negative": "a handwritten d′",
                                      "negative_digits": "0-9, sample i: i % 10"}))
    runs_per_set = 1 + len(METHODS) * len(plan.negative_omegas)
    with ui.progress() as bar:
        task = bar.add_task("negatives", total=len(sets) * runs_per_set)
        close, far, only = [run_case_set(den, plan, evaluator, cases, settings,
                                         partial(bar.advance, task))
                            for cases, settings in sets]
    summary = {**close, "far_pairs": far, "negative_only": only}
    if show_table:
        print_negatives_table(summary)
    return summary


def print_negatives_table(q: dict) -> None:
    """The close-pair table, then the negative-only one: rows per ω, one per method."""
    info, only = q["settings"], q["negative_only"]["settings"]
    print_case_table(q, "accuracy", "accuracy",
                     f"negative prompts: prompt digit d, negative a close digit d′ "
                     f"({', '.join(f'{a}/{b}' for a, b in info['pairs'])}, both ways); "
                     f"{info['samples_per_row']} samples per row, {info['steps']} steps",
                     caption=ratio_caption(q))
    far = q["far_pairs"]
    print_case_table(far, "accuracy", "accuracy",
                     f"far pairs: prompt digit d, negative a distant digit d′ "
                     f"({', '.join(f'{a}/{b}' for a, b in far['settings']['pairs'])}, both ways)",
                     caption=ratio_caption(far))
    print_case_table(q["negative_only"], "d′ rate", "negative_rate",
                     f'negative only: prompt "", negative a handwritten d′, d′ = 0–9 cycling; '
                     f"{only['samples_per_row']} samples per row, {only['steps']} steps",
                     caption="d′ rate: fraction the digit classifier labels d′; lower = the "
                             "negative works (CFG without it is unguided here)")
    print_fidelity_table({"close pairs": q, "far pairs": far, "negative only": q["negative_only"]})


def ratio_caption(q: dict) -> str:
    """agd + negative's P(d′) ratio over agd's own without a negative, per ω."""
    parts = []
    for w, rows in q["by_omega"].items():
        v = rows["agd-negative"]["vs_cfg_negative"]
        lo, hi = v["negative_probability_ratio_over_no_negative_ci95"]
        parts.append(f"ω {w}: {v['negative_probability_ratio_over_no_negative']:.2f} "
                     f"[{lo:.2f}, {hi:.2f}]")
    return ("agd + negative's P(d′) ratio over agd's own without a negative (1: it follows the "
            "negative as closely as CFG alone): " + "; ".join(parts))


def print_case_table(q: dict, column: str, key: str, title: str,
                     caption: str | None = None) -> None:
    """One case set's rows; `key` (shown as `column`) is its first score column."""
    t = Table(title=title, caption=caption)
    for col in ("method", "ω", column, "P(d′)", "mean log P(d′)", "PSNR vs CFG + neg", "NFE/img",
                f"vs CFG, same negative: {column}, points (95 % CI)", "P(d′) ratio (95 % CI)"):
        t.add_column(col, justify="left" if col == "method" else "right")
    rows = [(LABELS["unguided"], "1", q["unguided"])]
    rows += [(LABELS[label], w, e) for w, es in q["by_omega"].items() for label, e in es.items()]
    for label, w, e in rows:
        p, v = e.get("psnr_vs_cfg_negative"), e.get("vs_cfg_negative", e.get("vs_cfg"))
        paired = ("", "") if v is None else (
            f"{v[key + '_points']:+.1f} [{v[key + '_points_ci95'][0]:+.1f}, "
            f"{v[key + '_points_ci95'][1]:+.1f}]",
            f"{v['negative_probability_ratio']:.2f} [{v['negative_probability_ratio_ci95'][0]:.2f}, "
            f"{v['negative_probability_ratio_ci95'][1]:.2f}]")
        t.add_row(label, w, f"{e[key]:.3f}", f"{e['negative_probability']:.4f}",
                  f"{e['negative_log_probability']:.2f}", "—" if p is None else f"{p:.2f} dB",
                  str(e["nfe"]), *paired)
    console().print(t)
