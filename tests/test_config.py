"""Run configuration: YAML files, ``--set`` overrides, region discovery, the client task and the CLI's exit code."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from common.config import (
    AggregationSettings,
    ClientTask,
    EarlyStopping,
    LoraSettings,
    ModelSettings,
    Region,
    RunConfig,
    SimulationSettings,
    TrainSettings,
    apply_override,
    client_task,
    load_config,
)
from common.errors import EXIT_BAD_INPUT, ConfigError
from fedlocale.cli import main
from tests.conftest import write_region


@pytest.fixture(scope="module")
def regions_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny valid region folders (``a``, ``b``, ``c``), a folder without a train file and a stray file."""
    root = tmp_path_factory.mktemp("cfg-regions")
    for i, name in enumerate(("b", "a", "c")):
        write_region(root / name, 8, 8, seed=10 + i)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a region\n")
    (root / "stray.txt").write_text("a file, not a folder\n")
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, *overrides: str, regions_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, regions_dir)
    assert info.value.source == str(path)
    return info.value.problems


def good_yaml(root: Path) -> str:
    return (
        "name: ok\n"
        "rounds: 2\n"
        "regions:\n"
        f"  - name: a\n    data: {root / 'a'}\n"
        f"  - name: b\n    data: {root / 'b'}\n"
        "train:\n"
        "  lr: 5.0e-3\n"
        "labels: [neg, pos]\n"
    )


# ---------------------------------------------------------------------------------------------------------
# Every problem, together, each with file:line and its dotted path


def test_every_problem_reported_together_with_file_line_and_path(tmp_path: Path, regions_root: Path) -> None:
    path = write(
        tmp_path / "bad.yaml",
        "name: bad\n"  # 1
        "rounds: three\n"  # 2  wrong type
        "colour: blue\n"  # 3  unknown key
        "regions:\n"  # 4
        f"  - name: a\n    data: {regions_root / 'a'}\n"  # 5, 6
        "  - name: west\n"  # 7
        "    data: missing\n"  # 8  no such folder (relative to the file's folder)
        "train:\n"  # 9
        "  lr: 5\n"  # 10  bad value
        "  speed: 3\n"  # 11  unknown nested key
        "aggregation:\n"  # 12
        "  method: median\n"  # 13  bad literal
        "labels: [neg, pos]\n",  # 14
    )
    problems = problems_of(path)
    p = str(path)
    expected_starts = [
        f"{p}:2: rounds: must be int, got str 'three'",
        f"{p}:3: colour: unknown key (known: ",
        f"{p}:8: regions[1].data: no such folder: {tmp_path / 'missing'}",
        f"{p}:10: train.lr: must be in (0, 1), got 5.0",
        f"{p}:11: train.speed: unknown key (known: ",
        f"{p}:13: aggregation.method: must be one of 'weighted', 'uniform', got 'median'",
    ]
    assert len(problems) == len(expected_starts), problems
    for problem, start in zip(problems, expected_starts, strict=True):
        assert problem.startswith(start), (problem, start)
    assert "lr" in problems[4] and "batch_size" in problems[4]  # the known keys of that level are listed


def test_duplicate_region_name_and_min_clients_reported_together(tmp_path: Path, regions_root: Path) -> None:
    path = write(
        tmp_path / "dup.yaml",
        "name: dup\n"  # 1
        "regions:\n"  # 2
        f"  - name: a\n    data: {regions_root / 'a'}\n"  # 3, 4
        f"  - name: a\n    data: {regions_root / 'b'}\n"  # 5, 6
        "aggregation:\n"  # 7
        "  min_clients: 3\n"  # 8
        "seed: x\n"  # 9
        "labels: [neg, pos]\n",  # 10
    )
    p = str(path)
    assert problems_of(path) == [
        f"{p}:2: regions: region name 'a' appears more than once",
        f"{p}:8: aggregation.min_clients: is 3 but there are only 2 regions",
        f"{p}:9: seed: must be int, got str 'x'",
    ]


def test_missing_folder_does_not_hide_duplicate_name_or_min_clients(tmp_path: Path, regions_root: Path) -> None:
    path = write(
        tmp_path / "three.yaml",
        "regions:\n"  # 1
        f"  - name: a\n    data: {regions_root / 'a'}\n"  # 2, 3
        "  - name: a\n    data: nowhere\n"  # 4, 5
        "aggregation:\n"  # 6
        "  min_clients: 3\n"  # 7
        "labels: [neg, pos]\n",  # 8
    )
    problems = problems_of(path)
    assert any(":5: regions[1].data: no such folder" in p for p in problems)
    assert any("region name 'a' appears more than once" in p for p in problems)
    assert any(":7: aggregation.min_clients: is 3" in p for p in problems)


