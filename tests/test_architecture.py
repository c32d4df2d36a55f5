"""The tree's contracts, checked on the source: dependencies point one way, modules stay short.

core <- inputs <- run <- study <- cli: a package may import those to its left and the top-level
foundation (errors, config, diskio, locking, messages), never one to its right, not even inside a
function. A module over MAX_LINES says why at the top of its docstring ("Long because ...").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peftlab"
LAYERS = ("core", "inputs", "run", "study", "cli")  # each may import only those before it
MAX_LINES = 350


def _layer(module: str) -> str | None:
    """The layer of a dotted peftlab module name; None for the foundation modules."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "peftlab":
        return None
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1] if parts[1] in LAYERS else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every peftlab module ``path`` imports, anywhere in the file, with its line number."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("peftlab")]


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_dependencies_point_one_way(path):
    own = _layer("peftlab." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    if own is None:  # the foundation imports no layer at all
        allowed: tuple[str, ...] = ()
    else:
        allowed = LAYERS[: LAYERS.index(own) + 1]
    wrong = [f"line {line}: {name}" for line, name in _imports(path)
             if _layer(name) is not None and _layer(name) not in allowed]
    assert not wrong, f"{path.relative_to(PACKAGE)} ({own or 'foundation'}) imports a later layer: {wrong}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_long_module_says_why(path):
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Long because" in docstring, f"{path.relative_to(PACKAGE)} has {lines} lines and no reason"


def test_no_relative_imports():
    """Absolute imports only: a reader sees where each name comes from without counting dots."""
    relative = [f"{p.relative_to(PACKAGE)}:{node.lineno}" for p in _modules()
                for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative


def test_the_public_api_resolves_and_import_peftlab_stays_light():
    import subprocess
    import sys

    import peftlab

    missing = [name for name in peftlab.__all__ if getattr(peftlab, name, None) is None]
    assert not missing
    probe = "import sys, peftlab; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
