"""The base's own response to the negative (`negative_attention`): the signal is the frozen
attention's output for the negative minus the prompt's, K/V once per run, one pass per step,
adapters without the flag unchanged, the flag recorded in the file; and the fidelity gap."""

from __future__ import annotations

import json

import pytest
import torch

from agd_cli.bench.fidelity import agreement, fidelity_gap
from agd_cli.collect.run import run_collect
from agd_cli.config.presets import PRESET_DIR, load_preset
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.core.adapter_hooks import ContextCache
from agd_cli.core.sampling import initial_noise, sample_images
from agd_cli.families import load_denoiser, load_with_adapters
from agd_cli.infra.errors import ModelError
from agd_cli.train.run import run_train
from tests.test_generate import agd

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


def lever_config(flag: bool = True, negatives: bool = True) -> AdapterConfig:
    return AdapterConfig(**{**load_preset("tiny-sd").adapter.to_dict(), "negatives": negatives,
                            "negative_attention": flag})


def with_adapters(cfg: AdapterConfig, seed: int = 0):
    torch.manual_seed(seed)
    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    den.new_adapters(cfg)
    for block in den.adapters.blocks.values():  # outputs away from 0, so every part counts
        torch.nn.init.normal_(block.out.weight, std=0.3)
    return den


def inputs(den):
    torch.manual_seed(1)
    x = torch.randn(2, *den.latent_shape())
    return x, den.encode(["a red fox", "a bowl of fruit"]), den.encode(["blurry", "a watermark"])


def test_signal_is_the_base_attention_for_the_negative_minus_the_prompts():
    den = with_adapters(lever_config())
    x, cond, neg = inputs(den)
    site = den.adapters.sites[0].name
    module = den.model.get_submodule(site)
    seen = {}

    def keep(block, args, kwargs):  # the adapter's input: (hidden, ctx, signal=...)
        seen["hidden"], seen["signal"] = args[0], kwargs["signal"]
    handle = den.adapters.blocks[site.replace(".", "__")].register_forward_pre_hook(
        keep, with_kwargs=True)
    with torch.no_grad():
        den.forward(x, torch.tensor(500), cond, omega=4.0, negative=neg)
        handle.remove()
        with den.adapters.disabled():  # the frozen module alone, on the same hidden states
            hidden = seen["hidden"]
            want = module(hidden, encoder_hidden_states=neg["prompt_embeds"]) - module(
                hidden, encoder_hidden_states=cond["prompt_embeds"])
    assert seen["signal"].shape == hidden.shape
    torch.testing.assert_close(seen["signal"], want, atol=1e-5, rtol=1e-5)


def test_the_signal_reaches_the_output_and_cached_runs_match_single_calls():
    den = with_adapters(lever_config())
    for block in den.adapters.blocks.values():
        torch.nn.init.normal_(block.negative_map, std=0.5)
    x, cond, neg = inputs(den)
    t = torch.tensor(500)
    with torch.no_grad():
        plain = den.forward(x, t, cond, omega=4.0, negative=neg)
        for block in den.adapters.blocks.values():
            block.negative_map.mul_(2)
        doubled = den.forward(x, t, cond, omega=4.0, negative=neg)
        assert (plain - doubled).abs().max() > 1e-4  # the negative_map's input is not zero
        cache = ContextCache(torch.tensor([500.0, 400.0]))
        steps = [den.forward(x, t, cond, omega=4.0, negative=neg, cache=cache) for _ in range(2)]
    for got in steps:  # the prepared (folded or plain) path: the forward within rounding
        torch.testing.assert_close(got, doubled, atol=2e-5, rtol=1e-4)
    assert cache.computed == 1


def test_negative_keys_and_values_are_projected_once_per_run():
    den = with_adapters(lever_config())
    x, cond, neg = inputs(den)
    module = den.model.get_submodule(den.adapters.sites[0].name)
    widths = []
    handle = module.to_k.register_forward_hook(lambda m, a, out: widths.append(a[0].shape))
    cache = ContextCache(torch.tensor([500.0, 400.0, 300.0]))
    with torch.no_grad():
        for t in (500, 400, 300):
            den.forward(x, torch.tensor(t), cond, omega=4.0, negative=neg, cache=cache)
    handle.remove()
    assert len(widths) == 3 + 1  # the prompt's keys every step, the negative's once


