"""Hardware decisions, each exercised on the CPU through hardware.assume(...): fast attention per
family (xformers only where it is the same model) and the bf16 -> fp16 fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from agd_cli.collect.run import _fast_attention
from agd_cli.config.presets import FAMILIES, load_preset
from agd_cli.families import load_denoiser, resolve_dtype
from agd_cli.infra import hardware
from agd_cli.train.step import AdapterStep

CUDA = torch.device("cuda")  # only named: nothing runs on it here
SAME_MODEL = {"sd": "xformers", "sdxl": "xformers", "dit": "xformers", "sd3": "xformers",
              "pixart": "sdpa", "sana": "sdpa"}


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_backend_per_family(family):
    from agd_cli.families.attention import attention_backend

    with hardware.assume(xformers=True):
        assert attention_backend(family, CUDA) == SAME_MODEL[family]
        assert attention_backend(family, "cpu") == "sdpa"
    with hardware.assume(xformers=False):
        assert attention_backend(family, CUDA) == "sdpa"


@pytest.mark.parametrize(("preset", "want"), [("tiny-sd", "xformers"), ("tiny-pixart", "sdpa"),
                                              ("tiny-sana", "sdpa")])
def test_collect_sets_xformers_only_where_it_is_the_same_model(preset, want, monkeypatch):
    """PixArt-Σ's masked cross-attention crashes under xformers, and Sana's linear attention
    would be replaced by softmax attention: their processors stay as diffusers made them."""
    den = load_denoiser(load_preset(preset), device="cpu", text=False)
    before = {n: type(p).__name__ for n, p in den.model.attn_processors.items()}
    calls = []
    monkeypatch.setattr(den.model, "enable_xformers_memory_efficient_attention",
                        lambda *a, **k: calls.append(1))
    den.device = CUDA  # the decision's input; no kernel runs
    with hardware.assume(xformers=True):
        assert _fast_attention(den) == want
    assert len(calls) == (want == "xformers")
    assert {n: type(p).__name__ for n, p in den.model.attn_processors.items()} == before
    with hardware.assume(xformers=False):
        assert _fast_attention(den) == "sdpa"
    assert len(calls) == (want == "xformers")


def test_bf16_falls_back_to_fp16_on_a_card_without_it():
    from agd_cli.families.precision import part_dtype, resolve_precision

    with hardware.assume(bf16=False):
        assert hardware.usable_precision("bf16", CUDA) == "fp16"
        assert hardware.usable_precision("bf16", "cpu") == "bf16"
        assert hardware.usable_precision("fp32", CUDA) == "fp32"
        assert resolve_dtype("bf16", CUDA) == torch.float16
        assert resolve_precision("bf16", CUDA) == "fp16"  # said once per process
        assert resolve_dtype("fp16", CUDA) == torch.float16
        sana = load_preset("sana-1600m")  # its Gemma-2's own bf16 falls back alike
        assert part_dtype(sana, "text_encoder", torch.float16, CUDA) == torch.float16
    with hardware.assume(bf16=True):
        assert resolve_dtype("bf16", CUDA) == torch.bfloat16
        assert part_dtype(load_preset("sana-1600m"), "text_encoder", torch.float16, CUDA) == torch.bfloat16


def test_the_fallback_trains_with_the_existing_grad_scaler(recwarn):
    """bf16 presets on a card without bf16 train as fp16 does: with loss scaling."""
    from agd_cli.families.precision import resolve_precision

    with hardware.assume(bf16=False):
        precision = resolve_precision(load_preset("sdxl").train["precision"], CUDA)
    assert precision == "fp16"
    p = torch.nn.Parameter(torch.zeros(2))
    step = AdapterStep([p], torch.optim.AdamW([p]), precision, CUDA, torch.float16)
    assert step.scaler is not None and step.amp_dtype is None


def test_fallback_is_said_in_one_line(caplog, monkeypatch):
    from agd_cli.families import precision

    monkeypatch.setattr(precision, "_SAID", set())
    with hardware.assume(bf16=False), caplog.at_level(logging.WARNING, "agd_cli"):
        for _ in range(3):
            resolve_dtype("bf16", CUDA)
    said = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert len(said) == 1 and "running in fp16 instead" in said[0] and "\n" not in said[0]
