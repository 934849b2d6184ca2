"""The node's own settings: the tokenised-data cache (keyed, checked, never changing results) and torch threads."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

from assets.tiny import FILLER, NEG_WORDS, POS_WORDS, SPECIAL
from client.app import make_app
from client.task import (
    NodeConfigError,
    NodeSettings,
    evaluate_round,
    global_model,
    load_data,
    node_settings,
    train_round,
    use_threads,
)
from client.tokens import CACHE_SUBDIR, cache_key, encode_cached, encode_examples, entry_path, tokenizer_fingerprint
from client.train import evaluate, train_local
from common import keys
from common.config import ClientTask, LoraSettings, ModelSettings, Region, TrainSettings
from common.data import Example, load_region
from common.model import adapter_state, build_model
from common.seeds import derive_seed
from tests.conftest import write_region

LABELS = ("neg", "pos")
MAX_LEN = 32


@pytest.fixture(scope="module")
def tokenizer(tiny_bert: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(tiny_bert))


@pytest.fixture(scope="module")
def task(tiny_bert: Path) -> ClientTask:
    return ClientTask(
        seed=0,
        server_round=1,
        labels=LABELS,
        region_names=("north", "south"),
        model=ModelSettings(base=str(tiny_bert), max_length=MAX_LEN),
        lora=LoraSettings(r=4, alpha=8, dropout=0.1),  # dropout on: the seeded randomness must match too
        train=TrainSettings(lr=5e-3, epochs=1, batch_size=8),
    )


@pytest.fixture(scope="module")
def global_state(task: ClientTask) -> dict[str, torch.Tensor]:
    return adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)


@pytest.fixture
def region(tmp_path: Path) -> Region:
    return Region(name="north", data=write_region(tmp_path / "data" / "north", 40, 24, seed=3))


@pytest.fixture
def keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def examples_of(region: Region) -> list[Example]:
    return load_region(region.name, region.data, LABELS).train


def entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / CACHE_SUBDIR).glob("*.npz"))


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def key_of(tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_length: int = MAX_LEN) -> str:
    return cache_key(examples, tokenizer_fingerprint(tokenizer), max_length, LABELS)


# ---------------------------------------------------------------------------------------------------------
# Hit and miss


def test_second_call_is_served_from_the_cache(
    tokenizer: PreTrainedTokenizerBase, region: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    examples = examples_of(region)
    fresh = encode_examples(tokenizer, examples, MAX_LEN)
    assert encode_cached(tokenizer, examples, MAX_LEN, LABELS, cache) == fresh
    assert [p.name for p in entries(cache)] == [f"{key_of(tokenizer, examples)}.npz"]

    def no_tokenising(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not tokenise")

    monkeypatch.setattr("client.tokens.encode", no_tokenising)
    assert encode_cached(tokenizer, examples, MAX_LEN, LABELS, cache) == fresh


def test_no_cache_dir_writes_nothing(tokenizer: PreTrainedTokenizerBase, region: Region, tmp_path: Path) -> None:
    before = files_under(tmp_path)
    examples = examples_of(region)
    assert encode_cached(tokenizer, examples, MAX_LEN, LABELS, None) == encode_examples(tokenizer, examples, MAX_LEN)
    assert files_under(tmp_path) == before


def _edit_first_text(path: Path, edit: str) -> None:
    raw = path.read_bytes()
    start = raw.index(b'"text": "') + len(b'"text": "')
    if edit == "letter":  # one byte: the first letter of the first text becomes another letter
        raw = raw[:start] + (b"x" if raw[start : start + 1] != b"x" else b"y") + raw[start + 1 :]
    else:  # one byte of leading space, which cleaning removes: the rows encoded are the same
        raw = raw[:start] + b" " + raw[start:]
    path.write_bytes(raw)


def test_one_changed_byte_in_the_file_misses(tokenizer: PreTrainedTokenizerBase, region: Region) -> None:
    before = key_of(tokenizer, examples_of(region))
    _edit_first_text(region.data / "train.jsonl", "letter")
    assert key_of(tokenizer, examples_of(region)) != before


def test_a_byte_that_cleaning_removes_still_hits(tokenizer: PreTrainedTokenizerBase, region: Region) -> None:
    # The key is what gets encoded (after normalising, de-duplication and leak removal), not the raw bytes.
    before = key_of(tokenizer, examples_of(region))
    _edit_first_text(region.data / "train.jsonl", "space")
    assert key_of(tokenizer, examples_of(region)) == before


def test_a_change_in_train_changes_the_test_split_key(tokenizer: PreTrainedTokenizerBase, region: Region) -> None:
    # Test rows that also occur in train are dropped, so the test split's content depends on train.jsonl too.
    def test_key() -> str:
        return key_of(tokenizer, load_region(region.name, region.data, LABELS).test)

    before = test_key()
    leaked = (region.data / "test.jsonl").read_text().splitlines(keepends=True)[0]
    with (region.data / "train.jsonl").open("a") as fh:
        fh.write(leaked)
    assert test_key() != before


def _tokenizer(lower: bool, extra: tuple[str, ...] = ()) -> BertTokenizer:
    vocab = SPECIAL + sorted(set(POS_WORDS + NEG_WORDS + FILLER)) + list(extra)
    # transformers 5: BertTokenizer is the fast (tokenizers-backed) one, as in conftest.make_tiny_model
    return BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=lower)


def test_key_follows_tokenizer_max_length_and_labels(tokenizer: PreTrainedTokenizerBase, region: Region) -> None:
    examples = examples_of(region)
    base = key_of(tokenizer, examples)
    assert key_of(_tokenizer(lower=True), examples) == base  # the same tokenizer built in code
    assert key_of(_tokenizer(lower=False), examples) != base  # another normaliser
    assert key_of(_tokenizer(lower=True, extra=("zebra",)), examples) != base  # another vocabulary
    assert key_of(tokenizer, examples, max_length=MAX_LEN - 1) != base
    assert cache_key(examples, tokenizer_fingerprint(tokenizer), MAX_LEN, ("pos", "neg")) != base
    relabelled = [Example(ex.text, 1 - ex.label) for ex in examples]
    assert key_of(tokenizer, relabelled) != base


def test_fingerprint_ignores_and_keeps_the_call_state(tokenizer: PreTrainedTokenizerBase) -> None:
    # Each tokenizer call leaves its truncation settings in the backend; the fingerprint must not see them, and
    # taking it must not change them.
    fresh = tokenizer_fingerprint(tokenizer)
    tokenizer(["good movie"], truncation=True, max_length=7)
    state = tokenizer.backend_tokenizer.truncation
    assert tokenizer_fingerprint(tokenizer) == fresh
    assert tokenizer.backend_tokenizer.truncation == state


# ---------------------------------------------------------------------------------------------------------
# Entries that cannot be trusted


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a zip file at all")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _other_key(path: Path) -> None:
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["key"] = np.array("0" * 64)
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def _bad_ids(path: Path) -> None:
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["ids"] = arrays["ids"] + 10_000
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def _other_labels(path: Path) -> None:
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["labels"] = 1 - arrays["labels"]
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def _pickled(path: Path) -> None:
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["ids"] = np.array([object()], dtype=object)
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize("damage", [_garbage, _truncated, _other_key, _bad_ids, _other_labels, _pickled])
def test_a_bad_entry_is_logged_ignored_and_rebuilt(
    damage: object, tokenizer: PreTrainedTokenizerBase, region: Region, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    examples = examples_of(region)
    fresh = encode_examples(tokenizer, examples, MAX_LEN)
    encode_cached(tokenizer, examples, MAX_LEN, LABELS, cache)
    (entry,) = entries(cache)
    good = entry.read_bytes()
    damage(entry)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="client.tokens"):
        assert encode_cached(tokenizer, examples, MAX_LEN, LABELS, cache) == fresh
    assert "ignoring token cache entry" in caplog.text and str(entry) in caplog.text
    assert entry.read_bytes() == good  # rewritten
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="client.tokens"):
        assert encode_cached(tokenizer, examples, MAX_LEN, LABELS, cache) == fresh
    assert caplog.text == ""


def test_an_unwritable_cache_only_logs(
    tokenizer: PreTrainedTokenizerBase, region: Region, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    examples = examples_of(region)
    with caplog.at_level(logging.WARNING, logger="client.tokens"):
        assert encode_cached(tokenizer, examples, MAX_LEN, LABELS, blocker) == encode_examples(
            tokenizer, examples, MAX_LEN
        )
    assert "cannot write token cache entry" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Results do not depend on the cache


def test_training_and_evaluation_identical_with_and_without_cache(
    region: Region, task: ClientTask, global_state: dict[str, torch.Tensor], tmp_path: Path, keep_threads: None
) -> None:
    cache = NodeSettings(cache_dir=tmp_path / "cache", threads=1)
    runs = {
        "no cache": train_round(region, task, global_state, NodeSettings(threads=1)),
        "cold": train_round(region, task, global_state, cache),
        "warm": train_round(region, task, global_state, cache),
    }
    assert len(entries(tmp_path / "cache")) == 1
    # the path before the cache existed: train_local tokenising itself
    data, loaded = load_data(region, task, NodeSettings()).data, global_model(task, global_state)
    seed = derive_seed(task.seed, task.server_round, region.name)
    settings = TrainSettings(lr=5e-3, epochs=1, batch_size=8, threads=1)
    before = train_local(loaded.model, loaded.tokenizer, data.train, settings, max_length=MAX_LEN, seed=seed)
    reference = adapter_state(loaded.model)
    for name, (state, result) in runs.items():
        assert result == before, name
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), name
    assert any(not torch.equal(reference[k], global_state[k]) for k in reference)  # training did move it

    evals = [evaluate_round(region, task, reference, keys.TEST, node) for node in (NodeSettings(), cache, cache)]
    loaded = global_model(task, reference)
    direct = evaluate(loaded.model, loaded.tokenizer, data.test, len(LABELS), max_length=MAX_LEN, batch_size=64)
    assert evals == [direct] * 3
    assert len(entries(tmp_path / "cache")) == 2  # train and test


# ---------------------------------------------------------------------------------------------------------
# Node config


def test_node_settings_defaults_and_values(tmp_path: Path) -> None:
    assert node_settings({}) == NodeSettings(cache_dir=None, threads=None)
    assert node_settings({keys.NODE_REGION: "x", keys.NODE_PARTITION_ID: 0}) == NodeSettings()
    cache = str(tmp_path / "c")
    assert node_settings({keys.NODE_CACHE_DIR: cache, keys.NODE_THREADS: 3}) == NodeSettings(Path(cache), 3)
    assert node_settings({keys.NODE_THREADS: "2"}).threads == 2
    assert node_settings({keys.NODE_CACHE_DIR: "~/c"}).cache_dir == Path.home() / "c"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "threads=0"),
        ("0", "threads='0'"),
        (-2, "threads=-2"),
        ("two", "threads='two'"),
        (1.5, "threads=1.5"),
        (True, "threads=True"),
    ],
)
def test_bad_threads_name_key_and_value(value: object, shown: str) -> None:
    with pytest.raises(NodeConfigError, match=f"node config {shown}: must be a whole number >= 1"):
        node_settings({keys.NODE_THREADS: value})


@pytest.mark.parametrize(("value", "shown"), [("cache", "'cache'"), ("", "''"), (7, "7")])
def test_bad_cache_dir_names_key_and_value(value: object, shown: str) -> None:
    with pytest.raises(NodeConfigError, match=f"node config cache-dir={shown}: must be the absolute path of a folder"):
        node_settings({keys.NODE_CACHE_DIR: value})


def test_node_threads_win_over_the_run_config(task: ClientTask, keep_threads: None) -> None:
    with_run_threads = replace(task, train=TrainSettings(threads=2))
    assert use_threads(NodeSettings(threads=1), with_run_threads) == 1
    assert torch.get_num_threads() == 1
    assert use_threads(NodeSettings(), with_run_threads) == 2
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert use_threads(NodeSettings(), task) is None  # neither set: torch's default stays
    assert torch.get_num_threads() == 1


# ---------------------------------------------------------------------------------------------------------
# Through the ClientApp, as a deployed node


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built as the server builds them (see tests/test_client_reply.py)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


NodeConfig = dict[str, bool | float | int | str]


def _call(kind: str, task: ClientTask, state: dict[str, torch.Tensor], node_config: NodeConfig) -> Message:
    config = ConfigRecord({keys.TASK: task.to_json(), keys.SPLIT: keys.VAL})
    content = RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: config})
    msg = Message(content=content, dst_node_id=77, message_type=kind)
    context = Context(run_id=1, node_id=77, node_config=node_config, state=RecordDict(), run_config={})
    return make_app()(msg, context)


@pytest.mark.usefixtures("server_identity", "keep_threads")
def test_app_uses_the_node_settings_and_keeps_the_cache_in_its_folder(
    region: Region,
    task: ClientTask,
    global_state: dict[str, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "node-cache"
    outside = files_under(tmp_path)
    node: NodeConfig = {
        keys.NODE_REGION: "north",
        keys.NODE_DATA_DIR: str(region.data),
        keys.NODE_CACHE_DIR: str(cache),
        keys.NODE_THREADS: 1,
    }
    torch.set_num_threads(2)
    loads = []
    real_load = AutoTokenizer.from_pretrained

    def counted(*args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr("common.model.AutoTokenizer.from_pretrained", counted)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE, MessageType.TRAIN, MessageType.EVALUATE):
        reply = _call(kind, task, global_state, node)
        assert not reply.has_error()
        assert torch.get_num_threads() == 1
    # a message loads the tokenizer only to tokenise: the first train and val messages did (each missed), the
    # later ones found the tokenizer's description and their ids in the cache
    assert len(loads) == 2
    described = sorted((cache / CACHE_SUBDIR / "tokenizers").glob("*.json"))
    assert len(described) == 1
    # nothing else written, no temporary left
    assert files_under(tmp_path) - outside == set(entries(cache)) | set(described)
    assert len(entries(cache)) == 2  # train and val; the later messages hit
    assert all(p.stat().st_mode & 0o077 == 0 for p in [*entries(cache), *described])  # private to the node's user


@pytest.mark.usefixtures("server_identity")
def test_app_rejects_a_bad_node_setting(
    region: Region, task: ClientTask, global_state: dict[str, torch.Tensor]
) -> None:
    node: NodeConfig = {keys.NODE_REGION: "north", keys.NODE_DATA_DIR: str(region.data), keys.NODE_THREADS: 0}
    with pytest.raises(NodeConfigError, match="threads=0"):
        _call(MessageType.TRAIN, task, global_state, node)


def test_entry_path_stays_in_the_cache_dir(tmp_path: Path) -> None:
    key = "ab" * 32
    assert entry_path(tmp_path, key).parent.parent == tmp_path


def test_client_app_freezes_what_its_imports_created() -> None:
    # a process per message: the collector must not rescan the import-time objects (benchmarks/bench_message.py)
    assert gc.get_freeze_count() > 100_000


# ---------------------------------------------------------------------------------------------------------
# The tokenizer a model folder makes, known without loading it


def test_a_changed_tokenizer_file_is_a_new_description(tiny_bert: Path, tmp_path: Path) -> None:
    import shutil

    from client.tokens import describe_tokenizer, folder_digest, known_tokenizer, remember_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    cache = tmp_path / "cache"
    digest = folder_digest(folder)
    assert known_tokenizer(cache, digest) is None
    known = describe_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
    remember_tokenizer(cache, digest, known)
    assert known_tokenizer(cache, folder_digest(folder)) == known
    # weights do not decide the tokenizer: rewriting them keeps the description
    weights = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes() + b"")
    assert folder_digest(folder) == digest
    # any other file might: a changed tokenizer definition is another digest, so the tokenizer is loaded again
    definition = folder / "tokenizer.json"
    definition.write_text(definition.read_text().replace('"newword"', '"newword"') + "\n")
    assert folder_digest(folder) != digest
    assert known_tokenizer(cache, folder_digest(folder)) is None


def test_a_damaged_description_is_ignored(tiny_bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from client.tokens import folder_digest, known_tokenizer, memo_path

    cache = tmp_path / "cache"
    digest = folder_digest(tiny_bert)
    path = memo_path(cache, digest)
    path.parent.mkdir(parents=True)
    for body in ("{not json", '{"fingerprint": "short", "vocab_size": 5}', '{"vocab_size": 5}'):
        path.write_text(body)
        with caplog.at_level(logging.WARNING):
            assert known_tokenizer(cache, digest) is None
        assert "ignoring tokenizer description" in caplog.text
        caplog.clear()
