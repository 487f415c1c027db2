"""The package's shape: no import circles (imports inside functions and TYPE_CHECKING blocks
counted too), modules, classes and functions small enough to read whole, no torch for --help."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import agd_cli

PACKAGE = Path(agd_cli.__file__).resolve().parent
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 400, 250, 60


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imported(name: str, path: Path, modules: dict) -> set[str]:
    """Every agd_cli module `name` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles_anywhere_in_the_package():
    graph = import_graph()
    assert len(graph) > 40 and "agd_cli.core.adapters" in graph["agd_cli.families.base"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_modules_classes_and_functions_are_small_enough_to_read_whole():
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_big.append(f"{rel}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not too_big, too_big


def test_the_cli_and_help_import_no_torch():
    code = ("import sys; from agd_cli.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "for name in ('collect', 'train', 'generate', 'bench', 'presets', 'env'):\n"
            "    try:\n        main([name, '--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_library_code_logs_instead_of_printing_and_can_be_silenced(capsys):
    """Library modules log through logging.getLogger(__name__); a library user silences agd with
    the standard logging API, the CLI shows the same lines."""
    import logging

    from agd_cli.config import workspace

    printing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                if "commands" not in p.parts and p.name not in ("ui.py", "cli.py")
                and ("ui.info(" in p.read_text(encoding="utf-8")
                     or "ui.warn(" in p.read_text(encoding="utf-8"))]
    assert not printing
    assert workspace.logger.name == "agd_cli.config.workspace"
    workspace.logger.info("shown as the CLI shows it")
    assert "shown as the CLI shows it" in capsys.readouterr().err
    logging.getLogger("agd_cli").setLevel(logging.ERROR)
    workspace.logger.warning("silenced")
    assert "silenced" not in capsys.readouterr().err


def test_quiet_and_verbose_flags_on_the_group_and_on_each_command(tmp_path):
    from tests.conftest import run_agd

    loud = run_agd("presets", env={"NO_COLOR": "1"})
    assert "test presets hidden" in loud.stderr
    for args in (("-q", "presets"), ("presets", "-q"), ("presets", "--quiet")):
        out = run_agd(*args, env={"NO_COLOR": "1"})
        assert out.returncode == 0 and "sdxl" in out.stdout, out.stderr
        assert "hidden" not in out.stderr
    assert run_agd("-v", "presets").returncode == 0
