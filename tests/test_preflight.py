"""``fedlocale check`` catches what would crash, hang or refuse every reply once the run started (issue 15), and
``fedlocale simulate`` refuses the same before it writes anything: through the CLI, with the tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from client.preflight import preflight
from common.config import LoraSettings, ModelSettings, load_config
from common.errors import ConfigError
from common.model import adapter_state, build_model, check_model
from common.pii import CustomPattern, PatternTimeout, PiiRules, redact
from fedlocale.cli import main
from simulations.runner import load_policies
from tests.conftest import tiny_config, write_region


@pytest.fixture
def regions(tmp_path: Path) -> Path:
    root = tmp_path / "regions"
    write_region(root / "north", 40, 16, seed=1)
    write_region(root / "south", 40, 16, seed=2)
    return root


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of ``path`` where ``needle`` first occurs."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def write_policy(folder: Path, region: str, **settings: object) -> Path:
    path = folder / f"{region}.yaml"
    path.write_text(yaml.safe_dump({"region": region, **settings}, sort_keys=False))
    return path


def config_with_policies(tmp_path: Path, tiny_bert: Path, regions: Path, north: Path, **extra: object) -> Path:
    """A tiny config whose region north has the policy ``north``."""
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, regions, **extra)
    raw = yaml.safe_load(cfg.read_text())
    raw["regions"][0]["policy"] = str(north)
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, expect exit 2 and no traceback; the error text."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlocale: ") and "Traceback" not in err
    return err


def simulate_refuses(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``simulate`` exits 2 before it writes anything (no Ray: it fails before starting)."""
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    err = refused(["simulate", str(cfg), "--out", str(out)], capsys)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return err


# ---------------------------------------------------------------------------------------- NaN and infinity


@pytest.mark.parametrize(
    ("section", "key", "written", "shown"),
    [
        ("train", "lr", ".nan", "nan"),
        ("train", "weight_decay", ".inf", "inf"),
        ("train", "kl_to_global", "1e999", "inf"),
        ("lora", "dropout", "nan", "nan"),
        ("aggregation", "server_lr", "-.inf", "-inf"),
        ("personalize", "lr", ".NaN", "nan"),
    ],
)
def test_nan_and_infinite_settings_are_refused_naming_file_line_and_value(
    tmp_path: Path,
    tiny_bert: Path,
    regions: Path,
    capsys: pytest.CaptureFixture[str],
    section: str,
    key: str,
    written: str,
    shown: str,
) -> None:
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, regions)
    raw = yaml.safe_load(cfg.read_text())
    raw.setdefault(section, {})[key] = 0.123456
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False).replace("0.123456", written))
    line = line_of(cfg, f"{key}: {written}")
    err = refused(["check", str(cfg)], capsys)
    assert f"{cfg}:{line}: {section}.{key}: must be a finite number, got {shown}" in err
    simulate_refuses(cfg, tmp_path, capsys)


