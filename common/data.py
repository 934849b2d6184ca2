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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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

    def split(self, name: str) -> list[Example]:
        """The examples of a split by name."""
        return {keys.TRAIN: self.train, keys.VAL: self.val, keys.TEST: self.test}[name]


def normalise(text: str) -> str:
    """NFC Unicode and single spaces, so that equal texts compare equal."""
    return _SPACE_RE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _rows(path: Path) -> Iterator[tuple[int, dict[str, object] | str]]:
    """Yield (line, row) or (line, reason) for each data row of a .jsonl or .csv file."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield line_no, f"bad JSON: {err.msg}"
                    continue
                yield line_no, row if isinstance(row, dict) else "expected a JSON object"
        return
    # utf-8-sig: spreadsheet programs write a byte-order mark that would otherwise stick to the first column name
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        missing = {"text", "label"} - set(header)
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
                yield start, f"bad CSV: {err}"
                return
            if cells:  # blank lines are no rows
                yield start, dict(zip(header, cells, strict=False))


def read_split(path: Path, labels: tuple[str, ...]) -> tuple[list[Example], list[str]]:
    """Read one split file; returns the good examples and a ``file:line: reason`` for each bad row."""
    index = {name: i for i, name in enumerate(labels)}
    examples: list[Example] = []
    problems: list[str] = []
    try:
        rows = list(_rows(path))
    except UnicodeDecodeError as err:
        return [], [f"{path}: not UTF-8 ({err.reason} at byte {err.start})"]
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        if isinstance(row, str):
            problems.append(f"{where}: {row}")
            continue
        text, label = row.get("text"), row.get("label")
        if text is None or label is None:
            missing = [k for k in ("text", "label") if row.get(k) is None]
            problems.append(f"{where}: missing field {', '.join(missing)}")
        elif not isinstance(text, str):
            problems.append(f"{where}: text must be a string, got {type(text).__name__}")
        elif not normalise(text):
            problems.append(f"{where}: empty text")
        elif str(label) not in index:
            problems.append(f"{where}: unknown label {label!r} (labels: {', '.join(labels)})")
        else:
            examples.append(Example(normalise(text), index[str(label)]))
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