def test_region_folder_without_test_split(tmp_path: Path) -> None:
    folder = tmp_path / "only-train"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "x", "label": "pos"}\n')
    path = write(
        tmp_path / "c.yaml",
        "regions:\n  - name: r\n    data: only-train\naggregation:\n  min_clients: 1\nlabels: [neg, pos]\n",
    )
    assert problems_of(path) == [f"{path}:3: regions[0].data: no test.jsonl or test.csv in {folder}"]


def test_region_names_and_non_mapping_top_level(tmp_path: Path, regions_root: Path) -> None:
    path = write(
        tmp_path / "n.yaml", f"regions:\n  - name: 'bad name'\n    data: {regions_root / 'a'}\nlabels: [neg, pos]\n"
    )
    problems = problems_of(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2: regions[0].name: must be 1 to 64 Unicode letters")
    listed = write(tmp_path / "list.yaml", "- a\n- b\n")
    assert problems_of(listed) == [f"{listed}:1: must be a mapping (key: value lines) at the top level"]
    broken = write(tmp_path / "broken.yaml", "name: x\ntrain: [1, 2\n")
    (problem,) = problems_of(broken)
    assert problem.startswith(f"{broken}:") and "not valid YAML" in problem


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_problems_are_in_line_order(tmp_path: Path, regions_root: Path) -> None:
    path = write(
        tmp_path / "o.yaml",
        "early_stopping:\n  patience: 0\n"  # 1, 2
        "lora:\n  r: 0\n  dropout: 1.5\n"  # 3, 4, 5
        f"regions:\n  - name: a\n    data: {regions_root / 'a'}\n"  # 6, 7, 8
        "rounds: 0\n"  # 9
        "aggregation:\n  min_clients: 1\n"  # 10, 11
        "labels: [neg, pos]\n",  # 12
    )
    lines = [int(p.split(":")[1]) for p in problems_of(path)]
    assert lines == [2, 4, 5, 9]


# ---------------------------------------------------------------------------------------------------------
# Numbers that YAML 1.1 reads as strings


def test_exponent_strings_are_read_as_floats(tmp_path: Path, regions_root: Path) -> None:
    path = write(
        tmp_path / "f.yaml",
        good_yaml(regions_root).replace("lr: 5.0e-3", "lr: 5e-4\n  weight_decay: 1e-2")
        + "aggregation:\n  round_timeout: 1e3\n",
    )
    cfg = load_config(path)
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.01
    assert cfg.aggregation.round_timeout == 1000.0
    assert cfg.train.epochs == 1.0 and isinstance(cfg.train.epochs, float)


def test_non_numeric_string_for_a_float_is_a_type_error(tmp_path: Path, regions_root: Path) -> None:
    path = write(tmp_path / "f.yaml", good_yaml(regions_root).replace("lr: 5.0e-3", "lr: fast"))
    assert problems_of(path) == [f"{path}:9: train.lr: must be float, got str 'fast'"]


# ---------------------------------------------------------------------------------------------------------
# --set overrides


def test_override_sets_a_value_read_as_yaml(tmp_path: Path, regions_root: Path) -> None:
    path = write(tmp_path / "o.yaml", good_yaml(regions_root))
    cfg = load_config(path, ["train.lr=1e-4", "rounds=7", "labels=[bad, good, neutral]", "regions.0.name=east"])
    assert cfg.train.lr == 1e-4
    assert cfg.rounds == 7
    assert cfg.labels == ("bad", "good", "neutral")
    assert cfg.region_names == ("east", "b")


def test_override_creates_a_nested_key_missing_from_the_file(tmp_path: Path, regions_root: Path) -> None:
    path = write(tmp_path / "o.yaml", good_yaml(regions_root))
    cfg = load_config(path, ["early_stopping.patience=3", "lora.target_modules=[query]"])
    assert cfg.early_stopping.patience == 3
    assert cfg.lora.target_modules == ("query",)


def test_override_problems_name_the_override_not_a_line_of_the_file(tmp_path: Path, regions_root: Path) -> None:
    path = write(tmp_path / "o.yaml", good_yaml(regions_root))
    problems = problems_of(path, "train.speed=3", "train.batch_size=0")
    assert len(problems) == 2
    assert problems[0].startswith("--set train.speed=3: train.speed: unknown key")
    assert problems[1] == "--set train.batch_size=0: train.batch_size: must be >= 1, got 0"


@pytest.mark.parametrize(
    ("assignment", "prefix"),
    [
        ("train.lr", "--set train.lr: expected KEY=VALUE"),
        ("rounds.x=1", "--set rounds.x=1: rounds is 2, not a mapping"),  # rounds is an int
        ("regions.x=1", "--set regions.x=1: regions is a list"),
        ("rounds.x.y=1", "--set rounds.x.y=1: rounds is 2, not a mapping"),
        ("train.lr=[1", "--set train.lr=[1: value '[1' is not valid YAML: expected ',' or ']'"),
        ("regions.5.name=x", "--set regions.5.name=x: regions is a list (index it with a number in range)"),
    ],
)
def test_override_bad_syntax(tmp_path: Path, regions_root: Path, assignment: str, prefix: str) -> None:
    path = write(tmp_path / "o.yaml", good_yaml(regions_root))
    with pytest.raises(ConfigError) as info:
        load_config(path, [assignment])
    (problem,) = info.value.problems
    assert problem.startswith(prefix)


def test_override_problems_with_a_regions_dir_are_only_the_overrides(tmp_path: Path, regions_root: Path) -> None:
    # a bad --set keeps the folder from being read: no false "need at least one region" beside it; a --set that
    # makes up a section is named, not the file
    path = write(tmp_path / "d.yaml", f"name: d\nregions_dir: {regions_root}\nlabels: [neg, pos]\n")
    assert problems_of(path, "rounds") == ["--set rounds: expected KEY=VALUE"]
    (unknown,) = problems_of(path, "nosuch.key=1")
    assert unknown.startswith("--set nosuch.key=1: nosuch: unknown key")


@pytest.mark.parametrize(
    ("assignment", "problem"),
    [
        ("lora.r=257", "--set lora.r=257: lora.r: must be in [1, 256], got 257"),
        ("lora.r=99999999999999999999999", "--set lora.r=99999999999999999999999: lora.r: must be in [1, 256]"),
        ("seed=18446744073709551616", "--set seed=18446744073709551616: seed: must be in [0, 2**63 - 1]"),
        ("seed=-1", "--set seed=-1: seed: must be in [0, 2**63 - 1], got -1"),
    ],
)
def test_a_rank_or_seed_torch_cannot_take_is_refused(
    tmp_path: Path, regions_root: Path, assignment: str, problem: str
) -> None:
    path = write(tmp_path / "o.yaml", good_yaml(regions_root))
    (found,) = problems_of(path, assignment)
    assert found.startswith(problem)
    assert load_config(path, ["lora.r=256", f"seed={2**63 - 1}"]).lora.r == 256
    # the stacked adapter of local / dual personalization has rank r + local_r: bounded alike, named on local_r
    (stacked,) = problems_of(path, "lora.r=256", "lora.alpha=256", "personalize.mode=local")
    assert "personalize.local_r: local stacks an adapter of rank lora.r + local_r = 260, above 256" in stacked


def _two_regions_listed(path: Path, a: Path, b: Path) -> Path:
    """A run config listing regions ``a`` (its data on line 5) and ``b``."""
    regions = f"regions:\n  - name: a\n    data: {a}\n  - name: b\n    data: {b}\n"
    return write(path, f"name: l\nlabels: [neg, pos]\n{regions}")


def test_a_region_holding_a_split_twice_is_refused_in_a_list_and_in_a_folder(tmp_path: Path) -> None:
    # train.jsonl beside train.csv: reading one would silently leave the other out
    root = tmp_path / "regions"
    for i, name in enumerate(("a", "b")):
        write_region(root / name, 8, 8, seed=10 + i)
    (root / "a" / "train.csv").write_text("text,label\nhello,pos\n")
    (root / "b" / "test.csv").write_text("text,label\nhello,pos\n")
    listed = _two_regions_listed(tmp_path / "l.yaml", root / "a", root / "b")
    problems = problems_of(listed)
    assert f"{listed}:5: regions[0].data: {root / 'a'}: holds both train.jsonl and train.csv; keep one" in problems[0]
    assert f"regions[1].data: {root / 'b'}: holds both test.jsonl and test.csv" in problems[1]
    found = write(tmp_path / "d.yaml", f"name: d\nregions_dir: {root}\nlabels: [neg, pos]\n")
    (problem,) = problems_of(found)
    assert f"regions_dir: {root / 'a'}: holds both train.jsonl and train.csv" in problem


def test_a_file_where_a_folder_belongs_and_a_folder_named_like_a_split_are_named(tmp_path: Path) -> None:
    root = tmp_path / "regions"
    write_region(root / "a", 8, 8, seed=10)
    (root / "b" / "train.jsonl").mkdir(parents=True)  # a folder with the split file's name
    (tmp_path / "file").write_text("not a folder\n")
    problems = problems_of(_two_regions_listed(tmp_path / "l.yaml", tmp_path / "file", root / "b"))
    assert f"regions[0].data: {tmp_path / 'file'} is a file, not a folder" in problems[0]
    assert f"regions[1].data: {root / 'b' / 'train.jsonl'} is not a file (a folder?)" in problems[1]
    found = write(tmp_path / "d.yaml", f"name: d\nregions_dir: {root}\nlabels: [neg, pos]\n")
    (problem,) = problems_of(found)
    assert f"regions_dir: {root / 'b' / 'train.jsonl'} is not a file (a folder?)" in problem
    pointed = write(tmp_path / "p.yaml", f"name: p\nregions_dir: {tmp_path / 'file'}\nlabels: [neg, pos]\n")
    (problem,) = problems_of(pointed)
    assert f"regions_dir: {tmp_path / 'file'} is a file, not a folder" in problem


def test_policies_naming_a_file_is_one_problem_on_the_override(tmp_path: Path, regions_root: Path) -> None:
    path = write(tmp_path / "o.yaml", good_yaml(regions_root))
    (tmp_path / "afile.txt").write_text("x\n")
    (problem,) = problems_of(path, f"policies={tmp_path / 'afile.txt'}")
    assert problem.startswith(f"--set policies={tmp_path / 'afile.txt'}: policies: {tmp_path / 'afile.txt'} is a file")


def test_apply_override_on_plain_data() -> None:
    raw: dict[str, object] = {"train": {"lr": 0.1}, "regions": [{"name": "a"}]}
    apply_override(raw, "train.lr=2e-5")
    apply_override(raw, "a.b.c=[1, 2]")
    apply_override(raw, "regions.0.name=z")
    apply_override(raw, "name=")
    apply_override(raw, "text=a=b")  # only the first '=' splits
    assert raw == {
        "train": {"lr": "2e-5"},  # YAML 1.1 reads it as a string; load_config converts it
        "a": {"b": {"c": [1, 2]}},
        "regions": [{"name": "z"}],
        "name": None,
        "text": "a=b",
    }


# ---------------------------------------------------------------------------------------------------------
# Region discovery


def test_regions_dir_key_discovers_region_subfolders_relative_to_the_file(tmp_path: Path) -> None:
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    data = tmp_path / "data"
    for i, name in enumerate(("south", "north")):
        write_region(data / name, 8, 8, seed=20 + i)
    (data / "empty").mkdir()
    path = write(conf_dir / "r.yaml", "name: disc\nregions_dir: ../data\nlabels: [neg, pos]\n")
    cfg = load_config(path)
    assert cfg.region_names == ("north", "south")  # sorted; `empty` holds no train file
    assert [r.data for r in cfg.regions] == [(data / "north").resolve(), (data / "south").resolve()]


def test_regions_dir_argument_replaces_the_files_region_list(tmp_path: Path, regions_root: Path) -> None:
    path = write(tmp_path / "r.yaml", good_yaml(regions_root))
    assert load_config(path).region_names == ("a", "b")
    cfg = load_config(path, regions_dir=regions_root)
    assert cfg.region_names == ("a", "b", "c")
    assert [r.data for r in cfg.regions] == [(regions_root / n).resolve() for n in ("a", "b", "c")]


def test_regions_dir_argument_with_a_file_that_has_regions_dir(tmp_path: Path, regions_root: Path) -> None:
    other = tmp_path / "other"
    write_region(other / "x", 8, 8, seed=1)
    write_region(other / "y", 8, 8, seed=2)
    path = write(tmp_path / "r.yaml", f"name: demo\nregions_dir: {regions_root}\nlabels: [neg, pos]\n")
    assert load_config(path, regions_dir=other).region_names == ("x", "y")


def test_regions_dir_without_any_region(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    path = write(tmp_path / "r.yaml", "regions_dir: empty\n")
    with pytest.raises(ConfigError, match=r"no subfolder of .* holds a train.jsonl or train.csv"):
        load_config(path)


def test_missing_regions_dir_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "regions_dir: nowhere\nrounds: 0\n")
    problems = problems_of(path)
    assert any(p.startswith(f"{path}:1: ") and "no such folder" in p for p in problems)
    assert f"{path}:2: rounds: must be >= 1, got 0" in problems


# ---------------------------------------------------------------------------------------------------------
# The client task


def test_client_task_json_round_trip(tmp_path: Path, regions_root: Path) -> None:
    cfg = load_config(write(tmp_path / "t.yaml", good_yaml(regions_root)))
    task = client_task(cfg, 4)
    text = task.to_json()
    assert json.loads(text)["server_round"] == 4
    assert ClientTask.from_json(text) == task
    custom = dataclasses.replace(
        task,
        lora=LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=("query", "key")),
        train=TrainSettings(lr=1e-3, max_steps=5, grad_clip=None, threads=1, kl_to_global=0.5),
        model=ModelSettings(base="some/model", max_length=64),
    )
    back = ClientTask.from_json(custom.to_json())
    assert back == custom
    assert back.lora.target_modules == ("query", "key") and back.train.grad_clip is None


