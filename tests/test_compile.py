"""torch.compile of adapter-equipped models (issue 32): one graph without a graph break from
agd's code, no new graph when ω, the prompt or the negative change, compiled output equal to
eager; `--compile` in generate and bench.

Dynamo's tracing is what these tests check; most run the traced graph with the `eager` backend
(seconds). One test compiles with inductor (C++ kernels on the CPU), as `--compile` does."""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from agd_cli.config.presets import AdapterConfig, load_preset
from agd_cli.core.sampling import initial_noise, sample
from agd_cli.families import Denoiser, load_denoiser
from agd_cli.infra import hardware
from tests.test_generate import agd

# mnist: folded cross-attention adapters (the shipped teacher); tiny-sd: plain ones, trained
# with negatives; tiny-sdxl: pooled condition; tiny-dit: offset adapters; tiny-sd3: joint attention
PRESETS = ["mnist", "tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-sd3"]
OMEGAS = (2.0, 4.0, 6.5)


def adapted(name: str) -> Denoiser:
    """The preset's base with adapters of random weights (zero-initialised outputs would hide
    a wrong path); tiny-sd's read a negative too."""
    den = load_denoiser(load_preset(name), "cpu")
    cfg = den.preset.adapter
    adapters = den.new_adapters(AdapterConfig(**{**cfg.to_dict(), "negatives": True})
                                if name == "tiny-sd" else cfg)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    adapters.requires_grad_(False).eval()
    return den


@pytest.fixture(scope="module", params=PRESETS)
def den(request):
    torch._dynamo.reset()
    return adapted(request.param)


def prompts(den: Denoiser) -> list:
    return [[3], [5], [7]] if den.family == "dit" else [["a red fox"], ["two"], ["dusk"]]


def run(den: Denoiser, prompt, omega, negative: dict, steps: int = 3) -> torch.Tensor:
    """One agd sampling run from seed 0, as `agd generate` makes it."""
    noise = initial_noise(den.latent_shape(), [0])
    return sample(den, den.encode(prompt), negative, omega, noise, mode="agd", steps=steps,
                  scheduler=den.preset.sampling["scheduler"]).x


