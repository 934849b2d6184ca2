"""What fedlocale refuses in its input files, through ``fedlocale check`` (issue 15): every YAML file read by one
reader (UTF-8, repeated keys, aliases, unreadable files), ``--set`` problems named by the override, region names,
region folders, and data rows (stray CSV quotes, bytes that are not UTF-8). Each case exits 2, names file:line
and field, and writes nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.yamlfile import parse_yaml
from deploy.config import read_deploy
from fedlocale.cli import main
from tests.conftest import write_region


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Two valid regions ``a`` and ``b`` under ``tmp_path/regions``."""
    for i, name in enumerate(("a", "b")):
        write_region(tmp_path / "regions" / name, 8, 8, seed=20 + i)
    return tmp_path


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def config_text(root: Path, extra: str = "") -> str:
    return (
        "name: rules\n"  # 1
        "labels: [neg, pos]\n"  # 2
        "regions:\n"  # 3
        f"  - name: a\n    data: {root / 'regions' / 'a'}\n"  # 4-5
        f"  - name: b\n    data: {root / 'regions' / 'b'}\n"  # 6-7
        "train:\n"  # 8
        "  lr: 5.0e-3\n"  # 9
    ) + extra


def check(root: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``fedlocale check ARGS``; it must exit 2 and leave every file as it was; returns stderr."""
    before = tree(root)
    code = main(["check", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert tree(root) == before
    return err


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------------------
# The one YAML reader


def test_config_that_is_not_utf8_is_named_by_line(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_bytes(root / "c.yaml", config_text(root).encode() + b"name: caf\xe9\n")
    err = check(root, capsys, str(path))
    assert f"{path}:10: not UTF-8: byte 0xE9 at column 10 (save the file as UTF-8)" in err


def test_a_repeated_key_is_refused_naming_both_lines(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a second train: block would silently replace the first
    path = root / "c.yaml"
    path.write_text(config_text(root, "rounds: 2\ntrain:\n  epochs: 2\n"), encoding="utf-8")
    err = check(root, capsys, str(path))
    assert f"{path}:11: key 'train' repeated (first at line 8); YAML would keep only the last one" in err
    nested = root / "n.yaml"
    nested.write_text(config_text(root, "  lr: 1.0e-3\n"), encoding="utf-8")
    assert f"{nested}:10: key 'lr' repeated (first at line 9)" in check(root, capsys, str(nested))
    flow = root / "f.yaml"
    flow.write_text(config_text(root, "lora: {r: 4, r: 8}\n"), encoding="utf-8")
    assert f"{flow}:10: key 'r' repeated (first at line 10)" in check(root, capsys, str(flow))


def test_aliases_are_refused_so_an_alias_bomb_cannot_expand(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    path = root / "bomb.yaml"
    path.write_text(bomb, encoding="utf-8")
    err = check(root, capsys, str(path))
    assert f"{path}:2: alias *a: aliases are not supported (they can expand without bound); write the value out" in err


def test_unreadable_and_malformed_files_are_named(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = root / "c.yaml"
    folder.mkdir()
    assert f"{folder}: cannot read: Is a directory" in check(root, capsys, str(folder))
    control = write_bytes(root / "ctl.yaml", config_text(root).encode() + b"name: a\x07b\n")
    assert f"{control}:10: not valid YAML: character '\\x07' is not allowed" in check(root, capsys, str(control))
    listed = root / "list.yaml"
    listed.write_text("- a\n- b\n", encoding="utf-8")
    assert f"{listed}:1: must be a mapping (key: value lines) at the top level" in check(root, capsys, str(listed))


def test_a_policy_file_goes_through_the_same_reader(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = root / "a-policy.yaml"
    policy.write_text("region: a\nmin_train_examples: 1\nmin_train_examples: 2\n", encoding="utf-8")
    path = root / "c.yaml"
    path.write_text(config_text(root).replace("  - name: a\n", f"  - name: a\n    policy: {policy}\n"), "utf-8")
    err = check(root, capsys, str(path))
    assert f"{policy}:3: key 'min_train_examples' repeated (first at line 2)" in err


def test_a_deploy_file_goes_through_the_same_reader(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "deploy.yaml", b"run: run.yaml\nrun: other.yaml\n")
    with pytest.raises(ConfigError) as info:
        read_deploy(path)
    assert info.value.problems == [f"{path}:2: key 'run' repeated (first at line 1); YAML would keep only the last one"]
    latin = write_bytes(tmp_path / "latin.yaml", b"run: r\xe9.yaml\n")
    with pytest.raises(ConfigError, match=r"latin.yaml:1: not UTF-8: byte 0xE9 at column 7"):
        read_deploy(latin)


def test_yaml_values_are_read_as_before() -> None:
    value, lines = parse_yaml("a: 1\nb:\n  - {c: x}\n  - 5e-4\nd: &anchor yes\n", "t")
    assert value == {"a": 1, "b": [{"c": "x"}, "5e-4"], "d": True}  # an anchor alone expands nothing: allowed
    assert lines == {"a": 1, "b": 2, "b[0]": 3, "b[0].c": 3, "b[1]": 4, "d": 5}
    assert parse_yaml("", "t") == (None, {})


# ---------------------------------------------------------------------------------------------------------
# --set


def test_set_problems_name_the_override_not_a_line_of_the_file(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = root / "c.yaml"
    path.write_text(config_text(root, "rounds: 0\n"), encoding="utf-8")
    err = check(root, capsys, str(path), "--set", "train.lr=abc", "--set", "lora={r: 0}", "--set", "x.y=[1")
    assert "  - --set train.lr=abc: train.lr: must be float, got str 'abc'" in err
    assert "  - --set lora={r: 0}: lora.r: must be in [1, 256], got 0" in err
    assert "  - --set x.y=[1: value '[1' is not valid YAML" in err
    assert f"  - {path}:10: rounds: must be >= 1, got 0" in err  # the file's own problems keep their lines
    assert f"{path}:9: train.lr" not in err


# ---------------------------------------------------------------------------------------------------------
# Region names and region folders


def test_unicode_region_names_are_letters(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / "regions" / "a").rename(root / "regions" / "são-paulo")
    path = root / "c.yaml"
    text = config_text(root).replace("name: a\n    data: " + str(root / "regions" / "a"), "name: são-paulo\n    data: ")
    path.write_text(text.replace("data: \n", f"data: {root / 'regions' / 'são-paulo'}\n"), encoding="utf-8")
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    assert main(["check", str(root / "c.yaml"), "--regions", str(root / "regions")]) == 0


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "a\\\\b", "-x", "x" * 65, "tab\\tname", "a b"])
def test_region_names_that_cannot_be_a_folder_are_refused_with_the_rule(
    root: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = root / "c.yaml"
    path.write_text(config_text(root).replace("name: a\n", f'name: "{name}"\n'), encoding="utf-8")
    err = check(root, capsys, str(path))
    assert (
        f"{path}:4: regions[0].name: must be 1 to 64 Unicode letters, digits, '.', '_' or '-', starting with a "
        "letter or digit (it names a folder and a ledger)" in err
    )


def test_regions_and_regions_dir_together_are_refused(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = root / "c.yaml"
    path.write_text(config_text(root, f"regions_dir: {root / 'regions'}\n"), encoding="utf-8")
    err = check(root, capsys, str(path))
    assert f"{path}:10: regions_dir: cannot be combined with regions (line 3)" in err


def test_region_folders_with_a_misnamed_train_file_are_named(
    root: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    regions = root / "regions"
    for odd in ("Train.jsonl", "train.json", "train.JSONL", "train.txt"):
        folder = regions / f"odd-{odd.replace('.', '-')}"
        write_region(folder, 8, 8, seed=5)
        (folder / "train.jsonl").rename(folder / odd)
    (regions / "notes").mkdir()
    (regions / "notes" / "readme.txt").write_text("not a region\n", encoding="utf-8")
    (regions / ".archives").mkdir()
    path = root / "c.yaml"
    path.write_text("labels: [neg, pos]\nregions_dir: regions\n", encoding="utf-8")
    err = check(root, capsys, str(path))
    for odd in ("Train.jsonl", "train.json", "train.JSONL", "train.txt"):
        folder = regions / f"odd-{odd.replace('.', '-')}"
        found = ", ".join(sorted([odd, "test.jsonl", "val.jsonl"]))
        assert f"{path}:2: regions_dir: {folder}: holds {found} but no train.jsonl or train.csv" in err
    assert "split files are named train, val, test with .jsonl or .csv, in lower case" in err
    assert ".archives" not in err
    # the same through --regions; a folder without any split file is skipped, and said so
    for odd in ("Train.jsonl", "train.json", "train.JSONL", "train.txt"):
        folder = regions / f"odd-{odd.replace('.', '-')}"
        (folder / odd).rename(folder / "train.jsonl")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["check", str(path), "--regions", str(regions)]) == 0
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        f"regions: skipped {regions / 'notes'}: no train.jsonl or train.csv in it"
    ]  # hidden folders (.archives) are passed over silently


# ---------------------------------------------------------------------------------------------------------
# Data rows


def test_a_csv_stray_quote_is_caught_by_line(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = root / "regions" / "a"
    (folder / "train.jsonl").unlink()
    train = folder / "train.csv"
    train.write_text('text,label\ngood,pos\n"oops,neg\nbad,neg\nfine",pos\nok,pos\n', encoding="utf-8")
    path = root / "c.yaml"
    path.write_text(config_text(root), encoding="utf-8")
    err = check(root, capsys, str(path))
    assert f"{train}:3: a quoted field runs over 3 lines (3-5; a stray quote?): put each row on one line" in err


def test_data_that_stops_decoding_is_an_error_at_its_line(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = root / "regions" / "b" / "train.jsonl"
    lines = train.read_bytes().splitlines(keepends=True)
    lines[5] = lines[5].replace(b'"text": "', b'"text": "\xff')
    train.write_bytes(b"".join(lines))
    path = root / "c.yaml"
    path.write_text(config_text(root), encoding="utf-8")
    err = check(root, capsys, str(path))
    assert f"{train}:6: not UTF-8: byte 0xFF at column 11 (save the file as UTF-8)" in err
    assert "1 problem(s)" in err  # the one problem above, nothing else


def test_json_errors_in_data_are_whole_sentences(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = root / "regions" / "a" / "test.jsonl"
    with test.open("a", encoding="utf-8") as fh:
        fh.write('{"text": "tab\tin a string", "label": "pos"}\n')
    path = root / "c.yaml"
    path.write_text(config_text(root), encoding="utf-8")
    err = check(root, capsys, str(path))
    assert f"{test}:9: bad JSON: Invalid control character at column 14" in err


# ---------------------------------------------------------------------------------------------------------
# All problems, always


def test_deploy_plan_lists_every_problem_of_the_file_and_of_its_nodes(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad field of one node entry used to hide the nodes the run does not have, duplicate regions and a host
    the certificate cannot carry: they came one per attempt."""
    run = root / "run.yaml"
    run.write_text(config_text(root).replace("regions:\n", "model:\n  base: minilm\nregions:\n"))
    deploy = root / "deploy.yaml"
    deploy.write_text(
        f"run: {run}\n"  # 1
        f"workdir: {root / 'work'}\n"  # 2
        "superlink:\n"  # 3
        "  address: 'bad host!'\n"  # 4
        "  hosts: [localhost, 'no_underscores.example']\n"  # 5
        "nodes:\n"  # 6
        "  - {region: a, threads: 0}\n"  # 7
        "  - {region: nowhere}\n"  # 8
        "  - {region: a}\n"  # 9
    )
    before = tree(root)
    assert main(["deploy", "plan", str(deploy)]) == 2
    err = capsys.readouterr().err
    assert tree(root) == before and "Traceback" not in err
    for expected in (
        f"{deploy}:4: superlink.address: host 'bad host!' is neither an IP address nor a DNS name",
        f"{deploy}:5: superlink.hosts[1]: host 'no_underscores.example' is neither",
        f"{deploy}:7: nodes[0].threads: must be >= 1, got 0",
        f"{deploy}:6: nodes: region 'a' has more than one node",
        f"{deploy}:8: nodes[1].region: 'nowhere' is not a region of {run} (a, b)",
    ):
        assert expected in err, err
    assert "5 problem(s)" in err  # these five, each once