def test_bad_task_content_raises_config_error_naming_fields(tmp_path: Path, regions_root: Path) -> None:
    cfg = load_config(write(tmp_path / "t.yaml", good_yaml(regions_root)))
    raw = json.loads(client_task(cfg, 1).to_json())
    raw["train"]["lr"] = 5
    raw["lora"]["r"] = "four"
    raw["extra"] = 1
    with pytest.raises(ConfigError) as info:
        ClientTask.from_json(json.dumps(raw))
    assert info.value.source == "task from server"
    assert sorted(p.split(":")[0] for p in info.value.problems) == ["extra", "lora.r", "train.lr"]
    with pytest.raises(ConfigError) as info:
        ClientTask.from_json('{"seed": 0}')
    assert {p.split(":")[0] for p in info.value.problems} == {
        "server_round",
        "labels",
        "region_names",
        "model",
        "lora",
        "train",
    }
    with pytest.raises(ConfigError):
        ClientTask.from_json("[1, 2]")


def test_task_that_is_not_json_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        ClientTask.from_json("{not json")


# ---------------------------------------------------------------------------------------------------------
# Settings objects built in code validate themselves


@pytest.mark.parametrize(
    ("make", "fields"),
    [
        (lambda p: ModelSettings(base=" ", max_length=4), ["base", "max_length"]),
        (
            lambda p: LoraSettings(r=0, alpha=0, dropout=1.0, target_modules=()),
            ["r", "alpha", "dropout", "target_modules"],
        ),
        (
            lambda p: TrainSettings(lr=0.0, epochs=0, batch_size=0, max_steps=0, grad_clip=0.0, threads=0),
            ["lr", "epochs", "max_steps", "batch_size", "grad_clip", "threads"],
        ),
        (
            lambda p: TrainSettings(weight_decay=-1, eval_batch_size=0, warmup_steps=-1, kl_to_global=-0.1),
            ["weight_decay", "eval_batch_size", "warmup_steps", "kl_to_global"],
        ),
        (
            lambda p: AggregationSettings(
                method="median", server_lr=0, fraction_train=1.5, min_clients=0, round_timeout=0
            ),
            ["round_timeout", "method", "server_lr", "fraction_train", "min_clients"],
        ),
        (
            lambda p: EarlyStopping(patience=0, metric="f2", min_delta=-1, every=0),
            ["patience", "every", "metric", "min_delta"],
        ),
        (lambda p: SimulationSettings(cpus_per_client=0), ["cpus_per_client"]),
        (lambda p: Region(name="no spaces", data=p / "absent"), ["name"]),
        (lambda p: RunConfig(rounds=0, labels=("x",)), ["rounds", "labels", "regions"]),
    ],
)
def test_settings_built_in_code_raise_config_error_naming_each_field(
    tmp_path: Path, make: object, fields: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        make(tmp_path)  # type: ignore[operator]
    assert [p.split(":")[0] for p in info.value.problems] == fields


def test_run_config_built_in_code_checks_duplicates_and_min_clients(regions_root: Path) -> None:
    a = Region(name="a", data=regions_root / "a")
    with pytest.raises(ConfigError) as info:
        RunConfig(
            regions=(a, a),
            labels=("x", "x"),
            baselines=("oracle",),  # type: ignore[arg-type]
            aggregation=AggregationSettings(min_clients=3),
        )
    assert [p.split(":")[0] for p in info.value.problems] == [
        "labels",
        "regions",
        "baselines",
        "aggregation.min_clients",
    ]
    ok = RunConfig(regions=(a,), labels=("x", "y"), aggregation=AggregationSettings(min_clients=1))
    assert ok.region_names == ("a",)


def test_labels_are_required_and_reported_with_the_other_problems(tmp_path: Path, regions_root: Path) -> None:
    text = good_yaml(regions_root).replace("labels: [neg, pos]\n", "").replace("rounds: 2", "rounds: 0")
    path = write(tmp_path / "nolabels.yaml", text)
    # no line to point at: the key is missing; every other problem is still reported
    assert problems_of(path) == [
        f"{path}:2: rounds: must be >= 1, got 0",
        f"{path}: labels: required: the class names, in class-index order (e.g. [neg, pos])",
    ]
    assert load_config(path, ["labels=[bad, good]", "rounds=1"]).labels == ("bad", "good")
    with pytest.raises(ConfigError) as info:
        RunConfig(regions=(Region(name="a", data=regions_root / "a"),), aggregation=AggregationSettings(min_clients=1))
    assert info.value.problems == ["labels: required: the class names, in class-index order (e.g. [neg, pos])"]


# ---------------------------------------------------------------------------------------------------------
# The CLI


def test_cli_check_bad_config_exits_2_listing_every_problem(
    tmp_path: Path, regions_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path / "bad.yaml",
        "rounds: 0\n"
        f"regions:\n  - name: a\n    data: {regions_root / 'a'}\n"
        "  - name: b\n    data: gone\n"
        "train:\n  lr: 2\n"
        "labels: [neg, pos]\n",
    )
    code = main(["check", str(path)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT == 2
    assert f"fedlocale: 3 problem(s) in {path}:" in err
    assert f"  - {path}:1: rounds: must be >= 1, got 0" in err
    assert f"  - {path}:6: regions[1].data: no such folder: {tmp_path / 'gone'}" in err
    assert f"  - {path}:8: train.lr: must be in (0, 1), got 2.0" in err


def test_cli_check_bad_override_and_bad_data_exit_2(
    tmp_path: Path, regions_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "ok.yaml", good_yaml(regions_root))
    assert main(["check", str(path), "--set", "train.lr"]) == 2
    assert "--set train.lr: expected KEY=VALUE" in capsys.readouterr().err
    bad_region = tmp_path / "bad-region"
    write_region(bad_region, 8, 8, seed=3)
    with (bad_region / "test.jsonl").open("a") as fh:
        fh.write('{"text": "odd", "label": "meh"}\n')
    code = main(["check", str(path), "--set", f"regions.1.data={bad_region}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad_region / 'test.jsonl'}:9: unknown label 'meh'" in err


def test_cli_check_good_config_exits_0(tmp_path: Path, regions_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "ok.yaml", good_yaml(regions_root))
    assert main(["check", str(path)]) == 0
    assert f"{path}: OK (2 regions, 2 rounds" in capsys.readouterr().out


def test_node_timeout_defaults_and_must_be_positive(tmp_path: Path, regions_root: Path) -> None:
    assert AggregationSettings().node_timeout == 300.0
    with pytest.raises(ConfigError) as info:
        AggregationSettings(node_timeout=0)
    assert info.value.problems == ["node_timeout: must be > 0, got 0"]
    path = write(tmp_path / "t.yaml", good_yaml(regions_root) + "aggregation:\n  node_timeout: -5\n")
    assert problems_of(path) == [f"{path}:12: aggregation.node_timeout: must be > 0, got -5.0"]
    ok = write(tmp_path / "ok.yaml", good_yaml(regions_root) + "aggregation:\n  node_timeout: 1e2\n")
    assert load_config(ok).aggregation.node_timeout == 100.0


def test_the_header_blames_the_file_only_for_the_files_problems(tmp_path: Path) -> None:
    source = str(tmp_path / "run.yaml")
    in_file = ConfigError([f"{source}:1: rounds: must be >= 1, got 0"], source)
    assert str(in_file).startswith(f"1 problem(s) in {source}:")
    only_options = ConfigError(["--regions: no such folder: /gone", "--set rounds=x: rounds: must be int"], source)
    assert str(only_options).startswith("2 problem(s) in the command line's options:")
    both = ConfigError([f"{source}:1: rounds: must be >= 1, got 0", "--regions: no such folder: /gone"], source)
    assert str(both).startswith(f"2 problem(s) in {source} and the options:")
    assert str(ConfigError(["rounds: must be >= 1, got 0"])).startswith("1 problem(s):")
