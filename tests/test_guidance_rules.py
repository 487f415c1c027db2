"""The teacher's two-pass rules (agd_cli.core.guidance_rules): each equals diffusers' guider (or
the paper's formula) on random predictions; the sampling loop runs them at 2 NFE per step on the
flow-matching tiny-sd3 (on the velocity); collect records the rule, train carries it into the
adapter file, generate and bench run it as the teacher; bad names and values exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
)
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

from agd_cli.collect.run import run_collect
from agd_cli.collect.store import TrajectoryStore
from agd_cli.config.presets import PRESET_DIR, load_preset
from agd_cli.core.adapter_file import AdapterFile
from agd_cli.core.guidance import cfg_combine
from agd_cli.core.guidance_rules import GuidanceRule, interval_weight
from agd_cli.core.sampling import initial_noise, sample
from agd_cli.families import load_denoiser
from agd_cli.train.data import TrajectoryData
from tests.conftest import agd_here as agd
from tests.test_collect import quiet, write_prompts  # noqa: F401 - quiet: autouse

STEPS = 10

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test
RULES = {"interval": {"interval_start": 0.2, "interval_stop": 0.7},
         "apg": {"apg_eta": 0.3, "apg_momentum": -0.5, "apg_norm_threshold": 4.0},
         "cfg-zero-star": {"zero_init_steps": 2}, "rescale": {"rescale_phi": 0.6}}


def _pair(seed: int, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _diffusers_guider(name: str, omega: float):
    p = RULES[name]
    if name == "interval":
        return ClassifierFreeGuidance(omega, start=p["interval_start"], stop=p["interval_stop"])
    if name == "apg":
        g = AdaptiveProjectedGuidance(omega, p["apg_momentum"], p["apg_norm_threshold"],
                                      eta=p["apg_eta"])
        g.momentum_buffer = MomentumBuffer(p["apg_momentum"])  # what its prepare_inputs makes
        return g
    if name == "cfg-zero-star":
        return ClassifierFreeZeroStarGuidance(omega, zero_init_steps=p["zero_init_steps"])
    return ClassifierFreeGuidance(omega, guidance_rescale=p["rescale_phi"])


@pytest.mark.parametrize("name", list(RULES))
def test_each_rule_equals_the_diffusers_guider_over_a_run(name):
    omega = 5.0
    run = GuidanceRule.resolve(name, RULES[name]).start(STEPS)
    guider = _diffusers_guider(name, omega)
    for step in range(STEPS):
        cond, uncond = _pair(step)
        guider.set_state(step, STEPS, None)
        run.step = step
        want = guider.forward(cond, uncond).pred
        got = run.combine(uncond, cond, omega)
        assert torch.allclose(got, want, atol=1e-5), (name, step)


def test_interval_is_cfg_inside_and_the_conditional_prediction_outside():
    run = GuidanceRule.resolve("interval", RULES["interval"]).start(STEPS)
    inside = []
    for step in range(STEPS):
        cond, uncond = _pair(step)
        run.step = step
        got = run.combine(uncond, cond, 4.0)
        if torch.equal(got, cond):
            inside.append(False)
        else:
            assert torch.allclose(got, cfg_combine(uncond, cond, 4.0))
            inside.append(True)
    assert inside == [False, False, True, True, True, True, True, False, False, False]


def test_interval_ramp_is_a_share_of_cfgs_update_before_start_and_after_stop():
    """ramp 0.2 of 10 steps (K 2) around [2, 7): weights 1/3, 2/3 before, 2/3, 1/3 after; the
    output is CFG at 1 + weight·(ω − 1), per sample ω included."""
    params = {**RULES["interval"], "interval_ramp": 0.2}
    rule = GuidanceRule.resolve("interval", params)
    run, omega = rule.start(STEPS), torch.tensor([2.0, 4.0, 9.0])
    want = [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0]
    for step, weight in enumerate(want):
        cond, uncond = _pair(step)
        run.step = step
        got = run.combine(uncond, cond, omega)
        expect = cond + weight * (omega - 1).view(-1, 1, 1, 1) * (cond - uncond)
        assert torch.allclose(got, expect, atol=1e-5), step
    # ramp 0 is the hard switch, and an older record (no ramp key) reads as ramp 0
    assert GuidanceRule.resolve("interval", RULES["interval"]).record() == {
        "name": "interval", **RULES["interval"]}
    assert GuidanceRule.from_record({"name": "interval", **RULES["interval"]}).params[
        "interval_ramp"] == 0.0
    assert rule.record()["interval_ramp"] == 0.2 and "interval_ramp 0.2" in rule.label()


def test_mnist_interval_preset_teaches_the_ramped_interval():
    """The shipped recipe (docs/guidance-rules.md): interval 0.2–1.0 with ω ramped in over
    steps 0–3 of 20, 64 trajectories per prompt, hidden 128, 900 steps."""
    preset = load_preset("mnist-interval")
    rule = GuidanceRule.resolve(None, {}, preset.collect)
    assert rule.record() == {"name": "interval", "interval_start": 0.2, "interval_stop": 1.0,
                             "interval_ramp": 0.2}
    weights = [interval_weight(i, 20, 0.2, 1.0, 0.2) for i in range(20)]
    assert weights[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and min(weights[4:]) == 1.0
    assert preset.collect["num_per_prompt"] == 64 and preset.adapter.hidden_dim == 128
    assert preset.train["steps"] == 900 and preset.base_model == load_preset("mnist").base_model


def test_apg_without_momentum_and_clipping_is_the_papers_projection():
    """Sadat et al. eq. 7–8 with β = 0, no rescaling: u + ω(Δ⊥ + ηΔ∥), Δ = c − u, per sample."""
    cond, uncond = _pair(1)
    eta, omega = 0.25, torch.tensor([2.0, 5.0, 9.0])
    run = GuidanceRule.resolve("apg", {"apg_eta": eta, "apg_momentum": 0.0}).start(STEPS)
    got = run.combine(uncond, cond, omega)
    for b in range(3):
        d, c = (cond[b] - uncond[b]).flatten(), cond[b].flatten()
        parallel = (d @ c) / (c @ c) * c
        want = uncond[b].flatten() + omega[b] * (d - parallel + eta * parallel)
        assert torch.allclose(got[b].flatten(), want, atol=1e-4)


@pytest.mark.parametrize("name", list(RULES))
def test_per_sample_omega_equals_one_omega_per_call(name):
    cond, uncond = _pair(3)
    rule = GuidanceRule.resolve(name, RULES[name])
    both = rule.start(STEPS)
    both.step = 3
    got = both.combine(uncond, cond, torch.tensor([2.0, 4.0, 7.0]))
    for b, w in enumerate((2.0, 4.0, 7.0)):
        one = rule.start(STEPS)
        one.step = 3
        assert torch.allclose(got[b:b + 1], one.combine(uncond[b:b + 1], cond[b:b + 1], w), atol=1e-5)


@pytest.fixture(scope="module")
def sd3():
    return load_denoiser(load_preset("tiny-sd3"), "cpu", text=True)


@pytest.mark.parametrize("name", ["cfg", *RULES])
def test_flow_matching_loop_applies_the_rule_on_the_velocity_at_two_nfe(sd3, name):
    """tiny-sd3: every step's output is the rule on the cond/uncond velocities at that x."""
    den, steps = sd3, 4
    cond, uncond = den.encode(["a red fox", "a lighthouse"]), den.encode_null(2)
    rule = GuidanceRule.resolve(name, RULES.get(name, {}))
    replay = rule.start(steps)
    seen = []

    def check(info):
        replay.step = info["i"]
        c = den.predict(info["model_input"], info["t"], cond)
        u = den.predict(info["model_input"], info["t"], uncond)
        seen.append(torch.allclose(info["output"], replay.combine(u, c, 5.0).float(), atol=1e-4))

    noise = initial_noise(den.latent_shape(), [0, 1])
    replayed = sample(den, cond, uncond, 5.0, noise, mode="cfg", steps=steps,
                      scheduler="flow-euler", callback=check, guidance=rule)
    assert seen == [True] * steps
    res = sample(den, cond, uncond, 5.0, noise, mode="cfg", steps=steps, scheduler="flow-euler",
                 guidance=rule)
    assert res.nfe == 2 * steps and replayed.nfe == 4 * steps  # the replay's 2 per step
    assert torch.allclose(res.x, replayed.x, atol=1e-5)  # a fresh state per run (APG momentum)
    plain = sample(den, cond, uncond, 5.0, noise, mode="cfg", steps=steps,
                   scheduler="flow-euler").x
    assert torch.equal(res.x, plain) == (name == "cfg")
    unguided = sample(den, cond, uncond, 5.0, noise, mode="unguided", steps=steps,
                      scheduler="flow-euler")
    assert unguided.nfe == steps