class Recorder:
    """Stands in for the compiled model: keeps the arguments of the last call."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return self.model(*args, **kwargs)


@torch.no_grad()
def test_no_graph_break_in_a_compiled_run_or_a_library_call(den):
    """What `--compile` compiles (a sampling step, the run's constant part as tensors) and what a
    library user compiles (the model called with ω as a tensor): one graph each, no break."""
    den.compiled = recorder = Recorder(den.model)
    try:
        run(den, prompts(den)[0], 4.0, den.encode_negative(None), steps=2)
    finally:
        den.compiled = None
    agd = recorder.kwargs[den.omega_kwarg]
    # ω, prompt and negative reach the graph as tensors: the run's constant part and the step
    assert set(agd) == {"agd_constant", "agd_step"} and agd["agd_step"].dtype == torch.long
    call = lambda *args, **kwargs: den.model(*args, **kwargs)  # noqa: E731
    step = torch._dynamo.explain(call)(*recorder.args, **recorder.kwargs)
    library = dict(recorder.kwargs)
    library[den.omega_kwarg] = {"agd_omega": torch.tensor([4.0])}
    if den.adapters.wants_negative:
        negative = den.adapter_cond(den.encode_negative(None), recorder.args[0])
        library[den.omega_kwarg]["agd_negative"] = negative
    plain = torch._dynamo.explain(call)(*recorder.args, **library)
    for got in (step, plain):
        assert (got.graph_count, got.graph_break_count) == (1, 0), got.break_reasons


@torch.no_grad()
def test_three_omegas_prompts_and_negatives_compile_once(den):
    """Three runs, each with another ω, prompt and (tiny-sd) negative: one graph, compiled once,
    and the same images as eager sampling."""
    negatives = ([den.encode_negative(n) for n in ("blurry", "a cat", None)]
                 if den.adapters.wants_negative else [den.encode_negative(None)] * 3)
    cases = list(zip(prompts(den), OMEGAS, negatives, strict=True))
    eager = [run(den, *case) for case in cases]
    counter = CompileCounter()
    den.compile(backend=counter)
    try:
        compiled = [run(den, *case) for case in cases]
    finally:
        den.compiled = None
    assert counter.frame_count == 1 and den.compiled is None
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_library_compile_after_load_takes_new_omegas_without_compiling(tmp_path):
    """`torch.compile(pipe.unet)` after `load_agd_adapter` (an adapter trained with negatives,
    so the negative-prompt feed runs too): ω given as a tensor, no graph break, a new value
    compiles nothing (the adapters' pre-hook and the UNet are one frame each), images as eager."""
    from torch._dynamo.utils import counters

    from agd_cli.api import load_agd_adapter
    from tests.test_api import tiny_sd_pipeline

    path = tmp_path / "adapter.safetensors"
    den = adapted("tiny-sd")
    den.adapters.save(path, den.adapter_metadata(train_steps=0))
    pipe, shape = tiny_sd_pipeline()
    load_agd_adapter(pipe, path)
    noise = initial_noise(shape, [0])

    def images(w):
        return pipe("a red fox", num_inference_steps=2, guidance_scale=1.0, latents=noise.clone(),
                    output_type="latent", negative_prompt="blurry",
                    cross_attention_kwargs={"agd_omega": torch.tensor([w])}).images

    eager = [images(w) for w in OMEGAS]
    torch._dynamo.reset()
    breaks = sum(counters["graph_break"].values())
    counter = CompileCounter()
    pipe.unet = torch.compile(pipe.unet, backend=counter)
    compiled, frames = [], []
    for w in OMEGAS:
        compiled.append(images(w))
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1] <= 2 and sum(counters["graph_break"].values()) == breaks
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(eager[0], eager[-1])


@pytest.mark.slow
@torch.no_grad()
def test_inductor_output_equals_eager():
    """`--compile` on the CPU: inductor's C++ kernels, the same images within 1e-4, the graph
    compiled once for two runs with other ω and prompts."""
    den = adapted("tiny-sd")
    negative = den.encode_negative(None)
    eager = [run(den, p, w, negative) for p, w in zip(prompts(den)[:2], OMEGAS, strict=False)]
    den.compile()
    compiled = [run(den, p, w, negative) for p, w in zip(prompts(den)[:2], OMEGAS, strict=False)]
    assert den.compiled.graphs == 1 and den.compiled.mode == "default"
    assert den.compiled.warmup_seconds > 0
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# --- the commands -------------------------------------------------------------------------------
@pytest.fixture
def eager_backend(monkeypatch):
    """`--compile` through dynamo with the eager backend: the path of inductor in seconds."""
    original = Denoiser.compile
    monkeypatch.setattr(Denoiser, "compile", lambda self, backend=None: original(self, "eager"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    den.new_adapters().save(root / "tiny-sd" / "adapter.safetensors",
                            den.adapter_metadata(train_steps=0))
    return root




def test_generate_compile_makes_the_same_image(workdir, tmp_path, capsys, eager_backend):
    import numpy as np
    from PIL import Image

    common = ("generate", "a red fox", "--workdir", str(workdir), "--steps", "3", "--json")
    code, out, err = agd(capsys, *common, "--out", str(tmp_path / "eager.png"))
    assert code == 0, err
    code, out, err = agd(capsys, *common, "--compile", "--out", str(tmp_path / "compiled.png"))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["compile"] is True and summary["compile_seconds"] > 0
    pixels = [np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16)
              for n in ("eager", "compiled")]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # 8-bit rounding of equal images


def test_bench_compile_reports_eager_and_compiled_side_by_side(workdir, eager_backend):
    from agd_cli.bench.run import run_bench

    r = run_bench(preset="tiny-sd", compile=True, throughput_batch=3, workdir=str(workdir),
                  threads=1, steps=3, n=1, show_table=False)
    compiled = r["compiled"]
    assert compiled["graphs"] == 6  # agd, CFG's pair and unguided, at batch 1 and 3
    for part in (compiled["latency"], compiled["throughput"]):
        assert {m: e["nfe"] for m, e in part["methods"].items()} == {"agd": 3, "cfg": 6,
                                                                     "unguided": 3}
        assert all(e["warmup_seconds"] > 0 for e in part["methods"].values())
        assert part["cfg_pair_over_one_row"] == pytest.approx(
            part["methods"]["cfg"]["seconds_per_image"]
            / part["methods"]["unguided"]["seconds_per_image"])
    verdict = r["speed_verdict"]
    assert [(v["variant"], v["batch_size"]) for v in verdict["rows"]] == [
        ("eager", 1), ("eager", 3), ("compiled", 1), ("compiled", 3)]
    assert verdict["sentence"].startswith("At batch 1 (compiled) this CPU is ")
    assert "bound for tiny-sd" in verdict["sentence"]
    on_disk = json.loads((workdir / "tiny-sd" / "bench" / "compare-cfg.json").read_text())
    assert on_disk["speed_verdict"] == verdict


def test_the_verdict_names_what_bounds_the_device():
    from agd_cli.bench.report import speed_verdict

    def part(batch, cfg, agd, unguided=1.0):
        ms = {"cfg": cfg, "agd": agd, "unguided": unguided}
        return {"batch_size": batch, "ratio_agd_to_cfg": agd / cfg,
                "ratio_agd_to_unguided": agd / unguided, "cfg_pair_over_one_row": cfg / unguided,
                "methods": {m: {"seconds_per_image": s} for m, s in ms.items()}}

    # the H200's SDXL at batch 1 (pair 1.03 ×) and a busy device (pair 1.95 ×)
    idle = speed_verdict({"latency": part(1, 1.03, 1.0)}, "cuda", "sdxl")
    assert idle["rows"][0]["bound"] == "latency" and "latency-bound" in idle["sentence"]
    busy = speed_verdict({"latency": part(1, 1.95, 1.0), "throughput": part(16, 1.98, 1.0)},
                         "cuda", "sd15")
    assert [r["bound"] for r in busy["rows"]] == ["compute", "compute"]
    assert "halves" in busy["sentence"] and "agd/CFG 0.51" in busy["sentence"]
    assert "partly" in speed_verdict({"latency": part(1, 1.6, 1.0)}, "cuda", "dit")["sentence"]


@pytest.mark.parametrize("args, message", [
    (("generate", "a fox", "--compile", "--offload"), "--compile and --offload"),
    (("bench", "--compare-cfg", "--compile"), "--compile on cpu needs a C++ compiler"),
    (("generate", "a fox", "--compile"), "--compile on cpu needs a C++ compiler"),
])
def test_compile_refusals_exit_2_before_loading(workdir, capsys, args, message):
    with hardware.assume(compiler_missing="a C++ compiler (g++, clang++ or MSVC cl)"):
        code, _, err = agd(capsys, *args, "--workdir", str(workdir), "--device", "cpu")
    assert code == 2 and message in err, err


def test_the_presets_compile_key_is_the_default_and_a_flag_overrides_it(tmp_path):
    import dataclasses

    from agd_cli.config.presets import from_dict
    from agd_cli.generate.run import GenerateFlags, plan_compile
    from agd_cli.infra.errors import InputError

    preset = load_preset("tiny-sd")
    assert preset.sampling["compile"] is False  # off unless a preset or --compile says so
    on = dataclasses.replace(preset, sampling={**preset.sampling, "compile": True})
    with hardware.assume(compiler_missing=None):
        assert plan_compile(GenerateFlags(), on) is True
        assert plan_compile(GenerateFlags(compile=False), on) is False
        assert plan_compile(GenerateFlags(compile=True), preset) is True
    raw = {**preset.raw, "sampling": {**preset.raw["sampling"], "compile": "yes"}}
    with pytest.raises(InputError, match="'sampling.compile': 'yes'"):
        from_dict(raw)
