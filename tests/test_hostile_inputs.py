"""Hostile and broken inputs found by an audit: each is exit 2 with one message naming the value
(or a clean refusal in the library), never an internal error, and nothing written is harmed."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from agd_cli.cli import _as_agd_error
from agd_cli.config import checks
from agd_cli.config.presets import PRESET_DIR, load_preset
from agd_cli.core.adapter_file import AdapterFile
from agd_cli.infra.errors import DataError, InputError, WriteFailed
from agd_cli.infra.io import write_json
from tests.conftest import run_agd


def _json_error(out) -> dict:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr
    return json.loads(out.stdout)


# --- presets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "", "a\\b", "x" * 101])
def test_a_preset_name_cannot_leave_the_workspace(tmp_path, name):
    text = (PRESET_DIR / "tiny-sd.toml").read_text().replace('name = "tiny-sd"', f"name = {name!r}")
    (tmp_path / "p.toml").write_text(text)
    out = run_agd("collect", "--preset", str(tmp_path / "p.toml"), "--num-per-prompt", "1",
                  "--steps", "2", "--json", cwd=tmp_path)
    assert "bad value for 'name'" in _json_error(out)["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml"]  # nothing written anywhere
    assert not (tmp_path.parent / "escape").exists()


def test_a_preset_path_that_is_a_folder_says_so(tmp_path):
    (tmp_path / "mine.toml").mkdir()
    with pytest.raises(InputError, match="is a folder, not a .toml file"):
        load_preset(str(tmp_path / "mine.toml"))


def test_resume_with_an_edited_preset_of_the_same_name_is_refused(tmp_path):
    small = dict(cwd=tmp_path, timeout=600)
    args = ("--num-per-prompt", "1", "--steps", "2", "--out", "c", "--json")
    assert run_agd("collect", "--preset", "tiny-sd", *args, **small).returncode == 0
    manifest = (tmp_path / "c" / "trajectories" / "manifest.json").read_bytes()
    text = (PRESET_DIR / "tiny-sd.toml").read_text()
    resolution = load_preset("tiny-sd").resolution
    (tmp_path / "edited.toml").write_text(
        text.replace(f"resolution = {resolution}", f"resolution = {resolution * 2}", 1))
    err = _json_error(run_agd("collect", "--preset", str(tmp_path / "edited.toml"), *args, **small))
    assert f"resolution: {resolution} there, {resolution * 2} now" in err["error"]
    assert (tmp_path / "c" / "trajectories" / "manifest.json").read_bytes() == manifest


def test_a_batch_too_large_for_this_machine_is_refused_before_training(tmp_path, monkeypatch):
    """On the CPU the OS kills a process that runs out of memory (exit 137, no message); the
    step at this batch is estimated first and refused with a batch that fits."""
    small = dict(cwd=tmp_path, timeout=600)
    assert run_agd("collect", "--preset", "tiny-sd", "--num-per-prompt", "1", "--steps", "2",
                   "--out", "c", **small).returncode == 0
    err = _json_error(run_agd("train", "--run", "c", "--batch-size", "10000000",
                              "--steps", "1", "--device", "cpu", "--json", **small))
    assert "batch size 10000000: one training step needs about" in err["error"]
    assert "GiB free" in err["error"] and "--batch-size" in err["hint"]
    fits = int(err["hint"].split("--batch-size ")[1].split()[0])
    assert 64 < fits < 10000000
    assert not (tmp_path / "c" / "adapter.safetensors").exists()
    # a model the estimate cannot build does not stop training (the check is skipped, said so)
    import agd_cli.train.probe
    from agd_cli.train.run import run_train

    def cannot(*args, **kwargs):
        raise OSError("no config for the meta device")

    monkeypatch.setattr(agd_cli.train.probe, "measure_in_process", cannot)
    run_train(run=str(tmp_path / "c"), steps=1, batch_size=65, device="cpu", workdir=str(tmp_path))
    assert (tmp_path / "c" / "adapter.safetensors").exists()


# --- numbers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-1, 2**32, 2**70, 1.5, True, None])
def test_one_seed_range_for_every_command(value):
    with pytest.raises(InputError, match=f"--seed must be an integer from 0 to {checks.MAX_SEED}"):
        checks.seed(value)
    assert checks.seed(checks.MAX_SEED) == checks.MAX_SEED


@pytest.mark.parametrize("argv", [
    ("generate", "7", "--seed", str(2**70)),
    ("train", "--seed", str(2**70)),
    ("collect", "--preset", "mnist", "--seed", str(2**70)),
    ("bench", "--seeds", f"0,{2**70}"),
    ("bench", "--quality-seed", str(2**40)),
])
def test_seeds_beyond_64_bits_are_bad_input_everywhere(tmp_path, argv):
    err = _json_error(run_agd(*argv, "--json", cwd=tmp_path))
    assert "seed" in err["error"] and str(checks.MAX_SEED) in err["error"] + err["hint"]


@pytest.mark.parametrize("argv,shown", [
    (("generate", "7", "-w", "1e309"), "-w/--omega must be a finite number > 0, got 1e309"),
    (("collect", "--preset", "mnist", "--empty-negative-probability", "-1e999"),
     "--empty-negative-probability must be from 0 to 1, got -1e999"),
    (("collect", "--preset", "mnist", "--omega-max", "1E400"), "got 1E400"),
])
def test_a_number_too_large_for_a_float_is_named_as_written(tmp_path, argv, shown):
    assert shown in _json_error(run_agd(*argv, "--json", cwd=tmp_path))["error"]


def test_a_seed_range_too_large_to_run_is_refused_before_it_is_listed():
    with pytest.raises(InputError, match="more than 100,000 seeds"):
        checks.seed_list(["0-100000000"])
    assert checks.seed_list(["3-5", "4,9"]) == [3, 4, 5, 9]


@pytest.mark.parametrize("values", [["2,,4"], [""], ["2", ","], [" "]])
def test_empty_values_in_a_list_flag_are_named(values):
    with pytest.raises(InputError, match="has an empty value"):
        checks.omega_list(values, [4.0])
    with pytest.raises(InputError, match="has an empty value"):
        checks.seed_list(values)


@pytest.mark.parametrize("value", ["1e309", "inf", "-2", "nan"])
def test_bench_omegas_must_be_finite_and_positive(value):
    with pytest.raises(InputError, match=f"guidance scale {value} must be a positive number"):
        checks.omega_list([f"2,{value}"], [4.0])


def test_an_empty_workdir_is_named_not_replaced_by_the_default(tmp_path):
    err = _json_error(run_agd("train", "--workdir", "", "--json", cwd=tmp_path))
    assert err["error"] == "--workdir '' is empty"
    assert not (tmp_path / "agd-runs").exists()


def test_shard_count_zero_names_the_count(tmp_path):
    err = _json_error(run_agd("collect", "--preset", "tiny-sd", "--shard-index", "0",
                              "--num-shards", "0", "--json", cwd=tmp_path))
    assert err["error"] == "--num-shards must be a positive integer, got 0"


def test_too_many_trajectories_are_refused_before_any_list_is_built(tmp_path):
    err = _json_error(run_agd("collect", "--preset", "mnist", "--num-per-prompt",
                              "99999999999999999999", "--json", cwd=tmp_path))
    assert "--num-per-prompt 99999999999999999999 makes" in err["error"]


def test_too_many_images_are_refused_before_any_list_is_built(tmp_path):
    err = _json_error(run_agd("generate", "1", "2", "-n", "99999999999999999999", "--json",
                              cwd=tmp_path))
    assert err["error"].startswith("-n 99999999999999999999 makes 199,999,999,999,999,999,998 images")


# --- adapter files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    from agd_cli.families import load_denoiser

    den = load_denoiser(load_preset("tiny-sd"), "cpu")
    path = tmp_path_factory.mktemp("adapter") / "a.safetensors"
    den.new_adapters().save(path, den.adapter_metadata(train_steps=0))
    return path


def _tampered(adapter: Path, tmp_path: Path, **changes) -> Path:
    with safe_open(str(adapter), "pt") as f:
        meta = dict(f.metadata())
    meta.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        meta.pop(k)
    out = tmp_path / "t.safetensors"
    save_file(load_file(str(adapter)), str(out), metadata=meta)
    return out


@pytest.mark.parametrize("changes, field", [
    ({"omega_max": "abc"}, "omega_min/omega_max"),
    ({"omega_max": "0.5"}, "omega_min/omega_max"),
    ({"omega_max": "NaN"}, "omega_min/omega_max"),
    ({"adapter_config": "null"}, "adapter_config"),
    ({"adapter_config": json.dumps({"kind": "cross_attention", "hidden_dim": -4})},
     "adapter_config.hidden_dim"),
    ({"signature": None}, "signature"),
])
def test_a_damaged_adapter_metadata_value_is_named(adapter, tmp_path, changes, field):
    with pytest.raises(DataError, match=f"bad metadata value {field}="):
        AdapterFile.open(_tampered(adapter, tmp_path, **changes))
    AdapterFile.open(adapter)  # the untouched file still opens


def test_a_newer_adapter_format_says_so(adapter, tmp_path):
    with pytest.raises(DataError, match="of format 'agd-adapter/99'; this agd reads 'agd-adapter/1'"):
        AdapterFile.open(_tampered(adapter, tmp_path, format="agd-adapter/99"))


# --- the machine refuses --------------------------------------------------------------------------
def test_any_failed_write_of_an_output_is_bad_input_naming_the_file(tmp_path, monkeypatch):
    import agd_cli.infra.io as io

    def refuse(src, dst):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(dst))

    (tmp_path / "old.json").write_text("{}")
    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(WriteFailed) as caught:
        write_json(tmp_path / "old.json", {"new": 1})
    err = _as_agd_error(caught.value)
    assert err.exit_code == 2 and str(tmp_path / "old.json") in err.message
    assert (tmp_path / "old.json").read_text() == "{}"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["old.json"]  # no temp file left


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 40000000000 bytes"),
    MemoryError(),
])
def test_running_out_of_memory_is_reported_as_too_large_a_request(exc):
    err = _as_agd_error(exc)
    assert err.exit_code == 2 and err.message.startswith("out of memory")
    assert "--batch-size" in err.hint


def test_an_ordinary_bug_is_still_an_internal_error():
    assert _as_agd_error(RuntimeError("shape mismatch")).exit_code == 1



def test_collect_sets_a_copied_sidecar_aside_without_redoing_what_a_sound_shard_holds(tmp_path):
    args = ("collect", "--preset", "tiny-sd", "--num-per-prompt", "1", "--steps", "2",
            "--out", "c", "--json")
    first = json.loads(run_agd(*args, cwd=tmp_path, timeout=600).stdout)
    folder = tmp_path / "c" / "trajectories"
    sidecar = sorted(folder.glob("shard-*.json"))[0]
    shutil.copy(sidecar, sidecar.with_name("shard-w0-00000099.json"))
    out = run_agd(*args, cwd=tmp_path, timeout=600)
    again = json.loads(out.stdout)
    assert out.returncode == 0, out.stderr
    assert again["new_trajectories"] == 0 and again["trajectories"] == first["trajectories"]
    assert "0 to do" in out.stderr
    assert (folder / "damaged" / "shard-w0-00000099.json").is_file()
