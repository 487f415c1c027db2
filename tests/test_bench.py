"""`agd bench`: metrics, the CFG comparison's JSON and grid, NFE counts, flag errors, --quality."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from PIL import Image

from agd_cli.cli import main
from agd_cli.evaluation.metrics import PSNR_CAP_DB, psnr, ssim

TINY = ("tiny-sd", "tiny-sdxl", "tiny-dit")
FAST = {"threads": 1, "steps": 4, "n": 1, "show_table": False}


def make_adapter(workdir, preset: str):
    """An untrained (Xavier-init) adapter file in the preset's run folder."""
    from agd_cli.config.presets import load_preset
    from agd_cli.families import load_denoiser

    den = load_denoiser(load_preset(preset), "cpu")
    path = workdir / preset / "adapter.safetensors"
    den.new_adapters().save(path, den.adapter_metadata(train_steps=0))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    for name in TINY:
        make_adapter(root, name)
    return root


def run_cli(args, capsys) -> tuple[int, str, str]:
    """`agd ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# --- metrics ------------------------------------------------------------------------------
def test_psnr_of_a_known_error_and_of_identical_images():
    a = torch.zeros(2, 3, 16, 16)
    b = a + 0.1  # MSE 0.01 -> 20 dB
    assert psnr(a, b).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert psnr(a, a).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]


def test_ssim_of_constant_images_matches_the_closed_form():
    # constant images: variances and covariance vanish, SSIM = (2 μa μb + C1) / (μa² + μb² + C1)
    a, b = torch.full((1, 1, 20, 20), 0.3), torch.full((1, 1, 20, 20), 0.7)
    c1 = 0.01**2
    expected = (2 * 0.3 * 0.7 + c1) / (0.3**2 + 0.7**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-5)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-6)


def test_ssim_falls_with_noise_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(1, 3, 32, 32, generator=g)
    scores = [ssim(a, (a + s * noise).clamp(0, 1)).item() for s in (0.01, 0.05, 0.2)]
    assert scores[0] > scores[1] > scores[2] > 0
    b = (a + 0.05 * noise).clamp(0, 1)
    assert ssim(a, b).item() == pytest.approx(ssim(b, a).item(), abs=1e-6)
    assert ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)).shape == (1,)  # smaller than 11


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# --- the comparison -------------------------------------------------------------------------
@pytest.mark.parametrize("preset", TINY)
def test_compare_cfg_json_schema_and_nfe_counts(workdir, preset):
    from agd_cli.bench.run import run_bench

    r = run_bench(preset=preset, baselines="cfg,cfg-cutoff,unguided", workdir=str(workdir), **FAST)
    nfe = {m: r["methods"][m]["nfe"] for m in r["methods"]}
    assert nfe == {"agd": 4, "cfg": 8, "cfg-cutoff": 6, "unguided": 4}  # cutoff: 2 of 4 steps CFG
    for m, e in r["methods"].items():
        assert e["seconds_per_image"] > 0 and e["peak_memory_bytes"] > 0 and e["images"] == 1
        assert e["speed_ratio_to_cfg"] == pytest.approx(
            e["seconds_per_image"] / r["methods"]["cfg"]["seconds_per_image"])
        assert (e["agreement"] is None) == (m == "cfg")
    assert r["ratio_agd_to_cfg"] == r["methods"]["agd"]["speed_ratio_to_cfg"]
    assert 0 < r["agreement"]["psnr"] < PSNR_CAP_DB and -1 <= r["agreement"]["ssim"] < 1
    saved = json.loads((workdir / preset / "bench" / "compare-cfg.json").read_text())
    assert saved["methods"]["agd"]["nfe"] == 4 and saved["preset"] == preset
    assert r["grid"]["col_labels"] == ["CFG", "agd", "unguided", "CFG cutoff"]
    assert r["vae_decode"]["slicing"] and not r["vae_decode"]["tiling"]  # one image at a time


def test_full_cutoff_reproduces_cfg_and_omega_one_cfg_is_unguided(workdir):
    """Invariants that pin down 'same base, same noise': CFG on all steps is CFG."""
    from agd_cli.bench.run import run_bench

    r = run_bench(preset="tiny-sd", baselines="cfg-cutoff,unguided", cutoff=1.0, omegas=["1"],
                  workdir=str(workdir), **FAST)
    assert r["methods"]["cfg-cutoff"]["nfe"] == 8
    assert r["methods"]["cfg-cutoff"]["agreement"]["psnr"] == PSNR_CAP_DB
    assert r["methods"]["cfg-cutoff"]["agreement"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    # ω = 1 CFG is the conditional prediction: equal to unguided up to batch-2 float rounding
    assert r["methods"]["unguided"]["agreement"]["psnr"] > 60


def test_batched_cases_give_the_same_images_as_one_at_a_time(workdir):
    """Cases with different prompts and ω in one call (per-sample ω) match batch-1 results."""
    from agd_cli.bench.run import run_bench

    kw = {**FAST, "n": 2, "omegas": ["2", "6"], "steps": 3}
    one = run_bench(preset="tiny-sd", batch_size=1, workdir=str(workdir), **kw)
    four = run_bench(preset="tiny-sd", batch_size=4, workdir=str(workdir), **kw)
    assert four["batch_size"] == 4 and four["methods"]["agd"]["images"] == 4
    for w in ("2", "6"):
        for m in ("agd", "unguided"):
            a, b = one["methods"][m]["agreement"]["by_omega"][w], four["methods"][m]["agreement"]["by_omega"][w]
            assert b["psnr"] == pytest.approx(a["psnr"], abs=0.05)
            assert b["ssim"] == pytest.approx(a["ssim"], abs=1e-3)
    assert one["agreement"]["by_omega"]["2"]["psnr"] != pytest.approx(one["agreement"]["by_omega"]["6"]["psnr"])


def test_cli_json_grid_size_and_counts(workdir, tmp_path, capsys):
    grid = tmp_path / "g.png"
    code, out, err = run_cli(["bench", "--compare-cfg", "--preset", "tiny-sd", "--workdir",
                              str(workdir), "--threads", "1", "--steps", "3", "--num-prompts", "2", "-w", "2,4",
                              "--seeds", "0-1", "--grid", str(grid), "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert set(r["methods"]) == {"agd", "cfg", "unguided"}
    assert r["methods"]["agd"]["images"] == 2 * 2 * 2  # prompts x seeds x ω
    assert (r["methods"]["agd"]["nfe"], r["methods"]["cfg"]["nfe"]) == (3, 6)
    assert set(r["agreement"]["by_omega"]) == {"2", "4"}
    g = r["grid"]
    assert g["path"] == str(grid) and (g["rows"], g["cols"]) == (4, 3)  # 2 prompts x 2 ω, seed 0
    assert g["cell"] == [128, 128]  # 32 px upscaled x4
    from agd_cli.infra.images import make_grid

    blank = [[Image.new("RGB", tuple(g["cell"]))] * g["cols"]] * g["rows"]
    with Image.open(grid) as im:
        assert im.size == make_grid(blank, g["row_labels"], g["col_labels"]).size == tuple(g["size"])
        assert im.width > 3 * 128 and im.height > 4 * 128


def test_no_arguments_use_the_most_recent_adapter_and_its_builtin_prompts(tmp_path, capsys):
    make_adapter(tmp_path, "tiny-dit")
    code, out, err = run_cli(["bench", "--workdir", str(tmp_path), "--threads", "1", "--steps", "2",
                              "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["preset"] == "tiny-dit" and r["prompts"] == ["0", "2", "4", "6"]  # 4 of classes 0-7
    assert r["omegas"] == [4.0] and r["seeds"] == [0]  # the preset's default ω
    assert (tmp_path / "tiny-dit" / "bench" / "compare-cfg.png").is_file()
    assert "most recent adapter" in err


@pytest.mark.parametrize("args, message", [
    (["--baselines", "cfg,foo"], "unknown baseline 'foo'"),
    (["--baselines", ""], "unknown baseline"),
    (["--seeds", "x"], "bad seed 'x'"),
    (["--seeds", "3-1"], "bad seed '3-1'"),
    (["--preset", "tiny-sd", "-w", "-2"], "must be a positive number"),
    (["--preset", "tiny-sd", "-w", "abc"], "bad guidance scale 'abc'"),
    (["--num-prompts", "0"], "--num-prompts must be a positive integer, got 0"),
    (["-n", "0"], "--num-prompts must be a positive integer, got 0"),  # deprecated alias
    (["--cutoff", "1.5"], "--cutoff 1.5"),
    (["--grid", "out.jpg"], "not a .png path"),
    (["--run", "r", "--adapter", "a.safetensors"], "both --adapter 'a.safetensors' and --run 'r'"),
    (["--adapter", "missing.safetensors"], "adapter file not found"),
    (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
])
def test_bad_flags_exit_2_naming_the_value(workdir, capsys, args, message):
    code, out, err = run_cli(["bench", "--compare-cfg", "--workdir", str(workdir), *args], capsys)
    assert code == 2, err
    assert message in err and "hint:" in err and "Traceback" not in err


def test_bad_baselines_json_error_object(workdir, capsys):
    code, out, err = run_cli(["bench", "--baselines", "cfg,nope", "--workdir", str(workdir),
                              "--json"], capsys)
    assert code == 2 and json.loads(out)["error"].startswith("unknown baseline 'nope'")


def test_empty_workspace_says_to_train_first(tmp_path, capsys):
    code, _, err = run_cli(["bench", "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "no trained adapter" in err and "agd train" in err


def test_quality_on_a_preset_without_evaluator_exits_2(workdir, capsys):
    code, _, err = run_cli(["bench", "--compare-cfg", "--quality", "--preset", "tiny-sd",
                            "--workdir", str(workdir)], capsys)
    assert code == 2 and "'tiny-sd'" in err and "mnist" in err


def test_memory_arguments_fit_the_probe_and_flags_beat_the_preset():
    from agd_cli.bench.memory import memory_args
    from agd_cli.config.presets import load_preset

    p = load_preset("sdxl")
    args = memory_args(p, None, None, None, None, None)
    assert args == {"preset_name": "sdxl", "precision": p.train["precision"],
                    "optimizer": p.train["optimizer"], "batch_size": p.train["batch_size"],
                    "checkpointing": p.train["gradient_checkpointing"], "device": "auto"}
    args = memory_args(p, "fp32", "adamw", False, 3, "cpu")
    assert (args["precision"], args["optimizer"], args["checkpointing"], args["batch_size"]) == (
        "fp32", "adamw", False, 3)
    from agd_cli.train.probe import measure_train_step

    inspect.signature(measure_train_step).bind(**args)  # the probe takes exactly these


# --- --quality on the embedded default (teacher, classifier and preset ship with agd) ---------
def test_quality_table_on_mnist(tmp_path):
    from agd_cli.bench.report import MIN_CELL
    from agd_cli.bench.run import run_bench

    make_adapter(tmp_path, "mnist")
    r = run_bench(preset="mnist", quality=True, quality_samples=20, quality_batch=20, omegas=["2", "14"],
                  workdir=str(tmp_path), **FAST)
    q = r["quality"]
    assert set(q["unguided"]) == {"1"} and set(q["cfg"]) == set(q["agd"]) == {"2", "14"}
    assert (q["unguided"]["1"]["nfe"], q["cfg"]["2"]["nfe"], q["agd"]["14"]["nfe"]) == (4, 8, 4)
    for method in ("unguided", "cfg", "agd"):
        for e in q[method].values():
            assert 0 <= e["accuracy"] <= 1 and math.isfinite(e["fid"]) and e["fid"] >= 0
    assert q["settings"]["samples_per_omega"] == 20 and set(q) == {"unguided", "cfg", "agd", "settings"}
    assert q["agd"]["14"]["beyond_trained_range"] is True  # the preset trains 1-12
    assert q["agd"]["2"]["beyond_trained_range"] is False
    for w in ("2", "14"):  # the paired agd − CFG difference, same seeds, with its interval
        v = q["agd"][w]["vs_cfg"]
        acc = 100 * (q["agd"][w]["accuracy"] - q["cfg"][w]["accuracy"])
        assert v["accuracy_points"] == pytest.approx(acc, abs=1e-4)
        assert v["fid"] == pytest.approx(q["agd"][w]["fid"] - q["cfg"][w]["fid"], abs=1e-6)
        lo, hi = v["accuracy_points_ci95"]
        assert lo <= v["accuracy_points"] <= hi and v["fid_ci95"][0] <= v["fid_ci95"][1]
        assert "vs_cfg" not in q["cfg"][w]
    with Image.open(q["settings"]["grid"]) as grid:  # rows unguided, CFG/agd at ω 2 and 14; 10 digits
        assert grid.width > 10 * MIN_CELL and 5 * MIN_CELL < grid.height < 6 * MIN_CELL


def test_bench_reads_a_presets_prompt_file_like_collect(tmp_path):
    """A text preset whose `prompts` is a file path: bench compares on the file's prompts, not on
    the path string (the bug: bench used the path itself as a prompt)."""
    import dataclasses

    from agd_cli.bench.plan import bench_prompts
    from agd_cli.config.presets import load_preset
    from agd_cli.config.prompts import load_prompt_set

    path = tmp_path / "my [draft] prompts.txt"
    path.write_text("a red fox\na lighthouse at dusk\na bowl of soup\n", encoding="utf-8")
    preset = dataclasses.replace(load_preset("tiny-sd"), prompts=str(path))
    got = bench_prompts(preset, None, 3)
    assert sorted(got) == ["a bowl of soup", "a lighthouse at dusk", "a red fox"]
    assert sorted(got) == sorted(load_prompt_set(preset)[0])
    assert str(path) not in got


def test_latency_and_throughput_side_by_side_with_adapter_flops(workdir):
    """batch 1 and batch N timings of every method, with NFE counts, and the adapters' FLOPs."""
    from agd_cli.bench.run import run_bench

    r = run_bench(preset="tiny-sd", throughput_batch=3, workdir=str(workdir), **FAST)
    lat, thr = r["latency"], r["throughput"]
    assert (lat["batch_size"], thr["batch_size"]) == (1, 3)
    for part in (lat, thr):
        assert {m: e["nfe"] for m, e in part["methods"].items()} == {"agd": 4, "cfg": 8, "unguided": 4}
        assert part["ratio_agd_to_cfg"] == pytest.approx(
            part["methods"]["agd"]["seconds_per_image"] / part["methods"]["cfg"]["seconds_per_image"])
        assert part["meaning"].startswith(f"batch {part['batch_size']} (")
    assert thr["methods"]["agd"]["timed_calls"] == 1
    flops = r["adapter_overhead"]
    assert set(flops["by_batch"]) == {"1", "3"}
    one, three = flops["by_batch"]["1"], flops["by_batch"]["3"]
    assert 0 < one["adapter_flops_pct"] < 50 and three["base_flops"] == 3 * one["base_flops"]
    assert 0 < flops["adapter_params"] < flops["base_params"]
    off = run_bench(preset="tiny-sd", throughput_batch=0, workdir=str(workdir), **FAST)
    assert "throughput" not in off and off["latency"]["batch_size"] == 1


