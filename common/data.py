"""Region data: ``train`` / ``val`` / ``test`` files of labelled text, read strictly.

Every bad row is reported as ``file:line: reason``, all of them together; rows are normalised, exact
duplicates dropped, and evaluation rows that also occur in train (leakage) removed. What was dropped is
counted and logged, never silent.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

from common import keys
from common.errors import InputError
from common.pii import PiiRules, redact_texts

DATA_SUFFIXES = (".jsonl", ".csv")  # the files a region folder holds its splits in
_SPACE_RE = re.compile(r"\s+")
R = TypeVar("R")  # a row of any shape: an Example, or a raw row of a pool being split


class DataError(InputError):
    """One or more rows of region data are unusable; ``problems`` lists each as ``file:line: reason``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:50]
        more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{len(problems)} bad row(s):\n" + "\n".join(f"  {p}" for p in shown) + more)


def find_split(folder: Path, split: str) -> Path | None:
    """The file holding ``split`` in a region folder (``train.jsonl`` or ``train.csv``), if any; a folder holding
    both is an InputError (which one was meant would be a guess, and the other silently left out)."""
    found = [folder / f"{split}{suffix}" for suffix in DATA_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise InputError(f"{folder}: holds both {' and '.join(p.name for p in found)}; keep one of them")
    return found[0] if found else None


def split_near_misses(folder: Path, split: str) -> list[Path]:
    """Files in ``folder`` that look meant to hold ``split`` but are not named ``split.jsonl``/``split.csv``
    (``Train.jsonl``, ``train.JSONL``, ``train.json``, ``train.txt``), sorted; none if the folder is unreadable."""
    exact = {f"{split}{suffix}" for suffix in DATA_SUFFIXES}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.name not in exact and p.name.lower().split(".")[0] == split and p.is_file()]


def missing_split(folder: Path, split: str) -> str:
    """Why ``folder`` has no ``split``: the names expected and, if any, the files that were probably meant."""
    odd = [p.name for p in (folder / f"{split}{suffix}" for suffix in DATA_SUFFIXES) if p.exists() and not p.is_file()]
    if odd:
        return f"{folder / odd[0]} is not a file (a folder?); {split} rows go in a file named {odd[0]}"
    near = split_near_misses(folder, split)
    found = f" (found {', '.join(p.name for p in near)}: the name must be exactly one of these)" if near else ""
    return f"no {split}.jsonl or {split}.csv in {folder}{found}"


