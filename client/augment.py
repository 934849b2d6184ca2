"""Text augmentation of a region's train split, on the node, before local training (never val or test).

Each example gets ``copies`` extra augmented versions; labels are kept. The token-level ops work for any
language because of how text is cut into tokens (``tokenize``):

* whitespace separates tokens (English, Italian, Korean, …);
* every character of a script written without spaces between words — Han (Chinese, Japanese kanji),
  kana, Thai, Lao, Khmer, Myanmar, and full-width CJK punctuation — is a token of its own, so a Chinese
  sentence is edited per character even when it holds an occasional space or a Latin word.

Ops (``AugmentSettings.ops``; a copy gets every listed op, in the order of ``OPS``):

* ``backtranslate``: translate to ``pivot_lang`` and back with a local translation model (``Translator``);
* ``synonym``: replace a word by one of its synonyms from a user file (texts without spaces: longest match);
* ``delete``: drop tokens (never all of them);
* ``swap``: exchange tokens with other positions (the multiset of tokens is kept);
* ``mask``: replace spans of 1 to ``span`` tokens by ``mask_token``; spans never touch, so a run of mask
  tokens is never longer than ``span``.

Each token-level op touches a token with probability ``p`` and, when that touched none, exactly one, so a copy
is never a silent no-op. A copy that still equals an original text (or an earlier copy) is dropped.

A node calls ``augment_train`` on its region's data: the train split gets the copies, val and test stay as they are.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from common.augment_settings import AugmentSettings
from common.data import Example, RegionData, normalise
from common.errors import ConfigError

# Scripts written without spaces between words: each of their characters is one token.
_NO_SPACE = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u2e80-\u2fdf"  # CJK radicals
    "\u3000-\u303f"  # CJK symbols and punctuation
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u31f0-\u31ff"  # Katakana extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff00-\uffef"  # full-width and half-width forms
    "\U00020000-\U0003134f"  # CJK extensions B-G
)
_TOKEN_RE = re.compile(f"[{_NO_SPACE}]|[^\\s{_NO_SPACE}]+")
_NO_SPACE_RE = re.compile(f"[{_NO_SPACE}]")
_EDGE_PUNCT_RE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)

Synonyms = Mapping[str, tuple[str, ...]]


@runtime_checkable
class Translator(Protocol):
    """Back-translation hook: translate a batch of texts from language ``src`` to ``tgt``, one output per input."""

    def translate(self, texts: Sequence[str], src: str, tgt: str) -> list[str]:
        """Translations of ``texts``, in order."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Tokens


def tokenize(text: str) -> list[str]:
    """Whitespace-separated words, with every character of a script written without spaces (Han, kana, Thai, …)
    as a token of its own."""
    return _TOKEN_RE.findall(text)


def _no_space(token: str) -> bool:
    return len(token) == 1 and _NO_SPACE_RE.match(token) is not None


def detokenize(tokens: Sequence[str]) -> str:
    """Join tokens: no space next to a character of a script written without spaces, one space otherwise."""
    out: list[str] = []
    for i, token in enumerate(tokens):
        if i and not (_no_space(token) or _no_space(tokens[i - 1])):
            out.append(" ")
        out.append(token)
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------
# The token-level ops, pure functions of their inputs and ``rng``


def _touched(n: int, p: float, rng: random.Random) -> list[int]:
    """Positions hit with probability ``p`` each; one position if none was hit (and there is any)."""
    hits = [i for i in range(n) if rng.random() < p]
    return hits or ([rng.randrange(n)] if n else [])


