"""The CLI as a user meets it: help without torch, version, presets, error handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agd_cli import __version__
from agd_cli.cli import COMMANDS
from tests.conftest import run_agd

NO_TORCH = """
import sys
from agd_cli.cli import main
code = 0
try:
    main({args!r})
except SystemExit as e:
    code = e.code
print("TORCH_LOADED" if "torch" in sys.modules else "TORCH_FREE", code)
"""


@pytest.mark.parametrize("args", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_works_without_importing_torch(args):
    out = subprocess.run([sys.executable, "-c", NO_TORCH.format(args=args)],
                         capture_output=True, text=True, timeout=120)
    assert "Usage:" in out.stdout, out.stderr
    assert out.stdout.strip().endswith("TORCH_FREE 0"), out.stdout[-300:]


def test_version():
    out = run_agd("--version")
    assert out.returncode == 0 and __version__ in out.stdout


def test_presets_lists_user_presets_fast_and_hides_test_presets_unless_asked():
    code = ("import sys, json; from agd_cli.cli import main\n"
            "try:\n    main(['presets', '--json'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rows = {r["name"]: r for r in json.loads(out.stdout)["presets"]}
    assert {"sdxl", "sd21", "sd15", "dit", "mnist"} <= set(rows) and "tiny-sd" not in rows
    assert "adapter_params" not in rows["sdxl"] and out.stderr.strip().endswith("False")
    shown = run_agd("presets", "--all", env={"NO_COLOR": "1"})
    assert shown.returncode == 0 and "tiny-sd" in shown.stdout and "sdxl" in shown.stdout


def test_presets_json_lists_all_presets_with_ratios():
    out = run_agd("presets", "--json", "--all", "--params")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["presets"]}
    assert {"sdxl", "sd21", "sd15", "dit", "tiny-sd", "tiny-sdxl", "tiny-dit"} <= set(rows)
    assert rows["sdxl"]["ratio"] <= 0.03
    assert rows["dit"]["adapter_kind"] == "offset" and rows["sdxl"]["adapter_kind"] == "cross_attention"
    assert all(0 < r["ratio"] < 1 for r in rows.values())


BAD_PRESETS = [
    ('name = "x"\nfamily = "sd"\nbase_model = "config"\nresolution = 32\ncolour = 3\n'
     '[sampling]\nomega_min = 1.0\nomega_max = 4.0\n', "unknown key 'colour'"),
    ('name = "x"\nfamily = "unet"\nbase_model = "config"\nresolution = 32\n'
     '[sampling]\nomega_min = 1.0\nomega_max = 4.0\n', "'family': 'unet'"),
    ('name = "x"\nfamily = "sd"\nbase_model = "config"\nresolution = 32\n'
     '[sampling]\nomega_min = 5.0\nomega_max = 4.0\n', "sampling.omega_min 5 is larger than sampling.omega_max 4"),
    ('name = "x"\nfamily = "sd"\nbase_model = "config"\nresolution = -3\n'
     '[sampling]\nomega_min = 1.0\nomega_max = 4.0\n', "'resolution': -3"),
    ('name = "x"\nfamily = "sd"\nbase_model = "config"\nresolution = 32\n'
     '[adapter]\nkind = "loha"\n[sampling]\nomega_min = 1.0\nomega_max = 4.0\n', "'adapter.kind': 'loha'"),
    ('name = "x"\nfamily = "sd"\nbase_model = "config"\nresolution = 32\n'
     '[train]\nlr = "fast"\n[sampling]\nomega_min = 1.0\nomega_max = 4.0\n', "'train.lr': 'fast'"),
    ("name = [unclosed", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD_PRESETS)
def test_bad_preset_file_exits_2_with_message(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    out = run_agd("presets", "--preset", str(path))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "hint:" in out.stderr and "Traceback" not in out.stderr


def test_unknown_preset_name_exits_2():
    out = run_agd("presets", "--preset", "sdxxl", "--json")
    assert out.returncode == 2
    assert "unknown preset 'sdxxl'" in out.stderr
    assert json.loads(out.stdout)["error"].startswith("unknown preset")


def test_no_color_has_no_escape_codes(tmp_path):
    out = run_agd("presets", "--preset", str(tmp_path / "missing.toml"), env={"NO_COLOR": "1"})
    assert out.returncode == 2 and "\x1b[" not in out.stderr


# --- one vocabulary of flags across commands ---------------------------------------------------
def _options(name: str) -> dict:
    """Visible options of `agd NAME`: flag -> click.Option (every spelling of each option)."""
    import click

    from agd_cli.cli import group

    cmd = group.get_command(click.Context(group), name)
    found = {}
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            for flag in [*p.opts, *p.secondary_opts]:
                found[flag] = p
    return found


STAGES = ("collect", "train", "generate", "bench")


def test_every_command_uses_the_same_flag_names_for_the_same_concepts():
    opts = {name: _options(name) for name in COMMANDS}
    # one name per concept: the old synonyms are hidden aliases now
    for name, flags in opts.items():
        assert not {"--precision", "--checkpointing", "--no-checkpointing"} & set(flags), name
        if "-n" in flags:  # -n is images per prompt, nothing else
            assert name == "generate" and flags["-n"].name == "num_images"
    for name in STAGES:
        flags = opts[name]
        assert list(flags["--dtype"].type.choices) == ["fp16", "bf16", "fp32"], name
        assert flags["--device"].default == "auto" and flags["--device"].show_default, name
        assert flags["--preset"].help.startswith("Preset name"), name
        assert "the base and settings to use" in flags["--preset"].help, name
        assert "--json" in flags and "--workdir" in flags
    for name in ("train", "bench"):
        assert "--gradient-checkpointing" in opts[name] and "--no-gradient-checkpointing" in opts[name]
    for name in ("generate", "bench"):  # the adapter is chosen the same way
        assert {"--adapter", "--run", "--preset", "--steps", "--scheduler", "--negative-prompt"} <= set(opts[name])
        assert opts[name]["--run"].help == opts["generate"]["--run"].help
    assert "--num-prompts" in opts["bench"]


@pytest.mark.parametrize("name", STAGES)
def test_help_text_shows_the_vocabulary(name):
    out = run_agd(name, "--help", env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert out.returncode == 0
    assert "--dtype" in out.stdout and "--device" in out.stdout and "--precision" not in out.stdout
    assert "--checkpointing" not in out.stdout.replace("--gradient-checkpointing", "").replace(
        "--no-gradient-checkpointing", "")


@pytest.mark.parametrize("cmd, old, new", [
    (["bench", "--memory", "--precision", "bf16"], "--precision", "--dtype"),
    (["bench", "--memory", "--checkpointing"], "--checkpointing", "--gradient-checkpointing"),
    (["bench", "--memory", "--no-checkpointing"], "--checkpointing", "--gradient-checkpointing"),
    (["bench", "-n", "3"], "-n", "--num-prompts"),
    (["train", "--precision", "bf16"], "--precision", "--dtype"),
])
def test_deprecated_flags_still_work_with_one_note_and_clean_json(cmd, old, new, monkeypatch,
                                                                   capsys, tmp_path):
    """The old spelling reaches the same parameter; stderr says so in one line; stdout stays
    one JSON object."""
    from agd_cli.bench import run as bench
    from agd_cli.cli import main
    from agd_cli.train import run as train

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return {"processes": 1}

    monkeypatch.setattr(bench, "run_bench", fake)
    monkeypatch.setattr(train, "run_train", fake)
    main([*cmd, "--workdir", str(tmp_path), "--json"])  # exits only on errors
    out = capsys.readouterr()
    assert json.loads(out.out) == {"processes": 1}
    notes = [ln for ln in out.err.splitlines() if "deprecated" in ln]
    assert notes == [f"warning: {old} is deprecated, use {new}"]
    expected = {"--precision": ("precision", "bf16"), "-n": ("n", 3),
                "--checkpointing": ("checkpointing", cmd[-1] == "--checkpointing")}[old]
    assert seen[expected[0]] == expected[1]
    if cmd[0] == "bench" and old == "--precision":
        assert seen["dtype"] == "bf16"  # one --dtype for both the comparison and --memory


def test_the_new_flag_wins_over_its_deprecated_alias(monkeypatch, capsys, tmp_path):
    from agd_cli.cli import main
    from agd_cli.train import run as train

    seen = {}
    monkeypatch.setattr(train, "run_train", lambda **kw: seen.update(kw) or {"processes": 1})
    main(["train", "--dtype", "fp32", "--precision", "bf16", "--workdir", str(tmp_path), "--json"])
    assert seen["precision"] == "fp32" and "deprecated" in capsys.readouterr().err


@pytest.mark.parametrize("argv,named", [
    (["bench", "--optimizer", "adamw"], "--optimizer applies to `agd bench --memory` only"),
    (["bench", "--compare-cfg", "--train-batch-size", "2"], "--train-batch-size applies to"),
    (["bench", "--memory", "--preset", "tiny-sd", "--seeds", "0-3"],
     "--seeds applies to `agd bench --compare-cfg` only"),
])
def test_bench_refuses_an_option_its_mode_would_ignore(argv, named, tmp_path):
    out = run_agd(*argv, "--json", cwd=tmp_path)
    assert out.returncode == 2 and json.loads(out.stdout)["error"].startswith(named.split(" only")[0])


def test_renamed_flags_reach_the_same_parameter(monkeypatch, capsys, tmp_path):
    """collect --out -> --run, train --steps -> --max-steps, generate --cfg -> --mode cfg,
    bench --grid -> --out: the old spelling still works, with one note on stderr."""
    from agd_cli.cli import main
    from agd_cli.collect import run as collect
    from agd_cli.generate import run as generate
    from agd_cli.train import run as train

    seen = {}
    monkeypatch.setattr(collect, "run_collect", lambda **kw: seen.update(kw) or {})
    monkeypatch.setattr(train, "run_train", lambda **kw: seen.update(kw) or {"processes": 1})
    monkeypatch.setattr(generate, "run_generate", lambda prompts, **kw: seen.update(kw) or {})
    for argv, key, value in ((["collect", "--preset", "tiny-sd", "--out", "r1"], "out", "r1"),
                             (["collect", "--preset", "tiny-sd", "--run", "r2"], "out", "r2"),
                             (["train", "--steps", "7"], "steps", 7),
                             (["train", "--max-steps", "8"], "steps", 8),
                             (["generate", "x", "--cfg"], "cfg", True),
                             (["generate", "x", "--mode", "cfg"], "cfg", True),
                             (["generate", "x"], "cfg", False)):
        seen.clear()
        try:
            main([*argv, "--workdir", str(tmp_path), "--json"])
        except SystemExit as e:
            assert e.code == 0, argv
        assert seen[key] == value, argv
    err = capsys.readouterr().err
    assert "--out is deprecated, use --run" in err and "--steps is deprecated, use --max-steps" in err
    assert "--cfg is deprecated, use --mode cfg" in err