def test_quality_seed_shifts_the_noise_not_the_prompts(tmp_path, capsys):
    """--quality-seed S: sample i is prompt i on seed S + i, so a table can be judged on seeds
    it was not tuned on; a negative seed is refused before anything loads."""
    from types import SimpleNamespace

    from agd_cli.bench.quality import sample_for_quality
    from agd_cli.config.presets import load_preset
    from agd_cli.families import load_denoiser

    den = load_denoiser(load_preset("mnist"), "cpu")
    prompts = ["the digit two"] * 3
    plan = SimpleNamespace(quality_batch=3, steps=3, scheduler="ddim", quality_seed=0)
    from_zero = sample_for_quality(den, "unguided", 1.0, prompts, plan)[0]
    plan.quality_seed = 1
    from_one = sample_for_quality(den, "unguided", 1.0, prompts, plan)[0]
    assert torch.allclose(from_one[:2], from_zero[1:], atol=1e-5)  # seed 1 + i is seed 0 + (i + 1)
    assert not torch.allclose(from_one[0], from_zero[0], atol=1e-3)
    code, _, err = run_cli(["bench", "--quality", "--preset", "mnist", "--quality-seed", "-1",
                            "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "--quality-seed" in err


def test_paired_difference_of_quality_scores():
    """Same samples: difference 0 and an interval of width 0; CFG right where agd is wrong on
    half the seeds: −50 points with an interval around it; the FID interval holds the estimate."""
    from agd_cli.evaluation.mnist import load_evaluator
    from agd_cli.evaluation.stats import paired_difference

    ev = load_evaluator()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(60, 64, generator=g)
    hits = torch.ones(60, dtype=torch.bool)
    same = paired_difference(ev, (hits, feats), (hits, feats))
    assert same["accuracy_points"] == 0 and same["accuracy_points_ci95"] == [0, 0]
    assert same["fid"] == 0 and same["fid_ci95"] == [0, 0]
    worse = hits.clone()
    worse[::2] = False
    other = feats + 0.5 * torch.randn(60, 64, generator=g)
    v = paired_difference(ev, (worse, other), (hits, feats))
    lo, hi = v["accuracy_points_ci95"]
    assert v["accuracy_points"] == -50 and lo < -50 < hi < 0
    assert v["fid_ci95"][0] < v["fid"] < v["fid_ci95"][1]


def test_idle_device_note_only_where_cfgs_pair_is_nearly_free():
    from agd_cli.bench.report import idle_device_notes

    def part(batch, cfg, agd, unguided=1.0):
        return {"batch_size": batch, "methods": {"cfg": {"seconds_per_image": cfg},
                                                 "agd": {"seconds_per_image": agd},
                                                 "unguided": {"seconds_per_image": unguided}}}

    # the H200's sdxl figures: batch 1 latency-bound (pair 1.00 ×), batch 16 busy (1.74 ×)
    notes = idle_device_notes([part(1, 1.49, 1.77, 1.49), part(16, 0.815, 0.475, 0.468)])
    assert len(notes) == 1 and notes[0].startswith("batch 1:") and "1.00 ×" in notes[0]
    assert "agd/CFG 1.19" in notes[0]
    assert idle_device_notes([part(1, 1.9, 1.05)]) == []  # a busy device: nothing to explain
    assert idle_device_notes([{"batch_size": 1, "methods": {"cfg": {"seconds_per_image": 1.0},
                                                            "agd": {"seconds_per_image": 1.0}}}]) == []


def test_quality_needs_the_evaluators_teacher_not_the_presets_name():
    """--quality works on a renamed copy of the mnist preset (same teacher, e.g. a LoRA variant)
    and is refused, naming the preset, where no evaluator exists."""
    import dataclasses

    from agd_cli.bench.plan import check_quality_preset
    from agd_cli.config.presets import load_preset
    from agd_cli.infra.errors import InputError

    check_quality_preset(dataclasses.replace(load_preset("mnist"), name="mnist-lora-r16"))
    with pytest.raises(InputError, match="'tiny-sd'"):
        check_quality_preset(load_preset("tiny-sd"))
