"""A tiny randomly initialised encoder of each architecture fedlocale supports, built in code (no download).

The tests train on it (and on the synthetic sentiment regions of ``write_region``), and
``benchmarks/bench_message.py --model tiny`` times a node's per-message work with it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

POS_WORDS = ["good", "great", "happy", "love", "nice", "fine"]
NEG_WORDS = ["bad", "awful", "sad", "hate", "poor", "ugly"]
FILLER = ["the", "a", "movie", "hotel", "room", "book", "phone", "was", "is", "very", "and", "it", "this"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_model(folder: Path, kind: str = "bert") -> Path:
    """Save a tiny randomly initialised encoder of ``kind`` with a WordPiece tokenizer into ``folder``."""
    import torch
    from transformers import (  # type: ignore[attr-defined]
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        PreTrainedModel,
        RobertaConfig,
        RobertaForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(POS_WORDS + NEG_WORDS + FILLER))
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    small: dict[str, Any] = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=len(vocab))
    model: PreTrainedModel
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(num_hidden_layers=2, max_position_embeddings=64, **small))
    elif kind in ("roberta", "xlm-roberta"):
        cls_: Any
        cfg_: Any
        cls_, cfg_ = (
            (RobertaForSequenceClassification, RobertaConfig)
            if kind == "roberta"
            else (XLMRobertaForSequenceClassification, XLMRobertaConfig)
        )
        model = cls_(
            cfg_(
                num_hidden_layers=2, max_position_embeddings=80, pad_token_id=0, bos_token_id=2, eos_token_id=3, **small
            )
        )
    elif kind == "distilbert":
        model = DistilBertForSequenceClassification(
            DistilBertConfig(
                vocab_size=len(vocab),
                dim=32,
                n_layers=2,
                n_heads=2,
                hidden_dim=64,
                max_position_embeddings=64,
                pad_token_id=0,
            )
        )
    else:
        raise ValueError(kind)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def synthetic_rows(n: int, rng: random.Random, pos_fraction: float = 0.5) -> list[dict[str, str]]:
    """An easy sentiment task: the label is given by which word list a sentiment word comes from."""
    rows = []
    for i in range(n):
        label = "pos" if rng.random() < pos_fraction else "neg"
        words = [*rng.sample(FILLER, 4), rng.choice(POS_WORDS if label == "pos" else NEG_WORDS)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {FILLER[i % len(FILLER)]}" * (i % 3), "label": label})
    return rows


def write_region(folder: Path, n_train: int, n_test: int, seed: int, pos_fraction: float = 0.5) -> Path:
    """A region folder with train/val/test .jsonl of the synthetic task."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", max(8, n_test // 2)), ("test", n_test)):
        rows = synthetic_rows(n, rng, pos_fraction)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
