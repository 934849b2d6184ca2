"""Region data: strict reading of .jsonl and .csv splits, normalisation, duplicates and leakage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data import DataError, Example, iter_rows, load_region, normalise, read_split

LABELS = ("neg", "pos")


def jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def row(text: str, label: str) -> dict[str, str]:
    return {"text": text, "label": label}


def problems_of(folder: Path) -> list[str]:
    with pytest.raises(DataError) as info:
        load_region("r", folder, LABELS)
    assert str(info.value).startswith(f"{len(info.value.problems)} bad row(s):")
    return info.value.problems


# ---------------------------------------------------------------------------------------------------------
# Reading good files


def test_jsonl_region(tmp_path: Path) -> None:
    jsonl(tmp_path / "train.jsonl", [row("good film", "pos"), row("bad film", "neg"), row("fine", "pos")])
    jsonl(tmp_path / "val.jsonl", [row("nice", "pos")])
    jsonl(tmp_path / "test.jsonl", [row("awful", "neg"), row("lovely", "pos")])
    logged: list[str] = []
    region = load_region("north", tmp_path, LABELS, log=logged.append)
    assert region.name == "north"
    assert region.train == [Example("good film", 1), Example("bad film", 0), Example("fine", 1)]
    assert region.val == [Example("nice", 1)]
    assert region.test == [Example("awful", 0), Example("lovely", 1)]
    assert region.split("test") is region.test and region.split("val") is region.val
    assert region.dropped == {}
    assert logged == ["north: 3 train, 1 val, 2 test; dropped nothing"]


def test_csv_region_with_header_and_quoted_text(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text('text,label\n"good, really good",pos\nplain,pos\n', encoding="utf-8")
    (tmp_path / "test.csv").write_text('label,text\nneg,"say ""bad"""\n', encoding="utf-8")  # columns in any order
    region = load_region("r", tmp_path, LABELS)
    assert region.train == [Example("good, really good", 1), Example("plain", 1)]
    assert region.test == [Example('say "bad"', 0)]
    assert region.val == []  # val is optional


