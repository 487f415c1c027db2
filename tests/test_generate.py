"""`agd generate` as a user meets it: NFE counts, seeds, ω, files with metadata, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agd_cli.infra.images import make_grid, read_png_metadata, save_png, to_pil
from tests.conftest import agd_here, run_agd

STEPS = 4


def _make_adapter(workdir: Path, preset: str) -> Path:
    """An untrained (Xavier-initialised) adapter file in a run folder, as `agd train` leaves it."""
    from agd_cli.config.presets import load_preset
    from agd_cli.families import load_denoiser

    den = load_denoiser(load_preset(preset), "cpu")
    path = workdir / preset / "adapter.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    den.new_adapters().save(path, den.adapter_metadata(train_steps=0))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace with adapters for the three tiny families; tiny-sd is the newest."""
    workdir = tmp_path_factory.mktemp("ws")
    paths = [_make_adapter(workdir, p) for p in ("tiny-dit", "tiny-sdxl", "tiny-sd")]
    for age, p in enumerate(reversed(paths)):  # explicit mtimes: tiny-sd newest
        os.utime(p, (1e9 - age * 100, 1e9 - age * 100))
    return workdir


def agd(capsys, *args: str) -> tuple[int, str, str]:
    """`agd ARGS` in this process: (exit code, stdout, stderr)."""
    return agd_here(*args, capsys=capsys)


def generate_json(capsys, ws: Path, *args: str) -> dict:
    code, out, err = agd(capsys, "generate", "--workdir", str(ws), "--steps", str(STEPS),
                         "--json", *args)
    assert code == 0, err
    return json.loads(out)


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int16)


# --- images.py ---------------------------------------------------------------------------------
def test_make_grid_places_every_image_and_labels(tmp_path):
    import torch

    red = to_pil(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 20, 20))
    gray = to_pil(torch.full((1, 10, 10), 0.5))
    assert gray.mode == "L" and red.mode == "RGB"
    grid = make_grid([[red, red], [gray]], ["ω=1", "ω=6"], ["seed 0", "seed 1"])
    assert grid.width > 2 * 20 and grid.height > 2 * 20  # labels take room
    arr = np.asarray(grid)
    assert ((arr == [255, 0, 0]).all(-1)).sum() == 2 * 20 * 20  # both red cells, uncovered
    assert ((arr == [128, 128, 128]).all(-1)).sum() == 10 * 10  # gray centred in its cell
    with pytest.raises(ValueError, match="row labels"):
        make_grid([[red]], ["a", "b"], None)
    path = save_png(grid, tmp_path / "g.png", {"prompt": "ein Fuchs ω", "omega": 6.0})
    assert read_png_metadata(path) == {"prompt": "ein Fuchs ω", "omega": "6"}


# --- the payoff: one pass per step -------------------------------------------------------------
def test_nfe_is_steps_with_adapters_and_twice_with_cfg(ws, capsys):
    agd_run = generate_json(capsys, ws, "a red fox", "-w", "6", "--adapter",
                            str(ws / "tiny-sd/adapter.safetensors"))
    cfg_run = generate_json(capsys, ws, "a red fox", "-w", "6", "--run", str(ws / "tiny-sd"),
                            "--cfg")
    low = generate_json(capsys, ws, "a red fox", "-w", "2", "--run", "tiny-sd")
    assert agd_run["nfe"] == STEPS and agd_run["mode"] == "agd"
    assert cfg_run["nfe"] == 2 * STEPS and cfg_run["mode"] == "cfg"
    for run in (agd_run, cfg_run):
        assert run["omega"] == 6.0 and run["seconds"] > 0
        assert Path(run["images"][0]).parent == ws / "tiny-sd" / "samples"
        assert run["vae_decode"] == {"slicing": True, "tiling": False, "tile_size": 32}
    assert Path(agd_run["images"][0]).name == "a-red-fox-seed0-w6.png"
    assert Path(cfg_run["images"][0]).name == "a-red-fox-seed0-w6-cfg.png"
    meta = read_png_metadata(agd_run["images"][0])
    assert meta["prompt"] == "a red fox" and meta["omega"] == "6" and meta["seed"] == "0"
    assert meta["steps"] == str(STEPS) and meta["scheduler"] == "ddim"
    assert meta["nfe"] == str(STEPS) and meta["adapter"].endswith("adapter.safetensors")
    assert read_png_metadata(cfg_run["images"][0])["nfe"] == str(2 * STEPS)
    # ω reaches the adapters; real CFG on the same base differs from untrained adapters
    assert (pixels(low["images"][0]) != pixels(agd_run["images"][0])).any()
    assert (pixels(agd_run["images"][0]) != pixels(cfg_run["images"][0])).any()


