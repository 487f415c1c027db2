"""The shipped prompt set: builtin:coco500.txt is the text-to-image presets' default, and the
README's `--prompts coco500.txt` works as written."""

from __future__ import annotations

import pytest

from agd_cli.config.presets import load_preset
from agd_cli.config.prompts import ASSET_PROMPTS, load_negative_set, load_prompt_set
from tests.conftest import run_agd

TEXT_TO_IMAGE = ["sdxl", "sd15", "sd21", "sd35-medium", "sd35-large", "pixart-sigma", "sana-1600m"]


@pytest.mark.parametrize("name", TEXT_TO_IMAGE)
def test_text_to_image_presets_default_to_the_500_coco_captions(name):
    prompts, source = load_prompt_set(load_preset(name))
    assert source == "builtin:coco500.txt" and len(prompts) == 500 == len(set(prompts))
    assert prompts[0] == "A cow laying down on a beach under moon lite waters."


def test_a_bare_builtin_name_resolves_to_the_builtin_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no coco500.txt here
    preset = load_preset("sdxl")
    prompts, source = load_prompt_set(preset, "coco500.txt")
    assert source == "builtin:coco500.txt" and len(prompts) == 500
    assert "--prompts coco500.txt: no such file here; using the built-in set " \
           "builtin:coco500.txt" in capsys.readouterr().err
    negatives, where, _ = load_negative_set(preset, "negatives-sd.txt", 0.5)
    assert where == "builtin:negatives-sd.txt" and negatives
    assert "--negative-prompts negatives-sd.txt: no such file" in capsys.readouterr().err
    # a file of that name where the command runs is the user's, and wins
    (tmp_path / "coco500.txt").write_text("my own prompt\n", encoding="utf-8")
    assert load_prompt_set(preset, "coco500.txt") == (["my own prompt"], "coco500.txt")
    assert "built-in" not in capsys.readouterr().err


def test_the_attribution_ships_with_the_captions():
    from agd_cli.config import prompts

    assert (ASSET_PROMPTS / "coco500.txt").is_file()
    assert "CC BY 4.0" in prompts.__doc__ and "coco500.txt" in prompts.__doc__


@pytest.mark.parametrize("args", [["--preset", "sdxl"],
                                  ["--preset", "sdxl", "--prompts", "coco500.txt"]])
def test_collect_sdxl_starts_with_no_flags(tmp_path, args):
    """Planning passes with the default (or README's) prompts; offline, the run then stops where
    the weights load, with exit 2 and that reason, not at the prompts."""
    res = run_agd("--workdir", str(tmp_path / "ws"), "collect", *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "plan: sdxl · 500 prompts × 1 = 500 trajectories" in res.stderr, res.stderr
    assert "error: cannot load base model 'stabilityai/stable-diffusion-xl-base-1.0'" in res.stderr
    assert "prompt" not in res.stderr.split("error:", 1)[1].lower()
