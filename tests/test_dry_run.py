"""`--dry-run` answers "will it fit?" offline, loading no weights (issue 31), and training on CUDA
turns gradient checkpointing on where only that fits (row 12), decided on the CPU through
hardware.assume."""

from __future__ import annotations

import json

import pytest
import torch

from agd_cli.cli import _as_agd_error, main
from agd_cli.collect.run import run_collect
from agd_cli.config.presets import from_dict, load_preset
from agd_cli.infra import hardware
from agd_cli.infra.errors import InputError
from agd_cli.train.phase_memory import HEADROOM, Card, choose_checkpointing, training_step

GiB = 2**30
PHASES = ["text encoding", "sampling", "VAE decode"]


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """A dry run must not open a base model's files: any attempt fails the test."""
    import agd_cli.families.base
    import agd_cli.families.dit
    import agd_cli.families.sd
    import agd_cli.families.transformer
    from agd_cli.families.weights import PretrainedBase

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run tried to open a base model's files")

    for module in (agd_cli.families.base, agd_cli.families.dit, agd_cli.families.sd,
                   agd_cli.families.transformer):
        monkeypatch.setattr(module, "open_base", refuse)
    monkeypatch.setattr(PretrainedBase, "__init__", refuse)


def dry_collect(preset: str, tmp_path, **flags) -> dict:
    return run_collect(preset, dry_run=True, workdir=str(tmp_path / "ws"), **flags)


def phases(summary: dict) -> dict[str, dict]:
    return {p["name"]: p for p in summary["memory"]["phases"]}


def test_sd35_large_collects_on_a_24gb_card(tmp_path):
    """Every phase under 22 GiB, because the 8.1 B transformer waits until the text encoders
    (T5-XXL among them) are freed: together they would not fit (row 4)."""
    s = dry_collect("sd35-large", tmp_path)
    ph = phases(s)
    assert list(ph) == PHASES and s["dtype"] == "bf16" and s["batch_size"] == 2
    card = s["memory"]["card"]
    assert card["gib"] == 24 and card["budget_gib"] == 22 and "profile" in card["source"]
    assert all(p["peak_bytes"] < 22 * GiB and p["fits"] for p in ph.values()) and s["memory"]["fits"]
    text, sampling = ph["text encoding"]["parts"], ph["sampling"]["parts"]
    assert "denoiser_weights" not in text  # the transformer is not on the GPU while encoding
    assert 14.5 * GiB < sampling["denoiser_weights"] < 15.5 * GiB      # 8.06 B in bf16
    assert 10 * GiB < text["text_encoder_weights"] < 11.5 * GiB        # 5.7 B in bf16
    assert text["text_encoder_weights"] + sampling["denoiser_weights"] > 24 * GiB  # the old order
    assert s["plan"]["prompts"] == 500 and s["plan"]["to_do"] == 500
    assert not (tmp_path / "ws").exists()  # nothing written


@pytest.mark.parametrize("name, weights_gib", [("sdxl", (4.6, 5.0)), ("sd35-medium", (4.0, 4.8)),
                                               ("tiny-sd", (0.0, 0.01))])
def test_collect_phases_of_several_presets(tmp_path, name, weights_gib):
    s = dry_collect(name, tmp_path)
    ph = phases(s)
    assert list(ph) == PHASES
    lo, hi = weights_gib
    assert lo * GiB <= ph["sampling"]["parts"]["denoiser_weights"] <= hi * GiB
    for p in ph.values():
        assert p["peak_bytes"] == sum(p["parts"].values()) > 0
        assert p["fits"] is (p["peak_bytes"] <= s["memory"]["card"]["budget_bytes"])
    # the VAE decodes beside the resident denoiser, in fp32
    assert ph["VAE decode"]["parts"]["denoiser_weights"] == ph["sampling"]["parts"]["denoiser_weights"]


def test_class_conditional_and_pixel_space_presets_skip_what_they_lack(tmp_path):
    assert list(phases(dry_collect("tiny-dit", tmp_path))) == ["sampling", "VAE decode"]
    assert list(phases(dry_collect("mnist", tmp_path))) == ["text encoding", "sampling"]


