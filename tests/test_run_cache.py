"""A sampling run's reuse of fixed inputs (adapters.ContextCache, sampling.RunInputs): the same
numbers as computing everything at every step, recomputed whenever an input changes."""

from __future__ import annotations

import pytest
import torch

from agd_cli.config.presets import load_preset
from agd_cli.core.adapter_hooks import ContextCache
from agd_cli.core.adapter_layers import PreparedOffset
from agd_cli.core.sampling import sample
from agd_cli.families import load_denoiser

# mnist folds the adapters' query/output maps into their keys/values (narrow blocks),
# tiny-sd/tiny-sdxl keep plain keys and values, tiny-dit has offset adapters, tiny-sana is unrouted
PRESETS = ["mnist", "tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-sana"]


@pytest.fixture(scope="module", params=PRESETS)
def den(request):
    den = load_denoiser(load_preset(request.param), "cpu")
    adapters = den.new_adapters()
    with torch.no_grad():  # zero-initialised outputs (mnist) would hide a wrong adapter path
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    adapters.requires_grad_(False).eval()
    return den


def _prompts(den, first: bool) -> list:
    if den.family == "dit":
        return [1, 2, 3] if first else [4, 5, 6]
    return ["a red fox", "a cat", "seven"] if first else ["a lighthouse", "two", "dusk"]


def _relative_error(a, b, base) -> float:
    return ((a - b).abs().max() / (b - base).abs().max()).item()


@torch.no_grad()
def test_cached_context_equals_uncached_over_steps_prompts_and_omegas(den):
    x = torch.randn(3, *den.latent_shape(), generator=torch.Generator().manual_seed(0))
    c1, c2 = den.encode(_prompts(den, True)), den.encode(_prompts(den, False))
    uncond = den.encode_negative(None)
    cache = ContextCache(timesteps=torch.tensor([900, 500, 20]))  # t's work tabulated per run
    runs = [(c1, 4.0), (c1, 4.0), (c1, 2.5), (c2, 2.5), (c2, torch.tensor([1.5, 3.0, 6.0]))]
    for cond, omega in runs:
        for t in (900, 500, 20, 333):  # 333: not one of the run's timesteps
            cached = den.predict(x, t, cond, omega=omega, negative=uncond, cache=cache)
            plain = den.predict(x, t, cond, omega=omega, negative=uncond)
            base = den.predict(x, t, cond)
            assert _relative_error(cached, plain, base) < 1e-5
            # float32 rounding of a different summation order (seen: 1.3e-5 on tiny-sana at one
            # thread, outputs ~1); a wrong path is off by the adapters' effect, ~1e-1
            assert (cached - plain).abs().max() < 3e-5
    assert cache.computed == 4  # once per (condition, ω): the repeated run reused it


@torch.no_grad()
def test_cache_is_recomputed_when_an_input_or_the_weights_change(den):
    x = torch.randn(2, *den.latent_shape(), generator=torch.Generator().manual_seed(1))
    cond = den.encode(_prompts(den, True)[:2])
    cache = ContextCache()
    den.predict(x, 500, cond, omega=3.0, cache=cache)
    den.predict(x, 400, cond, omega=3.0, cache=cache)
    assert cache.computed == 1
    for tensor in cond.values():  # the same tensors, changed in place
        tensor.add_(1) if tensor.is_floating_point() else tensor.copy_((tensor + 1) % 10)
    changed = den.predict(x, 400, cond, omega=3.0, cache=cache)
    assert cache.computed == 2
    torch.testing.assert_close(changed, den.predict(x, 400, cond, omega=3.0), atol=1e-5, rtol=1e-5)
    first = next(den.adapters.parameters())
    first.mul_(1.5)  # e.g. an EMA update or load_state_dict between two runs
    updated = den.predict(x, 400, cond, omega=3.0, cache=cache)
    assert cache.computed == 3
    torch.testing.assert_close(updated, den.predict(x, 400, cond, omega=3.0), atol=1e-5, rtol=1e-5)
    first.div_(1.5)
    smaller = x[:1]  # another batch size
    den.predict(smaller, 400, {k: v[:1] for k, v in cond.items()}, omega=3.0, cache=cache)
    assert cache.computed == 4


