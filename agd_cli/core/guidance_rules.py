"""The teacher's guidance rule: plain CFG or one of the two-pass rules that refine it, each a
function of (uncond prediction, cond prediction, ω, step context), next to `cfg_combine`.

All of them cost two passes per step, like CFG; `agd collect --guidance RULE` records the rule's
output as the adapters' target, `agd generate/bench --guidance RULE` run it as the teacher. The
rules work on the model's own output (ε or v, as its scheduler's prediction_type says, for the
UNet/DiT families: the shipped mnist teacher predicts v; the velocity for the flow-matching ones,
SD3 and Sana), as diffusers' guiders do. Where diffusers ships the rule as a
function of a prediction pair it is called here (APG, CFG-Zero*'s scale, CFG-rescale).

The step context is the step index and the number of steps; no rule needs σ: the interval is
given, as diffusers' guiders give it, as fractions of the sampling steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale
from diffusers.guiders.guider_utils import rescale_noise_cfg

from agd_cli.config import checks
from agd_cli.config.vocab import GUIDANCE_RULES
from agd_cli.core.guidance import as_omega, cfg_combine, per_sample
from agd_cli.infra.errors import InputError

# rule -> its parameters: (key, default, low, high, low_open, high_open, integer, what it does)
PARAMETERS: dict[str, tuple[tuple, ...]] = {
    "cfg": (),
    "interval": (
        ("interval_start", 0.2, 0.0, 1.0, False, False, False,
         "first guided step, as a fraction of the steps (0: the noisiest)"),
        ("interval_stop", 0.8, 0.0, 1.0, False, False, False,
         "guidance stops at this fraction of the steps (1: to the end)"),
        ("interval_ramp", 0.0, 0.0, 1.0, False, False, False,
         "soft edges: ω ramps over this fraction of the steps before start and after stop "
         "(0: a hard switch)")),
    "apg": (
        ("apg_eta", 0.0, 0.0, 1.0, False, False, False,
         "weight of the update's part parallel to the cond prediction"),
        ("apg_momentum", -0.5, -1.0, 1.0, True, True, False,
         "momentum β of the update's running average (0: none)"),
        ("apg_norm_threshold", 0.0, 0.0, float("inf"), False, True, False,
         "the update's norm is clipped to this (0: no clipping)")),
    "cfg-zero-star": (
        ("zero_init_steps", 1, 0, 1000, False, False, True,
         "first steps whose prediction is zeroed"),),
    "rescale": (
        ("rescale_phi", 0.7, 0.0, 1.0, False, False, False,
         "blend of the std-matched and the plain CFG output (1: fully matched)"),),
}
PARAMETER_KEYS = tuple(p[0] for params in PARAMETERS.values() for p in params)
# parameters added after collections recorded their rule: left out of the record at their
# default, so an older collection's record (and its resume check) reads the same
LATER = {"interval_ramp": 0.0}


def flag_of(key: str) -> str:
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class GuidanceRule:
    """A rule and its parameter values (only its own), checked."""

    name: str = "cfg"
    params: dict = field(default_factory=dict)

    @classmethod
    def resolve(cls, name: str | None, flags: dict | None = None,
                preset_values: dict | None = None) -> GuidanceRule:
        """The rule from its flags (None: not given) over the preset's [collect] keys, over the
        defaults; a bad name or a value out of range is an InputError naming it."""
        flags, preset_values = flags or {}, preset_values or {}
        name = checks.choice(preset_values.get("guidance", "cfg") if name is None else name,
                             GUIDANCE_RULES, "guidance rule")
        own = {p[0] for p in PARAMETERS[name]}
        stray = [k for k, v in flags.items() if v is not None and k not in own]
        if stray:
            raise InputError(f"{flag_of(stray[0])} is not a parameter of guidance rule '{name}'",
                             hint="drop it, or choose the rule it belongs to with --guidance")
        params = {}
        for key, default, lo, hi, lo_open, hi_open, integer, _ in PARAMETERS[name]:
            value = flags.get(key)
            value = preset_values.get(key, default) if value is None else value
            if integer:
                params[key] = checks.integer(flag_of(key), value, int(lo))
            else:
                params[key] = checks.number(flag_of(key), value, lo, hi, lo_open, hi_open,
                                            example=f"{flag_of(key)} {default}")
        if name == "interval" and params["interval_start"] >= params["interval_stop"]:
            raise InputError(f"--interval-start {params['interval_start']:g} is not below "
                             f"--interval-stop {params['interval_stop']:g}",
                             hint="e.g. --interval-start 0.2 --interval-stop 0.8")
        return cls(name, params)

    @classmethod
    def at_inference(cls, name: str | None, flags: dict | None, recorded: GuidanceRule,
                     preset_values: dict | None = None) -> GuidanceRule:
        """generate/bench's two-pass teacher: --guidance and its flags, else the rule the
        adapter file recorded; a rule's unset parameters are the recorded ones where it is that
        rule, else the preset's [collect] values, else the defaults."""
        same = name is None or name == recorded.name
        return cls.resolve(name or recorded.name, flags,
                           {**(preset_values or {}), **(recorded.params if same else {})})

    @classmethod
    def from_record(cls, record: dict | None) -> GuidanceRule:
        """The rule a manifest or an adapter file recorded; none recorded (made before rules
        existed) is plain CFG."""
        if not record:
            return cls()
        return cls.resolve(record.get("name", "cfg"), {k: v for k, v in record.items()
                                                       if k != "name"})

    def record(self) -> dict:
        return {"name": self.name, **{k: v for k, v in self.params.items()
                                      if not (k in LATER and v == LATER[k])}}

    def label(self) -> str:
        """'apg (apg_eta 0, apg_momentum -0.5, …)'."""
        inner = ", ".join(f"{k} {v:g}" for k, v in self.record().items() if k != "name")
        return f"{self.name} ({inner})" if inner else self.name

    def start(self, steps: int) -> RuleRun:
        """The per-run state of a sampling loop of `steps` steps."""
        return RuleRun(self, steps)


