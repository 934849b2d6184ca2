"""Tests for simulations.intent_data: the multilingual intent regions built from chatterbot-corpus."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from assets.archives import ArchiveError

try:
    from simulations import intent_data
except ModuleNotFoundError:  # pytest started from outside the repo without a configured pythonpath
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from simulations import intent_data

from common.config import read_yaml
from common.data import load_region
from fedlocale.cli import _parser, main

SPLITS = ("train", "val", "test")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "intent.yaml"


@dataclass(frozen=True)
class Builds:
    cache: Path
    first: Path
    second: Path
    folders: list[Path]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".archives" not in p.parts
    }


def _records(folder: Path, split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    """Two same-seed builds sharing one archive cache, so the archive is downloaded once per module."""
    cache = tmp_path_factory.mktemp("archives")
    first = tmp_path_factory.mktemp("intent-a")
    folders = intent_data.build_intent(first, 0, cache, log=lambda _: None)
    second = tmp_path_factory.mktemp("intent-b")
    intent_data.build_intent(second, seed=0, cache_dir=cache, log=lambda _: None)
    return Builds(cache=cache, first=first, second=second, folders=folders)


@pytest.mark.network
def test_same_seed_gives_byte_identical_files(builds: Builds) -> None:
    first = _files(builds.first)
    assert len(first) == len(intent_data.LANGUAGES) * 3 + 2
    assert first == _files(builds.second)


@pytest.mark.network
def test_at_least_four_labels_each_in_every_split_of_every_region(builds: Builds) -> None:
    assert len(intent_data.LABELS) >= 4
    assert [f.name for f in builds.folders] == sorted(intent_data.LANGUAGES)
    for folder in builds.folders:
        for split in SPLITS:
            assert {r["label"] for r in _records(folder, split)} == set(intent_data.LABELS), (folder.name, split)


@pytest.mark.network
def test_no_text_in_two_splits_or_regions(builds: Builds) -> None:
    owner: dict[str, str] = {}
    for folder in builds.folders:
        for split in SPLITS:
            for record in _records(folder, split):
                key = intent_data.dedupe_key(record["text"])
                where = f"{folder.name}/{split}"
                assert key not in owner, f"{record['text']!r} in {owner.get(key)} and {where}"
                owner[key] = where


@pytest.mark.network
def test_regions_load_cleanly_with_the_config_labels(builds: Builds) -> None:
    labels = tuple(intent_data.LABELS)
    for folder in builds.folders:
        region = load_region(folder.name, folder, labels)
        assert region.dropped == {}  # nothing for the loader to clean: the builder did it
        assert len(region.train) >= 100
        assert len(region.test) >= 40


@pytest.mark.network
def test_intent_json_and_notice(builds: Builds) -> None:
    meta = json.loads((builds.first / "intent.json").read_text(encoding="utf-8"))
    assert meta["seed"] == 0
    assert meta["labels"] == list(intent_data.LABELS)
    for folder in builds.folders:
        info = meta["regions"][folder.name]
        for i, split in enumerate(SPLITS):
            assert len(_records(folder, split)) == info[split]
            assert sum(counts[i] for counts in info["per_label_train_val_test"].values()) == info[split]
    notice = (builds.first / "NOTICE").read_text(encoding="utf-8")
    for needle in ("chatterbot-corpus 1.3.3", "BSD", intent_data.CHATTERBOT_SHA256, "chatterbot_corpus/data/"):
        assert needle in notice


@pytest.mark.network
def test_rebuild_is_skipped_and_other_seed_splits_differently(builds: Builds, tmp_path: Path) -> None:
    logs: list[str] = []
    intent_data.build_intent(builds.first, seed=0, cache_dir=builds.cache, log=logs.append)
    assert any("already built" in line for line in logs)
    other = tmp_path / "other"
    intent_data.build_intent(other, seed=1, cache_dir=builds.cache, log=lambda _: None)
    assert (other / "en" / "test.jsonl").read_bytes() != (builds.first / "en" / "test.jsonl").read_bytes()
    texts = {s: {r["text"] for r in _records(builds.first / "en", s)} for s in SPLITS}
    again = {s: {r["text"] for r in _records(other / "en", s)} for s in SPLITS}
    assert set().union(*texts.values()) == set().union(*again.values())  # same prompts, other split


@pytest.mark.network
def test_cli_data_intent_builds_the_same_regions(
    builds: Builds, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "intent"
    assert main(["data", "intent", "--out", str(out), "--seed", "0", "--cache-dir", str(builds.cache)]) == 0
    assert f"{len(intent_data.LANGUAGES)} regions in {out}" in capsys.readouterr().out
    assert _files(out) == _files(builds.first)


# ---------------------------------------------------------------------------------------------------------
# Without the network


def test_cli_data_intent_defaults_to_the_folder_the_config_reads() -> None:
    args = _parser().parse_args(["data", "intent"])
    assert (args.out, args.seed, args.cache_dir) == (Path("data/intent"), 0, None)
    assert (CONFIG.parent / "../data/intent").resolve() == (CONFIG.parents[1] / args.out).resolve()


def test_cli_data_intent_reports_a_corrupt_archive_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / intent_data.CHATTERBOT.filename).write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main(["data", "intent", "--out", str(out), "--seed", "2", "--cache-dir", str(cache)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (out / "intent.json").exists()


def test_config_labels_are_the_builder_labels() -> None:
    raw, _ = read_yaml(CONFIG)
    assert tuple(raw["labels"]) == intent_data.LABELS
    assert raw["regions_dir"] == "../data/intent"


def test_corrupt_archive_raises_before_reading(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / intent_data.CHATTERBOT.filename).write_bytes(b"garbage")
    with pytest.raises(ArchiveError, match="sha256 mismatch"):
        intent_data.build_intent(tmp_path / "out", cache_dir=cache, log=lambda _: None)
    assert not (tmp_path / "out" / "intent.json").exists()


def test_clean_prompts_merges_spellings_and_drops_ambiguous() -> None:
    empty: dict[str, list[str]] = {label: [] for label in intent_data.LABELS}
    prompts = {
        "en": {**empty, "ai": ["What is AI?", "what is ai", "Are you a robot"], "emotion": ["are you a robot!", "?"]},
        "it": {**empty, "ai": ["Cos'è l'IA?", "What is AI"], "sports": ["Ti piace il calcio"]},
    }
    out, dropped = intent_data.clean_prompts(prompts, log=lambda _: None)
    assert dropped == {"two_topics": 1, "two_languages": 2}  # counted per region it is dropped from
    assert out["en"]["ai"] == []  # "what is ai" is in both languages, the robot under two topics
    assert out["en"]["emotion"] == []
    assert out["it"]["ai"] == ["Cos'è l'IA?"]
    assert out["it"]["sports"] == ["Ti piace il calcio"]


def test_split_region_is_stratified_disjoint_and_deterministic() -> None:
    by_label = {label: [f"{label} prompt {i}" for i in range(5 + 3 * k)] for k, label in enumerate(intent_data.LABELS)}
    splits = intent_data.split_region(by_label, seed=0, region="xx")
    assert splits == intent_data.split_region(by_label, seed=0, region="xx")
    assert splits != intent_data.split_region(by_label, seed=1, region="xx")
    texts = [text for split in SPLITS for text, _ in splits[split]]
    assert sorted(texts) == sorted(t for ts in by_label.values() for t in ts)
    for split in SPLITS:
        assert {label for _, label in splits[split]} == set(intent_data.LABELS)
    with pytest.raises(ArchiveError, match="topic 'ai' has 4"):
        intent_data.split_region({**by_label, "ai": by_label["ai"][:4]}, seed=0, region="xx")