def delete_tokens(tokens: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Drop tokens with probability ``p`` each (at least one); a text of one token is left whole."""
    if len(tokens) < 2:
        return list(tokens)
    gone = set(_touched(len(tokens), p, rng))
    if len(gone) == len(tokens):
        gone.discard(rng.choice(sorted(gone)))  # an empty text is not an example
    return [t for i, t in enumerate(tokens) if i not in gone]


def swap_tokens(tokens: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Swap each token hit with probability ``p`` (at least one) with another random position."""
    out = list(tokens)
    if len(out) < 2:
        return out
    for i in _touched(len(out), p, rng):
        j = rng.randrange(len(out) - 1)
        j += j >= i  # any position but i
        out[i], out[j] = out[j], out[i]
    return out


def mask_tokens(tokens: Sequence[str], p: float, span: int, mask_token: str, rng: random.Random) -> list[str]:
    """Replace spans of 1..``span`` tokens by ``mask_token`` (one per token); a span starts at a token with
    probability ``p`` (at least one span). A kept token follows each span, so runs stay <= ``span``, and at
    least one token is never masked (a text of one token is left whole)."""
    out = list(tokens)
    if len(out) < 2:
        return out  # a text that is all mask tokens says nothing about its label
    starts = set(_touched(len(out), p, rng))
    i = 0
    while i < len(out):
        if i not in starts:
            i += 1
            continue
        # Every later span has a kept token before it; only a first span could cover the whole text.
        length = min(rng.randint(1, span), len(out) - i - (i == 0))
        out[i : i + length] = [mask_token] * length
        i += length + 1
    return out


def replace_synonyms(tokens: Sequence[str], table: Synonyms, p: float, rng: random.Random) -> list[str]:
    """Replace each word that has synonyms, with probability ``p`` (at least one if any has), by a random one.

    A word is looked up as written, then case-folded, without the punctuation around it (which is kept).
    """
    out = list(tokens)
    found = [(i, m) for i, m in enumerate(map(_synonym_match, out, [table] * len(out))) if m is not None]
    for k in _touched(len(found), p, rng):
        i, (head, choices, tail) = found[k]
        out[i] = f"{head}{rng.choice(choices)}{tail}"
    return out


def _synonym_match(token: str, table: Synonyms) -> tuple[str, tuple[str, ...], str] | None:
    match = _EDGE_PUNCT_RE.match(token)
    head, word, tail = match.groups() if match else ("", token, "")
    choices = table.get(word) or table.get(word.casefold())
    return (head, choices, tail) if choices else None


def replace_synonyms_unspaced(text: str, table: Synonyms, p: float, rng: random.Random) -> str:
    """``replace_synonyms`` for text without spaces (Chinese, Japanese): words are found by longest match of
    the table's keys, since per-character tokens cannot match a multi-character word."""
    longest = max((len(k) for k in table), default=0)
    pieces: list[tuple[str, tuple[str, ...] | None]] = []
    i = 0
    while i < len(text):
        size = next((n for n in range(min(longest, len(text) - i), 0, -1) if text[i : i + n] in table), 0)
        if size:
            pieces.append((text[i : i + size], table[text[i : i + size]]))
            i += size
        else:
            pieces.append((text[i], None))
            i += 1
    found = [k for k, (_, choices) in enumerate(pieces) if choices]
    for k in _touched(len(found), p, rng):
        word, choices = pieces[found[k]]
        pieces[found[k]] = (rng.choice(choices or (word,)), None)
    return "".join(word for word, _ in pieces)


# ---------------------------------------------------------------------------------------------------------
# One text, and a whole train split


def augment_text(text: str, settings: AugmentSettings, rng: random.Random, synonyms: Synonyms | None = None) -> str:
    """One augmented version of ``text``: every token-level op of ``settings`` in turn (``backtranslate`` is a
    batch step of ``augment_examples``). ``synonyms`` defaults to the table read from ``settings.synonyms``."""
    ops = settings.token_ops
    if "synonym" in ops and synonyms is None:
        synonyms = settings.synonym_table
    if "synonym" in ops and synonyms and not any(c.isspace() for c in text):
        text = replace_synonyms_unspaced(text, synonyms, settings.p, rng)
        ops = tuple(op for op in ops if op != "synonym")
    tokens = tokenize(text)
    for op in ops:
        if op == "synonym":
            tokens = replace_synonyms(tokens, synonyms or {}, settings.p, rng)
        elif op == "delete":
            tokens = delete_tokens(tokens, settings.p, rng)
        elif op == "swap":
            tokens = swap_tokens(tokens, settings.p, rng)
        elif op == "mask":
            tokens = mask_tokens(tokens, settings.p, settings.span, settings.mask_token, rng)
    return detokenize(tokens)


def augment_examples(
    examples: Sequence[Example],
    settings: AugmentSettings,
    seed: int,
    translator: Translator | None = None,
) -> list[Example]:
    """The originals, then ``settings.copies`` augmented copies of each (labels kept), deterministic in ``seed``.

    A copy equal to any original text or to an earlier copy is dropped. Each copy's randomness depends only on
    (seed, copy number, text), so adding an example never changes another one's copies. ``translator`` serves
    ``backtranslate``; without it the model in ``settings.translator`` is loaded on first use.
    """
    out = list(examples)
    if settings.copies == 0 or not examples:
        return out
    synonyms = settings.synonym_table
    sources = [ex.text for ex in examples]
    if "backtranslate" in settings.ops:
        sources = back_translate(sources, settings, translator or load_translator(_need(settings.translator)))
    seen = {ex.text for ex in examples}
    for copy in range(1, settings.copies + 1):
        for ex, source in zip(examples, sources, strict=True):
            rng = random.Random(f"{seed}\x1f{copy}\x1f{ex.text}")
            text = normalise(augment_text(source, settings, rng, synonyms))
            if text and text not in seen:
                seen.add(text)
                out.append(Example(text, ex.label))
    return out


def augment_train(
    data: RegionData, settings: AugmentSettings, seed: int, *, translator: Translator | None = None
) -> tuple[RegionData, dict[str, int]]:
    """``data`` with its train split augmented by ``augment_examples`` (val, test and ``dropped`` untouched), and
    counts of what was done.

    Counts: ``train_before`` / ``train_after`` (examples), ``copies_requested`` (``copies`` x train examples),
    ``copies_added`` and ``copies_dropped`` (requested but equal to an original text or an earlier copy, e.g. a
    one-token text that no op can change). Deterministic in ``seed``; ``data`` itself is not changed.
    """
    train = augment_examples(data.train, settings, seed, translator)
    added = len(train) - len(data.train)
    requested = settings.copies * len(data.train)
    counts = {
        "train_before": len(data.train),
        "train_after": len(train),
        "copies_requested": requested,
        "copies_added": added,
        "copies_dropped": requested - added,
    }
    return dataclasses.replace(data, train=train), counts


def _need(folder: Path | None) -> Path:
    if folder is None:
        # AugmentSettings refuses 'backtranslate' without a translator folder, so only a caller can get here
        raise ConfigError(["translator: required when ops lists 'backtranslate'"])
    return folder


def back_translate(texts: Sequence[str], settings: AugmentSettings, translator: Translator) -> list[str]:
    """Each text translated to ``settings.pivot_lang`` and back to ``settings.source_lang``, in two batches."""
    src = settings.source_lang or ""
    there = translator.translate(list(texts), src, settings.pivot_lang)
    back = translator.translate(there, settings.pivot_lang, src)
    if len(back) != len(texts):
        raise RuntimeError(f"translator returned {len(back)} texts for {len(texts)}")
    # A failed translation (empty output) falls back to the original rather than losing the example.
    return [b if b.strip() else t for t, b in zip(texts, back, strict=True)]


# ---------------------------------------------------------------------------------------------------------
# The translation model behind the hook


class Seq2SeqTranslator:
    """``Translator`` over a local multilingual seq2seq model folder, loaded on the first ``translate`` call.

    transformers 5 removed ``pipeline("translation")``, so this does what it did: tokenise with the source
    language set, generate with the target language forced as first token (M2M100, NLLB, mBART-50 name their
    languages this way). A one-direction model (Marian) cannot translate back and is not supported.
    """

    def __init__(self, folder: Path, batch_size: int = 16, max_new_tokens: int = 128) -> None:
        self.folder = folder
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self._loaded: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
            model = AutoModelForSeq2SeqLM.from_pretrained(str(self.folder)).eval()
            self._loaded = (tokenizer, model)
        return self._loaded

    def translate(self, texts: Sequence[str], src: str, tgt: str) -> list[str]:
        """Translations of ``texts`` from ``src`` to ``tgt``, in batches."""
        import torch

        tokenizer, model = self._load()
        tokenizer.src_lang = src
        forced = _language_token_id(tokenizer, tgt)
        extra = {"forced_bos_token_id": forced} if forced is not None else {}
        out: list[str] = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(list(texts[start : start + self.batch_size]), return_tensors="pt", padding=True)
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=self.max_new_tokens, **extra)
            out.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
        return out


def _language_token_id(tokenizer: Any, lang: str) -> int | None:
    if hasattr(tokenizer, "get_lang_id"):  # M2M100: "fr" -> the id of "__fr__"
        return int(tokenizer.get_lang_id(lang))
    vocab = tokenizer.get_vocab()
    return int(vocab[lang]) if lang in vocab else None  # NLLB "fra_Latn", mBART-50 "fr_XX"


def load_translator(folder: Path) -> Translator:
    """The back-translation hook for a model folder; nothing is read until the first translation."""
    return Seq2SeqTranslator(folder)
