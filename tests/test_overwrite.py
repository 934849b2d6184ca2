"""Issue 15: fedlocale never replaces or destroys what exists without an explicit flag, and writes nothing
before everything is checked. Every test goes through the CLI and proves the user's files are byte-for-byte
untouched (hash before/after)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fedlocale.cli import main
from tests.conftest import tiny_config, write_region


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → SHA-256), and every folder (→ "dir")."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fake_finished_run(folder: Path) -> Path:
    """A run folder as a finished simulation leaves it (real files, not the real contents)."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights\x01")
    (folder / "checkpoints" / "round-001").mkdir(parents=True)
    (folder / "checkpoints" / "round-001" / "adapter_model.safetensors").write_bytes(b"ck")
    (folder / "summary.json").write_text(json.dumps({"regions": {"north": {}}}))
    (folder / "metrics.jsonl").write_text('{"round": 1}\n')
    (folder / "config.yaml").write_text("name: earlier\n")
    (folder / "report.md").write_text("# the earlier run\n")
    (folder / "my-notes.txt").write_text("the user's own notes\n")
    return folder


@pytest.fixture()
def bad_data_config(tmp_path: Path, tiny_bert: Path) -> Path:
    """A config whose second region's data fails validation (a label the config does not list)."""
    regions = tmp_path / "regions"
    write_region(regions / "north", 16, 8, seed=1)
    south = write_region(regions / "south", 16, 8, seed=2)
    with (south / "train.jsonl").open("a") as fh:
        fh.write(json.dumps({"text": "so-so", "label": "maybe"}) + "\n")
    return tiny_config(tmp_path / "run.yaml", tiny_bert, regions)


