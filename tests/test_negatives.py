"""Negative prompts in one pass: collected CFG-with-negative targets, adapters that read the
negative, one-pass generate, old files still loading, bad input refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from agd_cli.collect.run import run_collect
from agd_cli.collect.store import TrajectoryStore, sha256_file
from agd_cli.config.presets import load_preset
from agd_cli.core.adapter_config import AdapterConfig
from agd_cli.families import load_denoiser, load_with_adapters
from agd_cli.infra.errors import DataError
from agd_cli.train.data import TrajectoryData
from agd_cli.train.run import run_train
from tests.test_generate import agd

STEPS = 4
NEGATIVES = ["blurry", "a watermark"]
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of fruit"]
METHOD_ORDER = ("cfg", "cfg-negative", "agd-negative", "agd")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per test


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny-sd collection with two negatives, and adapters trained on it for a few steps."""
    tmp = tmp_path_factory.mktemp("negatives")
    torch.set_num_threads(1)
    run_collect("tiny-sd", prompts=write_lines(tmp / "p.txt", PROMPTS), num_per_prompt=3,
                steps=STEPS, batch_size=4, seed=3, out=str(tmp / "run"),
                negative_prompts=write_lines(tmp / "neg.txt", NEGATIVES),
                empty_negative_probability=0.4)
    run_train(run=str(tmp / "run"), steps=3, batch_size=8, device="cpu", workdir=str(tmp))
    return tmp / "run"


def shard_tensors(run: Path) -> list[dict]:
    store = TrajectoryStore(run / "trajectories")
    out = []
    for info in store.shards():
        with store.open_shard(info, verify=True) as f:
            out.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safetensors handle
    return out


def test_collected_target_is_cfg_with_the_trajectorys_negative(run):
    """target == ε(neg) + ω·(ε(c) − ε(neg)), recomputed from the teacher; the null is not it."""
    den = load_denoiser(load_preset("tiny-sd"), device="cpu")
    encoded = {n: den.encode([n])["prompt_embeds"] for n in NEGATIVES}
    null = den.encode_null(1)["prompt_embeds"]
    manifest = TrajectoryStore(run / "trajectories").manifest()["config"]
    assert manifest["negative_prompts"] == NEGATIVES
    assert manifest["empty_negative_probability"] == 0.4
    seen = set()
    for t in shard_tensors(run):
        for n in range(len(t["trajectory_id"])):
            index = int(t["negative_index"][n])
            seen.add(index)
            uncond = {"prompt_embeds": t["uncond.prompt_embeds"][int(t["uncond_row"][n])][None]}
            expected = null if index < 0 else encoded[NEGATIVES[index]]
            torch.testing.assert_close(uncond["prompt_embeds"].float(), expected, atol=2e-3, rtol=2e-3)
            row = int(t["cond_row"][n])
            cond = {"prompt_embeds": t["cond.prompt_embeds"][row:row + 1]}
            k, omega = 1, t["omega"][n].view(1)
            x, ts = t["x"][n, k:k + 1].float(), t["timesteps"][n, k]
            target = t["target"][n, k:k + 1].float()
            torch.testing.assert_close(den.predict_cfg(x, ts, cond, uncond, omega), target,
                                       atol=3e-3, rtol=3e-3)
            if index >= 0:  # the empty prompt's CFG is a different target
                assert not torch.allclose(den.predict_cfg(x, ts, cond, {"prompt_embeds": null},
                                                          omega), target, atol=3e-3)
    assert seen == {-1, 0, 1}