@pytest.mark.parametrize("flags, needle", [
    (["--guidance", "apgx"], "unknown guidance rule 'apgx'"),
    (["--guidance", "apg", "--apg-momentum", "1.5"], "--apg-momentum must be"),
    (["--guidance", "apg", "--apg-eta", "-0.1"], "got -0.1"),
    (["--guidance", "rescale", "--rescale-phi", "2"], "--rescale-phi must be"),
    (["--guidance", "cfg-zero-star", "--zero-init-steps", "-1"], "got -1"),
    (["--guidance", "interval", "--interval-start", "0.9", "--interval-stop", "0.5"],
     "--interval-start 0.9 is not below --interval-stop 0.5"),
    (["--guidance", "interval", "--interval-stop", "nan"], "got nan"),
    (["--guidance", "interval", "--interval-ramp", "1.5"], "--interval-ramp must be"),
    (["--guidance", "apg", "--interval-ramp", "0.1"], "--interval-ramp is not a parameter"),
    (["--guidance", "cfg", "--apg-eta", "0.5"], "--apg-eta is not a parameter of guidance rule 'cfg'"),
])
def test_bad_rule_names_and_values_exit_2_naming_them(tmp_path, capsys, flags, needle):
    code, _, err = agd("--workdir", str(tmp_path), "collect", "--preset", "tiny-sd3",
                       *flags, capsys=capsys)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "tiny-sd3").exists()


