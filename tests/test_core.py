"""Invariants of the core: adapters, CFG math, families, presets."""

from __future__ import annotations

import math

import pytest
import torch

from agd_cli.config.presets import builtin_names, load_preset
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.core.guidance import cfg_combine
from agd_cli.families import count_parameters, load_denoiser, load_with_adapters

TINY = ["tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-sd3", "tiny-pixart", "tiny-sana"]


def _inputs(den, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *den.latent_shape(), generator=g)
    prompts = ["a red fox", "a lighthouse"][:n] if den.family != "dit" else [3, 7][:n]
    return x, den.encode(prompts), den.encode_null(n)


@pytest.fixture(params=TINY)
def den(request):
    """A fresh base per test (tiny: milliseconds): tests attach and train adapters on it, so
    none may see another's adapters, whatever the order."""
    return load_denoiser(load_preset(request.param), "cpu")


def _fresh(den, **cfg):
    base = den.preset.adapter.to_dict()
    base.update(cfg)
    return den.new_adapters(AdapterConfig(**base))


@torch.no_grad()
def test_disabled_adapters_give_the_exact_base(den):
    x, c, _ = _inputs(den)
    assert den.adapters is None
    base = den.predict(x, 500, c)
    adapters = _fresh(den)
    active = den.predict(x, 500, c, omega=4.0)
    assert not torch.equal(active, base), "fresh Xavier-initialised adapters change the output"
    with adapters.disabled():
        assert torch.equal(den.predict(x, 500, c, omega=4.0), base)
    assert torch.equal(den.predict(x, 500, c), base)  # no ω: adapters inactive
    adapters.detach()
    assert torch.equal(den.predict(x, 500, c, omega=4.0), base)


def test_only_adapters_train_and_base_is_bit_identical(den):
    x, c, _ = _inputs(den)
    before = {k: v.clone() for k, v in den.model.state_dict().items()}
    adapters = _fresh(den)
    assert all(not p.requires_grad for p in den.model.parameters())
    assert all(p.requires_grad for p in adapters.parameters())
    opt = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    for _ in range(2):
        loss = den.forward(x, torch.tensor([100, 700]), c, omega=torch.tensor([2.0, 5.0])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in adapters.parameters() if p.requires_grad)
        opt.step()
    after = den.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not den.model.training


def test_output_depends_on_omega_after_one_step(den):
    x, c, _ = _inputs(den)
    adapters = _fresh(den, init="zero")
    with torch.no_grad():
        same = den.predict(x, 300, c, omega=2.0) - den.predict(x, 300, c, omega=6.0)
    assert same.abs().max() == 0, "zero-initialised adapters start as the base"
    opt = torch.optim.SGD(adapters.parameters(), lr=0.1)
    w = torch.tensor([2.0, 6.0])
    loss = (den.forward(x, 300, c, omega=w) - w.view(-1, 1, 1, 1)).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        diff = den.predict(x, 300, c, omega=2.0) - den.predict(x, 300, c, omega=6.0)
    assert diff.abs().max() > 1e-6


@torch.no_grad()
def test_save_load_roundtrip_gives_identical_output(den, tmp_path):
    x, c, _ = _inputs(den)
    _fresh(den)
    path = tmp_path / "adapter.safetensors"
    den.adapters.save(path, den.adapter_metadata(train_steps=3))
    expected = den.predict(x, 250, c, omega=3.5)
    other = load_with_adapters(path, "cpu")
    assert torch.equal(other.predict(x, 250, c, omega=3.5), expected)
    assert other.adapters.metadata["train_steps"] == 3
    assert other.adapters.metadata["family"] == den.family


def test_adapter_for_another_base_is_refused(tmp_path):
    from agd_cli.infra.errors import DataError

    sd = load_denoiser(load_preset("tiny-sd"), "cpu")
    sd.new_adapters()
    path = tmp_path / "a.safetensors"
    sd.adapters.save(path, sd.adapter_metadata())
    xl = load_denoiser(load_preset("tiny-sdxl"), "cpu")
    with pytest.raises(DataError, match="random:tiny-sd.*random:tiny-sdxl"):
        xl.load_adapters(path)


@torch.no_grad()
def test_cfg_at_omega_one_is_the_conditional_prediction(den):
    x, c, u = _inputs(den)
    assert den.adapters is None
    cond = den.predict(x, 400, c)
    assert torch.allclose(den.predict_cfg(x, 400, c, u, 1.0), cond, atol=1e-5)
    uncond = den.predict(x, 400, u)
    guided = den.predict_cfg(x, 400, c, u, 3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-4)


def test_cfg_combine_per_sample_omega():
    u, c = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    out = cfg_combine(u, c, torch.tensor([1.0, 4.0]))
    assert out[0].eq(1).all() and out[1].eq(4).all()


def test_dit_refuses_cross_attention_adapters():
    from agd_cli.infra.errors import InputError

    dit = load_denoiser(load_preset("tiny-dit"), "cpu")
    with pytest.raises(InputError, match="cross_attention.*dit"):
        dit.new_adapters(AdapterConfig(kind="cross_attention", hidden_dim=8, context_dim=8))


