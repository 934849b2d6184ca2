"""The LoRA model with tiny encoders of each supported architecture: exchange, defaults, training, saving."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from assets.tiny import FILLER, NEG_WORDS, POS_WORDS, make_tiny_model
from client.train import evaluate, plan_steps, train_local
from common.config import LoraSettings, ModelSettings, TrainSettings
from common.data import load_region
from common.errors import ConfigError
from common.model import (
    ARCHITECTURES,
    LABELS_FILE,
    LoadedModel,
    adapter_state,
    build_model,
    check_model,
    full_model_nbytes,
    load_adapter_state,
    lora_config,
    save_adapter,
    state_nbytes,
)
from common.seeds import derive_seed

KINDS = ("bert", "roberta", "xlm-roberta", "distilbert")
LABELS = ("neg", "pos")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
PROBE = ["good great movie", "the awful room was bad", "a phone", "love it and nice", "hate this ugly book"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: make_tiny_model(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="session")
def headless_models(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny encoders saved without their classification head, like a real pretrained encoder (MiniLM): the
    head that build_model adds is then freshly initialised rather than read from the checkpoint."""
    root = tmp_path_factory.mktemp("headless")
    out = {}
    for kind, folder in tiny_models.items():
        AutoModel.from_pretrained(str(folder)).save_pretrained(str(root / kind))
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(root / kind))
        out[kind] = root / kind
    return out


