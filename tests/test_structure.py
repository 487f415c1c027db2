"""Each concept resolved once: the family spec from configs agrees with the loaded model, an
adapter file's metadata reads without its tensors, sizes are (height, width) everywhere."""

from __future__ import annotations

import pytest

from agd_cli.config import checks
from agd_cli.config.presets import load_preset, preset_from_record
from agd_cli.core.adapter_file import AdapterFile
from agd_cli.families import load_denoiser
from agd_cli.families.spec import FamilySpec
from agd_cli.infra.errors import DataError, InputError

TINY = ("tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-sd3", "tiny-pixart", "tiny-sana")


@pytest.mark.parametrize("name", TINY)
def test_the_spec_from_configs_agrees_with_the_loaded_model(name):
    p = load_preset(name)
    spec, den = FamilySpec(p), load_denoiser(p, "cpu", text=False)
    assert spec.latent_shape() == den.latent_shape()
    assert spec.latent_shape(64, 96) == den.latent_shape(64, 96)
    assert spec.preset.base_source() == den.source == f"random:{name}"
    if p.family == "dit":
        assert spec.num_classes == den.null_class == den.cond_spec()["num_classes"]


def test_mnist_spec_reads_the_shipped_teacher_folder():
    p = load_preset("mnist")
    den = load_denoiser(p, "cpu", text=False)
    assert FamilySpec(p).latent_shape() == den.latent_shape() and FamilySpec(p).vae_factor == 1


def test_adapter_metadata_reads_without_the_tensors_and_the_checksum_still_guards_them(tmp_path):
    p = load_preset("tiny-dit")
    den = load_denoiser(p, "cpu")
    path = tmp_path / "adapter.safetensors"
    den.new_adapters().save(path, den.adapter_metadata(train_steps=0))
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(4 * [0x7F])  # damage the last tensor's bytes, not the header
    path.write_bytes(bytes(data))
    f = AdapterFile.open(path)  # metadata only: the damage is not seen yet
    assert f.preset.name == "tiny-dit" and f.family == "dit" and f.base_model == "random:tiny-dit"
    assert f.omega_range == p.omega_range and f.negatives is False
    assert f.base_for(None) is f.preset and f.base_for("tiny-dit") is f.preset
    with pytest.raises(InputError, match="family sd"):
        f.base_for("tiny-sd")
    with pytest.raises(DataError, match="damaged"):
        den.load_adapters(f)


def test_one_preset_from_recorded_metadata():
    p = load_preset("tiny-sd")
    assert preset_from_record({"preset_toml": p.raw, "base_model": "random:tiny-sd"}).base_model == "config"
    assert preset_from_record({"preset_toml": p.raw, "base_model": "/models/x"}).base_model == "/models/x"
    assert preset_from_record({"preset": "tiny-sd"}).name == "tiny-sd"
    assert preset_from_record({}) is None


def test_sizes_are_height_then_width():
    assert checks.size("48x32") == (32, 48) and checks.size("64") == (64, 64)
    from agd_cli.generate.run import check_size

    assert check_size(checks.size("48x32"), load_preset("tiny-sd")) == (32, 48)


def test_dit_class_names_outlive_the_text_encoders():
    den = load_denoiser(load_preset("tiny-dit"), "cpu")
    den.labels = {"3": "tabby, tabby cat"}
    den.free_text_encoders()
    assert "id2label" not in den.text and den.class_id("tabby cat") == 3


def test_the_mnist_builtin_prompt_file_is_the_teachers_caption_list():
    """builtin:mnist reads assets/prompts/mnist.txt; it must stay evaluation.mnist.PROMPTS."""
    from agd_cli.config.prompts import builtin_prompts
    from agd_cli.evaluation.mnist import PROMPTS

    assert builtin_prompts("builtin:mnist") == list(PROMPTS)
    assert builtin_prompts("builtin:mnist.txt") == list(PROMPTS)