class RuleRun:
    """One sampling run of a rule: the loop sets `step` before each step; APG's momentum buffer
    lives here, one running average per sample, created fresh for every run."""

    def __init__(self, rule: GuidanceRule, steps: int):
        self.rule, self.steps, self.step = rule, steps, 0
        momentum = rule.params.get("apg_momentum", 0.0)
        self.buffer = MomentumBuffer(momentum) if rule.name == "apg" and momentum else None

    def combine(self, uncond: torch.Tensor, cond: torch.Tensor, omega) -> torch.Tensor:
        p, name = self.rule.params, self.rule.name
        if name == "interval":
            weight = interval_weight(self.step, self.steps, p["interval_start"],
                                     p["interval_stop"], p["interval_ramp"])
            return interval_combine(uncond, cond, omega, weight)
        if name == "apg":
            return apg_combine(uncond, cond, omega, self.buffer, p["apg_eta"],
                               p["apg_norm_threshold"])
        if name == "cfg-zero-star":
            return zero_star_combine(uncond, cond, omega, self.step, p["zero_init_steps"])
        if name == "rescale":
            return rescale_combine(uncond, cond, omega, p["rescale_phi"])
        return cfg_combine(uncond, cond, omega)


def _omega(omega, cond: torch.Tensor) -> torch.Tensor:
    return per_sample(as_omega(omega, cond.shape[0], cond).to(cond.dtype), cond)


def interval_weight(step: int, steps: int, start: float, stop: float, ramp: float = 0.0) -> float:
    """How much of CFG's update step `step` of `steps` gets: 1 on the steps
    int(start·N) ≤ i < int(stop·N) (diffusers' ClassifierFreeGuidance start/stop), 0 elsewhere;
    with a ramp of K = round(ramp·N) steps, rising linearly over the K steps before the interval
    (1/(K+1), …, K/(K+1)) and falling the same way over the K steps after it."""
    first, end = int(start * steps), int(stop * steps)
    if first <= step < end:
        return 1.0
    k = round(ramp * steps)
    if first - k <= step < first:
        return (step - first + k + 1) / (k + 1)
    if end <= step < end + k:
        return 1.0 - (step - end + 1) / (k + 1)
    return 0.0


def interval_combine(uncond, cond, omega, weight: float) -> torch.Tensor:
    """Guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval
    improves sample and distribution quality in diffusion models"): CFG where `weight`
    (interval_weight) is 1, the conditional prediction where it is 0, and on a ramp CFG at
    1 + weight·(ω − 1), a share of CFG's update c + (ω − 1)(c − u)."""
    if weight >= 1.0:
        return cfg_combine(uncond, cond, omega)
    if weight <= 0.0:
        return cond
    return cfg_combine(uncond, cond, 1.0 + weight * (as_omega(omega, cond.shape[0], cond) - 1.0))


def apg_combine(uncond, cond, omega, buffer: MomentumBuffer | None, eta: float,
                norm_threshold: float) -> torch.Tensor:
    """APG (Sadat et al., ICLR 2025, "Eliminating oversaturation and artifacts of high guidance
    scales in diffusion models"): the update cond − uncond, averaged with momentum, clipped to
    `norm_threshold`, its part parallel to cond scaled by η; diffusers' normalized_guidance."""
    return normalized_guidance(cond, uncond, _omega(omega, cond), buffer, eta, norm_threshold)


def zero_star_combine(uncond, cond, omega, step: int, zero_init_steps: int) -> torch.Tensor:
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: improved classifier-free guidance for flow
    matching models"): zero output on the first `zero_init_steps` steps, then CFG with the
    unconditional prediction scaled by s* = ⟨c, u⟩/‖u‖² per sample (diffusers' scale)."""
    if step < zero_init_steps:
        return torch.zeros_like(cond)
    alpha = cfg_zero_star_scale(cond.flatten(1), uncond.flatten(1))
    alpha = alpha.view(-1, *(1,) * (cond.dim() - 1))
    return cfg_combine(uncond * alpha, cond, omega)


def rescale_combine(uncond, cond, omega, phi: float) -> torch.Tensor:
    """CFG-rescale (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
    flawed", §3.4): CFG's output rescaled to the conditional prediction's per-sample std,
    blended by φ; diffusers' rescale_noise_cfg."""
    return rescale_noise_cfg(cfg_combine(uncond, cond, omega), cond, phi)
