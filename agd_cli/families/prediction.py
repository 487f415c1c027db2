"""The prediction side of a denoiser: the small contract the sampling loop, training and bench
call (in the spirit of k-diffusion's external.py wrappers): `predict(x, t, cond, ω)` at one pass
with the adapters, `predict_cfg(x, t, cond, uncond, ω)` at two passes without them.

A family supplies `model`, `device`, `dtype`, `adapters`, `omega_kwarg`, `_model_kwargs(cond)`
and `adapter_cond`; `nfe` counts model evaluations per sample.
"""

from __future__ import annotations

import contextlib

import torch

from agd_cli.core.adapter_hooks import ContextCache
from agd_cli.core.compiling import CompiledModel
from agd_cli.core.conditions import cond_cat, cond_to
from agd_cli.core.guidance import cfg_combine


class Predictor:
    """ε (or v) for a batch: one pass with the adapters fed ω, or real CFG at two passes."""

    nfe = 0
    compiled = None  # the model call through torch.compile (`compile`), else None: eager

    def forward(self, x: torch.Tensor, t, cond: dict, omega=None,
                negative: dict | None = None, cache: ContextCache | None = None) -> torch.Tensor:
        """One batched model call; with `omega` the attached adapters are active. `negative` is
        CFG's unconditional condition (a negative prompt, or the null one) for adapters trained
        with negatives; others ignore it. `cache` (one per sampling run) lets the adapters reuse
        their work on the inputs that stay fixed over the run."""
        self.place_model()
        kwargs = self._model_kwargs(cond_to(cond, self.device, self.dtype))
        if omega is not None:
            kwargs[self.omega_kwarg] = {"agd_omega": omega}
            if cache is not None:
                kwargs[self.omega_kwarg]["agd_cache"] = cache
            if negative is not None and self.adapters is not None and self.adapters.wants_negative:
                kwargs[self.omega_kwarg]["agd_negative"] = self.adapter_cond(negative, x)
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if omega is not None and self.compiled is not None:
            kwargs[self.omega_kwarg] = self._graph_inputs(x, t, kwargs, kwargs[self.omega_kwarg])
        model = self.model if self.compiled is None else self.compiled
        out = model(x.to(self.device, self.dtype), timestep=t, return_dict=False, **kwargs)[0]
        return out[:, : self.in_channels]  # learned-sigma models: keep the ε/v channels

    def predict(self, x, t, cond: dict, omega=None, negative: dict | None = None,
                cache: ContextCache | None = None) -> torch.Tensor:
        """Single-pass prediction (1 NFE); adapters active when `omega` is given."""
        self.nfe += 1
        return self.forward(x, t, cond, omega, negative, cache)

    def predict_cfg(self, x, t, cond: dict, uncond: dict, omega, pair: dict | None = None,
                    combine=None) -> torch.Tensor:
        """CFG or a two-pass rule's `combine` (2 NFE): cond and uncond in one batched call,
        adapters off. `pair`: cond_cat([cond, uncond]) when the caller made it once per run."""
        self.nfe += 2
        b = x.shape[0]
        ctx = self.adapters.disabled() if self.adapters is not None else contextlib.nullcontext()
        with ctx:
            out = self.forward(torch.cat([x, x]), torch.as_tensor(t).expand(2 * b)
                               if torch.as_tensor(t).ndim else t,
                               cond_cat([cond, uncond]) if pair is None else pair)
        return (combine or cfg_combine)(out[b:], out[:b], omega)

    def compile(self, backend=None) -> None:
        """Run the model (with its adapters) through torch.compile from now on (`--compile`);
        `backend`: another torch.compile backend than inductor (tests). Attach the adapters
        first: the compiled call does not watch the model's modules (`compiled = None` is eager
        again)."""
        self.compiled = CompiledModel(self.model, self.device, backend)

    def _graph_inputs(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, agd: dict) -> dict:
        """The adapters' inputs for a compiled call, tensors only (a Python value in a graph's
        inputs is a constant of the graph: a new ω or step would compile a new graph). With a
        run's cache, its part without t, made eagerly once per run, and the step's row of its
        table; else ω as a tensor."""
        omega, cache = agd.pop("agd_omega"), agd.pop("agd_cache", None)
        if cache is None or self.adapters is None or not self.adapters.enabled:
            return {**agd, "agd_omega": torch.as_tensor(omega, dtype=torch.float32,
                                                        device=self.device).view(-1)}
        batch, cond = self.extract_adapter_cond({"sample": x, "hidden_states": x, **kwargs})
        constant = self.adapters.run_constant(cache, omega, cond, batch, self.device,
                                              agd.get("agd_negative"))
        step = cache.step_of(t)
        if step is None or constant.table is None:
            return {"agd_constant": constant}
        return {"agd_constant": constant,
                "agd_step": torch.full((1,), step, dtype=torch.long, device=self.device)}