def json_error_text(err: json.JSONDecodeError) -> str:
    """A JSON error as a whole sentence with its column: ``err.msg`` alone ends mid-sentence ("... at")."""
    return f"{err.msg} column {err.colno}" if err.msg.endswith(" at") else f"{err.msg} at column {err.colno}"


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` is the index into the run's label list."""

    text: str
    label: int


@dataclass
class RegionData:
    """The splits of one region after cleaning, and what cleaning removed."""

    name: str
    train: list[Example]
    test: list[Example]
    val: list[Example] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    # validation examples taken from the train split because the region has no val file (client.pipeline)
    val_carved: int = 0

    def split(self, name: str) -> list[Example]:
        """The examples of a split by name."""
        return {keys.TRAIN: self.train, keys.VAL: self.val, keys.TEST: self.test}[name]


def normalise(text: str) -> str:
    """NFC Unicode and single spaces, so that equal texts compare equal."""
    return _SPACE_RE.sub(" ", unicodedata.normalize("NFC", text)).strip()


Rows = Iterator[tuple[int, dict[str, object] | str]]  # (line, row) or (line, reason); line 0: the whole file
TEXT_LABEL = ("text", "label")  # the fields a labelled row needs


def iter_rows(path: Path, required: Sequence[str] = TEXT_LABEL) -> Rows:
    """Stream the rows of a ``.jsonl`` or ``.csv`` file: ``(line, row)`` per row, ``(line, reason)`` per bad one.

    The one definition of a data row, for region data and for ``fedlocale predict`` alike: a JSON object per line
    (blank lines are no rows), or a CSV row under a header that has every ``required`` column, with as many cells
    as the header has columns, on one line: a row whose quoted field runs over several lines is refused (a stray
    quote merges the rows after it into one text). A line that is not UTF-8 is a bad row named by its line and
    column; a UTF-16 file is one problem at line 1. Raises OSError when the file cannot be opened.
    """
    csv_file = path.suffix == ".csv"
    # utf-8-sig: spreadsheet programs write a byte-order mark that would otherwise stick to the first column name.
    # surrogateescape: a byte that is not UTF-8 becomes a marker on its own line instead of ending the read, so
    # it is reported by line and the rows around it still are read (and reported) one by one
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="" if csv_file else None) as fh:
        yield from _csv_rows(fh, required) if csv_file else json_lines(fh)


def json_lines(lines: Iterable[str], plain_text: bool = False) -> Rows:
    """The rows of JSON lines (a file, stdin); with ``plain_text`` a line not starting with ``{`` is a row's text
    itself. A line holding bytes that are not UTF-8 (read with ``errors="surrogateescape"``) is a bad row; input
    whose reading fails on them (a strict text stream) ends with one problem at line 0."""
    return _guard_decoding(_json_lines(lines, plain_text))


def not_utf8(line: str, line_no: int) -> str | None:
    """Why a line read with ``surrogateescape`` is not UTF-8 text (its first bad byte and column), or None; every
    line-based reader names a bad line with it (``file:line: why``)."""
    for column, ch in enumerate(line, start=1):
        if "\udc80" <= ch <= "\udcff":
            if line_no == 1 and line[:2] in ("\udcff\udcfe", "\udcfe\udcff"):
                return "UTF-16 text (byte-order mark); save the file as UTF-8"
            return f"not UTF-8: byte 0x{ord(ch) - 0xDC00:02X} at column {column} (save the file as UTF-8)"
    return None


def _json_lines(lines: Iterable[str], plain_text: bool) -> Rows:
    for line_no, line in enumerate(lines, start=1):
        undecodable = not_utf8(line, line_no)
        if undecodable:
            yield line_no, undecodable
            if undecodable.startswith("UTF-16"):
                return  # every line after it would be reported too
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if plain_text and not stripped.startswith("{"):
            yield line_no, {"text": stripped}
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield line_no, f"bad JSON: {json_error_text(err)}"
            continue
        yield line_no, row if isinstance(row, dict) else "expected a JSON object"


def _guard_decoding(rows: Rows) -> Rows:
    """Turn a decoding failure part-way through a strict text stream into a reported problem."""
    last = 0
    try:
        for line_no, row in rows:
            last = line_no
            yield line_no, row
    except UnicodeDecodeError as err:
        after = f" after line {last}" if last else ""
        yield 0, f"not UTF-8{after} ({err.reason}); the rest is skipped"


def _csv_rows(fh: TextIO, required: Sequence[str]) -> Rows:
    undecodable: dict[int, str] = {}  # line -> why it is not UTF-8, filled as the reader reads lines

    def lines() -> Iterator[str]:
        for line_no, line in enumerate(fh, start=1):
            problem = not_utf8(line, line_no)
            if problem:
                undecodable[line_no] = problem
            yield line

    reader = csv.reader(lines())
    try:
        header = next(reader, [])
    except csv.Error as err:
        yield 1, f"bad CSV header: {err}"
        return
    if undecodable:
        yield 1, undecodable[1]
        return
    missing = set(required) - set(header)
    if missing:
        yield 1, f"header lacks column(s) {', '.join(sorted(missing))}"
        return
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield start, f"bad CSV: {err}; the rest of the file is skipped"
            return
        end = reader.line_num
        bad = [(n, undecodable[n]) for n in range(start, end + 1) if n in undecodable]
        if bad:
            yield from bad
            continue
        if end > start:
            # a quoted newline makes a row span lines; far more often than a real multi-line text, it is a stray
            # quote that swallowed the rows after it into one example's text
            yield (
                start,
                f"a quoted field runs over {end - start + 1} lines ({start}-{end}; a stray quote?): "
                "put each row on one line",
            )
            continue
        if not cells:
            continue  # a blank line is no row
        if len(cells) != len(header):
            # an unquoted comma in a text shifts every cell after it: never guess which cell is which
            yield start, f"{len(cells)} cells for {len(header)} columns"
            continue
        yield start, dict(zip(header, cells, strict=True))


def row_problem(row: Mapping[str, object], required: Sequence[str] = TEXT_LABEL) -> str | None:
    """Why ``row`` is no usable row (a required field missing, a text that is not a non-empty string), or None."""
    missing = [k for k in required if row.get(k) is None]
    if missing:
        return f"missing field {', '.join(missing)}"
    text = row["text"]
    if not isinstance(text, str):
        return f"text must be a string, got {type(text).__name__}"
    if not normalise(text):
        return "empty text"
    return None


def read_split(path: Path, labels: tuple[str, ...]) -> tuple[list[Example], list[str]]:
    """Read one split file; returns the good examples and a ``file:line: reason`` for each bad row."""
    index = {name: i for i, name in enumerate(labels)}
    examples: list[Example] = []
    problems: list[str] = []
    try:
        for line_no, row in iter_rows(path):
            where = f"{path}:{line_no}" if line_no else str(path)
            problem = row if isinstance(row, str) else row_problem(row)
            if isinstance(row, str) or problem is not None:
                problems.append(f"{where}: {problem}")
                continue
            label = str(row["label"])
            if label not in index:
                problems.append(f"{where}: unknown label {row['label']!r} (labels: {', '.join(labels)})")
            else:
                examples.append(Example(normalise(str(row["text"])), index[label]))
    except OSError as err:
        # unreadable (permissions, a folder named train.csv, an I/O error): nothing of it may be trained on
        problems.append(f"{path}: cannot read: {err.strerror or err}")
    return examples, problems


def _dedupe(rows: list[R], text: Callable[[R], str], seen: set[str]) -> tuple[list[R], int]:
    kept = []
    for row in rows:
        if text(row) not in seen:
            seen.add(text(row))
            kept.append(row)
    return kept, len(rows) - len(kept)


def clean_splits(splits: Mapping[str, list[R]], text: Callable[[R], str]) -> tuple[dict[str, list[R]], dict[str, int]]:
    """The splits without exact duplicates (by ``text``, already normalised) and without val/test rows that also
    occur in train, and how many of each kind were dropped (``duplicates_train``, ``leaked_test``, …; only
    non-zero counts). The one cleaning rule, for a region's examples and for a pool's raw rows alike."""
    dropped: dict[str, int] = {}
    train, dropped["duplicates_train"] = _dedupe(list(splits.get(keys.TRAIN, [])), text, set())
    train_texts = {text(row) for row in train}
    cleaned = {keys.TRAIN: train}
    for split in (keys.VAL, keys.TEST):
        # Evaluation rows also seen in train would flatter the model: drop them before deduping.
        rows = splits.get(split, [])
        clean = [row for row in rows if text(row) not in train_texts]
        dropped[f"leaked_{split}"] = len(rows) - len(clean)
        cleaned[split], dropped[f"duplicates_{split}"] = _dedupe(clean, text, set())
    return cleaned, {k: v for k, v in dropped.items() if v}


def load_region(
    name: str, folder: Path, labels: tuple[str, ...], log: Callable[[str], None] | None = None
) -> RegionData:
    """Load and clean a region folder; raise DataError listing every bad row of every split."""
    splits: dict[str, list[Example]] = {}
    problems: list[str] = []
    for split in keys.SPLITS:
        path = find_split(folder, split)
        if path is None:
            if split != keys.VAL:
                problems.append(missing_split(folder, split))
            continue
        splits[split], bad = read_split(path, labels)
        problems.extend(bad)
    if problems:
        raise DataError(problems)
    cleaned, dropped = clean_splits(splits, lambda ex: ex.text)
    region = RegionData(name, cleaned[keys.TRAIN], cleaned[keys.TEST], cleaned[keys.VAL], dropped)
    if log is not None:
        note = ", ".join(f"{k} {v}" for k, v in region.dropped.items()) or "nothing"
        log(f"{name}: {len(region.train)} train, {len(region.val)} val, {len(region.test)} test; dropped {note}")
    if not region.train:
        raise DataError([f"{folder}: no usable training rows"])
    return region


def redact_region(data: RegionData, rules: PiiRules) -> tuple[RegionData, dict[str, int]]:
    """Every split with personal data replaced by type tokens, and how many of each type were replaced."""
    counts: Counter[str] = Counter()
    splits = {}
    for split in keys.SPLITS:
        examples = data.split(split)
        texts, found = redact_texts((ex.text for ex in examples), rules)
        counts.update(found)
        splits[split] = [Example(text, ex.label) for text, ex in zip(texts, examples, strict=True)]
    redacted = RegionData(data.name, splits[keys.TRAIN], splits[keys.TEST], splits[keys.VAL], dict(data.dropped))
    return redacted, dict(sorted(counts.items()))
