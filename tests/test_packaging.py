"""Packaging: the wheel built from a clone ships the top-level presets/ and they load from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_wheel(tmp_path: Path) -> Path:
    """Build the wheel offline from a copy of the sources (no build/ folder in the clone)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("agd_cli", "presets"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True,
                   capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("agd-*.whl")
    return wheel


def test_wheel_ships_every_preset_and_they_load_from_an_installed_copy(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in (ROOT / "presets").glob("*.toml"))
    assert shipped and "mnist.toml" in shipped
    assert {f"agd_cli/_presets/{n}" for n in shipped} <= names
    assert "agd_cli/assets/prompts/tiny-prompts.txt" in names  # builtin: prompt sets too

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, text=True)
    probe = ("import agd_cli, agd_cli.config.presets as p, agd_cli.config.prompts as q; "
             "print(agd_cli.__file__); print(p.PRESET_DIR); print(','.join(p.builtin_names())); "
             "print(len(q.builtin_prompts(p.load_preset('tiny-sd').prompts)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True,
                         capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.split("\n")
    assert out[0].startswith(str(site)) and out[1].startswith(str(site))
    assert out[2].split(",") == sorted(Path(n).stem for n in shipped)  # by name, not file name
    assert int(out[3]) > 0


def test_a_clone_or_editable_install_reads_the_top_level_presets():
    import agd_cli
    from agd_cli.config.presets import PRESET_DIR, builtin_names

    if Path(agd_cli.__file__).resolve().parent == ROOT / "agd_cli":
        assert PRESET_DIR.resolve() == ROOT / "presets"
    assert "mnist" in builtin_names() and not (ROOT / "agd_cli" / "presets").exists()
