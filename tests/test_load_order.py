"""The load order of collect and generate (issue 31, row 4): the text encoders go to the device
and encode alone; only once they are freed does the denoiser move there. Seen on the CPU by
recording every device move and every text-encoder call of a tiny SD 3.5 in order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agd_cli.families.base import Denoiser

ENCODERS = ("CLIPTextModelWithProjection", "T5EncoderModel")
DENOISER = "SD3Transformer2DModel"


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str]]:
    """(what, whose class) in order: 'to-device' for a .to() that names a device, 'encode' for a
    text encoder's forward, 'free' for free_text_encoders."""
    log: list[tuple[str, str]] = []
    to = nn.Module.to

    def logged_to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and type(self).__name__ in (*ENCODERS, DENOISER):
            log.append(("to-device", type(self).__name__))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", logged_to)
    import transformers

    for name in ENCODERS:
        cls = getattr(transformers, name)
        forward = cls.forward

        def logged_forward(self, *args, __forward=forward, **kwargs):
            log.append(("encode", type(self).__name__))
            return __forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", logged_forward)
    free = Denoiser.free_text_encoders

    def logged_free(self):
        log.append(("free", type(self).__name__))
        return free(self)

    monkeypatch.setattr(Denoiser, "free_text_encoders", logged_free)
    return log


def check_order(log: list[tuple[str, str]]) -> None:
    """Encoders placed, then every encoding, then freed, then the denoiser placed (once)."""
    kinds = [k for k, _ in log]
    placed = [i for i, (k, who) in enumerate(log) if k == "to-device" and who == DENOISER]
    encoders_placed = [i for i, (k, who) in enumerate(log) if k == "to-device" and who in ENCODERS]
    encoded = [i for i, k in enumerate(kinds) if k == "encode"]
    assert len(placed) == 1 and encoders_placed and encoded and "free" in kinds, log
    assert max(encoders_placed) < min(encoded) < max(encoded) < kinds.index("free") < placed[0], log
    assert {who for k, who in log if k == "encode"} == set(ENCODERS)


def test_collect_encodes_with_the_text_encoders_alone_then_places_the_denoiser(events, tmp_path):
    from agd_cli.collect.run import run_collect

    run_collect("tiny-sd3", num_per_prompt=1, steps=2, device="cpu", out=str(tmp_path / "run"))
    check_order(events)


@pytest.fixture
def adapter_file(tmp_path) -> str:
    from agd_cli.config.presets import load_preset
    from agd_cli.families import load_denoiser

    den = load_denoiser(load_preset("tiny-sd3"), "cpu", text=False)
    path = tmp_path / "adapter.safetensors"
    den.new_adapters().save(path, den.adapter_metadata(train_steps=0))
    return str(path)


def test_generate_places_the_denoiser_after_the_prompts_are_encoded(adapter_file, events,
                                                                     tmp_path):
    """(adapter_file before events: making the file is not part of what is recorded)"""
    from agd_cli.generate.run import run_generate

    run_generate(["a red fox"], adapter=adapter_file, steps=2, device="cpu",
                 out=str(tmp_path / "fox.png"))
    check_order(events)


def test_without_text_encoders_the_denoiser_is_placed_at_once():
    """Training and memory probes load no text encoders: nothing to wait for."""
    from agd_cli.config.presets import load_preset
    from agd_cli.families import load_denoiser

    den = load_denoiser(load_preset("tiny-sd3"), "cpu", text=False)
    assert den._model_placed
    den = load_denoiser(load_preset("tiny-sd3"), "cpu", text=True)
    assert not den._model_placed
    den.free_text_encoders()
    assert den._model_placed and den.text == {}