def test_same_seed_same_image_whatever_the_batch(ws, tmp_path, capsys):
    fast = ("--steps", "2")  # seeds and batching do not need many steps
    batch = generate_json(capsys, ws, "a red fox", "-n", "2", "--batch-size", "2", "--seed", "7",
                          "--out", str(tmp_path / "a"), *fast)
    alone = generate_json(capsys, ws, "a red fox", "--seed", "8", "--out", str(tmp_path / "b"), *fast)
    again = generate_json(capsys, ws, "a red fox", "--seed", "8", "--out", str(tmp_path / "d"), *fast)
    assert batch["seeds"] == [7, 8] and len(batch["images"]) == 2
    assert np.array_equal(pixels(alone["images"][0]), pixels(again["images"][0]))  # bit-exact
    assert Path(again["images"][0]).name == "a-red-fox-seed8-w4.png" and again["skipped"] == 0
    # seed 8 alone vs inside a batch of 2: batched kernels may round differently, by ≤ 1 level
    assert np.abs(pixels(alone["images"][0]) - pixels(batch["images"][1])).max() <= 1
    assert (pixels(batch["images"][0]) != pixels(batch["images"][1])).any()
    single = generate_json(capsys, ws, "a red fox", "--steps", "1", "--out", str(tmp_path / "c.png"))
    assert single["images"] == [str(tmp_path / "c.png")]


@pytest.mark.parametrize("preset,prompts", [("tiny-sdxl", ["a red fox", "a cat"]),
                                            ("tiny-dit", ["3", "207"])])
def test_other_families(ws, capsys, preset, prompts):
    run = generate_json(capsys, ws, *prompts, "--run", preset, "--offload", "--steps", "2")
    cfg = generate_json(capsys, ws, *prompts, "--run", preset, "--cfg", "--steps", "2")
    assert run["nfe"] == 2 and cfg["nfe"] == 4
    assert len(run["images"]) == 2 and run["prompts"] == prompts
    assert read_png_metadata(run["images"][1])["prompt"] == prompts[1]
    res = load_preset_resolution(preset)
    assert Image.open(run["images"][0]).size == (res, res)
    assert (pixels(run["images"][0]) != pixels(run["images"][1])).any()


def load_preset_resolution(name: str) -> int:
    from agd_cli.config.presets import load_preset

    return load_preset(name).resolution


def test_latest_adapter_said_and_notices(ws, capsys):
    code, out, err = agd(capsys, "generate", "a red fox", "--workdir", str(ws), "--steps", "2",
                         "-w", "20", "--negative-prompt", "blurry", "--size", "48x32")
    assert code == 0, err
    assert "using the most recent adapter" in err and "tiny-sd" in err
    assert "outside the range this adapter was trained on [1, 8]" in err
    assert err.count("note:") == 1 and "4 NFE each (cfg" in err
    path = out.strip().splitlines()[-1]
    assert Image.open(path).size == (48, 32)
    meta = read_png_metadata(path)
    assert meta["negative_prompt"] == "blurry" and meta["mode"] == "cfg"


# --- rerun after Ctrl-C: resume, never clobber ---------------------------------------------------
def _interrupt_at_image(monkeypatch, n: int) -> None:
    """Ctrl-C while image n (1-based) is being made: the n - 1 before it are written."""
    import agd_cli.generate.run

    real, calls = agd_cli.generate.run.save_png, []

    def save_then_stop(image, path, metadata=None):
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(image, path, metadata)

    monkeypatch.setattr(agd_cli.generate.run, "save_png", save_then_stop)