def test_one_pass_per_step_and_omega_one_is_the_conditional_model():
    den = with_adapters(lever_config())
    _, cond, neg = inputs(den)
    calls = []
    handle = den.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    noise = initial_noise(den.latent_shape(), [0, 1])
    got = sample_images(den, cond, neg, 4.0, noise, mode="agd", steps=STEPS, scheduler="ddim")
    handle.remove()
    assert got.nfe == STEPS and len(calls) == STEPS
    x, _, _ = inputs(den)
    with torch.no_grad():
        one = den.forward(x, torch.tensor(500), cond, omega=1.0, negative=neg)
        base = den.forward(x, torch.tensor(500), cond)
    torch.testing.assert_close(one, base)  # the (ω − 1) gain covers the new path too


def test_adapters_without_the_flag_have_no_new_part():
    for cfg in (lever_config(False), lever_config(True, negatives=False)):
        den = with_adapters(cfg)
        assert not any("negative_map" in k for k in den.adapters.state_dict())
        assert "negative_attention" not in cfg.to_dict() or not cfg.negatives
        for s in den.adapters.sites:  # no hook on the base's query map
            assert not den.model.get_submodule(s.name).to_q._forward_hooks
    assert "negative_attention" not in lever_config(False).to_dict()
    den = with_adapters(lever_config())
    assert any(den.model.get_submodule(s.name).to_q._forward_hooks for s in den.adapters.sites)
    den.adapters.detach()  # and detaching takes the query hooks off too
    assert not any(den.model.get_submodule(s.name).to_q._forward_hooks for s in den.adapters.sites)


def test_a_call_without_the_negatives_states_is_refused():
    den = with_adapters(lever_config())
    x, cond, _ = inputs(den)
    with pytest.raises(ModelError, match="trained with negative prompts"):
        den.forward(x, torch.tensor(500), cond, omega=4.0)


def test_preset_key_trains_records_and_reloads(tmp_path, capsys):
    toml = (PRESET_DIR / "tiny-sd.toml").read_text().replace(
        "[adapter]\n", "[adapter]\nnegative_attention = true\n")
    preset = tmp_path / "lever.toml"
    preset.write_text(toml)
    prompts, negatives = tmp_path / "p.txt", tmp_path / "n.txt"
    prompts.write_text("a red fox\na bowl of fruit\n")
    negatives.write_text("blurry\na watermark\n")
    run_collect(str(preset), prompts=str(prompts), num_per_prompt=2, steps=STEPS, batch_size=4,
                seed=3, out=str(tmp_path / "run"), negative_prompts=str(negatives),
                empty_negative_probability=0.3)
    run_train(run=str(tmp_path / "run"), steps=3, batch_size=4, device="cpu",
              workdir=str(tmp_path))
    path = tmp_path / "run" / "adapter.safetensors"
    den = load_with_adapters(path, device="cpu")
    recorded = den.adapters.metadata["adapter_config"]
    assert recorded["negative_attention"] is True and recorded["negatives"] is True
    assert all(b.negative_map is not None for b in den.adapters.blocks.values())
    again = load_with_adapters(path, device="cpu")
    x, cond, neg = inputs(den)
    with torch.no_grad():
        torch.testing.assert_close(den.forward(x, torch.tensor(500), cond, omega=3.0, negative=neg),
                                   again.forward(x, torch.tensor(500), cond, omega=3.0, negative=neg))
    code, out, err = agd(capsys, "generate", "a red fox", "--adapter", str(path), "--steps",
                         str(STEPS), "--negative-prompt", "blurry", "--json")
    assert code == 0, err
    assert json.loads(out)["nfe"] == STEPS and json.loads(out)["mode"] == "agd"


