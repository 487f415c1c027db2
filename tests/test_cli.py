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


def test_presets_json_lists_all_presets_with_ratios():
    out = run_agd("presets", "--json")
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
     '[adapter]\nkind = "lora"\n[sampling]\nomega_min = 1.0\nomega_max = 4.0\n', "'adapter.kind': 'lora'"),
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