def test_a_larger_batch_and_another_dtype_are_estimated_as_given(tmp_path):
    base = phases(dry_collect("tiny-sd", tmp_path, dtype="fp16"))["sampling"]
    bigger = phases(dry_collect("tiny-sd", tmp_path, batch_size=16, dtype="fp32"))["sampling"]
    assert bigger["parts"]["activations"] > base["parts"]["activations"]
    assert bigger["parts"]["denoiser_weights"] == 2 * base["parts"]["denoiser_weights"]  # fp16 -> fp32


def test_cli_collect_dry_run_prints_one_json_object(tmp_path, capsys):
    main(["--workdir", str(tmp_path / "ws"), "collect", "--preset", "tiny-sd", "--dry-run",
          "--json"])  # returns on success
    s = json.loads(capsys.readouterr().out)
    assert s["dry_run"] and s["command"] == "collect" and [p["name"] for p in
                                                           s["memory"]["phases"]] == PHASES
    main(["--workdir", str(tmp_path / "ws"), "collect", "--preset", "tiny-sd", "--dry-run"])
    out = capsys.readouterr().out
    assert "dry run of agd collect --preset tiny-sd" in out and "every phase fits" in out
    assert "text encoding" in out and "GiB" in out


def test_the_card_is_the_free_memory_on_cuda_else_the_preset_profile():
    from agd_cli.train.phase_memory import card

    preset = load_preset("sdxl")
    assert card(preset, torch.device("cpu")).bytes == 24 * GiB
    with hardware.assume(free_memory=15 * GiB):
        c = card(preset, torch.device("cuda"))
    assert c.bytes == 15 * GiB and c.budget == 15 * GiB - HEADROOM and "free" in c.source
    raw = dict(preset.raw, memory={"profile": "16 GB"})
    assert card(from_dict(raw), None).bytes == 16 * GiB
    with pytest.raises(InputError, match="profile"):
        from_dict(dict(preset.raw, memory={"profile": "big"}))


def test_cli_train_dry_run_with_a_preset_and_no_collection(tmp_path, capsys):
    main(["--workdir", str(tmp_path / "ws"), "train", "--preset", "tiny-sdxl", "--batch-size",
          "4", "--dry-run", "--json"])
    s = json.loads(capsys.readouterr().out)
    (step,) = s["memory"]["phases"]
    assert s["command"] == "train" and s["collections"] == [] and s["settings"]["batch_size"] == 4
    assert step["name"] == "training step" and step["fits"] and s["checkpointing"]["action"] == "fits"
    assert step["peak_bytes"] >= step["parts"]["denoiser_weights"] > 0


def test_cli_train_dry_run_says_checkpointing_would_be_turned_on(tmp_path, capsys):
    """A card the step fits only with gradient checkpointing: both estimates, and the choice
    agd train makes on such a card (tiny-sdxl: ~0.14 GiB off, ~0.04 GiB on; budget 0.1 GiB)."""
    text = (load_preset("tiny-sdxl").source.read_text(encoding="utf-8")
            .replace('name = "tiny-sdxl"', 'name = "tiny-sdxl-small-card"')
            + '\n[memory]\nprofile = "2.1GB"\n')
    preset = tmp_path / "small-card.toml"
    preset.write_text(text, encoding="utf-8")
    main(["--workdir", str(tmp_path / "ws"), "train", "--preset", str(preset), "--dry-run",
          "--json"])
    s = json.loads(capsys.readouterr().out)
    asked, chosen = s["memory"]["phases"]
    assert s["checkpointing"]["action"] == "turn on" and s["memory"]["fits"] is True
    assert not asked["fits"] and chosen["fits"] and chosen["peak_bytes"] < asked["peak_bytes"]
    assert chosen["name"] == "training step (checkpointing)"