def test_dit_collection_with_negative_classes(tmp_path):
    """DiT: the negative is a class; every trajectory here has one (probability of none 0)."""
    s = run_collect("tiny-dit", classes="0-1", num_per_prompt=2, steps=2, batch_size=4, seed=1,
                    out=str(tmp_path / "run"), empty_negative_probability=0.0,
                    negative_prompts=write_lines(tmp_path / "neg.txt", ["5", "6"]))
    (t,) = shard_tensors(Path(s["out"]))
    den = load_denoiser(load_preset("tiny-dit"), device="cpu")
    labels = t["uncond.class_labels"][t["uncond_row"]]
    assert t["uncond.class_labels"][0] == den.null_class  # row 0 is always the null class
    assert set(labels.tolist()) <= {5, 6} and (t["negative_index"] >= 0).all()
    for n in range(4):
        cond = {"class_labels": t["cond.class_labels"][t["cond_row"][n]].view(1)}
        out = den.predict_cfg(t["x"][n, 1:2].float(), t["timesteps"][n, 1], cond,
                              {"class_labels": labels[n].view(1)}, t["omega"][n].view(1))
        torch.testing.assert_close(out, t["target"][n, 1:2].float(), atol=3e-3, rtol=3e-3)


def test_negative_only_trajectories_pair_the_negative_with_the_empty_prompt(tmp_path):
    """--negative-only-probability 1: every trajectory with a negative has the null condition as
    its prompt (prompt_index -1), the target is CFG of that pair; those without keep their
    prompt. The same collection resumes; a different probability is a different collection."""
    common = dict(prompts=write_lines(tmp_path / "p.txt", PROMPTS[:2]), num_per_prompt=4,
                  steps=2, batch_size=8, seed=5, out=str(tmp_path / "run"),
                  negative_prompts=write_lines(tmp_path / "neg.txt", NEGATIVES),
                  empty_negative_probability=0.5)
    s = run_collect("tiny-sd", negative_only_probability=1.0, **common)
    assert s["negative_only_probability"] == 1.0
    manifest = TrajectoryStore(tmp_path / "run" / "trajectories").manifest()["config"]
    assert manifest["negative_only_probability"] == 1.0
    den = load_denoiser(load_preset("tiny-sd"), device="cpu")
    null = den.encode_null(1)["prompt_embeds"]
    prompts = {i: den.encode([p])["prompt_embeds"] for i, p in enumerate(PROMPTS[:2])}
    (t,) = shard_tensors(tmp_path / "run")
    negative = t["negative_index"] >= 0
    assert negative.any() and (~negative).any()  # both kinds at this seed
    assert ((t["prompt_index"] < 0) == negative).all()
    for n in range(len(t["trajectory_id"])):
        row = int(t["cond_row"][n])
        cond = {"prompt_embeds": t["cond.prompt_embeds"][row:row + 1]}
        p = int(t["prompt_index"][n])
        expected = null if p < 0 else prompts[p]
        torch.testing.assert_close(cond["prompt_embeds"].float(), expected, atol=2e-3, rtol=2e-3)
        uncond = {"prompt_embeds": t["uncond.prompt_embeds"][int(t["uncond_row"][n])][None]}
        x, ts, omega = t["x"][n, 1:2].float(), t["timesteps"][n, 1], t["omega"][n].view(1)
        torch.testing.assert_close(den.predict_cfg(x, ts, cond, uncond, omega),
                                   t["target"][n, 1:2].float(), atol=3e-3, rtol=3e-3)
    again = run_collect("tiny-sd", negative_only_probability=1.0, **common)
    assert again["new_trajectories"] == 0
    with pytest.raises(DataError, match="negative_only_probability: 1.0 there, 0.5 now"):
        run_collect("tiny-sd", negative_only_probability=0.5, **common)


def test_bad_negative_only_probability_is_refused(tmp_path, capsys):
    code, _, err = agd(capsys, "--workdir", str(tmp_path), "collect", "--preset", "tiny-sd",
                       "--negative-only-probability", "-0.2")
    assert code == 2 and "--negative-only-probability must be from 0 to 1, got -0.2" in err
    assert "hint:" in err and "Traceback" not in err


