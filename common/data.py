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
from typing import TextIO

from common import keys
from common.errors import InputError
from common.pii import PiiRules, redact_texts

DATA_SUFFIXES = (".jsonl", ".csv")  # the files a region folder holds its splits in
_SPACE_RE = re.compile(r"\s+")


class DataError(InputError):
    """One or more rows of region data are unusable; ``problems`` lists each as ``file:line: reason``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:50]
        more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{len(problems)} bad row(s):\n" + "\n".join(f"  {p}" for p in shown) + more)


def find_split(folder: Path, split: str) -> Path | None:
    """The file holding ``split`` in a region folder (``train.jsonl`` or ``train.csv``), if any."""
    for suffix in DATA_SUFFIXES:
        path = folder / f"{split}{suffix}"
        if path.is_file():
            return path
    return None


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
    as the header has columns (a quoted newline makes a row span lines; it is named by the line it starts on).
    A file that stops decoding as UTF-8 ends with one problem at line 0 (the file), the rest of it skipped.
    """
    csv_file = path.suffix == ".csv"
    # utf-8-sig: spreadsheet programs write a byte-order mark that would otherwise stick to the first column name
    with path.open(encoding="utf-8-sig", newline="" if csv_file else None) as fh:
        yield from _guard_decoding(_csv_rows(fh, required)) if csv_file else json_lines(fh)


def json_lines(lines: Iterable[str], plain_text: bool = False) -> Rows:
    """The rows of JSON lines (a file, stdin); with ``plain_text`` a line not starting with ``{`` is a row's text
    itself. Input that stops decoding as UTF-8 ends with one problem at line 0, as in ``iter_rows``."""
    return _guard_decoding(_json_lines(lines, plain_text))


def _json_lines(lines: Iterable[str], plain_text: bool) -> Rows:
    for line_no, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if plain_text and not stripped.startswith("{"):
            yield line_no, {"text": stripped}
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield line_no, f"bad JSON: {err.msg}"
            continue
        yield line_no, row if isinstance(row, dict) else "expected a JSON object"


def _guard_decoding(rows: Rows) -> Rows:
    """Turn a decoding failure part-way through into a reported problem, keeping the rows before it."""
    last = 0
    try:
        for line_no, row in rows:
            last = line_no
            yield line_no, row
    except UnicodeDecodeError as err:
        after = f" after line {last}" if last else ""
        yield 0, f"not UTF-8{after} ({err.reason}); the rest is skipped"


def _csv_rows(fh: TextIO, required: Sequence[str]) -> Rows:
    reader = csv.reader(fh)
    header = next(reader, [])
    missing = set(required) - set(header)
    if missing:
        yield 1, f"header lacks column(s) {', '.join(sorted(missing))}"
        return
    while True:
        # a quoted newline makes a row span lines: the row starts on the line after the previous one ended
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield start, f"bad CSV: {err}; the rest of the file is skipped"
            return
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
    return examples, problems


def _dedupe(examples: list[Example], seen: set[str]) -> tuple[list[Example], int]:
    kept = []
    for ex in examples:
        if ex.text not in seen:
            seen.add(ex.text)
            kept.append(ex)
    return kept, len(examples) - len(kept)


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
                problems.append(f"{folder}: no {split}.jsonl or {split}.csv")
            continue
        splits[split], bad = read_split(path, labels)
        problems.extend(bad)
    if problems:
        raise DataError(problems)
    dropped: dict[str, int] = {}
    train, dropped["duplicates_train"] = _dedupe(splits[keys.TRAIN], set())
    train_texts = {ex.text for ex in train}
    region = RegionData(name=name, train=train, test=[])
    for split in (keys.VAL, keys.TEST):
        # Evaluation rows also seen in train would flatter the model: drop them before deduping.
        rows = splits.get(split, [])
        clean = [ex for ex in rows if ex.text not in train_texts]
        dropped[f"leaked_{split}"] = len(rows) - len(clean)
        clean, dropped[f"duplicates_{split}"] = _dedupe(clean, set())
        setattr(region, split, clean)
    region.dropped = {k: v for k, v in dropped.items() if v}
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
