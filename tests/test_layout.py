"""Guards on the project's shape: folders say who runs the code, and imports only go down the layers.

Layers, bottom up (a package imports its own modules and packages of lower layers only):

0. ``common``: what the server and the nodes both import (config, keys, data rows, model factory, metrics,
   ledger format, policy);
1. ``client`` (node only), ``server`` (server only), ``assets`` (what a machine builds offline): never each other;
2. ``runfolder``: the operator's run folder (summary, report, audit report, export, predict);
3. ``deploy``: per-country nodes and their server as real processes;
4. ``simulations``: everything in one process (simulation, baselines, demo data);
5. ``fedlocale``: the CLI;
6. ``benchmarks``: scripts outside the installed package.

``tests`` is above everything and imported by nothing.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "common": 0,
    "client": 1,
    "server": 1,
    "assets": 1,
    "runfolder": 2,
    "deploy": 3,
    "simulations": 4,
    "fedlocale": 5,
    "benchmarks": 6,
}
INSTALLED = {name for name, layer in LAYERS.items() if name != "benchmarks"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module of ours (or of tests) that ``path`` imports, anywhere in it (deferred imports count too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the module pkg.mod when there is one
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            ]
        for name in names:
            if name.split(".")[0] in {*LAYERS, "tests"}:
                yield node.lineno, name


GRAPH = {module: {name for _, name in _imports(path)} for module, path in MODULES.items()}


def _package(module: str) -> str:
    return module.split(".")[0]


def test_packages_resolve_to_this_repo() -> None:
    for package in LAYERS:
        module = importlib.import_module(package)
        assert module.__file__ is not None
        assert Path(module.__file__).resolve().parent == ROOT / package


def test_required_layout() -> None:
    for name in ("pyproject.toml", "README.md", "server", "client", "common", "tests", "configs", "simulations"):
        assert (ROOT / name).exists(), name


def _upward(module: str, path: Path) -> list[str]:
    """The imports of ``module`` (read from ``path``) that go sideways, up, or into the tests."""
    here, wrong = _package(module), []
    for line, name in _imports(path):
        there = _package(name)
        if there != here and (there not in LAYERS or LAYERS[there] >= LAYERS[here]):
            wrong.append(f"{path.name}:{line}: {here} (layer {LAYERS[here]}) imports {name}")
    return wrong


def test_imports_only_go_down() -> None:
    assert [problem for module, path in MODULES.items() for problem in _upward(module, path)] == []


def test_no_import_cycles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(GRAPH.get(module, ())):
            if name not in GRAPH:
                continue
            if state.get(name) == 1:
                cycles.append([*path[path.index(name) :], name])
            elif name not in state:
                visit(name, [*path, name])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def _reach(roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(n for n in GRAPH.get(module, ()) if n in GRAPH)
    return seen


def test_common_holds_only_what_both_sides_import() -> None:
    server = _reach({m for m in MODULES if _package(m) == "server"})
    client = _reach({m for m in MODULES if _package(m) == "client"})
    common = {m for m in MODULES if _package(m) == "common" and m != "common"}
    assert sorted(common - server) == [], "common modules the server never imports"
    assert sorted(common - client) == [], "common modules the nodes never import"


def test_benchmarks_stay_out_of_the_installed_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in include} == INSTALLED
    assert not list((ROOT / "simulations").glob("bench_*.py"))
    assert (ROOT / "benchmarks" / "results").is_dir()


def test_the_rules_catch_a_wrong_import(tmp_path: Path) -> None:
    """The checks above must be able to fail: an upward import in a file they read is reported."""
    wrong = tmp_path / "wrong.py"
    wrong.write_text("from common.keys import TASK\nfrom server import strategy\nimport tests.conftest\n")
    assert _upward("client.wrong", wrong) == [
        "wrong.py:2: client (layer 1) imports server.strategy",
        "wrong.py:3: client (layer 1) imports tests.conftest",
    ]
    assert _upward("benchmarks.wrong", wrong) == ["wrong.py:3: benchmarks (layer 6) imports tests.conftest"]


def _run_folder_names() -> tuple[set[str], set[str]]:
    """The file names (with a dot) and folder names that common/runfiles.py defines, read from its constants."""
    import common.runfiles as runfiles

    names = {v for k, v in vars(runfiles).items() if k.isupper() and isinstance(v, str) and not k.endswith("_SUFFIX")}
    files = {n for n in names if "." in n}
    return files, names - files


def _spelled_run_folder_names(path: Path) -> list[str]:
    """Run-folder names that ``path`` spells itself: a string literal equal to a file name of common/runfiles.py,
    a folder name joined onto a path (``/ "adapter"``), or a round entry's f-string (``f"round-{…}"``)."""
    files, folders = _run_folder_names()
    label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found: list[tuple[int, str]] = []
    tree = ast.parse(path.read_text(), str(path))
    # the literal parts of an f-string are judged with the f-string (below), not as strings of their own
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if id(node) in parts:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in files:
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("round-"):
            found.append((node.lineno, repr(node.value)))  # a glob or pattern over round entries
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and right.value in folders:
                found.append((node.lineno, f"/ {right.value!r}"))
        elif isinstance(node, ast.JoinedStr):
            head = node.values[0] if node.values else None
            if isinstance(head, ast.Constant) and str(head.value).startswith("round-"):
                found.append((node.lineno, "f'round-…'"))
    return [f"{label}:{line}: {what}" for line, what in sorted(found)]


def test_only_common_runfiles_spells_run_folder_names() -> None:
    """Every file and folder name of a run folder comes from common/runfiles.py (one place to rename one)."""
    own = ROOT / "common" / "runfiles.py"
    assert [hit for path in MODULES.values() if path != own for hit in _spelled_run_folder_names(path)] == []


def test_the_run_folder_name_check_can_fail(tmp_path: Path) -> None:
    """The check above must be able to fail: a file name, a folder joined onto a path and a round entry are found;
    the same word as a plain value (``kind = "adapter"``) is not."""
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        'import json\nfrom pathlib import Path\n\nout = Path("x")\n'
        'summary = json.loads((out / "summary.json").read_text())\n'
        'adapter = out / "adapter"\nkind = "adapter"\nround_dir = out / f"round-{3:03d}"\n'
        'kept = out.glob("round-*.safetensors")\n'
    )
    assert _spelled_run_folder_names(wrong) == [
        "wrong.py:5: 'summary.json'",
        "wrong.py:6: / 'adapter'",
        "wrong.py:8: f'round-…'",
        "wrong.py:9: 'round-*.safetensors'",
    ]


def test_a_node_without_dp_does_not_import_opacus() -> None:
    """A deployed node imports the ClientApp afresh for every message (Flower starts a process per message):
    Opacus, ≈1.3 s of that import, is imported only where DP-SGD is planned or trained (client.dp)."""
    import subprocess
    import sys

    probe = "import sys, client.app, client.task, client.preflight; print('opacus' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