def test_adapter_file_records_negatives_and_reads_them(run):
    den = load_with_adapters(run / "adapter.safetensors", device="cpu")
    meta = den.adapters.metadata
    assert meta["adapter_config"]["negatives"] is True and den.adapters.wants_negative
    assert meta["negatives"]["negative_prompts"] == NEGATIVES
    x = torch.randn(1, *den.latent_shape())
    cond = den.encode(["a red fox in the snow"])
    a = den.predict(x, 500, cond, omega=4.0, negative=den.encode(["blurry"]))
    b = den.predict(x, 500, cond, omega=4.0, negative=den.encode(["a watermark"]))
    assert (a - b).abs().max() > 1e-6  # the negative reaches the adapters
    base = den.predict(x, 500, cond)
    same = den.predict(x, 500, cond, omega=1.0, negative=den.encode(["blurry"]))
    torch.testing.assert_close(same, base)  # ω = 1 is the conditional model, as in CFG
    from agd_cli.infra.errors import ModelError

    with pytest.raises(ModelError, match="trained with negative prompts"):
        den.predict(x, 500, cond, omega=4.0)


def test_generate_with_negative_runs_one_pass_per_step(run, capsys):
    code, out, err = agd(capsys, "generate", "a red fox", "--adapter", str(run / "adapter.safetensors"),
                         "--steps", str(STEPS), "--negative-prompt", "blurry", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["mode"] == "agd" and summary["nfe"] == STEPS
    assert summary["negative_prompt"] == "blurry" and "one pass per step" in err
    code, out, err = agd(capsys, "generate", "a red fox", "--adapter", str(run / "adapter.safetensors"),
                         "--steps", str(STEPS), "--negative-prompt", "blurry")
    assert code == 0 and "1 pass per step, negative prompt 'blurry'" in err


def test_old_adapter_falls_back_to_cfg_and_says_so(tmp_path, capsys):
    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    path = tmp_path / "old.safetensors"
    den.new_adapters().save(path, den.adapter_metadata(train_steps=0))  # the format from before
    assert "negatives" not in json.loads(load_meta(path)["adapter_config"])
    code, out, err = agd(capsys, "generate", "a red fox", "--adapter", str(path), "--steps", "2",
                         "--negative-prompt", "blurry", "--json")
    assert code == 0, err
    assert json.loads(out)["mode"] == "cfg" and json.loads(out)["nfe"] == 4
    assert "trained without negative prompts" in err and "real CFG" in err



@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_negative_is_no_negative_one_pass_with_any_adapter(tmp_path, capsys, blank):
    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    path = tmp_path / "old.safetensors"
    den.new_adapters().save(path, den.adapter_metadata(train_steps=0))
    code, out, err = agd(capsys, "generate", "a red fox", "--adapter", str(path), "--steps", "2",
                         "--negative-prompt", blank, "--json")
    assert code == 0, err
    assert json.loads(out)["mode"] == "agd" and json.loads(out)["nfe"] == 2
    assert "real CFG" not in err

def load_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_collection_from_before_negatives_still_trains(run, tmp_path):
    """Shards without uncond_row/negative_index and a manifest without negatives load as 'none'."""
    import shutil

    old = tmp_path / "old" / "trajectories"
    shutil.copytree(run / "trajectories", old)
    store = TrajectoryStore(old)
    for info in store.shards():
        path = old / info["file"]
        tensors = {k: v for k, v in load_file(str(path)).items()
                   if k not in ("uncond_row", "negative_index")}
        tensors = {k: v[:1] if k.startswith("uncond.") else v for k, v in tensors.items()}
        save_file(tensors, str(path))
        info.update(bytes=path.stat().st_size, sha256=sha256_file(path))
        path.with_suffix(".json").write_text(json.dumps(info), encoding="utf-8")
    manifest = store.manifest()
    for key in ("negative_prompts", "negative_source", "negatives_sha256", "empty_negative_probability"):
        manifest["config"].pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    data = TrajectoryData([old])
    assert not data.has_negatives
    batch = data.batch(torch.arange(6))
    null = data.uncond["prompt_embeds"]
    assert torch.equal(batch.uncond["prompt_embeds"], null.expand(6, *null.shape[1:]))


# --- bad input: exit 2, one clear message ---------------------------------------------------
def test_empty_negatives_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "neg.txt"
    empty.write_text("\n\n", encoding="utf-8")
    code, out, err = agd(capsys, "--workdir", str(tmp_path), "collect", "--preset", "tiny-sd",
                         "--negative-prompts", str(empty))
    assert code == 2 and "--negative-prompts" in err and "holds no prompts" in err
    assert "hint:" in err and "Traceback" not in err and not (tmp_path / "tiny-sd").exists()


@pytest.mark.parametrize("what", ["missing", "folder"])
def test_a_missing_or_folder_negatives_file_names_its_flag(tmp_path, capsys, what):
    path = tmp_path / "negatives"
    if what == "folder":
        path.mkdir()
    code, out, err = agd(capsys, "--workdir", str(tmp_path), "collect", "--preset", "tiny-sd",
                         "--negative-prompts", str(path), "--json")
    assert code == 2, err
    report = json.loads(out)
    expected = f"prompt file not found: {path}" if what == "missing" else f"{path} is a folder"
    assert expected in report["error"], report
    assert "--negative-prompts" in report["hint"] and "--prompts" not in report["hint"].replace(
        "--negative-prompts", ""), report
    assert not (tmp_path / "tiny-sd").exists() and "Traceback" not in err


def test_bad_empty_negative_probability_is_refused(tmp_path, capsys):
    code, _, err = agd(capsys, "--workdir", str(tmp_path), "collect", "--preset", "tiny-sd",
                       "--empty-negative-probability", "1.5")
    assert code == 2 and "--empty-negative-probability must be from 0 to 1, got 1.5" in err


def test_dit_negative_given_as_text_is_refused(tmp_path, capsys):
    den = load_denoiser(load_preset("tiny-dit"), "cpu")
    path = tmp_path / "dit.safetensors"
    den.new_adapters(AdapterConfig(kind="offset", negatives=True)).save(
        path, den.adapter_metadata(train_steps=0))
    code, out, err = agd(capsys, "generate", "3", "--adapter", str(path), "--steps", "2",
                         "--negative-prompt", "blurry", "--out", str(tmp_path / "img"))
    assert code == 2 and "--negative-prompt: unknown class 'blurry'" in err and "hint:" in err
    assert "Traceback" not in err and not (tmp_path / "img").exists()
    code, out, err = agd(capsys, "generate", "3", "--adapter", str(path), "--steps", "2",
                         "--negative-prompt", "5", "--out", str(tmp_path / "img"), "--json")
    assert code == 0, err
    assert json.loads(out)["mode"] == "agd" and json.loads(out)["nfe"] == 2


def test_api_negative_prompt_at_guidance_scale_one(tmp_path):
    """The pipeline's own negative_prompt reaches the adapters: same latents as agd's sampler."""
    from agd_cli.api import load_agd_adapter, unload_agd_adapter
    from agd_cli.core import sampling
    from tests.test_api import latents, tiny_sd_pipeline

    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    path = tmp_path / "neg.safetensors"
    den.new_adapters(AdapterConfig(kind="cross_attention", hidden_dim=32, context_dim=32,
                                   negatives=True)).save(path, den.adapter_metadata(train_steps=0))
    pipe, shape = tiny_sd_pipeline()
    noise = sampling.initial_noise(shape, [0])
    load_agd_adapter(pipe, path)
    agd = {"cross_attention_kwargs": {"agd_omega": 4.0}}
    with_neg = latents(pipe, noise, negative_prompt="blurry", **agd)
    without = latents(pipe, noise, **agd)
    own = load_with_adapters(path, "cpu")
    cond = own.encode(["a red fox"])
    for result, negative in ((with_neg, own.encode(["blurry"])), (without, own.encode_null(1))):
        ref = sampling.sample(own, cond, negative, 4.0, noise, mode="agd", steps=4, scheduler="ddim")
        torch.testing.assert_close(result, ref.x, rtol=1e-5, atol=1e-5)
        assert ref.nfe == 4
    assert (with_neg - without).abs().max() > 1e-5
    unload_agd_adapter(pipe)
    assert "encode_prompt" not in vars(pipe)  # the pipeline's own method again


# --- bench ----------------------------------------------------------------------------------
def test_bench_compares_agd_and_cfg_with_the_same_negative(run):
    from agd_cli.bench.run import run_bench

    r = run_bench(adapter=str(run / "adapter.safetensors"), negative_prompt="blurry", threads=1,
                  steps=STEPS, n=1, show_table=False)
    assert r["negative_prompt"] == "blurry" and r["adapter_trained_with_negatives"] is True
    assert r["methods"]["agd"]["nfe"] == STEPS and r["methods"]["cfg"]["nfe"] == 2 * STEPS


def test_bench_negatives_table_on_mnist(tmp_path, capsys):
    from agd_cli.bench.negatives import print_negatives_table
    from agd_cli.bench.run import run_bench

    den = load_denoiser(load_preset("mnist"), "cpu")
    path = tmp_path / "mnist" / "adapter.safetensors"
    cfg = AdapterConfig(**{**load_preset("mnist").adapter.to_dict(), "init": "xavier",
                           "negatives": True})
    den.new_adapters(cfg).save(path, den.adapter_metadata(train_steps=0))
    r = run_bench(preset="mnist", negatives=True, quality_samples=8, quality_batch=8,
                  quality_seed=10, omegas=["3"], workdir=str(tmp_path), threads=1, steps=2, n=1,
                  show_table=False)
    q = r["negatives"]
    assert q["settings"]["samples_per_row"] == 8 and q["unguided"]["nfe"] == 2
    assert q["settings"]["seeds"] == [10, 17]  # sample i uses seed quality_seed + i
    rows = q["by_omega"]["3"]
    assert set(rows) == {"cfg", "cfg-negative", "agd-negative", "agd"}
    assert [rows[m]["nfe"] for m in METHOD_ORDER] == [4, 4, 2, 2]
    for m, e in rows.items():
        assert 0 <= e["accuracy"] <= 1 and 0 <= e["negative_probability"] <= 1
        assert ("psnr_vs_cfg_negative" in e) == (m != "cfg-negative")
    assert math.isfinite(rows["agd"]["psnr_vs_cfg_negative"])
    # the negative changes CFG's images: CFG without it is not identical to CFG with it
    assert rows["cfg"]["psnr_vs_cfg_negative"] < 100
    check_paired(rows, "accuracy")

    check_negative_only(q["negative_only"])
    far = q["far_pairs"]
    assert far["settings"]["pairs"] == [[0, 1], [2, 4], [6, 7], [8, 1]]
    assert set(far["by_omega"]["3"]) == set(METHOD_ORDER)
    check_paired(far["by_omega"]["3"], "accuracy")
    for case_set in (q, far, q["negative_only"]):
        check_fidelity(case_set["by_omega"]["3"])
    print_negatives_table(q)
    err = capsys.readouterr().err
    assert "close digit d′" in err and 'negative only: prompt ""' in err and "lower = the" in err
    assert "far pairs: prompt digit d" in err and "negative fidelity gap" in err
    words = " ".join(err.split())  # the caption may wrap at any width
    assert "over agd's own without a negative" in words and "ω 3: " in words


def check_fidelity(rows: dict) -> None:
    """The gap on agd + negative's row: agreement without minus with the negative, each mean
    the row's own PSNR / SSIM, the interval around it."""
    f = rows["agd-negative"]["fidelity"]
    assert f["psnr_with_negative"] == pytest.approx(rows["agd-negative"]["psnr_vs_cfg_negative"])
    assert f["psnr_without_negative"] == pytest.approx(rows["agd"]["psnr_vs_cfg"])
    assert f["ssim_with_negative"] == pytest.approx(rows["agd-negative"]["ssim_vs_cfg_negative"])
    assert f["ssim_without_negative"] == pytest.approx(rows["agd"]["ssim_vs_cfg"])
    for name in ("psnr", "ssim"):
        assert f[f"{name}_gap"] == pytest.approx(f[f"{name}_without_negative"]
                                                 - f[f"{name}_with_negative"])
        lo, hi = f[f"{name}_gap_ci95"]
        assert lo <= f[f"{name}_gap"] <= hi
    assert -1 <= f["ssim_with_negative"] <= 1 and -1 <= f["ssim_without_negative"] <= 1


def check_negative_only(only: dict) -> None:
    """Prompt "", negative "a handwritten d′" (d′ = i % 10): rates and probabilities of d′."""
    assert only["settings"]["samples_per_row"] == 8 and only["settings"]["seeds"] == [10, 17]
    assert only["settings"]["prompt"] == "" and set(only["by_omega"]) == {"3"}
    rows = only["by_omega"]["3"]
    assert set(rows) == {"cfg", "cfg-negative", "agd-negative", "agd"}
    assert [only["unguided"]["nfe"]] + [rows[m]["nfe"] for m in METHOD_ORDER] == [2, 4, 4, 2, 2]
    for m, e in [("unguided", only["unguided"]), *rows.items()]:
        assert "accuracy" not in e and 0 <= e["negative_rate"] <= 1
        assert 0 < e["negative_probability"] <= 1 and e["negative_log_probability"] < 0
        assert ("psnr_vs_cfg_negative" in e) == (m not in ("unguided", "cfg-negative"))
    # same noise and prompt "" on both of CFG's branches: CFG without the negative is unguided
    cfg, unguided = rows["cfg"], only["unguided"]
    assert cfg["negative_rate"] == unguided["negative_rate"]
    assert abs(cfg["negative_probability"] - unguided["negative_probability"]) < 1e-6
    assert math.isclose(cfg["negative_log_probability"], unguided["negative_log_probability"],
                        rel_tol=1e-5)
    assert rows["cfg"]["psnr_vs_cfg_negative"] < 100  # the negative changes CFG's images
    check_paired(rows, "negative_rate")


def check_paired(rows: dict, key: str) -> None:
    """agd against CFG with the same negative (or none), on the same seeds: the difference and
    the ratio agree with the rows, each inside its interval; only the agd rows carry them."""
    for label, ref, field in (("agd-negative", "cfg-negative", "vs_cfg_negative"),
                              ("agd", "cfg", "vs_cfg")):
        v, a, b = rows[label][field], rows[label], rows[ref]
        assert v[f"{key}_points"] == pytest.approx(100 * (a[key] - b[key]), abs=1e-4)
        lo, hi = v[f"{key}_points_ci95"]
        assert lo <= v[f"{key}_points"] <= hi
        ratio = a["negative_probability"] / b["negative_probability"]
        assert v["negative_probability_ratio"] == pytest.approx(ratio, rel=1e-4)
        lo, hi = v["negative_probability_ratio_ci95"]
        assert 0 < lo <= hi
        assert [m for m, e in rows.items() if field in e] == [label]
    v, p = rows["agd-negative"]["vs_cfg_negative"], {m: e["negative_probability"] for m, e in rows.items()}
    ratios = (p["agd-negative"] / p["cfg-negative"]) / (p["agd"] / p["cfg"])
    assert v["negative_probability_ratio_over_no_negative"] == pytest.approx(ratios, rel=1e-4)
    lo, hi = v["negative_probability_ratio_over_no_negative_ci95"]
    assert 0 < lo <= hi


def test_preset_budget_for_negatives_applies_only_with_a_list(tmp_path):
    """`num_per_prompt_with_negatives` (mnist: 32) replaces `num_per_prompt` (16) when a negatives
    list is given; --num-per-prompt still wins; presets without the key keep num_per_prompt."""
    from agd_cli.collect.plan import CollectFlags, resolve_settings

    neg = write_lines(tmp_path / "neg.txt", ["a handwritten 1", "blurry"])
    plan = lambda **kw: resolve_settings(CollectFlags(out=str(tmp_path / "run"), **kw))  # noqa: E731
    mnist = load_preset("mnist")
    assert mnist.collect["num_per_prompt"] == 16 and mnist.collect["num_per_prompt_with_negatives"] == 32
    assert plan(preset="mnist").num_per_prompt == 16
    assert plan(preset="mnist", negative_prompts=neg).num_per_prompt == 32
    assert plan(preset="mnist", negative_prompts=neg, num_per_prompt=5).num_per_prompt == 5
    assert plan(preset="tiny-sd", negative_prompts=neg).num_per_prompt == \
        load_preset("tiny-sd").collect["num_per_prompt"]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_preset_budget_for_negatives_is_checked(tmp_path):
    from agd_cli.config.presets import load_preset as load
    from agd_cli.infra.errors import InputError

    bad = tmp_path / "bad.toml"
    text = (Path(__file__).resolve().parents[1] / "presets" / "mnist.toml").read_text(encoding="utf-8")
    bad.write_text(text.replace("num_per_prompt_with_negatives = 32",
                                "num_per_prompt_with_negatives = 0"), encoding="utf-8")
    with pytest.raises(InputError, match="num_per_prompt_with_negatives"):
        load(str(bad))


def test_previews_skip_the_null_condition_of_negative_only_trajectories():
    """A condition table with null rows among the prompts (negative-only trajectories): the
    preview takes prompt rows; a table of null rows only still previews something."""
    from agd_cli.train.output import preview_rows

    null = {"prompt_embeds": torch.zeros(1, 3, 4)}
    prompts = torch.randn(4, 3, 4)
    table = {"prompt_embeds": torch.cat([prompts[:2], null["prompt_embeds"], prompts[2:]])}
    assert preview_rows(table, null) == [0, 1, 3, 4]
    assert preview_rows(table, null, n=2) == [0, 1]
    assert preview_rows({"prompt_embeds": torch.zeros(2, 3, 4)}, null) == [0, 1]


# --- training on both orders of prompt and negative -----------------------------------------------
def test_swapped_roles_is_cfg_with_prompt_and_negative_swapped(run):
    """guidance.swapped_roles of a collected target == CFG recomputed from the teacher with the
    trajectory's negative as the prompt and its prompt as the negative."""
    from agd_cli.core.guidance import cfg_combine, swapped_roles

    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    b = TrajectoryData([run]).batch(torch.arange(36))
    rows = b.omega >= 1.5
    assert rows.sum() >= 4
    with torch.no_grad():
        eps_c = den.forward(b.x, b.timesteps, b.cond).float()
        eps_n = den.forward(b.x, b.timesteps, b.uncond).float()
    expected = cfg_combine(eps_c, eps_n, b.omega)  # unconditional branch: the prompt
    got = swapped_roles(b.target, eps_c, b.omega)
    scale = expected[rows].abs().max()
    assert (got[rows] - expected[rows]).abs().max() < 2e-2 * scale
    assert (b.target[rows] - expected[rows]).abs().max() > 0.1 * scale  # not the target itself


def _swap_preset(tmp_path: Path, share: float) -> str:
    text = (Path(load_preset("tiny-sd").source)).read_text()
    path = tmp_path / f"swap-{share}.toml"
    path.write_text(text.replace("[train]\n", f"[train]\nnegative_swap_share = {share}\n", 1))
    return str(path)


def test_training_with_swapped_rows_resumes_bit_identically(run, tmp_path):
    """Swapped rows come from the checkpointed generator: resumed after step 2 == 4 steps."""
    import shutil

    from tests.test_train import adapter_state

    def copy(name: str) -> Path:
        shutil.copytree(run / "trajectories", tmp_path / name / "trajectories")
        return tmp_path / name

    swap, plain = _swap_preset(tmp_path, 1.0), _swap_preset(tmp_path, 0.0)
    common = dict(batch_size=8, device="cpu", workdir=str(tmp_path), checkpoint_every=2)
    straight, resumed, unswapped = copy("straight"), copy("resumed"), copy("unswapped")
    run_train(run=str(straight), steps=4, preset=swap, **common)
    run_train(run=str(resumed), steps=4, preset=swap, **common)
    # as if killed after step 2's checkpoint: the rerun resumes there
    (resumed / "adapter.safetensors").unlink()
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    run_train(run=str(resumed), steps=4, preset=swap, **common)
    run_train(run=str(unswapped), steps=4, preset=plain, **common)
    a, b = adapter_state(straight / "adapter.safetensors"), adapter_state(resumed / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = adapter_state(unswapped / "adapter.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the swap changes what is learnt
    with pytest.raises(Exception, match="negative_swap_share"):  # a checkpoint of another share
        run_train(run=str(resumed), steps=6, preset=plain, **common)


def test_bad_negative_swap_share_is_refused(tmp_path):
    with pytest.raises(Exception, match="negative_swap_share"):
        load_preset(_swap_preset(tmp_path, 1.5))