def test_bad_preset_rule_exits_2(tmp_path, capsys):
    preset = tmp_path / "p.toml"
    text = (PRESET_DIR / "tiny-sd3.toml").read_text(encoding="utf-8")
    preset.write_text(text.replace("[collect]", '[collect]\nguidance = "pag"'), encoding="utf-8")
    code, _, err = agd("--workdir", str(tmp_path), "collect", "--preset", str(preset),
                       capsys=capsys)
    assert code == 2 and "pag" in err, err


def test_rule_recorded_in_manifest_and_adapter_and_run_by_generate_and_bench(tmp_path, capsys):
    """collect --guidance apg records it; an old manifest (no key) reads as cfg; mixed rules
    are refused; train writes it in the adapter file; generate --mode cfg and bench run it."""
    prompts = str(write_prompts(tmp_path / "p.txt"))
    wd = str(tmp_path / "ws")
    common = {"preset": "tiny-sd3", "prompts": prompts, "num_per_prompt": 1, "steps": 4,
              "workdir": wd, "device": "cpu"}
    s = run_collect(guidance="apg", guidance_params={"apg_eta": 0.5}, **common)
    assert s["guidance"] == {"name": "apg", "apg_eta": 0.5, "apg_momentum": -0.5,
                             "apg_norm_threshold": 0.0}
    store = TrajectoryStore(s["trajectories_dir"])
    assert store.manifest()["config"]["guidance"]["name"] == "apg"
    assert TrajectoryData([store.root]).guidance.record() == s["guidance"]
    # a collection made before the rules: no key in its manifest -> plain CFG, still resumes
    old = run_collect(out=str(tmp_path / "old"), **common)
    path = Path(old["manifest"])
    manifest = json.loads(path.read_text())
    assert manifest["config"]["guidance"] is None
    del manifest["config"]["guidance"]
    path.write_text(json.dumps(manifest))
    assert TrajectoryData([tmp_path / "old/trajectories"]).guidance == GuidanceRule()
    again = run_collect(out=str(tmp_path / "old"), **common)
    assert again["new_trajectories"] == 0 and again["complete"] and old["complete"]
    with pytest.raises(Exception, match="different|guidance"):
        TrajectoryData([store.root, tmp_path / "old/trajectories"])
    code, out, err = agd("--workdir", wd, "train", "--steps", "4", "--checkpoint-every", "4",
                         "--json", capsys=capsys)
    assert code == 0, err
    adapter = AdapterFile.open(tmp_path / "ws/tiny-sd3/adapter.safetensors")
    assert adapter.guidance.record() == s["guidance"]
    code, out, err = agd("--workdir", wd, "generate", "a red fox", "--mode", "cfg", "--steps",
                         "4", "--json", capsys=capsys)
    gen = json.loads(out)
    assert code == 0 and gen["nfe"] == 8 and gen["guidance"]["name"] == "apg"
    code, out, err = agd("--workdir", wd, "generate", "a red fox", "--steps", "4", "--json",
                         "--guidance", "rescale", "--mode", "cfg", "--out",
                         str(tmp_path / "r.png"), capsys=capsys)
    assert code == 0 and json.loads(out)["guidance"] == {"name": "rescale", "rescale_phi": 0.7}
    code, _, err = agd("--workdir", wd, "generate", "a red fox", "--steps", "4", "--out",
                       str(tmp_path / "a.png"), capsys=capsys)
    assert code == 0 and "(agd, 1 pass per step, taught apg)" in err, err
    code, out, err = agd("--workdir", wd, "bench", "--compare-cfg", "--num-prompts", "1",
                         "--steps", "4", "--throughput-batch", "0", "--guidance",
                         "cfg-zero-star", "--json", capsys=capsys)
    b = json.loads(out)
    assert code == 0, err
    assert b["guidance"]["name"] == "cfg-zero-star" and b["adapter_guidance"]["name"] == "apg"
    assert (b["methods"]["agd"]["nfe"], b["methods"]["cfg"]["nfe"]) == (4, 8)
    assert math.isfinite(b["agreement"]["psnr"])


