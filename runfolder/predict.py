"""Labels for new text: read input rows strictly (every bad row reported as ``file:line: reason``), predict in
length-sorted batches, and give one result per good row in input order.

Inputs: ``.jsonl`` (a JSON object per line with a string ``text``), ``.csv`` with a ``text`` header, or a text
stream (stdin) where a line starting with ``{`` is a JSON object and any other line is the text itself. Blank
lines are no rows. Every field other than ``text`` is passed through to the result; those named like a result
field (``line``, ``label``, ``probs``) get an ``input_`` prefix, so a gold ``label`` survives as ``input_label``.
Rows are read by ``common.data.iter_rows`` / ``json_lines``, the rules region data is read by (only ``label``
is not required here), streamed, each bad row reported and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from torch import nn
from transformers import PreTrainedTokenizerBase

from client.train import predict_proba
from common.data import DATA_SUFFIXES, Rows, iter_rows, json_lines, normalise, row_problem

STDIN = "-"
RESULT_FIELDS = ("line", "label", "probs")
TEXT = ("text",)  # the one field an input row needs
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
    What a row is, and why one is bad, is ``common.data``'s one definition (as for region data), with only
    ``text`` required. An input that cannot be read at all yields a single problem.
    """
    name = input_name(source)
    if str(source) == STDIN:
        raw = getattr(sys.stdin, "buffer", None) if stream is None else None
        if raw is not None:
            yield from _stdin_rows(name, raw)
        else:
            yield from _rows(name, json_lines(stream or sys.stdin, plain_text=True))
        return
    path = Path(source)
    if path.suffix not in DATA_SUFFIXES:
        yield f"{name}: unsupported input, expected a .jsonl or .csv file or - (stdin)"
        return
    try:
        yield from _rows(name, iter_rows(path, TEXT))
    except OSError as err:
        yield f"{name}: {err.strerror or err}"


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


def _stdin_rows(name: str, raw: BinaryIO) -> Iterator[Row | str]:
    """The rows of stdin's bytes, each line decoded as UTF-8 on its own.

    Python's text stdin under a C or POSIX locale decodes bad bytes to lone surrogates instead of failing, so a
    non-UTF-8 line would reach the tokenizer (and crash it); decoding here names that line and keeps the rest.
    """
    for line_no, data in enumerate(raw, start=1):
        try:
            text = data.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as err:
            yield f"{name}:{line_no}: not UTF-8 (byte {err.start + 1} of the line: {err.reason}); skipped"
            continue
        yield from _rows(name, ((line_no, row) for _, row in json_lines([text], plain_text=True)))


def _rows(name: str, rows: Rows) -> Iterator[Row | str]:
    """Rows as predict passes them on: normalised text, every other field kept (result names prefixed)."""
    for line_no, row in rows:
        where = f"{name}:{line_no}" if line_no else name
        problem = row if isinstance(row, str) else row_problem(row, TEXT)
        if isinstance(row, str) or problem is not None:
            yield f"{where}: {problem}"
            continue
        fields = {(f"input_{k}" if k in RESULT_FIELDS else k): v for k, v in row.items() if k != "text"}
        yield Row(line_no, normalise(str(row["text"])), fields)


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
