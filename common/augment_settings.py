"""How a node augments its train split (``AugmentSettings``) and the synonym files those settings name.

Part of the run config (a simulated region's ``augment:``) and of a deployed node's own settings, so the server
and the nodes both read it; the augmentation itself is node code (``client.augment``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data import normalise
from common.errors import ConfigError

OPS = ("backtranslate", "synonym", "delete", "swap", "mask")  # the order in which a copy applies them
MAX_COPIES = 20


@dataclass(frozen=True)
class AugmentSettings:
    """How a node augments its train split; ``copies`` 0 turns augmentation off."""

    ops: tuple[str, ...] = ("delete", "swap", "mask")
    copies: int = 0  # extra augmented copies per training example
    p: float = 0.1  # chance that a token-level op touches a token (mask: that a span starts there)
    mask_token: str = "[MASK]"  # use the tokenizer's own mask token (XLM-R: "<mask>")
    span: int = 2  # longest run of tokens one mask span covers
    synonyms: Path | None = None  # .json {word: [synonym, …]} or TSV: word<TAB>synonym[<TAB>synonym…]
    translator: Path | None = None  # folder of a local multilingual seq2seq model (M2M100, NLLB, mBART-50)
    source_lang: str | None = None  # the region's language, as the translation model names it ("zh", "zho_Hans")
    pivot_lang: str = "en"  # the language back-translation goes through

    def __post_init__(self) -> None:
        problems = [*self._op_problems(), *self._number_problems(), *self._file_problems()]
        if problems:
            raise ConfigError([f"{name}: {msg}" for name, msg in problems])

    def _op_problems(self) -> list[tuple[str, str]]:
        problems = [("ops", f"unknown op {op!r}; known: {', '.join(OPS)}") for op in self.ops if op not in OPS]
        if len(set(self.ops)) != len(self.ops):
            problems.append(("ops", f"must be distinct, got {list(self.ops)}"))
        if self.copies > 0 and not self.ops:
            problems.append(("ops", "must name at least one op when copies > 0"))
        if not self.mask_token.strip() or any(c.isspace() for c in self.mask_token):
            problems.append(("mask_token", f"must be non-empty without whitespace, got {self.mask_token!r}"))
        return problems

    def _number_problems(self) -> list[tuple[str, str]]:
        problems = []
        if not 0 <= self.copies <= MAX_COPIES:
            problems.append(("copies", f"must be in [0, {MAX_COPIES}], got {self.copies}"))
        if not 0.0 < self.p < 1.0:
            problems.append(("p", f"must be in (0, 1), got {self.p}"))
        if self.span < 1:
            problems.append(("span", f"must be >= 1, got {self.span}"))
        return problems

    def _file_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if "synonym" in self.ops and self.synonyms is None:
            problems.append(("synonyms", "required when ops lists 'synonym'"))
        table = None
        if self.synonyms is not None:
            # Parse now so a bad file stops the run before training, each bad line named file:line; the table is
            # kept with these settings (immutable), so augmentation reads the file that was checked, once
            try:
                table = load_synonyms(self.synonyms)
            except ConfigError as err:
                problems.extend(("synonyms", p) for p in err.problems)
        object.__setattr__(self, "_table", table)  # not a field: the config's YAML and fingerprint stay as they were
        if "backtranslate" in self.ops:
            if self.translator is None:
                problems.append(("translator", "required when ops lists 'backtranslate'"))
            if not self.source_lang:
                problems.append(("source_lang", "required when ops lists 'backtranslate'"))
            elif self.source_lang == self.pivot_lang:
                problems.append(("pivot_lang", f"must differ from source_lang, both are {self.pivot_lang!r}"))
        if self.translator is not None and not self.translator.is_dir():
            problems.append(("translator", f"no such folder: {self.translator}"))
        return problems

    @property
    def synonym_table(self) -> dict[str, tuple[str, ...]] | None:
        """The synonyms read from ``synonyms`` when these settings were made; None without a file."""
        table: dict[str, tuple[str, ...]] | None = self.__dict__.get("_table")
        return table

    @property
    def token_ops(self) -> tuple[str, ...]:
        """The listed ops that edit tokens of one text, in the order they are applied."""
        return tuple(op for op in OPS if op in self.ops and op != "backtranslate")


# ---------------------------------------------------------------------------------------------------------
# Synonym files


def load_synonyms(path: Path) -> dict[str, tuple[str, ...]]:
    """Read a synonym file: ``.json`` (an object of word -> list of synonyms) or otherwise TSV (``word<TAB>synonym
    [<TAB>synonym…]`` per line; blank lines and ``#`` comments skipped). Repeated words merge their synonyms.

    Raises ConfigError listing every bad line as ``file:line: reason``.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not UTF-8 ({err.reason} at byte {err.start})"
        raise ConfigError([f"{path}: cannot read: {reason}"]) from err
    pairs, problems = _parse_json(path, text) if path.suffix.lower() == ".json" else _parse_tsv(path, text)
    if not pairs and not problems:
        problems.append(f"{path}: holds no synonyms")
    if problems:
        raise ConfigError(problems)
    merged: dict[str, list[str]] = {}
    for word, syns in pairs:
        bucket = merged.setdefault(word, [])
        bucket.extend(s for s in syns if s not in bucket and s != word)
    return {word: tuple(syns) for word, syns in merged.items() if syns}


def _parse_tsv(path: Path, text: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    pairs: list[tuple[str, list[str]]] = []
    problems: list[str] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [normalise(c) for c in line.split("\t")]
        if len(cells) < 2:
            problems.append(f"{path}:{line_no}: expected word<TAB>synonym, found no tab")
        elif not cells[0]:
            problems.append(f"{path}:{line_no}: empty word")
        elif not any(cells[1:]):
            problems.append(f"{path}:{line_no}: no synonym for {cells[0]!r}")
        else:
            pairs.append((cells[0], [c for c in cells[1:] if c]))
    return pairs, problems


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs: keeps repeated keys, and tells objects from arrays."""


def _parse_json(path: Path, text: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    try:
        raw = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as err:
        return [], [f"{path}:{err.lineno}: bad JSON: {err.msg}"]
    if not isinstance(raw, _Pairs):
        return [], [f"{path}:1: expected an object of word -> list of synonyms"]
    pairs: list[tuple[str, list[str]]] = []
    problems: list[str] = []
    for key, value in raw:
        where = f"{path}:{_json_key_line(text, key)}"
        word = normalise(key)
        if not word:
            problems.append(f"{where}: empty word")
        elif not isinstance(value, list) or isinstance(value, _Pairs) or not all(isinstance(v, str) for v in value):
            problems.append(f"{where}: synonyms of {word!r} must be a list of strings")
        elif not any(normalise(v) for v in value):
            problems.append(f"{where}: no synonym for {word!r}")
        else:
            pairs.append((word, [normalise(v) for v in value if normalise(v)]))
    return pairs, problems


def _json_key_line(text: str, key: str) -> int:
    """The line a key of a JSON object sits on (its first occurrence as a key); json reports no positions."""
    for spelled in (json.dumps(key, ensure_ascii=False), json.dumps(key)):
        match = re.search(re.escape(spelled) + r"\s*:", text)
        if match:
            return text.count("\n", 0, match.start()) + 1
    return 1