def test_an_infinite_float_in_a_policy_is_refused_too(
    tmp_path: Path, tiny_bert: Path, regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    north = write_policy(tmp_path, "north", require_dp={"epsilon": 1.5, "delta": 1e-5})
    north.write_text(north.read_text().replace("1.5", ".inf"))
    cfg = config_with_policies(tmp_path, tiny_bert, regions, north)
    err = refused(["check", str(cfg)], capsys)
    assert f"{north}:{line_of(north, 'epsilon')}: require_dp.epsilon: must be a finite number, got inf" in err


# ------------------------------------------------------------------------------------------ model and LoRA


def test_a_misspelt_lora_target_is_named_with_the_model_s_linear_layers(
    tmp_path: Path, tiny_bert: Path, regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(
        tmp_path / "run.yaml", tiny_bert, regions, lora={"r": 4, "alpha": 8, "target_modules": ["qeury", "value"]}
    )
    err = refused(["check", str(cfg)], capsys)
    line = line_of(cfg, "target_modules")
    assert f"{cfg}:{line}: lora.target_modules: 'qeury' names no layer of this bert model" in err
    assert "the layers LoRA can adapt: " in err and "query" in err.split("the layers LoRA can adapt: ")[1]
    assert "'value'" not in err  # the target that exists is not blamed
    simulate_refuses(cfg, tmp_path, capsys)


def test_a_lora_target_that_is_no_linear_layer_is_refused(
    tmp_path: Path, tiny_bert: Path, regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, regions, lora={"target_modules": ["LayerNorm"]})
    err = refused(["check", str(cfg)], capsys)
    assert "lora.target_modules: 'LayerNorm' is a LayerNorm, not a layer LoRA adapts" in err


@pytest.mark.parametrize("kind", ["missing", "empty", "no-weights"])
def test_a_model_base_that_is_no_model_folder_is_named_with_its_line(
    tmp_path: Path, tiny_bert: Path, regions: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    folder = tmp_path / "models" / "mine"
    if kind != "missing":
        folder.mkdir(parents=True)
    if kind == "no-weights":
        (folder / "config.json").write_text((tiny_bert / "config.json").read_text())
    cfg = tiny_config(tmp_path / "run.yaml", folder, regions)
    err = refused(["check", str(cfg)], capsys)
    line = line_of(cfg, "base:")
    expected = {"missing": "no such folder", "empty": "no config.json", "no-weights": "no weights"}[kind]
    assert f"{cfg}:{line}: model.base: " in err and expected in err
    simulate_refuses(cfg, tmp_path, capsys)


def test_max_length_beyond_the_model_s_positions_is_refused(
    tmp_path: Path, tiny_bert: Path, regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, regions, model={"base": str(tiny_bert), "max_length": 128})
    err = refused(["check", str(cfg)], capsys)
    assert (
        f"{cfg}:{line_of(cfg, 'max_length: 128')}: model.max_length: is 128, this model reads at most 64 tokens" in err
    )


def test_the_checked_reply_is_the_one_training_sends(tiny_bert: Path) -> None:
    """check_model builds no weights, yet its tensors are the real reply's: names, shapes, dtypes, bytes."""
    settings, lora = ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(r=4, alpha=8)
    checked = check_model(settings, lora, ("neg", "pos"))
    assert checked.problems == []
    real = adapter_state(build_model(settings, lora, ("neg", "pos"), seed=0).model)
    assert checked.tensors == {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
        for name, t in real.items()
    }


# ---------------------------------------------------------------------------------------- PII patterns


def test_a_catastrophic_pattern_is_refused_when_the_policy_loads(
    tmp_path: Path, tiny_bert: Path, regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    north = write_policy(tmp_path, "north", pii={"custom": [{"name": "ORDER", "pattern": r"(\w+\s?)+$"}]})
    cfg = config_with_policies(tmp_path, tiny_bert, regions, north)
    started = time.monotonic()
    err = refused(["check", str(cfg)], capsys)
    assert time.monotonic() - started < 30
    assert f"{north}:{line_of(north, 'pattern')}: pii.custom[0].pattern: " in err
    assert "backtracks catastrophically" in err
    simulate_refuses(cfg, tmp_path, capsys)


def test_a_pattern_slow_only_on_some_text_is_stopped_by_the_time_limit(
    tmp_path: Path, tiny_bert: Path, regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The load-time probe cannot try every text; the per-text time limit bounds what it misses."""
    pattern = r"ZZ(a|aa)+$"  # fast on every probe string (one repeated character), exponential after "ZZ"
    rules = PiiRules(custom=(CustomPattern("ORDER", pattern),))
    assert redact("order ZZaaa", rules)[0] == "order [ORDER]"
    started = time.monotonic()
    with pytest.raises(PatternTimeout, match=r"ORDER .*ran longer than"):
        redact("ZZ" + "a" * 3000 + "!", rules)
    assert time.monotonic() - started < 20
    # through check: the region's train text holds such a row; the policy file and line are named
    with (regions / "north" / "train.jsonl").open("a") as fh:
        fh.write(json.dumps({"text": "ZZ" + "a" * 3000 + "!", "label": "pos"}) + "\n")
    north = write_policy(tmp_path, "north", pii={"custom": [{"name": "ORDER", "pattern": pattern}]})
    cfg = config_with_policies(tmp_path, tiny_bert, regions, north)
    err = refused(["check", str(cfg)], capsys)
    assert f"{north}:{line_of(north, 'pattern')}: pii.custom[0].pattern: region north, train split: " in err
    assert "ran longer than" in err


@pytest.mark.parametrize("pattern", [r".+", r"[\s\S]+?", r"(?s).+", r"[^\n]+"])
def test_a_pattern_that_redacts_everything_is_refused(
    tmp_path: Path, tiny_bert: Path, regions: Path, capsys: pytest.CaptureFixture[str], pattern: str
) -> None:
    north = write_policy(tmp_path, "north", pii={"custom": [{"name": "ALL", "pattern": pattern}]})
    cfg = config_with_policies(tmp_path, tiny_bert, regions, north)
    err = refused(["check", str(cfg)], capsys)
    assert f"{north}:{line_of(north, 'pattern')}: pii.custom[0].pattern: ALL ({pattern!r}) would replace 100%" in err
    simulate_refuses(cfg, tmp_path, capsys)


def test_a_pattern_that_redacts_most_text_is_a_warning(
    tmp_path: Path, tiny_bert: Path, regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    north = write_policy(tmp_path, "north", pii={"custom": [{"name": "WORD", "pattern": r"[a-z]{4,}"}]})
    cfg = config_with_policies(tmp_path, tiny_bert, regions, north)
    assert main(["check", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert f"warning: {north}:{line_of(north, 'pattern')}: pii.custom[0].pattern: WORD" in captured.err
    assert "1 warning(s) above" in captured.out


# ------------------------------------------------------------------------------- policies refusing every reply


@pytest.mark.parametrize(
    ("settings", "field", "reason"),
    [
        ({"egress": {"max_bytes": 2000}}, "max_bytes", "every train reply would be refused: "),
        ({"egress": {"metrics": ["num-examples"]}}, "metrics", "metric 'train-loss' is not allowed to leave"),
        ({"egress": {"tensors": ["*.lora_A.weight"]}}, "tensors", "is not allowed to leave"),
        ({"egress": {"dtypes": ["float16"]}}, "dtypes", "has dtype float32, allowed: float16"),
        ({"min_train_examples": 500}, "min_train_examples", "40 training examples, the policy needs at least 500"),
        # a budget no DP-SGD noise up to dp.max_noise_multiplier can keep for the planned rounds
        ({"require_dp": {"epsilon": 0.001, "delta": 1e-5}}, "require_dp", "cannot cover the planned"),
        ({"require_secure_aggregation": True}, "require_secure_aggregation", "requires secure aggregation"),
    ],
)
def test_a_policy_that_would_refuse_every_reply_is_named_with_its_line(
    tmp_path: Path,
    tiny_bert: Path,
    regions: Path,
    capsys: pytest.CaptureFixture[str],
    settings: dict[str, object],
    field: str,
    reason: str,
) -> None:
    north = write_policy(tmp_path, "north", **settings)
    cfg = config_with_policies(tmp_path, tiny_bert, regions, north)
    err = refused(["check", str(cfg)], capsys)
    dotted = f"egress.{field}" if "egress" in settings else field
    assert f"{north}:{line_of(north, field)}: {dotted}: region north: every " in err
    assert reason in err
    simulate_refuses(cfg, tmp_path, capsys)


def test_max_bytes_is_compared_with_this_model_s_reply(tmp_path: Path, tiny_bert: Path, regions: Path) -> None:
    """The byte count is the reply's: a limit just above it passes, just below it is refused."""
    cfg = load_config(tiny_config(tmp_path / "run.yaml", tiny_bert, regions))
    tensors = check_model(cfg.model, cfg.lora, cfg.labels).tensors
    size = sum(nbytes for _, _, nbytes in tensors.values())
    for limit, ok in ((size + 200, True), (size - 1, False)):
        north = write_policy(tmp_path, "north", egress={"max_bytes": limit})
        run = config_with_policies(tmp_path, tiny_bert, regions, north)
        loaded = load_config(run)
        if ok:
            preflight(loaded, load_policies(loaded), run)
        else:
            with pytest.raises(ConfigError, match=rf"bytes, the policy allows at most {limit}"):
                preflight(loaded, load_policies(loaded), run)


# ---------------------------------------------------------------------------------------------- warnings


def test_a_one_class_region_and_an_emptied_split_are_warnings(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "regions"
    write_region(root / "north", 40, 16, seed=1, pos_fraction=1.0)
    write_region(root / "south", 40, 16, seed=2)
    # every val row of south is a train row: leakage removal empties the split
    train = (root / "south" / "train.jsonl").read_text().splitlines(keepends=True)
    (root / "south" / "val.jsonl").write_text("".join(train[:10]))
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, root)
    assert main(["check", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert "warning: region north: every train example is 'pos'" in captured.err
    assert "warning: region south: all 10 val rows also occur in train and were removed (leakage)" in captured.err
    assert "2 warning(s) above" in captured.out


def test_a_problem_with_a_set_value_names_the_override_not_the_file_line(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model checks run after the config loaded; what they find about a --set value still names the --set."""
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions)
    assert main(["check", str(path), "--set", "lora.target_modules=[querry, value]"]) == 2
    err = capsys.readouterr().err
    assert "--set lora.target_modules=[querry, value]: lora.target_modules: 'querry' names no layer" in err, err
    assert f"{path}:" not in err


def test_check_and_simulate_read_each_region_once(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preflight's reading of a region is the one the pipeline redacts and carves: no file is read twice."""
    import client.pipeline
    import client.preflight
    from common.data import load_region

    reads: list[str] = []

    def counted(name: str, *args: object, **kwargs: object) -> object:
        reads.append(name)
        return load_region(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client.preflight, "load_region", counted)
    monkeypatch.setattr(client.pipeline, "load_region", counted)
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions)
    assert main(["check", str(path)]) == 0
    assert sorted(reads) == ["north", "south"]
    reads.clear()
    from simulations.runner import load_all, load_policies

    cfg = load_config(path)
    policies = load_policies(cfg)
    checked = preflight(cfg, policies, path)
    data = load_all(cfg, lambda _: None, policies, checked.loaded)
    assert sorted(reads) == ["north", "south"] and sorted(data) == ["north", "south"]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"train": {"lr": 5e-3, "epochs": 2, "batch_size": 8, "prox_mu": 0.01}}, "train.prox_mu is 0.01, which cannot"),
        ({"train": {"lr": 5e-3, "epochs": 2, "batch_size": 8, "logit_adjust": 1.0}}, "train.logit_adjust is 1, which"),
        (
            {"train": {"lr": 0.1, "epochs": 2, "batch_size": 8, "optimizer": "sgd"}},
            "train.optimizer is sgd and dp.optimizer adamw without dp.lr: DP-SGD's AdamW would step at train.lr (0.1)",
        ),
        (
            {"personalize": {"mode": "dual", "local_r": 4}, "aggregation": {"min_clients": 2, "lora": "ffa"}},
            "personalize mode dual with aggregation.lora: ffa cannot be used with require_dp",
        ),
        (
            {"personalize": {"mode": "dual", "local_r": 4, "dual_train": "apart"}},
            "personalize.dual_train apart cannot be used with require_dp",
        ),
    ],
)
def test_settings_dp_sgd_cannot_train_with_are_refused_before_the_run(
    tmp_path: Path,
    tiny_bert: Path,
    regions: Path,
    capsys: pytest.CaptureFixture[str],
    extra: dict[str, object],
    reason: str,
) -> None:
    north = write_policy(tmp_path, "north", require_dp={"epsilon": 8.0, "delta": 1e-5})
    cfg = config_with_policies(tmp_path, tiny_bert, regions, north, **extra)
    err = refused(["check", str(cfg)], capsys)
    where = f"{north}:{line_of(north, 'require_dp')}: require_dp"
    assert f"{where}: region north: every train reply would be refused" in err
    assert reason in err
    simulate_refuses(cfg, tmp_path, capsys)
    # the same settings without the DP policy are fine
    plain = config_with_policies(tmp_path, tiny_bert, regions, write_policy(tmp_path, "north"), **extra)
    assert main(["check", str(plain)]) == 0


def test_the_dp_plan_is_made_for_the_train_split_the_node_trains_on(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A region without a val file trains on what is left once its val split is carved: ``fedlocale check``
    plans DP-SGD (sample rate, steps) for exactly that, as the node calibrates it."""
    import client.preflight
    from client.dp import Accountant
    from client.task import NodeSettings, train_round
    from common.config import client_task
    from common.policy import load_policy

    root = tmp_path / "regions"
    write_region(root / "north", 40, 16, seed=1)
    write_region(root / "south", 40, 16, seed=2)
    (root / "north" / "val.jsonl").unlink()  # north's val split is carved from its 40 train examples
    north = write_policy(tmp_path, "north", require_dp={"epsilon": 8.0, "delta": 1e-5})
    path = config_with_policies(tmp_path, tiny_bert, root, north, data={"val_fraction": 0.25}, rounds=2)
    cfg = load_config(path)
    planned = []
    real = client.preflight._policy_problems

    def spy(*args: object, **kwargs: object) -> list[str]:
        planned.append(args[4])  # the DP plan
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client.preflight, "_policy_problems", spy)
    preflight(cfg, load_policies(cfg), path)
    (plan,) = planned
    assert plan.sample_rate == 8 / 30  # batch 8 of the 30 examples left, not of 40
    # the node, training round 1 of the same run, calibrates the same plan
    region = cfg.regions[0]
    node = NodeSettings(policy=load_policy(north), audit_dir=tmp_path / "audit", threads=1)
    task = client_task(cfg, 1, "run-k")
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    train_round(region, task, state, node)
    account = Accountant.load(tmp_path / "audit").accounts["run-k"]
    assert (account.sample_rate, account.planned_steps) == (plan.sample_rate, plan.steps)
    assert account.noise_multiplier == pytest.approx(plan.noise_multiplier)
