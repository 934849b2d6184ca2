"""Guards on the project's shape: the generic package names resolve here, and the sides stay apart."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["server", "client", "common", "simulations", "deploy", "fedlocale"])
def test_package_resolves_to_this_repo(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == ROOT / package


def _imported_roots(package: str) -> set[str]:
    roots: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("common", {"server", "client", "simulations", "deploy", "fedlocale"}),
        ("server", {"client"}),
        ("client", {"server"}),
        ("deploy", {"server", "client", "fedlocale"}),
    ],
)
def test_import_boundaries(package: str, forbidden: set[str]) -> None:
    assert _imported_roots(package) & forbidden == set()


def test_required_layout() -> None:
    for name in ("pyproject.toml", "README.md", "server", "client", "common", "tests", "configs", "simulations"):
        assert (ROOT / name).exists(), name