# --- row 12: gradient checkpointing where only that fits, decided before the first step ---------
@pytest.fixture(scope="module")
def tiny_steps() -> dict[bool, int]:
    """One tiny-sdxl training step's peak (batch 32), with and without checkpointing."""
    return {on: training_step(load_preset("tiny-sdxl"), "fp32", "adamw", on, 32).peak_bytes
            for on in (False, True)}


def settings_of(checkpointing: bool):
    from agd_cli.train.settings import TrainSettings

    return TrainSettings.resolve(load_preset("tiny-sdxl"),
                                 {"gradient_checkpointing": checkpointing, "batch_size": 32})


def fit(free: int, checkpointing: bool = False, explicit=None, device: str = "cuda"):
    from agd_cli.train.setup import fit_gpu_memory

    s = settings_of(checkpointing)
    with hardware.assume(free_memory=free):
        fit_gpu_memory(load_preset("tiny-sdxl"), s, torch.device(device), explicit)
    return s


def test_checkpointing_turns_on_where_only_it_fits(tiny_steps, capsys):
    off, on = tiny_steps[False], tiny_steps[True]
    assert on < off
    between = HEADROOM + (off + on) // 2
    assert fit(HEADROOM + 2 * off).gradient_checkpointing is False   # fits as it is
    capsys.readouterr()
    assert fit(between).gradient_checkpointing is True               # only with: turned on
    assert "turning it on" in capsys.readouterr().err
    assert fit(HEADROOM + on // 2, device="cpu").gradient_checkpointing is False  # CPU: no check


def test_what_fits_neither_way_or_was_asked_off_is_refused_naming_the_flag(tiny_steps):
    off, on = tiny_steps[False], tiny_steps[True]
    with pytest.raises(InputError, match="does not fit cuda") as asked_off:
        fit(HEADROOM + (off + on) // 2, explicit=False)
    assert "--gradient-checkpointing" in asked_off.value.hint
    with pytest.raises(InputError) as neither:
        fit(HEADROOM + on // 2)
    assert "--gradient-checkpointing" in neither.value.hint and "--batch-size" in neither.value.hint
    with pytest.raises(InputError) as already_on:
        fit(HEADROOM + on // 2, checkpointing=True)
    assert "--batch-size" in already_on.value.hint


def test_the_decision_itself():
    from agd_cli.train.phase_memory import Phase

    def estimate(on: bool) -> Phase:
        return Phase("training step", (6 if on else 16) * GiB)

    sixteen = Card(16 * GiB, "a 16 GB card")   # SDXL's preset: 15.95 GiB off, 6.10 GiB on
    assert choose_checkpointing(estimate, sixteen, False, None).action == "turn on"
    assert choose_checkpointing(estimate, Card(24 * GiB, "24"), False, None).action == "fits"
    assert choose_checkpointing(estimate, sixteen, False, False).action == "refuse"
    assert choose_checkpointing(estimate, Card(7 * GiB, "7"), False, None).action == "refuse"


def test_the_out_of_memory_hint_names_gradient_checkpointing():
    err = _as_agd_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert err.message.startswith("out of memory") and "--gradient-checkpointing" in err.hint


# --- benchmarks/gpu_check.py --phases: the GPU's side of the dry run, runnable here on the CPU ---
def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_phases_runs_the_collect_path_and_checks_every_output(tmp_path):
    gpu_check = _gpu_check()
    assert set(gpu_check.REAL_PRESETS) == {"sdxl", "sd15", "sd21", "sd35-medium", "sd35-large",
                                           "pixart-sigma", "sana-1600m", "dit"}
    r = gpu_check.check_phases("tiny-sd3", "cpu", tmp_path)
    assert list(r["phases"]) == [*PHASES, "training step"] and r["all_finite"]
    for p in r["phases"].values():
        assert p["estimate_gib"] is not None and p["allocated_gib"] is None  # no CUDA here
    assert r["phases"]["sampling"]["seconds_per_step"] > 0
    assert "| tiny-sd3 | sampling |" in gpu_check.phase_table({"tiny-sd3": r})
