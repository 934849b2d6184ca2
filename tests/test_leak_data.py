"""The large leak scenario's data (benchmarks/leak_data.py): disjoint, balanced regions of the sizes asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.leak_data import deal, main


def _texts(n: int, tag: str) -> set[str]:
    return {f"{tag} review {i}" for i in range(n)}


def test_regions_are_balanced_disjoint_and_sized() -> None:
    regions = deal({"neg": _texts(40, "bad"), "pos": _texts(40, "good")}, 2, {"train": 9, "val": 2, "test": 8}, 0)
    assert sorted(regions) == ["rt-1", "rt-2"]
    seen: list[str] = []
    for splits in regions.values():
        assert {split: len(rows) for split, rows in splits.items()} == {"train": 9, "val": 2, "test": 8}
        train_labels = [label for _, label in splits["train"]]
        assert train_labels.count("neg") == 5 and train_labels.count("pos") == 4  # the odd one to the first label
        assert all(
            text.startswith("bad" if label == "neg" else "good") for rows in splits.values() for text, label in rows
        )
        seen += [text for rows in splits.values() for text, _ in rows]
    assert len(seen) == len(set(seen)) == 38  # no text in two splits or two regions
    assert (
        deal({"neg": _texts(40, "bad"), "pos": _texts(40, "good")}, 2, {"train": 9, "val": 2, "test": 8}, 0) == regions
    )


def test_too_few_texts_is_refused_naming_the_label() -> None:
    with pytest.raises(ValueError, match=r"pos: 18 needed, 3 available"):
        deal({"neg": _texts(40, "bad"), "pos": _texts(3, "good")}, 2, {"train": 10, "val": 1, "test": 9}, 0)


def test_a_folder_left_by_an_interrupted_run_is_refused_before_anything_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "large.partial" / "rt-3").mkdir(parents=True)
    assert main([str(tmp_path / "large"), "--cache-dir", str(tmp_path / "no-archives")]) == 2
    assert "large.partial exists (left by an interrupted run)" in capsys.readouterr().err
    assert not (tmp_path / "large").exists() and not (tmp_path / "no-archives").exists()
