"""The sampling loop shared by collect, generate and bench, with NFE counting and callbacks;
`sample_images`, the batched noise → pixels step of generate, bench and training previews."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import diffusers
import torch

from agd_cli.core.adapter_hooks import ContextCache
from agd_cli.core.conditions import cond_cat, cond_to
from agd_cli.core.guidance_rules import GuidanceRule, RuleRun
from agd_cli.infra.errors import InputError

if TYPE_CHECKING:
    from agd_cli.core.adapter_hooks import ContextCache

SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler", "unipc": "UniPCMultistepScheduler", "heun": "HeunDiscreteScheduler",
    # flow matching (SD3, Sana): the model predicts a velocity, x_next = x + (σ_next − σ)·v;
    # the preset's scheduler config carries the timestep shift
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}
MODES = ("agd", "cfg", "unguided", "cfg-cutoff")


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler of the named kind from the base model's scheduler config."""
    if name not in SCHEDULER_CLASSES:
        raise InputError(f"unknown scheduler '{name}'", hint=f"choose one of {', '.join(SCHEDULER_CLASSES)}")
    cls = getattr(diffusers, SCHEDULER_CLASSES[name])
    kwargs = {"timestep_spacing": "trailing"} if name in ("euler", "euler-a", "dpm++", "heun") else {}
    return cls.from_config({**config, **kwargs})


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """x_T ~ N(0, I), one CPU generator per sample: the same seed gives the same image
    whatever the batch size or device."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@dataclass
class SampleResult:
    """Final samples (model space, on the model's device) and model evaluations per sample."""

    x: torch.Tensor
    nfe: int


def model_output(denoiser, mode: str, x, t, cond: dict, uncond: dict | None, omega,
                 guided: bool = True, run: RunInputs | None = None) -> torch.Tensor:
    """One step's prediction for a sampling mode: agd (1 NFE), cfg (2), unguided (1). `run`
    holds what `sample` prepares once per run (the cond+uncond pair, the adapters' cache)."""
    if mode == "agd":
        if denoiser.adapters is None:
            raise InputError("mode 'agd' needs adapters", hint="load an adapter file first")
        # CFG's unconditional branch (negative or null) also feeds adapters trained with negatives
        return denoiser.predict(x, t, cond, omega=omega, negative=uncond,
                                cache=run.cache if run else None)
    if mode in ("cfg", "cfg-cutoff") and guided:
        return denoiser.predict_cfg(x, t, cond, uncond, omega, pair=run.pair if run else None,
                                    combine=run.rule.combine if run else None)
    return denoiser.predict(x, t, cond)


@dataclass
class RunInputs:
    """What stays fixed over a sampling run, made once instead of at every step: conditions on
    the model's device and dtype, CFG's cond+uncond batch, the adapters' ContextCache, and the
    two-pass rule's per-run state (its step index, APG's momentum), made fresh for each run."""

    cond: dict
    uncond: dict | None
    pair: dict | None
    cache: ContextCache | None
    rule: RuleRun | None = None

    @classmethod
    def make(cls, denoiser, mode: str, cond: dict, uncond: dict | None,
             timesteps: torch.Tensor | None = None,
             guidance: GuidanceRule | None = None) -> RunInputs:
        cond = cond_to(cond, denoiser.device, denoiser.dtype)
        uncond = None if uncond is None else cond_to(uncond, denoiser.device, denoiser.dtype)
        pair = cond_cat([cond, uncond]) if mode in ("cfg", "cfg-cutoff") else None
        steps = 0 if timesteps is None else len(timesteps)
        return cls(cond, uncond, pair, ContextCache(timesteps) if mode == "agd" else None,
                   (guidance or GuidanceRule()).start(steps))


@torch.no_grad()
def sample(denoiser, cond: dict, uncond: dict | None, omega, noise: torch.Tensor, *,
           mode: str = "agd", steps: int = 50, scheduler: str = "ddim", cutoff: float = 0.5,
           callback: Callable[[dict], None] | None = None,
           guidance: GuidanceRule | None = None) -> SampleResult:
    """Run the reverse process from `noise`; `callback(info)` is called after every step.
    `guidance`: the two-pass rule of modes cfg and cfg-cutoff (None: plain CFG).

    info = {"i", "t", "model_input", "output", "x_next"}: the model input x_t as the model saw
    it, the (guided) model output used by the scheduler, and the next sample.
    """
    if mode not in MODES:
        raise InputError(f"unknown sampling mode '{mode}'", hint=f"one of {', '.join(MODES)}")
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}", hint="try --steps 50")
    sched = make_scheduler(scheduler, denoiser.scheduler_config)
    sched.set_timesteps(steps, device=denoiser.device)
    # flow-matching schedulers start at σ = 1 and take the model input as is
    x = noise.to(denoiser.device, torch.float32) * getattr(sched, "init_noise_sigma", 1.0)
    scale = getattr(sched, "scale_model_input", lambda x, t: x)
    run = RunInputs.make(denoiser, mode, cond, uncond, sched.timesteps, guidance)
    start = denoiser.nfe
    timesteps = sched.timesteps
    for i, t in enumerate(timesteps):
        run.rule.step = i
        model_input = scale(x, t)
        guided = i < int(round(cutoff * len(timesteps))) if mode == "cfg-cutoff" else True
        if run.cache is not None:
            run.cache.next_step = i  # t is timesteps[i]: the cache need not read it
        out = model_output(denoiser, mode, model_input, t, run.cond, run.uncond, omega, guided,
                           run).float()
        x_next = sched.step(out, t, x, return_dict=False)[0]
        if callback is not None:
            callback({"i": i, "t": t, "model_input": model_input, "output": out, "x_next": x_next})
        x = x_next
    return SampleResult(x=x, nfe=denoiser.nfe - start)


def batch_ranges(total: int, size: int) -> list[range]:
    """Indices of consecutive batches of at most `size` items."""
    return [range(i, min(i + size, total)) for i in range(0, total, size)]


def synchronize(device) -> None:
    """Wait for the device's queued work, so that a clock read around it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SampledImages:
    """One call of `sample_images`: the decoded batch and the call's model evaluations and times."""

    images: torch.Tensor    # (N, C, H, W) in [0, 1], on the CPU
    nfe: int                # per sample
    seconds: float          # noise → pixels (sampling loop + decode), device synchronised
    denoise_seconds: float  # the sampling loop alone
    cpu_seconds: float      # process CPU time: steadier than wall time on a shared CPU


def sample_images(denoiser, cond: dict, uncond: dict | None, omega, noise: torch.Tensor, *,
                  mode: str, steps: int, scheduler: str, cutoff: float = 0.5,
                  callback: Callable[[dict], None] | None = None,
                  guidance: GuidanceRule | None = None) -> SampledImages:
    """Sample one batch from `noise` and decode it, timed with the device synchronised: the one
    batched step of `agd generate`, `agd bench` (comparison, --quality) and training previews."""
    synchronize(denoiser.device)
    t0, c0 = time.perf_counter(), time.process_time()
    res = sample(denoiser, cond, uncond, omega, noise, mode=mode, steps=steps,
                 scheduler=scheduler, cutoff=cutoff, callback=callback, guidance=guidance)
    synchronize(denoiser.device)
    t1 = time.perf_counter()
    images = denoiser.decode(res.x)  # CPU tensors: synchronised by the copy
    synchronize(denoiser.device)
    return SampledImages(images, res.nfe, time.perf_counter() - t0, t1 - t0,
                         time.process_time() - c0)
