"""Labels for new text: read input rows strictly (every bad row reported as ``file:line: reason``), predict in
length-sorted batches, and give one result per good row in input order.

Inputs: ``.jsonl`` (a JSON object per line with a string ``text``), ``.csv`` with a ``text`` header, or a text
stream (stdin) where a line starting with ``{`` is a JSON object and any other line is the text itself. Blank
lines are no rows. Every field other than ``text`` is passed through to the result; those named like a result
field (``line``, ``label``, ``probs``) get an ``input_`` prefix, so a gold ``label`` survives as ``input_label``.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from torch import nn
from transformers import PreTrainedTokenizerBase

from client.train import predict_proba
from common.data import normalise

STDIN = "-"
RESULT_FIELDS = ("line", "label", "probs")
SUFFIXES = (".jsonl", ".csv")
# rows are sorted by length within blocks of this many batches: most of the padding saving of a global sort,
# while memory stays bounded and results stream out
BLOCK_BATCHES = 16


@dataclass(frozen=True)
class Row:
    """One input text, the line it starts on, and the row's other fields (passed through to the result)."""

    line: int
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


def input_name(source: str | Path) -> str:
    """How problems name the input: its path, or ``<stdin>``."""
    return "<stdin>" if str(source) == STDIN else str(source)


def iter_inputs(source: str | Path, stream: TextIO | None = None) -> Iterator[Row | str]:
    """Yield a ``Row`` per good row and a ``file:line: reason`` string per bad one, in input order.

    ``source`` is a ``.jsonl`` or ``.csv`` path, or ``-`` for ``stream`` (default stdin; plain text or JSON lines).
    An input that cannot be read at all yields a single problem.
    """
    name = input_name(source)
    if str(source) == STDIN:
        yield from _guard(name, _stream_rows(name, stream or sys.stdin))
        return
    path = Path(source)
    if path.suffix not in SUFFIXES:
        yield f"{name}: unsupported input, expected a .jsonl or .csv file or - (stdin)"
        return
    try:
        fh = path.open(encoding="utf-8-sig", newline="" if path.suffix == ".csv" else None)
    except OSError as err:
        yield f"{name}: {err.strerror or err}"
        return
    with fh:
        rows = _csv_rows(name, fh) if path.suffix == ".csv" else _jsonl_rows(name, fh)
        yield from _guard(name, rows)


def read_inputs(source: str | Path, stream: TextIO | None = None) -> tuple[list[Row], list[str]]:
    """All good rows of an input and a ``file:line: reason`` for each bad one."""
    rows: list[Row] = []
    problems: list[str] = []
    for item in iter_inputs(source, stream):
        if isinstance(item, str):
            problems.append(item)
        else:
            rows.append(item)
    return rows, problems


def _guard(name: str, rows: Iterator[Row | str]) -> Iterator[Row | str]:
    """Turn a decoding failure part-way through into a reported problem instead of a crash."""
    last = 0
    try:
        for item in rows:
            last = item.line if isinstance(item, Row) else last
            yield item
    except UnicodeDecodeError as err:
        after = f" after line {last}" if last else ""
        yield f"{name}: not UTF-8{after} ({err.reason}); the rest of the input is skipped"


def _jsonl_rows(name: str, lines: Iterable[str]) -> Iterator[Row | str]:
    for line_no, line in enumerate(lines, start=1):
        if line.strip():
            yield _json_row(name, line_no, line)


def _stream_rows(name: str, lines: Iterable[str]) -> Iterator[Row | str]:
    for line_no, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("{"):
            yield _json_row(name, line_no, line)
        elif stripped:
            yield Row(line_no, normalise(stripped))


def _json_row(name: str, line_no: int, line: str) -> Row | str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return f"{name}:{line_no}: bad JSON: {err.msg}"
    if not isinstance(obj, dict):
        return f"{name}:{line_no}: expected a JSON object with a 'text' field"
    return _row(name, line_no, obj)


def _row(name: str, line_no: int, obj: dict[str, Any]) -> Row | str:
    text = obj.get("text")
    if text is None:
        return f"{name}:{line_no}: missing field text"
    if not isinstance(text, str):
        return f"{name}:{line_no}: text must be a string, got {type(text).__name__}"
    if not normalise(text):
        return f"{name}:{line_no}: empty text"
    fields = {(f"input_{k}" if k in RESULT_FIELDS else k): v for k, v in obj.items() if k != "text"}
    return Row(line_no, normalise(text), fields)


def _csv_rows(name: str, fh: TextIO) -> Iterator[Row | str]:
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        return
    if "text" not in header:
        yield f"{name}:1: header lacks a text column (got {', '.join(header) or 'nothing'})"
        return
    while True:
        # a quoted newline makes a row span lines: the row starts on the line after the previous one ended
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield f"{name}:{start}: bad CSV: {err}; the rest of the file is skipped"
            return
        if not cells:
            continue  # a blank line is no row
        if len(cells) != len(header):
            yield f"{name}:{start}: {len(cells)} cells for {len(header)} columns"
            continue
        yield _row(name, start, dict(zip(header, cells, strict=True)))


def predict_rows(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    labels: tuple[str, ...],
    rows: Iterable[Row],
    *,
    max_length: int,
    batch_size: int,
    on_block: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """One result per row, in the rows' order: ``{"line", ...passed-through fields, "label", "probs"}``.

    Rows are predicted a block at a time (sorted by length within it); ``on_block`` gets each block's size.
    """
    block: list[Row] = []
    for row in rows:
        block.append(row)
        if len(block) == batch_size * BLOCK_BATCHES:
            yield from _predict_block(model, tokenizer, labels, block, max_length, batch_size, on_block)
            block = []
    if block:
        yield from _predict_block(model, tokenizer, labels, block, max_length, batch_size, on_block)


def _predict_block(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    labels: tuple[str, ...],
    block: list[Row],
    max_length: int,
    batch_size: int,
    on_block: Callable[[int], None] | None,
) -> Iterator[dict[str, Any]]:
    probs = predict_proba(model, tokenizer, [r.text for r in block], max_length=max_length, batch_size=batch_size)
    if on_block is not None:
        on_block(len(block))
    for row, p in zip(block, probs, strict=True):
        yield {
            "line": row.line,
            **row.fields,
            "label": labels[int(p.argmax())],
            "probs": {name: float(v) for name, v in zip(labels, p, strict=True)},
        }