def test_quality_compares_agd_with_the_rule_and_with_plain_cfg_on_the_same_seeds(tmp_path):
    from agd_cli.bench.quality import print_quality_table
    from agd_cli.bench.run import run_bench
    from tests.test_bench import FAST, make_adapter

    make_adapter(tmp_path, "mnist")  # an adapter file from before the rules: learned plain CFG
    r = run_bench(preset="mnist", quality=True, quality_samples=20, quality_batch=20,
                  omegas=["6"], workdir=str(tmp_path), guidance="apg",
                  guidance_params={"apg_momentum": 0.0}, **FAST)
    q = r["quality"]
    assert q["settings"]["rows"] == ["cfg", "agd", "cfg-plain"]
    assert q["settings"]["guidance"]["name"] == "apg"
    assert q["settings"]["adapter_guidance"] == {"name": "cfg"}
    assert (q["cfg"]["6"]["nfe"], q["cfg-plain"]["6"]["nfe"], q["agd"]["6"]["nfe"]) == (8, 8, 4)
    assert q["cfg"]["6"]["fid"] != q["cfg-plain"]["6"]["fid"]  # APG is not CFG
    for key, versus in (("vs_cfg", "cfg"), ("vs_cfg_plain", "cfg-plain")):
        v = q["agd"]["6"][key]
        assert v["fid"] == pytest.approx(q["agd"]["6"]["fid"] - q[versus]["6"]["fid"], abs=1e-6)
    print_quality_table(q)  # the rule's rows and plain CFG's rows, labelled
