"""The README's main job on the embedded default, with a tiny budget: collect → train →
generate → bench --compare-cfg --quality on the shipped `mnist` teacher, through the CLI."""

from __future__ import annotations

import json
import math

from agd_cli.config.presets import PRESET_DIR
from agd_cli.evaluation import mnist
from tests.conftest import run_agd


def test_the_embedded_default_is_shipped():
    """The main job's teacher and preset ship with agd: the end-to-end test never skips itself."""
    assert mnist.TEACHER_DIR.is_dir() and (PRESET_DIR / "mnist.toml").is_file()


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_mnist_pipeline_end_to_end(tmp_path):
    wd = str(tmp_path)
    col = _ok(run_agd("--workdir", wd, "collect", "--preset", "mnist", "--steps", "8",
                      "--num-per-prompt", "2", "--json"))
    assert col["trajectories"] == 2 * len(mnist.PROMPTS)  # built-in prompts: no --prompts needed

    tr = _ok(run_agd("--workdir", wd, "train", "--steps", "40", "--checkpoint-every", "20", "--json"))
    assert tr["steps"] == 40
    assert math.isfinite(tr["train_loss"]) and math.isfinite(tr["val_loss"])
    assert (tmp_path / "mnist" / "adapter.safetensors").is_file()

    gen = _ok(run_agd("--workdir", wd, "generate", "the digit seven", "-w", "4", "--steps", "8",
                      "-n", "2", "--json"))
    assert len(gen["images"]) == 2 and gen["nfe"] == 8 and gen["mode"] == "agd"

    b = _ok(run_agd("--workdir", wd, "bench", "--compare-cfg", "--quality", "--quality-samples", "20",
                    "--quality-batch", "20", "-w", "4", "--steps", "8", "--num-prompts", "2", "--json"))
    q = b["quality"]
    assert set(q) == {"unguided", "cfg", "agd", "settings"}
    assert (q["unguided"]["1"]["nfe"], q["cfg"]["4"]["nfe"], q["agd"]["4"]["nfe"]) == (8, 16, 8)
    for method in ("unguided", "cfg", "agd"):
        for e in q[method].values():
            assert 0 <= e["accuracy"] <= 1 and math.isfinite(e["fid"])
    assert (tmp_path / "mnist" / "bench" / "compare-cfg.png").is_file()
    assert q["settings"]["grid"] == str(tmp_path / "mnist" / "bench" / "quality.png")
