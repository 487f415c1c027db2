"""SD 3.5, PixArt-Σ and Sana: real presets on the meta device, the tiny ones through the CLI,
flow matching in the sampling loop, and adapters inside the plain diffusers pipelines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from agd_cli.api import agd_guidance, load_agd_adapter, unload_agd_adapter
from agd_cli.config.presets import load_preset
from agd_cli.core.sampling import initial_noise, make_scheduler, sample
from agd_cli.families import count_parameters, load_denoiser, load_with_adapters
from tests.conftest import agd_here

REAL = {"sd35-medium": 24, "sd35-large": 38, "pixart-sigma": 28, "sana-1600m": 20}  # blocks
TINY = ("tiny-sd3", "tiny-pixart", "tiny-sana")
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of fruit"]
STEPS = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


@pytest.mark.parametrize("name", list(REAL))
def test_real_preset_builds_on_meta_with_an_adapter_on_every_block(name):
    counts = count_parameters(load_preset(name))
    assert counts["adapter_sites"] == REAL[name]
    assert 0.01 <= counts["ratio"] <= 0.03, counts


def test_flow_euler_step_is_x_plus_dsigma_times_velocity():
    den = load_denoiser(load_preset("tiny-sd3"), "cpu", text=False)
    sched = make_scheduler("flow-euler", den.scheduler_config)
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    shift = den.scheduler_config["shift"]  # SD3's timestep shift: σ' = sσ / (1 + (s − 1)σ)
    plain = sigmas[:-1] / (shift - (shift - 1) * sigmas[:-1])  # undone: an evenly spaced grid
    assert torch.allclose(plain.diff(), plain.diff()[0].expand(STEPS - 1), atol=1e-5)
    assert (sigmas[1:-1] > plain[1:]).all(), "the shift spends more steps at high noise"
    assert torch.allclose(sched.timesteps, sigmas[:-1] * 1000)
    x, v = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    out = sched.step(v, sched.timesteps[0], x).prev_sample
    assert torch.allclose(out, x + (sigmas[1] - sigmas[0]) * v, atol=1e-6)


def _run(args, capsys) -> dict:
    code, out, err = agd_here(*args, "--json", capsys=capsys)
    assert code == 0, f"agd {' '.join(args)} exited {code}: {err[-2000:]}"
    return json.loads(out)


@pytest.mark.parametrize("name", TINY)
def test_collect_train_generate_bench_through_the_cli(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AGD_NO_PROGRESS", "1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    wd = ["--workdir", str(tmp_path)]
    col = _run([*wd, "collect", "--preset", name, "--prompts", str(prompts), "--steps", str(STEPS),
                "--num-per-prompt", "2"], capsys)
    assert col["trajectories"] == 6 and col["complete"]
    tr = _run([*wd, "train", "--steps", "30", "--checkpoint-every", "30"], capsys)
    assert tr["steps"] == 30 and math.isfinite(tr["val_loss"]) and math.isfinite(tr["train_loss"])
    gen = _run([*wd, "generate", "a red fox", "-w", "4", "--steps", str(STEPS), "-n", "1"], capsys)
    assert gen["nfe"] == STEPS and gen["mode"] == "agd" and len(gen["images"]) == 1
    b = _run([*wd, "bench", "--compare-cfg", "--num-prompts", "1", "--steps", str(STEPS)], capsys)
    m = b["methods"]
    assert (m["agd"]["nfe"], m["cfg"]["nfe"]) == (STEPS, 2 * STEPS)

    den = load_with_adapters(tmp_path / name / "adapter.safetensors", "cpu")
    x = torch.randn(1, *den.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = den.encode(["a red fox"])
    with torch.no_grad():
        low, high = den.predict(x, 500.0, cond, omega=2.0), den.predict(x, 500.0, cond, omega=6.0)
    assert (low - high).abs().max() > 1e-5, "after training the output depends on ω"


# --- the library API inside the plain diffusers pipelines -----------------------------------
def _pipeline(name: str):
    """The family's own diffusers pipeline from the tiny preset's components (no agd inside)."""
    import diffusers

    den = load_denoiser(load_preset(name), "cpu")
    sched_cls = {"flow-euler": "FlowMatchEulerDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler"}
    sched = getattr(diffusers, sched_cls[den.preset.sampling["scheduler"]]).from_config(den.scheduler_config)
    pipe = getattr(diffusers, den.pipeline_class)(transformer=den.model, vae=den.vae_model(),
                                                  scheduler=sched, **den.text)
    pipe.set_progress_bar_config(disable=True)
    return pipe, den


def _call_kwargs(den, noise, steps: int = STEPS) -> dict:
    """The pipeline call's arguments for final latents from `noise`, at the preset's size."""
    res = den.preset.resolution
    kw = {"height": res, "width": res, "num_inference_steps": steps, "latents": noise.clone(),
          "output_type": "latent", "max_sequence_length": den.max_sequence_length}
    if den.family != "sd3":
        kw["use_resolution_binning"] = False
    return kw


def _adapter_file(name: str, folder: Path) -> Path:
    """A fresh (untrained) adapter file for the tiny preset `name`."""
    path = folder / "adapter.safetensors"
    trained = load_denoiser(load_preset(name), "cpu", text=False)
    trained.new_adapters().save(path, trained.adapter_metadata(train_steps=0))
    return path


def _call(pipe, den, noise, omega=None):
    """Final latents at guidance_scale=1 (one transformer pass per step); ω as the family takes it."""
    kw = {**_call_kwargs(den, noise), "guidance_scale": 1.0}
    if omega is None or den.family == "pixart":  # PixArt's pipeline passes no attention kwargs
        with agd_guidance(pipe, omega) if omega is not None else torch.no_grad():
            return pipe("a red fox", **kw).images
    key = den.omega_kwarg  # joint_attention_kwargs (SD3) / attention_kwargs (Sana)
    return pipe("a red fox", **kw, **{key: {"agd_omega": omega}}).images


@pytest.mark.parametrize("name", TINY)
def test_pipeline_with_adapter_at_guidance_one_runs_one_pass_per_step(name, tmp_path):
    pipe, den = _pipeline(name)
    path = _adapter_file(name, tmp_path)
    noise = initial_noise(den.latent_shape(), [0])
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    base = _call(pipe, den, noise)
    load_agd_adapter(pipe, path)
    calls.clear()
    guided = _call(pipe, den, noise, omega=4.0)
    assert len(calls) == STEPS, "NFE = steps: no second CFG pass"
    assert not torch.allclose(guided, base), "the adapters guide"
    unload_agd_adapter(pipe)
    assert torch.equal(_call(pipe, den, noise), base), "unloading gives the exact base back"
    hook.remove()
    if den.preset.sampling["scheduler"] == "flow-euler":  # same scheduler: agd's own loop agrees
        ours = load_with_adapters(path, "cpu")
        cond = ours.encode(["a red fox"])
        x = sample(ours, cond, None, 4.0, noise, mode="agd", steps=STEPS, scheduler="flow-euler").x
        assert torch.allclose(x, guided, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_omega_with_the_pipelines_own_cfg_warns_in_every_family(name, tmp_path):
    """guidance_scale > 1 with ω guides twice: warned for each family, PixArt-Σ included (its
    pipeline keeps the CFG switch as a local of __call__, not a property); at 1.0 no warning."""
    import contextlib
    import warnings

    pipe, den = _pipeline(name)
    load_agd_adapter(pipe, _adapter_file(name, tmp_path))
    kw = _call_kwargs(den, initial_noise(den.latent_shape(), [0]), steps=1)

    def guided_twice(scale: float, omega: float | None) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with agd_guidance(pipe, omega) if omega else contextlib.nullcontext():
                pipe("a red fox", guidance_scale=scale, **kw)
        return [str(w.message) for w in seen if "guided twice" in str(w.message)]

    assert "(guidance_scale=2.5)" in " ".join(guided_twice(2.5, 4.0))
    assert guided_twice(1.0, 4.0) == []  # one pass: agd guides alone
    assert guided_twice(2.5, None) == []  # the pipeline's own CFG without ω