def test_training_never_uses_the_cache():
    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    adapters = den.new_adapters()
    x = torch.randn(2, *den.latent_shape())
    cond = den.encode(["a", "b"])
    cache = ContextCache()
    loss = den.forward(x, torch.tensor([100, 700]), cond, omega=4.0, cache=cache).pow(2).mean()
    loss.backward()
    assert cache.computed == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())


@pytest.mark.parametrize("mode,nfe", [("agd", 20), ("cfg", 40), ("unguided", 20)])
def test_sampling_run_matches_a_step_by_step_loop(den, mode, nfe):
    """sample() (run inputs made once, adapters cached) == the same steps with fresh inputs."""
    from agd_cli.core.sampling import initial_noise, make_scheduler

    cond = den.encode(_prompts(den, True)[:2])
    uncond = den.encode_null(2)
    noise = initial_noise(den.latent_shape(), [0, 1])
    scheduler = den.preset.sampling["scheduler"]
    res = sample(den, cond, uncond, 4.0, noise, mode=mode, steps=10, scheduler=scheduler)
    assert res.nfe == nfe // 2 and res.x.shape == noise.shape
    sched = make_scheduler(scheduler, den.scheduler_config)
    sched.set_timesteps(10)
    x = noise * getattr(sched, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in sched.timesteps:
            if mode == "agd":
                out = den.predict(x, t, cond, omega=4.0, negative=uncond)
            elif mode == "cfg":
                out = den.predict_cfg(x, t, cond, uncond, 4.0)
            else:
                out = den.predict(x, t, cond)
            x = sched.step(out.float(), t, x, return_dict=False)[0]
    assert (res.x - x).abs().max() < 1e-4


VIEW_OPS = {"view", "_unsafe_view", "select", "slice", "transpose", "t", "permute", "expand",
            "unsqueeze", "squeeze", "as_strided", "alias", "detach", "diagonal", "narrow"}


def _kernel_ops(fn, only: str | None = None) -> int:
    """Aten calls that launch work (a kernel on a GPU), views and metadata ops left out; `only`:
    calls of that one op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in VIEW_OPS and (only is None or name == only):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@torch.no_grad()
def test_a_cached_step_costs_each_adapter_few_kernels(den):
    """In a sampling run each step's adapter work per site is a handful of kernels (t's slot
    write, then the attention or the offset row), since every kernel costs a launch on a GPU:
    cross-attention ≤ 5 (folded: one copy for t's key and value, scores, softmax, output: 4),
    offset 1, beyond a few per call for t's row. Told its step by the sampling loop, the cache
    never reads t's value (on a GPU a read waits for the device)."""
    x = torch.randn(2, *den.latent_shape(), generator=torch.Generator().manual_seed(2))
    cond = den.encode(_prompts(den, True)[:2])
    uncond = den.encode_negative(None)
    cache = ContextCache(timesteps=torch.tensor([900, 500]))
    den.predict(x, 900, cond, omega=3.0, negative=uncond, cache=cache)  # the run's first step

    def step():
        cache.next_step = 1  # as sampling.sample says it
        den.predict(x, 500, cond, omega=3.0, negative=uncond, cache=cache)

    adapters = den.adapters
    budget = sum(1 if isinstance(p, PreparedOffset) else 4 if p.folded else 5
                 for p in cache.constant.prepared.values())
    assert len(cache.constant.prepared) == len(adapters.sites)
    adapters.enabled = False
    try:
        base = _kernel_ops(lambda: den.predict(x, 500, cond))
        base_reads = _kernel_ops(lambda: den.predict(x, 500, cond), only="_local_scalar_dense")
    finally:
        adapters.enabled = True
    assert _kernel_ops(step) - base <= budget + 6
    assert _kernel_ops(step, only="_local_scalar_dense") == base_reads  # no value read added
    assert cache.computed == 1