@pytest.fixture(scope="session")
def easy_region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clearly separable synthetic region: two sentiment words and one filler word per text."""
    folder = tmp_path_factory.mktemp("easy-region")
    rng = random.Random(3)
    for split, n in (("train", 64), ("test", 48)):
        rows = []
        for _ in range(n):
            label = rng.choice(LABELS)
            words = rng.sample(POS_WORDS if label == "pos" else NEG_WORDS, 2) + rng.sample(FILLER, 1)
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": label})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def build(base: Path, seed: int = 0, lora: LoraSettings = LORA) -> LoadedModel:
    return build_model(ModelSettings(base=str(base), max_length=32), lora, LABELS, seed=seed)


@torch.no_grad()
def logits(model: torch.nn.Module, loaded: LoadedModel, texts: list[str] = PROBE) -> torch.Tensor:
    model.eval()
    return model(**loaded.tokenizer(texts, padding=True, return_tensors="pt")).logits


def randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same keys with random values, so that LoRA B is non-zero and the adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in state.items()}


def expected_keys(kind: str) -> set[str]:
    prefix = "base_model.model."
    if kind == "distilbert":
        lora = [f"distilbert.transformer.layer.{i}.attention.{m}" for i in range(2) for m in ("q_lin", "v_lin")]
        head = ["pre_classifier", "classifier"]
    else:
        body = "bert" if kind == "bert" else "roberta"
        lora = [f"{body}.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
        head = ["classifier"] if kind == "bert" else ["classifier.dense", "classifier.out_proj"]
    return {f"{prefix}{m}.lora_{ab}.weight" for m in lora for ab in "AB"} | {
        f"{prefix}{h}.{p}" for h in head for p in ("weight", "bias")
    }


# ---------------------------------------------------------------------------------------------------------
# Per-architecture defaults and the exchanged keys


@pytest.mark.parametrize(
    ("model_type", "targets", "head"),
    [
        ("bert", {"query", "value"}, ["classifier"]),
        ("roberta", {"query", "value"}, ["classifier"]),
        ("xlm-roberta", {"query", "value"}, ["classifier"]),
        ("distilbert", {"q_lin", "v_lin"}, ["pre_classifier", "classifier"]),
    ],
)
def test_lora_defaults_per_architecture(model_type: str, targets: set[str], head: list[str]) -> None:
    cfg = lora_config(model_type, LoraSettings(r=8, alpha=16, dropout=0.1))
    assert set(cfg.target_modules) == targets
    assert list(cfg.modules_to_save) == head
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    custom = lora_config(model_type, LoraSettings(target_modules=("key",)))
    assert set(custom.target_modules) == {"key"}
    assert set(ARCHITECTURES) == set(KINDS)


def test_unknown_architecture_leaves_targets_to_peft() -> None:
    cfg = lora_config("t5", LoraSettings())
    assert cfg.target_modules is None
    assert list(cfg.modules_to_save) == ["classifier"]


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_state_holds_exactly_lora_and_head(tiny_models: dict[str, Path], kind: str) -> None:
    loaded = build(tiny_models[kind])
    state = adapter_state(loaded.model)
    assert loaded.model.get_base_model().config.model_type == kind
    assert set(state) == expected_keys(kind)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    assert state_nbytes(state) == sum(t.numel() * 4 for t in state.values())
    # Copies: changing what was exchanged does not change the model.
    key = next(iter(state))
    state[key].add_(1.0)
    assert not torch.equal(state[key], adapter_state(loaded.model)[key])


# ---------------------------------------------------------------------------------------------------------
# Exchange round trip


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_state_round_trip_gives_identical_logits(tiny_models: dict[str, Path], kind: str) -> None:
    source = build(tiny_models[kind], seed=0)
    load_adapter_state(source.model, randomised(adapter_state(source.model), seed=1))
    target = build(tiny_models[kind], seed=123)  # another head to start from
    assert not torch.allclose(logits(source.model, source), logits(target.model, target))
    load_adapter_state(target.model, adapter_state(source.model))
    assert torch.equal(logits(source.model, source), logits(target.model, target))
    for name, tensor in adapter_state(source.model).items():
        assert torch.equal(tensor, adapter_state(target.model)[name])


def test_load_adapter_state_rejects_missing_and_extra_keys(tiny_bert: Path) -> None:
    loaded = build(tiny_bert)
    state = adapter_state(loaded.model)
    missing = dict(state)
    gone = missing.pop("base_model.model.classifier.bias")
    with pytest.raises(ValueError, match=r"missing \['base_model.model.classifier.bias'\], unexpected \[\]"):
        load_adapter_state(loaded.model, missing)
    extra = {**state, "base_model.model.bert.embeddings.word_embeddings.weight": torch.zeros(3, 32)}
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['base_model.model.bert.embeddings"):
        load_adapter_state(loaded.model, extra)
    assert gone.shape == (2,)


# ---------------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("kind", KINDS)
def test_build_model_same_seed_same_initial_adapter_and_head(headless_models: dict[str, Path], kind: str) -> None:
    first = adapter_state(build(headless_models[kind], seed=5).model)
    second = adapter_state(build(headless_models[kind], seed=5).model)
    other = adapter_state(build(headless_models[kind], seed=6).model)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    head = [k for k in first if "lora_" not in k and k.endswith("weight")]
    lora_a = [k for k in first if "lora_A" in k]
    assert head and lora_a
    assert all(not torch.equal(first[k], other[k]) for k in head + lora_a)  # the seed is what fixes them


def test_derive_seed_is_stable_and_distinct() -> None:
    seed = derive_seed(0, 1, "north")
    assert seed == derive_seed(0, 1, "north") == derive_seed("0", "1", "north")
    assert seed == 4648213264927711775  # the same in every process (no salted hash())
    assert 0 <= seed < 2**63
    seeds = {derive_seed(s, r, name) for s in range(3) for r in range(1, 4) for name in ("north", "south")}
    assert len(seeds) == 18
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_train_local_same_seed_same_state(tiny_bert: Path, easy_region: Path) -> None:
    data = load_region("easy", easy_region, LABELS)
    settings = TrainSettings(lr=1e-2, epochs=1, batch_size=8, threads=1)

    def run(seed: int) -> tuple[dict[str, torch.Tensor], float]:
        loaded = build(tiny_bert, seed=0)
        result = train_local(loaded.model, loaded.tokenizer, data.train, settings, max_length=32, seed=seed)
        return adapter_state(loaded.model), result.loss

    (a, loss_a), (b, loss_b), (c, loss_c) = run(7), run(7), run(8)
    assert loss_a == loss_b
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loss_c != loss_a and any(not torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("kind", KINDS)
def test_train_local_learns_the_synthetic_task(tiny_models: dict[str, Path], easy_region: Path, kind: str) -> None:
    data = load_region("easy", easy_region, LABELS)
    loaded = build(tiny_models[kind])
    before = evaluate(loaded.model, loaded.tokenizer, data.test, 2, max_length=32)
    # 20 passes: at 10, a tiny model stays stuck at chance on about one seed in seven (seeds 0-4, five kinds)
    settings = TrainSettings(lr=1e-2, epochs=20, batch_size=8, threads=1)
    running: list[float] = []
    result = train_local(
        loaded.model,
        loaded.tokenizer,
        data.train,
        settings,
        max_length=32,
        seed=1,
        progress=lambda step, steps, mean: running.append(mean),
    )
    per_epoch = -(-len(data.train) // settings.batch_size)
    assert result.steps == len(running) == plan_steps(len(data.train), settings) == 20 * per_epoch
    assert result.num_examples == len(data.train)
    # the progress callback reports the running mean; recover each step's loss from it
    losses = [m * (i + 1) - (running[i - 1] * i if i else 0.0) for i, m in enumerate(running)]
    first, last = losses[:per_epoch], losses[-per_epoch:]
    assert sum(last) / per_epoch < 0.5 * sum(first) / per_epoch
    assert result.loss == pytest.approx(sum(losses) / len(losses))
    after = evaluate(loaded.model, loaded.tokenizer, data.test, 2, max_length=32)
    assert after.macro_f1 > before.macro_f1 + 0.3
    assert after.macro_f1 > 0.8


def test_kl_to_global_runs_and_changes_the_loss(tiny_bert: Path, easy_region: Path) -> None:
    data = load_region("easy", easy_region, LABELS)

    def run(kl: float) -> tuple[float, dict[str, torch.Tensor]]:
        loaded = build(tiny_bert)
        settings = TrainSettings(lr=1e-2, epochs=2, batch_size=8, threads=1, kl_to_global=kl)
        result = train_local(loaded.model, loaded.tokenizer, data.train, settings, max_length=32, seed=3)
        return result.loss, adapter_state(loaded.model)

    plain_loss, plain = run(0.0)
    kl_loss, with_kl = run(1.0)
    assert kl_loss == kl_loss and plain_loss == plain_loss  # finite, not NaN
    assert kl_loss != plain_loss
    assert any(not torch.equal(plain[k], with_kl[k]) for k in plain)


# ---------------------------------------------------------------------------------------------------------
# Saving for Hugging Face / peft users


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(
    headless_models: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    loaded = build(headless_models[kind])
    load_adapter_state(loaded.model, randomised(adapter_state(loaded.model), seed=2))
    out = save_adapter(loaded, tmp_path / "adapter")
    assert json.loads((out / LABELS_FILE).read_text()) == {"labels": ["neg", "pos"]}
    torch.manual_seed(99)  # the fresh head below is random; the saved one must replace it
    base = AutoModelForSequenceClassification.from_pretrained(str(headless_models[kind]), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(out))
    assert torch.equal(logits(loaded.model, loaded), logits(reloaded, loaded))


def test_full_model_nbytes_is_the_plain_models_size(tiny_bert: Path) -> None:
    loaded = build(tiny_bert)
    plain = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    plain_bytes = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    assert full_model_nbytes(loaded.model) == plain_bytes


def test_batch_order_groups_by_length_and_keeps_each_epoch_a_permutation() -> None:
    import random

    from client.train import batch_order

    lengths = [random.Random(i).randint(3, 64) for i in range(100)]
    plain = batch_order(lengths, 14, 8, 1, torch.Generator().manual_seed(0))
    grouped = batch_order(lengths, 14, 8, 4, torch.Generator().manual_seed(0))
    for order in (plain, grouped):
        assert [len(b) for b in order] == [8] * 12 + [4, 8]  # 13 batches per epoch, the 14th starts the next
        assert sorted(i for b in order[:13] for i in b) == list(range(100))  # every example once per epoch
    # window 1 is the plain shuffle, as it always was
    assert plain[:13] == [b.tolist() for b in torch.randperm(100, generator=torch.Generator().manual_seed(0)).split(8)]

    def padded(order: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in order[:13])

    assert padded(grouped) < 0.8 * padded(plain)
    assert grouped == batch_order(lengths, 14, 8, 4, torch.Generator().manual_seed(0))  # the seed decides all
    # the sorted groups are not served short-to-long: the batch order within a window is shuffled
    firsts = [min(lengths[i] for i in b) for b in grouped[:4]]
    assert firsts != sorted(firsts)


# ---------------------------------------------------------------------------------------------------------
# model.pooling: mean


def _head_input(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the classification head reads for ``batch`` (the input of its linear layer, dropout off)."""
    seen: list[torch.Tensor] = []
    head = next(m for name, m in model.named_modules() if name.endswith("classifier.modules_to_save.default"))
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    with torch.no_grad():
        model.eval()(**batch)
    handle.remove()
    return seen[0]