def test_gradient_checkpointing_lets_adapter_gradients_through():
    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    adapters = den.new_adapters()
    den.model.enable_gradient_checkpointing()
    x, c, _ = _inputs(den)
    den.forward(x, 500, c, omega=5.0).pow(2).mean().backward()
    grads = [p.grad for p in adapters.blocks.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", builtin_names())
def test_every_preset_parses_and_builds(name):
    preset = load_preset(name)
    counts = count_parameters(preset)
    assert counts["base_params"] > 0 and counts["adapter_params"] > 0
    assert counts["adapter_sites"] > 0
    if name == "sdxl":
        assert counts["ratio"] <= 0.03
        assert counts["adapter_sites"] == 70  # every transformer block of the SDXL UNet
        assert math.isclose(counts["base_params"], 2.567e9, rel_tol=0.01)
    if name.startswith("tiny-"):
        den = load_denoiser(preset, "cpu")
        x, c, _ = _inputs(den, n=1)
        with torch.no_grad():
            assert den.predict(x, 10, c).shape == x.shape


@torch.no_grad()
def test_agd_at_omega_one_is_the_conditional_base_like_cfg(den):
    x, c, _ = _inputs(den)
    _fresh(den)
    with den.adapters.disabled():
        cond = den.predict(x, 600, c)
    assert torch.equal(den.predict(x, 600, c, omega=1.0), cond)
    assert not torch.equal(den.predict(x, 600, c, omega=1.5), cond)


@torch.no_grad()
def test_omega_beyond_the_trained_range_only_scales_the_gain(den):
    """The ω embedding sees ω clamped to the trained range; the (ω − 1) gain alone carries ω
    beyond it, as CFG is linear in ω (agd collapsed at ω 10 of a 1–6 range without this)."""
    x, c, _ = _inputs(den)
    adapters = _fresh(den, omega_range=[1.0, 6.0])
    cond = den.adapter_cond(c, x)
    at = {w: adapters.context(w, 300, cond, 2, "cpu") for w in (0.5, 1.0, 3.0, 6.0, 10.0)}
    for beyond, edge in ((10.0, 6.0), (0.5, 1.0)):
        assert torch.equal(at[beyond].tokens, at[edge].tokens)
        assert torch.equal(at[beyond].vector, at[edge].vector)
    assert torch.allclose(at[10.0].gain, at[6.0].gain * 9 / 5)
    assert not torch.equal(at[3.0].tokens, at[6.0].tokens)  # inside the range ω still counts
    unclamped = AdapterConfig(**{**adapters.config.to_dict(), "omega_range": None})
    assert "omega_range" not in unclamped.to_dict()  # files from before stay as they were


@torch.no_grad()
def test_adapter_files_with_and_without_a_trained_range_load(den, tmp_path):
    """Files record the trained range and reload it; files from before (no range) load and
    feed ω unclamped, exactly as they were trained."""
    x, c, _ = _inputs(den)
    for omega_range in ([1.0, 4.0], None):
        _fresh(den, omega_range=omega_range)
        path = tmp_path / f"{omega_range}.safetensors"
        den.adapters.save(path, den.adapter_metadata())
        other = load_with_adapters(path, "cpu")
        assert other.adapters.config.omega_range == omega_range
        assert ("omega_range" in other.adapters.metadata["adapter_config"]) == bool(omega_range)
        expected = den.predict(x, 400, c, omega=9.0)
        assert torch.equal(other.predict(x, 400, c, omega=9.0), expected)
        clamped = other.adapters.context(9.0, 400, other.adapter_cond(c, x), 2, "cpu").tokens
        edge = other.adapters.context(4.0, 400, other.adapter_cond(c, x), 2, "cpu").tokens
        assert torch.equal(clamped, edge) == bool(omega_range)


def test_omega_loss_weight_is_mean_one_and_favours_low_omega():
    from agd_cli.train.settings import OMEGA_WEIGHT_FLOOR, omega_loss_weight

    grid = torch.linspace(1.0, 6.0, 1001)
    assert torch.equal(omega_loss_weight(grid, 0.0, [1.0, 6.0]), torch.ones_like(grid))
    w = omega_loss_weight(grid, 2.0, [1.0, 6.0])
    assert abs(float(w.mean()) - 1.0) < 1e-5
    assert bool((w[1:] <= w[:-1]).all())  # never more weight for a higher ω
    floor = grid - 1 <= OMEGA_WEIGHT_FLOOR
    assert torch.equal(w[floor], w[floor][:1].expand(int(floor.sum())))  # flat below the floor
    ratio = omega_loss_weight(torch.tensor([2.0, 6.0]), 2.0, [1.0, 6.0])
    assert torch.allclose(ratio[0] / ratio[1], torch.tensor(25.0))  # ((6 − 1) / (2 − 1))²