def test_rerun_after_ctrl_c_resumes_and_says_so(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gi"
    args = ["generate", "a red fox", "-n", "3", "--batch-size", "1", "--steps", "2",
            "--workdir", str(ws), "--out", str(out), "--json"]
    _interrupt_at_image(monkeypatch, 2)
    code, stdout, err = agd(capsys, *args)
    assert code == 130 and "Traceback" not in err
    report = json.loads(stdout)  # one JSON object, saying what is kept and how to go on
    assert f"1 of 3 image(s) are written in {out}" in report["error"]
    assert "rerun the same command to resume" in report["hint"] and "other 2" in report["hint"]
    first = out / "a-red-fox-seed0-w4.png"
    kept = first.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [first.name]  # no temp file left behind
    monkeypatch.undo()
    torn = out / "a-red-fox-seed2-w4.png"  # a half-written file never counts as done
    torn.write_bytes(kept[: len(kept) // 2])
    code, stdout, err = agd(capsys, *args)
    assert code == 0, err
    again = json.loads(stdout)
    assert again["skipped"] == 1 and "resuming: 1 of 3 image(s)" in " ".join(err.split())
    assert [Path(p).name for p in again["images"]] == [
        first.name, "a-red-fox-seed1-w4.png", "a-red-fox-seed2-w4-2.png"]
    assert first.read_bytes() == kept and torn.stat().st_size == len(kept) // 2
    # the same command once more makes nothing and loads no model; other settings never clobber
    done = generate_json(capsys, ws, *args[1:-1])
    assert done["skipped"] == 3 and done["device"] is None and done["nfe"] == 2
    other = generate_json(capsys, ws, "a red fox", "--steps", "1", "--out", str(out))
    assert Path(other["images"][0]).name == "a-red-fox-seed0-w4-2.png" and other["skipped"] == 0
    assert first.read_bytes() == kept


def test_out_file_is_never_overwritten_by_another_image(ws, tmp_path, capsys):
    keep = tmp_path / "keep.png"
    save_png(Image.new("RGB", (8, 8), "red"), keep, {"prompt": "a red fox"})  # someone's file
    before = keep.read_bytes()
    code, out, err = agd(capsys, "generate", "a red fox", "--workdir", str(ws), "--steps", "1",
                         "--out", str(keep))
    assert code == 2 and "Traceback" not in err
    err = " ".join(err.split())
    assert f"--out '{keep}' already exists" in err and f"--out {tmp_path / 'keep-2.png'}" in err
    assert keep.read_bytes() == before and out == ""
    mine = tmp_path / "mine.png"
    made = generate_json(capsys, ws, "a red fox", "--steps", "1", "--out", str(mine))
    rerun = generate_json(capsys, ws, "a red fox", "--steps", "1", "--out", str(mine))
    assert made["skipped"] == 0 and rerun["skipped"] == 1 and rerun["images"] == [str(mine)]
    code, _, err = agd(capsys, "generate", "a red fox", "--workdir", str(ws), "--steps", "1",
                       "--seed", "1", "--out", str(mine))
    assert code == 2 and "already exists" in err


def test_an_image_written_meanwhile_by_another_generate_is_kept(ws, tmp_path, capsys, monkeypatch):
    """Two agd generate runs into one folder plan the same name; the one that writes second
    takes the next free name instead of replacing the other's image."""
    import agd_cli.generate.run as generate

    planned = generate.place_jobs

    def other_process_writes_first(plan):
        planned(plan)
        for job in plan.jobs:
            save_png(Image.new("RGB", (8, 8), "red"), job.path, {"prompt": "another run's"})

    monkeypatch.setattr(generate, "place_jobs", other_process_writes_first)
    out = tmp_path / "shared"
    made = generate_json(capsys, ws, "a red fox", "--steps", "1", "-n", "2", "--out", str(out))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a-red-fox-seed0-w4-2.png", "a-red-fox-seed0-w4.png",
                     "a-red-fox-seed1-w4-2.png", "a-red-fox-seed1-w4.png"]
    assert [Path(p).name for p in made["images"]] == ["a-red-fox-seed0-w4-2.png",
                                                       "a-red-fox-seed1-w4-2.png"]
    assert read_png_metadata(out / "a-red-fox-seed0-w4.png")["prompt"] == "another run's"
    single = tmp_path / "one.png"
    code, stdout, err = agd(capsys, "generate", "a red fox", "--workdir", str(ws), "--steps", "1",
                            "--out", str(single))
    assert code == 2 and "was written by another process" in " ".join(err.split())
    assert read_png_metadata(single)["prompt"] == "another run's"
    # a temp folder that cannot hold the lock file does not stop the images being written
    monkeypatch.undo()
    blocked = tmp_path / "a-file"  # a "folder" that is a file: nothing can be created in it
    blocked.write_text("")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(blocked))
    made = generate_json(capsys, ws, "a red fox", "--steps", "1", "--out", str(tmp_path / "x"))
    assert Path(made["images"][0]).is_file()


def test_long_prompt_warns_it_is_truncated(ws, tmp_path, capsys):
    code, _, err = agd(capsys, "generate", "a red fox " * 1000, "--workdir", str(ws), "--steps",
                       "1", "--out", str(tmp_path))
    err = " ".join(err.split())
    assert code == 0 and err.count("warning:") == 1
    assert "1 of 1 prompts are longer than the text encoder's" in err and "truncated" in err


def test_bad_dit_class_is_the_only_message(ws, tmp_path, capsys):
    code, _, err = agd(capsys, "generate", "cat", "--negative-prompt", "cat", "--run", "tiny-dit",
                       "--workdir", str(ws), "--steps", "1", "--out", str(tmp_path))
    assert code == 2 and "unknown class 'cat'" in err and "note:" not in err


# --- bad inputs: exit 2, one message naming the value, no traceback, nothing written -----------
BAD = [
    (["-w", "0"], "-w/--omega must be a finite number > 0, got 0"),
    (["-w", "-2"], "got -2"),
    (["-w", "nan"], "got nan"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--scheduler", "plms"], "unknown scheduler 'plms'"),
    (["-n", "0"], "-n/--num-images must be a positive integer, got 0"),
    (["--size", "30x32"], "--size 30x32 does not fit tiny-sd"),
    (["--size", "big"], "bad --size 'big'"),
    (["--adapter", "nope.safetensors"], "adapter file not found: nope.safetensors"),
    (["--run", "no-such-run"], "run folder 'no-such-run' has no adapter.safetensors"),
    (["--run", "tiny-sd", "--preset", "tiny-dit"], "trained for 'random:tiny-sd' (family sd), but --preset tiny-dit is 'random:tiny-dit'"),
    (["-n", "2", "--out", "{tmp}/one.png"], "is one file, but 2 images will be made"),
    (["--out", "{tmp}/file.txt/sub"], "file.txt' is a file, not a folder"),
    (["--out", "{tmp}/file.txt"], "is an existing file, not a folder"),
    (["--adapter", "{tmp}/file.txt"], "cannot read adapter file"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_inputs_exit_2_with_a_message(ws, tmp_path, capsys, args, message):
    (tmp_path / "file.txt").write_text("not an image folder")
    before = sorted(p for p in ws.rglob("*"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = agd(capsys, "generate", "a red fox", "--workdir", str(ws), *args)
    assert code == 2, err
    assert message in err and "Traceback" not in err and "hint:" in err
    assert sorted(p for p in ws.rglob("*")) == before


def test_adapter_for_another_base_of_the_same_family_names_both(ws, tmp_path, capsys):
    from agd_cli.config.presets import PRESET_DIR

    toml = (PRESET_DIR / "tiny-sd.toml").read_text()
    narrow = toml.replace('name = "tiny-sd"', 'name = "tiny-sd-narrow"').replace(
        "cross_attention_dim = 32", "cross_attention_dim = 16")
    narrow = narrow.replace("[architecture.text_encoder]\nhidden_size = 32",
                            "[architecture.text_encoder]\nhidden_size = 16")
    (tmp_path / "narrow.toml").write_text(narrow)
    code, out, err = agd(capsys, "generate", "a red fox", "--workdir", str(ws), "--steps", "1",
                         "--preset", str(tmp_path / "narrow.toml"), "--json")
    assert code == 2 and "Traceback" not in err
    assert "'random:tiny-sd'" in err and "'random:tiny-sd-narrow'" in err
    assert "random:tiny-sd-narrow" in json.loads(out)["error"]


def test_bad_input_in_a_real_process_and_no_prompt(ws, tmp_path, capsys):
    proc = run_agd("generate", "a red fox", "-w", "nan", "--workdir", str(ws))
    assert proc.returncode == 2 and "got nan" in proc.stderr and "Traceback" not in proc.stderr
    code, _, err = agd(capsys, "generate", "--workdir", str(ws))
    assert code == 2 and "no prompt given" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = agd(capsys, "generate", "x", "--workdir", str(empty))
    assert code == 2 and "no trained adapter found" in err
    shutil.rmtree(empty)


def test_preset_without_run_uses_the_adapter_of_that_presets_run(ws, capsys):
    """--preset means one thing everywhere (the preset to use); its run folder's adapter is the
    default, before the newest one in the workspace (tiny-sd here)."""
    code, out, err = agd(capsys, "generate", "3", "--workdir", str(ws), "--steps", "1",
                         "--preset", "tiny-dit", "--out", str(ws / "out-dit"), "--json")
    assert code == 0, err
    assert json.loads(out)["adapter"] == str(ws / "tiny-dit" / "adapter.safetensors")