def test_mean_pooling_feeds_the_head_the_masked_normalised_mean_whatever_the_padding(tiny_bert: Path) -> None:
    """The head reads the L2-normalised mean of the last hidden states over real tokens only: a text's logits
    are the same alone and padded beside a longer one, also in a deep copy of the model (personalization copies
    it: the mask must reach the copy's own pooler), and differ from the CLS pooler's."""
    import copy

    from client.train import pad_batch

    mean = build_model(ModelSettings(base=str(tiny_bert), max_length=32, pooling="mean"), LoraSettings(), LABELS, 0)
    cls = build_model(ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(), LABELS, 0)
    short, long = (mean.tokenizer(t)["input_ids"] for t in ("good film", "a long and very bad film indeed"))
    alone = pad_batch([short], mean.pad_id)
    padded = pad_batch([short, long], mean.pad_id)
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # the short text is padded

    features = _head_input(mean.model, padded)
    encoder = mean.model.base_model.model.bert
    with torch.no_grad():
        hidden = encoder(**padded).last_hidden_state
    mask = padded["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(features[:1], _head_input(mean.model, alone))
    torch.testing.assert_close(_head_input(copy.deepcopy(mean.model), padded), expected)
    assert not torch.allclose(_head_input(cls.model, padded), expected, atol=1e-3)


def test_mean_pooling_is_refused_where_the_head_reads_no_pooler(tiny_models: dict[str, Path]) -> None:
    """DistilBERT's head reads the first token itself: check_model names the field before anything is built,
    and build_model refuses with the same reason."""
    from common.errors import ConfigError
    from common.model import check_model

    settings = ModelSettings(base=str(tiny_models["distilbert"]), max_length=32, pooling="mean")
    checked = check_model(settings, LoraSettings(), LABELS)
    assert [field for field, _ in checked.problems] == ["model.pooling"]
    assert "reads no pooler" in checked.problems[0][1]
    with pytest.raises(ConfigError, match=r"model\.pooling: mean: the distilbert head reads no pooler"):
        build_model(settings, LoraSettings(), LABELS, 0)
    bert = ModelSettings(base=str(tiny_models["bert"]), max_length=32, pooling="mean")
    assert check_model(bert, LoraSettings(), LABELS).problems == []


def test_a_saved_mean_pooling_adapter_loads_with_its_pooling(tiny_bert: Path, tmp_path: Path) -> None:
    """Stock peft gives a mean-pooling adapter the BERT head's own pooler (other logits, no error); with the
    pooling applied it is the trained model, and fedlocale's loader applies it from the folder's labels.json."""
    from client.adapterfolder import load_peft_folder
    from client.train import pad_batch
    from common.model import apply_pooling, save_adapter

    settings = ModelSettings(base=str(tiny_bert), max_length=32, pooling="mean")
    trained = build_model(settings, LoraSettings(), LABELS, 0)
    with torch.no_grad():
        for param in trained.model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))  # a head and LoRA that are not the initial ones
    folder = save_adapter(trained, tmp_path / "adapter")
    batch = pad_batch([trained.tokenizer(t)["input_ids"] for t in ("good film", "a bad long film")], trained.pad_id)
    with torch.no_grad():
        expected = trained.model.eval()(**batch).logits
        stock = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(str(tiny_bert)), str(folder)
        )
        assert not torch.allclose(stock.eval()(**batch).logits, expected, atol=1e-4)
        apply_pooling(stock, settings)
        torch.testing.assert_close(stock(**batch).logits, expected)
        # fedlocale's own loader (predict, both audits) reads the pooling from the folder's labels.json
        torch.testing.assert_close(load_peft_folder(folder, str(tiny_bert), LABELS)(**batch).logits, expected)
        cls = build_model(ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(), LABELS, 0)
        assert "pooling" not in json.loads((save_adapter(cls, tmp_path / "cls") / "labels.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# lora.layers: LoRA in the last layers only


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_lora_in_the_last_layer_only_leaves_the_layers_below_without_autograd(
    tiny_models: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    """`lora.layers: 1` on a 2-layer model: LoRA tensors only in layer 1, and in training layer 0's output
    carries no autograd graph (what makes a step cheaper); the saved adapter loads with stock peft."""
    top = build(tiny_models[kind], lora=dataclasses.replace(LORA, layers=1))
    every = build(tiny_models[kind])
    lora_names = [n for n in adapter_state(top.model) if "lora_" in n]
    assert lora_names and all(".layer.1." in n for n in lora_names)
    assert {n for n in adapter_state(every.model) if "lora_" in n} > set(lora_names)
    seen: dict[int, bool] = {}
    base = top.model.get_base_model()
    layers = base.bert.encoder.layer if kind == "bert" else base.distilbert.transformer.layer

    def record(index: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: object, out: object) -> None:
            first = out[0] if isinstance(out, tuple) else out
            seen[index] = bool(getattr(first, "requires_grad", None))

        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_hook(record(i))
    top.model.train()
    batch = top.tokenizer(PROBE, return_tensors="pt", padding=True)
    top.model(**batch).logits.sum().backward()
    assert seen == {0: False, 1: True}
    load_adapter_state(top.model, randomised(adapter_state(top.model), seed=3))
    out = save_adapter(top, tmp_path / "adapter")
    torch.manual_seed(99)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models[kind]), num_labels=2)
    assert torch.equal(logits(top.model, top), logits(PeftModel.from_pretrained(base, str(out)), top))


def test_lora_layers_beyond_the_model_are_refused_before_training(tiny_bert: Path) -> None:
    settings = ModelSettings(base=str(tiny_bert), max_length=32)
    assert check_model(settings, LoraSettings(layers=2), LABELS).problems == []
    assert check_model(settings, LoraSettings(layers=3), LABELS).problems == [
        ("lora.layers", "is 3, this model has 2 layers")
    ]
    with pytest.raises(ConfigError, match="layers: must be >= 1"):
        LoraSettings(layers=0)
