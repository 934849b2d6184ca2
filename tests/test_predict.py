"""``fedlocale predict``: jsonl / csv / stdin in, one JSON line per good row out, bad rows named and skipped."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from assets.tiny import make_tiny_model
from client.train import predict_proba
from fedlocale.cli import main
from runfolder.export import export_run
from runfolder.predict import Row, read_inputs
from tests.test_export import LABELS, MAX_LENGTH, FakeRun, make_run

# well over the run's max_length (32) and the tiny model's 64 positions: only truncation makes it fit
LONG = " ".join(["the", "movie", "was", "very", "good", "and"] * 15)
TEXTS = ["good", "the awful room was bad", LONG, "love it", "hate this ugly book", "a phone and a room", "nice"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny run and its unmerged and merged exports of region north."""
    root = tmp_path_factory.mktemp("served")
    run = make_run(root, str(make_tiny_model(root / "base", "bert")))
    export_run(run.dir, "north", root / "unmerged")
    export_run(run.dir, "north", root / "merged", merged=True)
    return {"run": run, "unmerged": root / "unmerged", "merged": root / "merged", "adapter": run.dir / "adapter"}


def expected_probs(run: FakeRun, texts: list[str]) -> np.ndarray:
    trained = run.global_model
    return predict_proba(trained.model, trained.tokenizer, texts, max_length=MAX_LENGTH, batch_size=64)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def run_predict(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    code = main(["predict", *argv])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


# ---------------------------------------------------------------------------------------------------------
# Inputs and outputs


def test_jsonl_rows_keep_their_order_and_fields(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = [TEXTS[i % len(TEXTS)] + " very" * (i % 5) for i in range(40)]  # 40 rows: two blocks of batch 2
    rows = [{"id": f"r{i}", "text": t, "label": "pos", "meta": {"n": i}} for i, t in enumerate(texts)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    code, out, err = run_predict(capsys, str(served["unmerged"]), str(path), "--batch-size", "2")
    assert code == 0, err
    assert "predicted 40 row(s)" in err
    assert [r["line"] for r in out] == list(range(1, 41))
    assert [r["id"] for r in out] == [f"r{i}" for i in range(40)]
    assert out[3]["meta"] == {"n": 3} and all(r["input_label"] == "pos" for r in out)  # a gold label survives
    assert list(out[0]) == ["line", "id", "input_label", "meta", "label", "probs"]
    want = expected_probs(served["run"], texts)
    got = np.array([[r["probs"][name] for name in LABELS] for r in out])
    assert np.allclose(got, want, atol=1e-5)
    assert [r["label"] for r in out] == [LABELS[i] for i in want.argmax(axis=1)]


def test_merged_unmerged_and_run_adapter_predict_the_same(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    results = {}
    for name in ("unmerged", "merged", "adapter"):
        out_file = tmp_path / f"{name}.jsonl"
        code, stdout, err = run_predict(capsys, str(served[name]), str(path), "--out", str(out_file))
        assert code == 0, err
        assert stdout == [] and f"into {out_file}" in err
        results[name] = [json.loads(line) for line in out_file.read_text().splitlines()]
    # the run's adapter/ folder has no fedlocale.json: max_length comes from RUN_DIR/config.yaml (32), without
    # which the long text would overflow the tiny model's 64 positions
    for name in ("merged", "adapter"):
        assert [r["label"] for r in results[name]] == [r["label"] for r in results["unmerged"]]
        for a, b in zip(results[name], results["unmerged"], strict=True):
            assert all(abs(a["probs"][k] - b["probs"][k]) <= 1e-5 for k in LABELS)


def test_csv_input_with_quoted_newlines_reports_lines(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "in.csv"
    path.write_text(
        'id,text\n1,good movie\n2,"awful\nroom, bad"\n3,\n4,nice,extra\n5,love it\n',
        encoding="utf-8",
    )
    code, out, err = run_predict(capsys, str(served["merged"]), str(path))
    assert code == 3
    assert [(r["line"], r["id"]) for r in out] == [(2, "1"), (7, "5")]
    assert f"{path}:3: a quoted field runs over 2 lines (3-4; a stray quote?)" in err
    assert f"{path}:5: empty text" in err
    assert f"{path}:6: 3 cells for 2 columns" in err
    assert "skipped 3 bad row(s)" in err


def test_stdin_takes_json_objects_and_plain_lines(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('great movie\n{"text": "awful room", "id": 7}\n\n{bad\n  nice  \n'))
    code, out, err = run_predict(capsys, str(served["unmerged"]), "-")
    assert code == 3
    assert [(r["line"], r.get("id")) for r in out] == [(1, None), (2, 7), (5, None)]
    assert "<stdin>:4: bad JSON" in err
    want = expected_probs(served["run"], ["great movie", "awful room", "nice"])
    assert np.allclose([[r["probs"][k] for k in LABELS] for r in out], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Bad rows and exit codes


def test_bad_rows_are_reported_with_file_and_line_and_skipped(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"text": "good", "id": 1},
        "not json",
        {"id": 3},
        {"text": "   "},
        {"text": 5},
        [1, 2],
        "",
        {"text": "bad", "id": 8},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    code, out, err = run_predict(capsys, str(served["unmerged"]), str(path))
    assert code == 3
    assert [(r["line"], r["id"]) for r in out] == [(1, 1), (8, 8)]
    for line, reason in [
        (2, "bad JSON: Expecting value"),
        (3, "missing field text"),
        (4, "empty text"),
        (5, "text must be a string, got int"),
        (6, "expected a JSON object"),
    ]:
        assert f"{path}:{line}: {reason}" in err
    assert f"{path}:7" not in err  # a blank line is no row
    assert "skipped 5 bad row(s)" in err


def test_read_inputs_is_a_pure_reader(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": " a  b ", "line": 9}, {"txt": "x"}])
    rows, problems = read_inputs(path)
    assert rows == [Row(1, "a b", {"input_line": 9})]
    assert problems == [f"{path}:2: missing field text"]
    rows, problems = read_inputs("-", io.StringIO("x\n"))
    assert rows == [Row(1, "x")] and problems == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("all-bad.jsonl", "{oops\n[]\n", "no row could be read"),
        ("empty.jsonl", "\n\n", "no row could be read"),
        ("no-text.csv", "id,body\n1,good\n", "no-text.csv:1: header lacks column(s) text"),
        ("notes.txt", "good\n", "unsupported input"),
        ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8"),
        ("missing.jsonl", None, "No such file"),
    ],
)
def test_nothing_readable_exits_2_and_writes_no_output(
    served: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str | bytes | None,
    message: str,
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out_file = tmp_path / "out.jsonl"
    code, out, err = run_predict(capsys, str(served["unmerged"]), str(path), "--out", str(out_file))
    assert code == 2
    assert message in err and out == []
    assert not out_file.exists()


def test_not_a_model_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    code, _, err = run_predict(capsys, str(tmp_path), str(path))
    assert code == 2 and "neither a peft adapter" in err


def test_bad_batch_size_is_a_usage_error(served: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(served["unmerged"]), "-", "--batch-size", "0"])
    assert exc.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Damaged inputs and model folders: an error naming what is wrong, never a traceback


def test_non_utf8_lines_on_stdin_are_named_and_the_rest_predicted(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Python's own stdin under a C/POSIX locale: bad bytes become lone surrogates instead of failing
    stdin = io.TextIOWrapper(io.BytesIO(b'good\ncaf\xe9 \xff\n{"text": "nice"}\n'), errors="surrogateescape")
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, err = run_predict(capsys, str(served["merged"]), "-")
    assert code == 3, err
    assert [r["line"] for r in out] == [1, 3]
    assert "<stdin>:2: not UTF-8 (byte 4 of the line" in err and "Traceback" not in err


def _damage(folder: Path, how: str) -> None:
    if how == "truncated weights":
        weights = next(folder.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "bad config":
        name = "adapter_config.json" if (folder / "adapter_config.json").exists() else "config.json"
        (folder / name).write_text('{"model_type": ')
    elif how == "no tokenizer":
        for path in folder.glob("tokenizer*"):
            path.unlink()
    elif how == "broken tokenizer":
        (folder / "tokenizer.json").write_text("{")
    elif how == "binary labels":
        (folder / "labels.json").write_bytes(b"\xff\xfe\x00")


@pytest.mark.parametrize("kind", ["merged", "unmerged"])
@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated weights", "(Error while deserializing header"),
        ("bad config", "config.json"),
        ("no tokenizer", "no tokenizer (tokenizer_config.json)"),
        ("broken tokenizer", "its tokenizer (tokenizer.json, tokenizer_config.json) does not load"),
        ("binary labels", "labels.json: not readable JSON"),
    ],
)
def test_a_damaged_model_folder_exits_2_naming_it(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, how: str, message: str
) -> None:
    import shutil

    folder = tmp_path / kind
    shutil.copytree(served[kind], folder)
    _damage(folder, how)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    out_file = tmp_path / "out.jsonl"
    code, out, err = run_predict(capsys, str(folder), str(path), "--out", str(out_file))
    assert code == 2, err
    assert err.startswith(f"fedlocale: {folder}") and message in err and "Traceback" not in err
    assert out == [] and not out_file.exists()


@pytest.mark.parametrize("labels", [["neg"], ["neg", "pos", "mixed"]])
def test_labels_that_do_not_fit_the_adapters_head_name_labels_json(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], labels: list[str]
) -> None:
    import shutil

    folder = tmp_path / "unmerged"
    shutil.copytree(served["unmerged"], folder)
    (folder / "labels.json").write_text(json.dumps({"labels": labels}))
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    code, out, err = run_predict(capsys, str(folder), str(path))
    assert code == 2, err
    assert err.startswith(f"fedlocale: {folder / 'labels.json'}: {len(labels)} label(s)"), err
    assert "the labels do not belong to this adapter" in err and "Traceback" not in err and out == []


def test_a_recorded_base_path_of_another_machine_predicts_quietly(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    folder = tmp_path / "unmerged"
    shutil.copytree(served["unmerged"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "elsewhere" / "base")  # no such folder here
    (folder / "adapter_config.json").write_text(json.dumps(config))
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    with warnings.catch_warnings(record=True) as caught:  # what a user's terminal would show
        warnings.simplefilter("always")
        code, out, err = run_predict(capsys, str(folder), str(path))
    assert code == 0, err
    assert len(out) == 1 and "warn" not in err.lower()
    assert [str(w.message) for w in caught if "Could not find a config file" in str(w.message)] == []


def test_a_base_model_missing_here_is_named_as_the_base(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    folder = tmp_path / "copied-alone"  # no run around it, no fedlocale.json: only the adapter names its base
    shutil.copytree(served["unmerged"], folder)
    (folder / "fedlocale.json").unlink(missing_ok=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "elsewhere" / "base")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    code, out, err = run_predict(capsys, str(folder), str(path))
    assert code == 2 and out == [], err
    assert err.startswith(f"fedlocale: {folder}: its base model '{tmp_path / 'elsewhere' / 'base'}' does not load")
    assert "adapter_config.json's base_model_name_or_path" in err and "Traceback" not in err


def test_max_length_beyond_the_model_is_refused_before_predicting(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": LONG}])
    out_file = tmp_path / "out.jsonl"
    # the tiny BERT has 64 learned positions: 64 tokens fit (special tokens included), 65 do not
    code, _, err = run_predict(capsys, str(served["unmerged"]), str(path), "--max-length", "65", "--out", str(out_file))
    assert code == 2
    assert "--max-length 65 exceeds the model's limit of 64 tokens per text" in err
    assert not out_file.exists()
    code, out, _ = run_predict(capsys, str(served["unmerged"]), str(path), "--max-length", "64")
    assert code == 0 and len(out) == 1