def test_bad_negative_attention_value_is_refused(tmp_path):
    from agd_cli.infra.errors import InputError

    toml = (PRESET_DIR / "tiny-sd.toml").read_text().replace(
        "[adapter]\n", "[adapter]\nnegative_attention = \"yes\"\n")
    (tmp_path / "bad.toml").write_text(toml)
    with pytest.raises(InputError, match="negative_attention"):
        load_preset(str(tmp_path / "bad.toml"))


# --- the negative fidelity gap ------------------------------------------------------------
def test_agreement_of_identical_images_is_capped_psnr_and_ssim_one():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    got = agreement(x, x)
    assert got["ssim"].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert got["psnr"].tolist() == pytest.approx([100.0] * 3)


def test_gap_is_positive_when_the_negative_is_followed_less_faithfully():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    near = ref + 0.02 * torch.randn(ref.shape, generator=g)
    far = ref + 0.3 * torch.randn(ref.shape, generator=g)
    gap = fidelity_gap(with_negative=agreement(far, ref), without=agreement(near, ref))
    for name in ("psnr", "ssim"):
        assert set(gap) >= {f"{name}_with_negative", f"{name}_without_negative", f"{name}_gap",
                            f"{name}_gap_ci95"}
        assert gap[f"{name}_gap"] == pytest.approx(
            gap[f"{name}_without_negative"] - gap[f"{name}_with_negative"])
        lo, hi = gap[f"{name}_gap_ci95"]
        assert 0 < lo <= gap[f"{name}_gap"] <= hi
    flipped = fidelity_gap(with_negative=agreement(near, ref), without=agreement(far, ref))
    assert flipped["psnr_gap"] == pytest.approx(-gap["psnr_gap"])
    same = fidelity_gap(agreement(near, ref), agreement(near, ref))
    assert same["psnr_gap"] == 0 and same["psnr_gap_ci95"] == [0, 0]


def test_gap_needs_the_same_seeds():
    a = agreement(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    b = agreement(torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="3 seeds without the negative, 2 with it"):
        fidelity_gap(a, b)



@torch.no_grad()
def test_compiled_run_is_one_graph_and_matches_eager():
    """What `--compile` compiles, with the lever: one graph, no break, compiled once over two
    negatives, the same images as eager (K/V projected per call inside the graph)."""
    from torch._dynamo.testing import CompileCounter

    from agd_cli.core.sampling import sample
    from tests.test_compile import Recorder

    torch._dynamo.reset()
    den = with_adapters(lever_config())
    for block in den.adapters.blocks.values():
        torch.nn.init.normal_(block.negative_map, std=0.3)
    den.adapters.requires_grad_(False).eval()

    def run(negative: str):
        noise = initial_noise(den.latent_shape(), [0])
        return sample(den, den.encode(["a red fox"]), den.encode_negative(negative), 4.0, noise,
                      mode="agd", steps=2, scheduler="ddim").x

    den.compiled = recorder = Recorder(den.model)
    try:
        run("blurry")
    finally:
        den.compiled = None
    call = lambda *args, **kwargs: den.model(*args, **kwargs)  # noqa: E731
    got = torch._dynamo.explain(call)(*recorder.args, **recorder.kwargs)
    assert (got.graph_count, got.graph_break_count) == (1, 0), got.break_reasons
    eager = [run(n) for n in ("blurry", "a cat")]
    counter = CompileCounter()
    den.compile(backend=counter)
    try:
        compiled = [run(n) for n in ("blurry", "a cat")]
    finally:
        den.compiled = None
    assert counter.frame_count == 1
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_fresh_lever_adapters_start_as_the_adapters_without_it():
    """negative_map starts at zero: training starts from the adapters without the lever."""
    x = None
    outs = []
    for flag in (False, True):
        den = with_adapters(lever_config(flag), seed=5)
        if x is None:
            x, cond, neg = inputs(den)
        with torch.no_grad():
            outs.append(den.forward(x, torch.tensor(500), cond, omega=4.0, negative=neg))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
