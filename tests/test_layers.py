"""The dependency rule, from the imports of every module (function-level imports too): each package imports only
the packages below it, and the engine core and the kernels import no web or screen library."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom to top: a package may import itself and the packages before it
LAYERS = ("tradeoff_kernels", "engine", "serve", "voice", "tui", "bench", "tradeoff")
WEB_AND_SCREEN = {"starlette", "uvicorn", "httpx", "websockets", "prometheus_client", "textual", "textual_plotext",
                  "sounddevice"}
FORBIDDEN_LIBRARIES = {"tradeoff_kernels": WEB_AND_SCREEN, "engine": WEB_AND_SCREEN, "serve": {"textual", "textual_plotext"},
                       "voice": {"textual", "textual_plotext"}}


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, top-level name) of every import in the file, relative imports resolved to their package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, path.relative_to(root).parts[0] if node.level else node.module.split(".")[0]))
    return found


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for package in LAYERS:
        allowed = set(LAYERS[: LAYERS.index(package) + 1])
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imported_modules(path, root):
                where = f"{path.relative_to(root)}:{line}"
                if name in LAYERS and name not in allowed:
                    bad.append(f"{where} imports {name} (above {package})")
                if name in FORBIDDEN_LIBRARIES.get(package, ()):
                    bad.append(f"{where} imports {name} ({package} must not)")
    return bad


def test_every_import_points_down_the_layers():
    assert violations() == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The rule is able to fail: a module of the engine that imports the dashboard, or a web library, is caught."""
    fake = tmp_path / "engine"
    fake.mkdir()
    (fake / "leak.py").write_text("def f():\n    from tui.model import Sample\n    import httpx\n")
    assert violations(tmp_path) == ["engine/leak.py:2 imports tui (above engine)",
                                    "engine/leak.py:3 imports httpx (engine must not)"]


def test_each_package_is_imported_from_this_checkout(tmp_path):
    """As the installed `tradeoff` command imports them (from outside the checkout, no PYTHONPATH): a distribution
    with the same top-level name, such as Hugging Face's `kernels` that transformers installs, must not win."""
    code = "import importlib, sys; print(*(importlib.import_module(p).__file__ for p in sys.argv[1:]), sep='\\n')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, *LAYERS], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    where = dict(zip(LAYERS, out.stdout.split("\n")))
    assert {p: Path(f).parent for p, f in where.items()} == {p: ROOT / p for p in LAYERS}