def test_simulate_refuses_an_existing_run_naming_both_flags(
    tmp_path: Path, bad_data_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = fake_finished_run(tmp_path / "out")
    before = tree_hashes(tmp_path)
    assert main(["simulate", str(bad_data_config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "--resume" in err and "already holds a run" in err
    assert tree_hashes(tmp_path) == before


def test_simulate_overwrite_with_bad_data_writes_nothing(
    tmp_path: Path, bad_data_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = fake_finished_run(tmp_path / "out")
    before = tree_hashes(tmp_path)
    assert main(["simulate", str(bad_data_config), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "maybe" in err and "south" in err  # the data problem, not a folder problem
    assert tree_hashes(tmp_path) == before  # the old run's config.yaml too


def test_simulate_with_bad_data_creates_no_folder(
    tmp_path: Path, bad_data_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", str(bad_data_config)]) == 2
    assert not (tmp_path / "runs").exists()


def test_simulate_into_a_file_is_refused(
    tmp_path: Path, bad_data_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.write_text("mine\n")
    assert main(["simulate", str(bad_data_config), "--out", str(out), "--overwrite"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert out.read_text() == "mine\n"


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "a/b", ".hidden", ".."])
def test_run_name_must_stay_inside_runs(
    tmp_path: Path, tiny_bert: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    regions = tmp_path / "regions"
    write_region(regions / "north", 16, 8, seed=1)
    config = tiny_config(tmp_path / "run.yaml", tiny_bert, regions, name=name)
    monkeypatch.chdir(tmp_path)
    before = tree_hashes(tmp_path)
    assert main(["check", str(config)]) == 2
    assert main(["simulate", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:1: name:" in err and "runs/NAME" in err
    assert tree_hashes(tmp_path) == before


def _deploy_file(tmp_path: Path, tiny_bert: Path, hosts: list[str]) -> Path:
    import yaml

    regions = tmp_path / "regions"
    write_region(regions / "north", 16, 8, seed=1)
    write_region(regions / "south", 16, 8, seed=2)
    tiny_config(tmp_path / "run.yaml", tiny_bert, regions)
    spec = {"run": "run.yaml", "workdir": "work", "superlink": {"address": "127.0.0.1", "port": 9, "hosts": hosts}}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_deploy_init_with_a_bad_host_leaves_nothing(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy_file = _deploy_file(tmp_path, tiny_bert, ["localhost", "bad host!"])
    before = tree_hashes(tmp_path)
    assert main(["deploy", "init", str(deploy_file)]) == 2
    assert "'bad host!'" in capsys.readouterr().err
    assert tree_hashes(tmp_path) == before and not (tmp_path / "work").exists()
    # the corrected command needs no --force: nothing of the failed one is in its way
    deploy_file.write_text(deploy_file.read_text().replace("- bad host!", "- example.org"))
    assert main(["deploy", "init", str(deploy_file)]) == 0
    assert (tmp_path / "work" / "pki" / "ca.key").is_file()
    assert (tmp_path / "work" / "nodes" / "south" / "node.key").is_file()


def test_deploy_init_with_an_unmakeable_folder_leaves_nothing(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy_file = _deploy_file(tmp_path, tiny_bert, ["localhost"])
    (tmp_path / "work" / "nodes").mkdir(parents=True)
    (tmp_path / "work" / "nodes" / "south").write_text("a file where the node's folder goes\n")
    before = tree_hashes(tmp_path)
    assert main(["deploy", "init", str(deploy_file)]) == 2
    assert "south is not a folder" in capsys.readouterr().err
    assert tree_hashes(tmp_path) == before


def test_deploy_up_refuses_an_existing_run_before_starting_anything(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy_file = _deploy_file(tmp_path, tiny_bert, ["localhost"])
    out = fake_finished_run(tmp_path / "out")
    before = tree_hashes(tmp_path)
    assert main(["deploy", "up", str(deploy_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "--resume" in err
    assert tree_hashes(tmp_path) == before  # no credentials made, no process started


@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink"])
def test_predict_refuses_out_that_is_the_input(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "a good one"}\n')
    out = {"same path": source, "other spelling": Path("sub/../in.jsonl"), "symlink": tmp_path / "link.jsonl"}[how]
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        out.symlink_to(source)
    before = tree_hashes(tmp_path)
    # the model folder does not exist: the refusal comes before anything is read or loaded
    assert main(["predict", str(tmp_path / "no-model"), str(source), "--out", str(out), "--force"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert tree_hashes(tmp_path) == before


def test_predict_refuses_a_folder_and_an_existing_file_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "a good one"}\n')
    (tmp_path / "folder").mkdir()
    (tmp_path / "earlier.jsonl").write_text("the user's earlier predictions\n")
    before = tree_hashes(tmp_path)
    assert main(["predict", str(tmp_path / "no-model"), str(source), "--out", str(tmp_path / "folder")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "no-model"), str(source), "--out", str(tmp_path / "earlier.jsonl")]) == 2
    assert "--force" in capsys.readouterr().err
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("command", [["data", "demo", "{dir}"], ["data", "intent", "--out", "{dir}"]])
def test_data_builds_refuse_a_folder_holding_the_users_files(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "data"
    (folder / "my-region").mkdir(parents=True)
    (folder / "my-region" / "train.jsonl").write_text('{"text": "mine", "label": "pos"}\n')
    before = tree_hashes(tmp_path)
    # refused before any archive is fetched: no network, nothing written
    assert main([part.format(dir=folder) for part in command] + ["--cache-dir", str(tmp_path / "cache")]) == 2
    assert f"{folder}: holds my-region" in capsys.readouterr().err
    assert tree_hashes(tmp_path) == before


def test_clear_run_dir_removes_only_the_runs_own_files(tmp_path: Path) -> None:
    from common.runfiles import clear_run_dir, run_entries

    out = fake_finished_run(tmp_path / "out")
    notes = (out / "my-notes.txt").read_bytes()
    clear_run_dir(out)
    assert run_entries(out) == [] and [p.name for p in out.iterdir()] == ["my-notes.txt"]
    assert (out / "my-notes.txt").read_bytes() == notes
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the aside folder is gone