def test_csv_bad_rows_after_a_multiline_row_have_the_right_line(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(
        "text,label\n"  # 1
        '"one\ntwo\nthree",pos\n'  # 2-4
        "ok,meh\n"  # 5
        "\n"  # 6 blank, skipped
        ",neg\n"  # 7
        "fine,pos\n",  # 8
        encoding="utf-8",
    )
    examples, problems = read_split(path, LABELS)
    assert examples == [Example("fine", 1)]
    assert problems == [
        f"{path}:2: a quoted field runs over 3 lines (2-4; a stray quote?): put each row on one line",
        f"{path}:5: unknown label 'meh' (labels: neg, pos)",
        f"{path}:7: empty text",
    ]


def test_bad_multiline_csv_row_is_reported_where_it_starts(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('text,label\nok,pos\n"spans\nthree\nlines",wat\n', encoding="utf-8")
    _, problems = read_split(path, LABELS)
    assert problems == [f"{path}:3: a quoted field runs over 3 lines (3-5; a stray quote?): put each row on one line"]


def test_a_stray_quote_merging_rows_is_a_bad_row_not_one_long_example(tmp_path: Path) -> None:
    """An unclosed quote would make every row up to the next quote one example's text; it is refused instead,
    and the rows after the closing quote are read as rows again."""
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"oops,pos\nb,neg\nc",pos\nd,neg\n', encoding="utf-8")
    examples, problems = read_split(path, LABELS)
    assert examples == [Example("d", 0)]
    assert problems == [f"{path}:2: a quoted field runs over 3 lines (2-4; a stray quote?): put each row on one line"]


def test_csv_with_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\ngood,pos\n".encode("utf-8-sig"))
    examples, problems = read_split(path, LABELS)
    assert problems == []
    assert examples == [Example("good", 1)]


def test_a_csv_row_with_more_or_fewer_cells_than_columns_is_a_bad_row(tmp_path: Path) -> None:
    """The same rule as `fedlocale predict` (common.data.iter_rows): an unquoted comma shifts the cells, so the
    row is reported, never read with its extra cells dropped."""
    path = tmp_path / "train.csv"
    path.write_text("text,label\ngood,pos\ngreat, really,pos\nbad\nfine,neg\n", encoding="utf-8")
    examples, problems = read_split(path, LABELS)
    assert examples == [Example("good", 1), Example("fine", 0)]
    assert problems == [f"{path}:3: 3 cells for 2 columns", f"{path}:4: 1 cells for 2 columns"]


def test_rows_are_streamed_with_the_problems_in_place(tmp_path: Path) -> None:
    """iter_rows is what predict reads through: one item per row in file order, bad rows as (line, reason); a
    byte that is not UTF-8 is a bad row at its own line (not a chunk boundary), and the rows after it are read."""
    path = tmp_path / "in.jsonl"
    good = b'{"text": "a"}\n' * 3000  # several decoding chunks
    path.write_bytes(b'{"text": "first"}\n\n[1]\n' + good + b'{"text": "caf\xe9"}\n{"text": "last"}\n')
    items = list(iter_rows(path, ("text",)))
    assert items[:2] == [(1, {"text": "first"}), (3, "expected a JSON object")]
    assert all(row == {"text": "a"} for _, row in items[2:-2]) and len(items) == 3004
    assert items[-2:] == [
        (3004, "not UTF-8: byte 0xE9 at column 14 (save the file as UTF-8)"),
        (3005, {"text": "last"}),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_bytes_that_are_not_utf8_are_bad_rows_at_their_line(tmp_path: Path, suffix: str) -> None:
    """Training data that stops decoding part-way is an error naming the line, never half a file."""
    folder = tmp_path / "r"
    folder.mkdir()
    rows = [json.dumps(row(t, "pos")) if suffix == ".jsonl" else f"{t},pos" for t in ("one", "two", "three")]
    head = b"" if suffix == ".jsonl" else b"text,label\n"
    lines = [r.encode() + b"\n" for r in rows]
    lines[1] = lines[1].replace(b"two", b"tw\xf6")
    (folder / f"train{suffix}").write_bytes(head + b"".join(lines))
    jsonl(folder / "test.jsonl", [row("good", "pos")])
    line = 2 if suffix == ".jsonl" else 3
    column = 13 if suffix == ".jsonl" else 3
    assert problems_of(folder) == [
        f"{folder / f'train{suffix}'}:{line}: not UTF-8: byte 0xF6 at column {column} (save the file as UTF-8)"
    ]


def test_a_utf16_file_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'.encode("utf-16"))
    assert read_split(path, LABELS) == ([], [f"{path}:1: UTF-16 text (byte-order mark); save the file as UTF-8"])


def test_json_errors_are_whole_sentences(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a\tb", "label": "pos"}\n{"text": "x" "label": "pos"}\n', encoding="utf-8")
    _, problems = read_split(path, LABELS)
    assert problems == [
        f"{path}:1: bad JSON: Invalid control character at column 12",
        f"{path}:2: bad JSON: Expecting ',' delimiter at column 14",
    ]


def test_an_unreadable_split_is_named_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").mkdir()  # a folder where the file should be: cannot be opened, on any user
    path = tmp_path / "train.jsonl"
    assert read_split(path, LABELS) == ([], [f"{path}: cannot read: Is a directory"])


# ---------------------------------------------------------------------------------------------------------
# Bad rows: each reported as path:line: reason, all together


def test_every_bad_row_of_every_split_in_one_error(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(
        '{"text": "good film", "label": "pos"}\n'  # 1 ok
        '{"text": "bad film", "label": "neg"\n'  # 2 bad JSON
        "\n"  # 3 blank: skipped
        '{"text": "meh"}\n'  # 4 missing label
        '{"text": "so so", "label": "neutral"}\n'  # 5 unknown label
        '{"text": "  \\t ", "label": "pos"}\n'  # 6 empty text after normalisation
        '["a list", "pos"]\n'  # 7 not an object
        '{"label": "neg"}\n'  # 8 missing text
        '{"text": "fine", "label": "pos"}\n',  # 9 ok
        encoding="utf-8",
    )
    val = jsonl(tmp_path / "val.jsonl", [row("ok", "pos"), "just a string", {"text": None, "label": None}])
    test = tmp_path / "test.csv"
    test.write_text("text,stars\nnice,5\n", encoding="utf-8")
    problems = problems_of(tmp_path)
    assert problems[0].startswith(f"{train}:2: bad JSON: ")
    assert problems[1:] == [
        f"{train}:4: missing field label",
        f"{train}:5: unknown label 'neutral' (labels: neg, pos)",
        f"{train}:6: empty text",
        f"{train}:7: expected a JSON object",
        f"{train}:8: missing field text",
        f"{val}:2: expected a JSON object",
        f"{val}:3: missing field text, label",
        f"{test}:1: header lacks column(s) label",
    ]


def test_csv_without_text_and_label_columns(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("review;sentiment\ngood;pos\n", encoding="utf-8")
    assert read_split(path, LABELS) == ([], [f"{path}:1: header lacks column(s) label, text"])


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "caf\xe9", "label": "pos"}\n')
    examples, problems = read_split(path, LABELS)
    assert examples == []
    assert problems == [f"{path}:1: not UTF-8: byte 0xE9 at column 14 (save the file as UTF-8)"]


def test_missing_test_and_train_files(tmp_path: Path) -> None:
    jsonl(tmp_path / "only-train" / "train.jsonl", [row("good", "pos")])
    assert problems_of(tmp_path / "only-train") == [f"no test.jsonl or test.csv in {tmp_path / 'only-train'}"]
    (tmp_path / "nothing").mkdir()
    assert problems_of(tmp_path / "nothing") == [
        f"no train.jsonl or train.csv in {tmp_path / 'nothing'}",
        f"no test.jsonl or test.csv in {tmp_path / 'nothing'}",
    ]
    (tmp_path / "nothing" / "Test.JSONL").write_text("", encoding="utf-8")
    assert problems_of(tmp_path / "nothing")[1] == (
        f"no test.jsonl or test.csv in {tmp_path / 'nothing'} (found Test.JSONL: the name must be exactly one of these)"
    )


def test_empty_train_split(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("\n\n", encoding="utf-8")
    jsonl(tmp_path / "test.jsonl", [row("good", "pos")])
    assert problems_of(tmp_path) == [f"{tmp_path}: no usable training rows"]


def test_error_message_lists_at_most_50_rows(tmp_path: Path) -> None:
    jsonl(tmp_path / "train.jsonl", [row(f"t{i}", "other") for i in range(60)])
    jsonl(tmp_path / "test.jsonl", [row("good", "pos")])
    with pytest.raises(DataError) as info:
        load_region("r", tmp_path, LABELS)
    assert len(info.value.problems) == 60
    assert str(info.value).startswith("60 bad row(s):")
    assert str(info.value).endswith("… and 10 more")


# ---------------------------------------------------------------------------------------------------------
# Normalisation, duplicates, leakage


def test_normalise_nfc_and_whitespace() -> None:
    decomposed = "cafe\u0301"  # e + combining acute accent
    assert normalise(decomposed) == "caf\u00e9"
    assert normalise(decomposed) == normalise("caf\u00e9")
    assert normalise("  great\t\tfilm \n really\u00a0 ") == "great film really"
    assert normalise("Ｆｕｌｌ") == "Ｆｕｌｌ"  # NFC, not NFKC: compatibility forms are kept


def test_rows_are_normalised_on_read(tmp_path: Path) -> None:
    jsonl(tmp_path / "train.jsonl", [row(" cafe\u0301 \n ok ", "pos")])
    jsonl(tmp_path / "test.jsonl", [row("x", "neg")])
    assert load_region("r", tmp_path, LABELS).train == [Example("caf\u00e9 ok", 1)]


def test_duplicates_are_dropped_and_counted(tmp_path: Path) -> None:
    jsonl(
        tmp_path / "train.jsonl",
        [
            row("good film", "pos"),
            row("good  film ", "pos"),
            row("bad", "neg"),
            row("cafe\u0301", "pos"),
            row("caf\u00e9", "neg"),
            row("good film", "neg"),
        ],
    )
    jsonl(tmp_path / "val.jsonl", [row("v", "pos"), row("v", "pos")])
    jsonl(tmp_path / "test.jsonl", [row("t", "neg"), row(" t", "neg"), row("t\n", "pos"), row("u", "pos")])
    region = load_region("r", tmp_path, LABELS)
    assert region.train == [Example("good film", 1), Example("bad", 0), Example("caf\u00e9", 1)]  # first kept
    assert region.val == [Example("v", 1)]
    assert region.test == [Example("t", 0), Example("u", 1)]
    assert region.dropped == {"duplicates_train": 3, "duplicates_val": 1, "duplicates_test": 2}


def test_eval_rows_seen_in_train_are_removed_as_leakage(tmp_path: Path) -> None:
    jsonl(tmp_path / "train.jsonl", [row("good film", "pos"), row("bad film", "neg"), row("caf\u00e9", "pos")])
    jsonl(tmp_path / "val.jsonl", [row("good  film", "pos"), row("new val", "neg")])
    jsonl(
        tmp_path / "test.jsonl",
        [
            row("bad film", "pos"),
            row("cafe\u0301", "pos"),
            row("bad film", "neg"),
            row("new", "pos"),
            row("new", "pos"),
        ],
    )
    logged: list[str] = []
    region = load_region("r", tmp_path, LABELS, log=logged.append)
    assert region.val == [Example("new val", 0)]
    assert region.test == [Example("new", 1)]
    assert region.dropped == {"leaked_val": 1, "leaked_test": 3, "duplicates_test": 1}
    assert logged == ["r: 3 train, 1 val, 1 test; dropped leaked_val 1, leaked_test 3, duplicates_test 1"]
    assert {ex.text for ex in region.train}.isdisjoint({ex.text for ex in region.val + region.test})
