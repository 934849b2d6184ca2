"""Token ids of a split, optionally cached on the node's own disk so that a fresh process skips tokenising.

An entry is keyed by what determines its content: the exact (text, label) rows being encoded (after cleaning,
so a change anywhere upstream misses), the tokenizer's fingerprint, ``max_length`` and the label list. An entry
is checked before use; one that cannot be read or does not fit is logged, ignored and rewritten. Token ids are
the text in another encoding, so the cache is as private as the data: it lives only where the node's operator
points it (``cache-dir``), files are created owner-only, and nothing here ever sends it anywhere.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from client.train import encode
from common.data import Example
from common.errors import FedlocaleError
from common.model import LoadedModel

CACHE_VERSION = 1  # bump when the entry layout or the encoding call changes
CACHE_SUBDIR = f"tokens-v{CACHE_VERSION}"

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """A split ready for the model: token ids per example (unpadded) and label indices."""

    ids: list[list[int]]
    labels: list[int]


class CacheEntryError(FedlocaleError):
    """A cache entry that cannot be trusted; the reason says why."""


def encode_examples(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int) -> Encoded:
    """Tokenise ``examples`` exactly as ``client.train.train_local`` does."""
    ids = encode(tokenizer, [ex.text for ex in examples], max_length)
    return Encoded(ids=ids, labels=[ex.label for ex in examples])


def encode_cached(
    source: PreTrainedTokenizerBase | LoadedModel,
    examples: Sequence[Example],
    max_length: int,
    label_names: Sequence[str],
    cache_dir: Path | None,
) -> Encoded:
    """``encode_examples``, served from ``cache_dir`` when a valid entry exists; no cache when it is None.

    ``source`` is a tokenizer, or a model whose tokenizer is loaded only when needed: with a cache, the
    tokenizer a model folder makes is known by a fingerprint kept beside the entries (``known_tokenizer``), so
    a hit does not load it. A cache problem never fails the caller: an unreadable entry is re-tokenised, an
    unwritable folder only logged.
    """
    if not examples:
        return Encoded(ids=[], labels=[])
    if cache_dir is None:
        return encode_examples(_tokenizer(source), examples, max_length)
    folder = Path(source.source) if isinstance(source, LoadedModel) and Path(source.source).is_dir() else None
    digest = folder_digest(folder) if folder is not None else None
    known = known_tokenizer(cache_dir, digest) if digest is not None else None
    if known is None:
        known = describe_tokenizer(_tokenizer(source))
        if digest is not None:
            remember_tokenizer(cache_dir, digest, known)
    key = cache_key(examples, known.fingerprint, max_length, label_names)
    path = entry_path(cache_dir, key)
    try:
        return read_entry(path, key, examples, max_length, vocab_size=known.vocab_size)
    except FileNotFoundError:
        pass  # a plain miss
    except CacheEntryError as err:
        _LOG.warning("ignoring token cache entry %s (%s); tokenising again", path, err)
    encoded = encode_examples(_tokenizer(source), examples, max_length)
    try:
        write_entry(path, key, encoded)
    except OSError as err:
        _LOG.warning("cannot write token cache entry %s (%s); continuing without it", path, err)
    return encoded


def _tokenizer(source: PreTrainedTokenizerBase | LoadedModel) -> PreTrainedTokenizerBase:
    """The tokenizer itself (a model's is loaded now if it was not yet)."""
    return source.tokenizer if isinstance(source, LoadedModel) else source


@dataclass(frozen=True)
class KnownTokenizer:
    """What the cache needs of a tokenizer: its fingerprint (``tokenizer_fingerprint``) and vocabulary size."""

    fingerprint: str
    vocab_size: int


def describe_tokenizer(tokenizer: PreTrainedTokenizerBase) -> KnownTokenizer:
    """``tokenizer``'s fingerprint and vocabulary size."""
    return KnownTokenizer(tokenizer_fingerprint(tokenizer), len(tokenizer))


# a model folder's weights do not decide its tokenizer; hashing them would cost seconds per message
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file of a model folder but its weights (names and contents) and the versions of the
    libraries that tokenise: while it is the same, the tokenizer the folder makes is the same."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(f"transformers {transformers.__version__} tokenizers {tokenizers.__version__}".encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)):
        name = path.relative_to(folder).as_posix().encode()
        digest.update(len(name).to_bytes(8, "big") + name)
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def memo_path(cache_dir: Path, digest: str) -> Path:
    """Where the tokenizer a folder of ``digest`` makes is described."""
    return cache_dir / CACHE_SUBDIR / "tokenizers" / f"{digest}.json"


def known_tokenizer(cache_dir: Path, digest: str) -> KnownTokenizer | None:
    """The tokenizer a model folder of ``digest`` (``folder_digest``) makes, as an earlier load described it in
    ``cache_dir``; None when no usable description is kept (the caller then loads the tokenizer)."""
    path = memo_path(cache_dir, digest)
    try:
        raw = json.loads(path.read_text())
        known = KnownTokenizer(str(raw["fingerprint"]), int(raw["vocab_size"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        _LOG.warning("ignoring tokenizer description %s (%s); loading the tokenizer", path, err)
        return None
    if len(known.fingerprint) != 64 or known.vocab_size < 1:
        _LOG.warning("ignoring tokenizer description %s (malformed); loading the tokenizer", path)
        return None
    return known


def remember_tokenizer(cache_dir: Path, digest: str, known: KnownTokenizer) -> None:
    """Describe the tokenizer a model folder of ``digest`` makes in ``cache_dir`` (atomically, owner-only); a
    failure is logged."""
    path = memo_path(cache_dir, digest)
    body = json.dumps({"fingerprint": known.fingerprint, "vocab_size": known.vocab_size}).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(path, body)
    except OSError as err:
        _LOG.warning("cannot write tokenizer description %s (%s); continuing without it", path, err)


def _write_private(path: Path, body: bytes) -> None:
    """``body`` to ``path`` through a temporary sibling (mode 0600) renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def entry_path(cache_dir: Path, key: str) -> Path:
    """Where the entry of ``key`` lives: always inside ``cache_dir``."""
    return cache_dir / CACHE_SUBDIR / f"{key}.npz"


def cache_key(examples: Sequence[Example], fingerprint: str, max_length: int, label_names: Sequence[str]) -> str:
    """SHA-256 over the rows to encode, the tokenizer fingerprint, ``max_length`` and the label list."""
    digest = hashlib.sha256()
    header = {"version": CACHE_VERSION, "tokenizer": fingerprint, "max_length": max_length, "labels": list(label_names)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for ex in examples:
        text = ex.text.encode()
        # length-prefixed, so no two different row lists hash the same bytes
        digest.update(len(text).to_bytes(8, "big") + text + ex.label.to_bytes(8, "big", signed=True))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the ids: class, backend definition (or vocabulary), special tokens and
    the versions of the libraries that run it."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    parts: dict[str, Any] = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "special": sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True)),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        with _without_call_state(backend):
            digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


@contextmanager
def _without_call_state(backend: Any) -> Iterator[None]:
    """Clear the backend's truncation and padding for the duration: they hold the settings of the last call, not
    what the tokenizer is. Restored afterwards; copying the backend instead costs ten times as long."""
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        yield
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def write_entry(path: Path, key: str, encoded: Encoded) -> None:
    """Write an entry atomically (temporary file in the same folder, then rename), readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lengths = np.array([len(row) for row in encoded.ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((i for row in encoded.ids for i in row), dtype=np.int64, count=int(offsets[-1]))
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), ids=flat, offsets=offsets, labels=np.array(encoded.labels, dtype=np.int64))
    _write_private(path, buffer.getvalue())


def read_entry(path: Path, key: str, examples: Sequence[Example], max_length: int, *, vocab_size: int) -> Encoded:
    """Read and check an entry against what it claims to encode: FileNotFoundError when there is none,
    CacheEntryError when it cannot be read or does not fit."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored_key, flat, offsets, labels = (npz[name] for name in ("key", "ids", "offsets", "labels"))
    except FileNotFoundError:
        raise
    except Exception as err:  # damaged bytes fail in many ways (zip, header, pickle refused); all mean unusable
        raise CacheEntryError(f"unreadable: {type(err).__name__}: {err}") from err
    _check_entry(stored_key, flat, offsets, labels, key, examples, max_length, vocab_size)
    ids = [flat[a:b].tolist() for a, b in itertools.pairwise(offsets.tolist())]
    return Encoded(ids=ids, labels=labels.tolist())


def _check_entry(
    stored_key: np.ndarray,
    flat: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    key: str,
    examples: Sequence[Example],
    max_length: int,
    vocab_size: int,
) -> None:
    n = len(examples)
    if stored_key.shape != () or str(stored_key) != key:
        raise CacheEntryError("written for another key")
    if flat.ndim != 1 or offsets.shape != (n + 1,) or labels.shape != (n,):
        raise CacheEntryError(f"shapes do not fit {n} examples")
    if not all(a.dtype.kind == "i" for a in (flat, offsets, labels)):
        raise CacheEntryError("arrays are not integers")
    lengths = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != len(flat) or lengths.min() < 1 or lengths.max() > max_length:
        raise CacheEntryError("row boundaries are inconsistent")
    if flat.min() < 0 or flat.max() >= vocab_size:
        raise CacheEntryError(f"token ids outside the vocabulary of {vocab_size}")
    if labels.tolist() != [ex.label for ex in examples]:
        raise CacheEntryError("labels differ from the data")
