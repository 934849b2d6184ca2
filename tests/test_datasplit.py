"""``fedlocale data split``: the Dirichlet maths against numpy, the split of a real pool on disk, the refusals."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from assets.tiny import synthetic_rows
from common.data import load_region
from common.errors import ConfigError, InputError
from fedlocale.cli import main
from simulations.datasplit import (
    MANIFEST_FILE,
    SplitSettings,
    allocate,
    class_proportions,
    read_pool,
    region_shares,
    run_split,
    split_pool,
)
from tests.conftest import tiny_config, write_region

LABELS = ("neg", "pos")


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three synthetic regions (unique texts, an extra field ``lang``), 40 % / 60 % / 50 % pos."""
    root = tmp_path_factory.mktemp("pool")
    rng = random.Random(7)
    n = 0
    for region, lang, pos in (("east", "en", 0.4), ("west", "de", 0.6), ("north", "fr", 0.5)):
        for split, size in (("train", 160), ("val", 40), ("test", 80)):
            rows = []
            for row in synthetic_rows(size, rng, pos):
                rows.append({**row, "text": f"{row['text']} #{n}", "lang": lang, "id": n})
                n += 1
            _write(root / region / f"{split}.jsonl", rows)
    return root


def _read_out(out: Path) -> dict[str, dict[str, list[dict[str, object]]]]:
    return {
        d.name: {f.stem: [json.loads(line) for line in f.read_text().splitlines()] for f in sorted(d.glob("*.jsonl"))}
        for d in sorted(out.iterdir())
        if d.is_dir()
    }


def _split(pool: Path, out: Path, **settings: object) -> dict[str, object]:
    return run_split(pool, out, SplitSettings(**settings), say=lambda line: None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the maths


def test_allocate_conserves_and_rounds_by_largest_remainder() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, p = int(rng.integers(0, 500)), rng.dirichlet(np.full(int(rng.integers(2, 12)), 0.5))
        counts = allocate(n, p)
        assert counts.sum() == n
        assert np.all(np.abs(counts - n * p) < 1.0)
    assert allocate(10, np.array([0.25, 0.25, 0.5])).tolist() == [3, 2, 5]  # a tie goes to the lower index


def test_small_alpha_skews_each_class_and_large_alpha_is_near_uniform() -> None:
    k = 8
    uniform = region_shares(np.random.default_rng(0), k, None)
    assert np.allclose(uniform, 1 / k)
    skewed = [class_proportions(np.random.default_rng(seed), 2, uniform, 0.1) for seed in range(5)]
    flat = [class_proportions(np.random.default_rng(seed), 2, uniform, 1000.0) for seed in range(5)]
    for p in skewed + flat:
        assert np.allclose(p.sum(axis=1), 1.0)
    # alpha 0.1: most of a class sits in one or two regions; alpha 1000: every region about 1/K of every class
    assert np.mean([p.max(axis=1).mean() for p in skewed]) > 0.5
    assert max(np.abs(p - 1 / k).max() for p in flat) < 0.03
    # and the standard definition: each class's shares ~ Dir(alpha·1_K), mean 1/K, variance (1/K)(1-1/K)/(K·alpha+1)
    draws = class_proportions(np.random.default_rng(1), 4000, uniform, 0.5)
    assert np.allclose(draws.mean(axis=0), 1 / k, atol=0.01)
    assert np.allclose(draws.var(axis=0), (1 / k) * (1 - 1 / k) / (k * 0.5 + 1), rtol=0.1)


def test_quantity_skew_sets_the_mean_share_and_inf_alpha_keeps_the_label_mix() -> None:
    shares = region_shares(np.random.default_rng(3), 5, 0.5)
    assert math.isclose(shares.sum(), 1.0) and shares.max() > 2 * shares.min()
    draws = class_proportions(np.random.default_rng(4), 4000, shares, 1.0)
    assert np.allclose(draws.mean(axis=0), shares, atol=0.015)  # Dir(alpha·K·q) has mean q
    for limit in (math.inf, 1e308):  # alpha inf, or one so large that alpha·K·q overflows
        assert np.array_equal(class_proportions(np.random.default_rng(4), 3, shares, limit), np.tile(shares, (3, 1)))


# ---------------------------------------------------------------- a split on disk


def test_every_row_lands_in_exactly_one_region_split_with_all_its_fields(pool: Path, tmp_path: Path) -> None:
    record = _split(pool, tmp_path / "out", regions=5, alpha=0.5, seed=1, min_train=5, min_test=2)
    out = _read_out(tmp_path / "out")
    assert sorted(out) == [f"region-{i}" for i in range(5)]
    origin = {"east": "en", "west": "de", "north": "fr"}
    for split in ("train", "val", "test"):
        given = [json.loads(line) for f in sorted(pool.glob(f"*/{split}.jsonl")) for line in f.read_text().splitlines()]
        got = [row for region in out.values() for row in region.get(split, [])]
        assert len(got) == len(given) and {r["id"] for r in got} == {r["id"] for r in given}  # each once, none lost
        by_id = {r["id"]: r for r in given}
        for row in got:  # every field kept; the region it came from added as `source`
            assert row == {**by_id[row["id"]], "source": next(s for s, lang in origin.items() if lang == row["lang"])}
    # the manifest counts what the files hold
    for name, region in out.items():
        for split, rows in region.items():
            counts = Counter(r["label"] for r in rows)
            entry = record["regions"][name][split]  # type: ignore[index]
            assert entry["labels"] == {label: counts.get(label, 0) for label in LABELS}
            assert entry["positive_share"] == round(counts["pos"] / len(rows), 4)


def test_each_split_of_a_region_follows_the_same_class_proportions(pool: Path, tmp_path: Path) -> None:
    record = _split(pool, tmp_path / "out", regions=4, alpha=0.3, seed=2, min_train=5, min_test=2)
    totals = record["pool"]
    for name, entry in record["regions"].items():  # type: ignore[attr-defined]
        for split in ("train", "val", "test"):
            for label in LABELS:
                expected = entry["class_proportions"][label] * totals[split]["labels"][label]  # type: ignore[index]
                assert abs(entry[split]["labels"][label] - expected) < 1.0, (name, split, label)


def test_the_same_seed_gives_the_same_bytes_and_another_seed_another_split(pool: Path, tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _split(pool, tmp_path / name, regions=4, alpha=0.5, seed=seed, min_train=5, min_test=2)

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}

    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert (tmp_path / "a" / MANIFEST_FILE).read_bytes() == (tmp_path / "b" / MANIFEST_FILE).read_bytes()
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_small_alpha_gives_skewed_regions_and_large_alpha_the_pool_mix(pool: Path, tmp_path: Path) -> None:
    def spread(alpha: float, seed: int) -> float:
        record = _split(pool, tmp_path / f"{alpha}-{seed}", regions=4, alpha=alpha, seed=seed, min_train=1, min_test=0)
        shares = [e["train"]["positive_share"] for e in record["regions"].values()]  # type: ignore[attr-defined]
        return max(shares) - min(shares)

    assert all(spread(0.1, seed) > 0.5 for seed in range(3))
    assert all(spread(1000.0, seed) < 0.1 for seed in range(3))


def test_quantity_skew_makes_sizes_unequal_and_inf_alpha_keeps_each_label_mix(pool: Path, tmp_path: Path) -> None:
    record = _split(pool, tmp_path / "q", regions=4, alpha=math.inf, quantity_skew=0.3, seed=0, min_train=5, min_test=2)
    assert record["parameters"]["alpha"] == "inf" and record["parameters"]["quantity_skew"] == 0.3  # type: ignore[index]
    regions = record["regions"].values()  # type: ignore[attr-defined]
    sizes = [e["train"]["examples"] for e in regions]
    assert max(sizes) > 2 * min(sizes)
    for entry in regions:  # each region's size is its drawn share of the pool, up to rounding of each class
        assert abs(entry["train"]["examples"] - entry["expected_share"] * 480) <= 2
    pool_share = record["pool"]["train"]["positive_share"]  # type: ignore[index]
    for entry in regions:
        assert abs(entry["train"]["positive_share"] - pool_share) <= 1.5 / entry["train"]["examples"] + 1e-9


def test_split_by_a_field_and_by_source(pool: Path, tmp_path: Path) -> None:
    _split(pool, tmp_path / "lang", by="lang", min_train=5, min_test=2)
    out = _read_out(tmp_path / "lang")
    assert sorted(out) == ["de", "en", "fr"]
    assert {r["lang"] for rows in out["de"].values() for r in rows} == {"de"}
    assert [len(out["en"][s]) for s in ("train", "val", "test")] == [160, 40, 80]
    _split(pool, tmp_path / "src", by="source", min_train=5, min_test=2)
    assert sorted(_read_out(tmp_path / "src")) == ["east", "north", "west"]
    # a region folder of its own output loads through the ordinary loader
    assert len(load_region("de", tmp_path / "lang" / "de", LABELS).train) == 160


def test_a_single_region_folder_is_a_pool_too(tmp_path: Path) -> None:
    write_region(tmp_path / "one", 200, 100, seed=5)
    record = _split(tmp_path / "one", tmp_path / "out", regions=3, alpha=1.0, min_train=5, min_test=2)
    assert record["source_files"] == ["train.jsonl", "val.jsonl", "test.jsonl"]
    assert "source" not in json.loads((tmp_path / "out" / "region-0" / "train.jsonl").read_text().splitlines()[0])


def test_manifest_records_parameters_source_hash_and_cleaning(pool: Path, tmp_path: Path) -> None:
    record = _split(pool, tmp_path / "a", regions=3, alpha=0.7, seed=9, min_train=5, min_test=2)
    assert record["parameters"] == {
        "regions": 3,
        "alpha": 0.7,
        "quantity_skew": None,
        "by": None,
        "seed": 9,
        "min_train": 5,
        "min_test": 2,
    }
    assert record["source"] == str(pool.resolve()) and record["labels"] == ["neg", "pos"]
    assert record["positive_label"] == "pos" and record["dropped"] == {}
    assert json.loads((tmp_path / "a" / MANIFEST_FILE).read_text()) == record
    assert (tmp_path / "a" / "label_mix.png").read_bytes()[:4] == b"\x89PNG"
    # a changed input changes the hash; a duplicate and a leaked test row are dropped and counted
    changed = tmp_path / "pool"
    for f in pool.rglob("*.jsonl"):
        (changed / f.relative_to(pool)).parent.mkdir(parents=True, exist_ok=True)
        (changed / f.relative_to(pool)).write_bytes(f.read_bytes())
    first = json.loads((changed / "east" / "train.jsonl").read_text().splitlines()[0])
    with (changed / "west" / "train.jsonl").open("a") as fh:
        fh.write(json.dumps({**first, "id": "dup"}) + "\n")
    with (changed / "north" / "test.jsonl").open("a") as fh:
        fh.write(json.dumps({**first, "id": "leak"}) + "\n")
    other = _split(changed, tmp_path / "b", regions=3, alpha=0.7, seed=9, min_train=5, min_test=2)
    assert other["source_sha256"] != record["source_sha256"]
    assert other["dropped"] == {"duplicates_train": 1, "leaked_test": 1}


# ---------------------------------------------------------------- refusals


def test_bad_settings_are_refused_naming_the_option() -> None:
    for settings, option in (
        ({"regions": 4, "alpha": 0.0}, "--alpha"),
        ({"regions": 4, "alpha": float("nan")}, "--alpha"),
        ({"regions": 4, "alpha": -1.0}, "--alpha"),
        ({"regions": 1, "alpha": 1.0}, "--regions"),
        ({"alpha": 1.0}, "--regions"),
        ({"regions": 4, "alpha": 1.0, "quantity_skew": math.inf}, "--quantity-skew"),
        ({"by": "lang", "regions": 4}, "--regions"),
        ({"regions": 4, "alpha": 1.0, "min_train": 0}, "--min-train"),
    ):
        with pytest.raises(ConfigError) as err:
            SplitSettings(**settings)  # type: ignore[arg-type]
        assert any(p.startswith(f"{option}:") for p in err.value.problems), (settings, err.value.problems)


def test_an_existing_out_is_refused_and_replaced_only_with_overwrite(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        _split(pool, out, regions=3, alpha=1.0, min_train=5, min_test=2)
    with pytest.raises(InputError, match="not an earlier `fedlocale data split`"):
        run_split(pool, out, SplitSettings(regions=3, alpha=1.0), overwrite=True, say=lambda line: None)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(InputError, match="inside the pool"):
        _split(pool, pool / "east" / "sub", regions=3, alpha=1.0)
    first = tmp_path / "split"
    _split(pool, first, regions=3, alpha=1.0, seed=0, min_train=5, min_test=2)
    run_split(pool, first, SplitSettings(regions=2, alpha=1.0, seed=1), overwrite=True, say=lambda line: None)
    assert sorted(p.name for p in first.iterdir()) == ["label_mix.png", "region-0", "region-1", MANIFEST_FILE]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary sibling left


def test_overwrite_refuses_a_split_that_holds_the_users_own_files(pool: Path, tmp_path: Path) -> None:
    # replacing the folder would delete them: refused naming them, and nothing is touched
    out = tmp_path / "split"
    _split(pool, out, regions=3, alpha=1.0, seed=0, min_train=5, min_test=2)
    notes, extra = out / "my-notes.txt", out / "region-0" / "extra" / "keep.txt"
    notes.write_text("mine")
    extra.parent.mkdir()
    extra.write_text("mine too")
    manifest = (out / MANIFEST_FILE).read_bytes()
    with pytest.raises(InputError, match=rf"files an earlier split did not write \({notes}, {extra.parent}\)"):
        run_split(pool, out, SplitSettings(regions=2, alpha=1.0, seed=1), overwrite=True, say=lambda line: None)
    assert notes.read_text() == "mine" and extra.read_text() == "mine too"
    assert (out / MANIFEST_FILE).read_bytes() == manifest
    notes.unlink()
    shutil.rmtree(extra.parent)
    run_split(pool, out, SplitSettings(regions=2, alpha=1.0, seed=1), overwrite=True, say=lambda line: None)
    assert sorted(p.name for p in out.iterdir()) == ["label_mix.png", "region-0", "region-1", MANIFEST_FILE]


def test_k_too_large_and_an_impossible_alpha_name_the_setting(pool: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"K=30 regions, alpha=1: impossible for this pool: 480 train"):
        _split(pool, tmp_path / "out", regions=30, alpha=1.0, min_train=20)
    with pytest.raises(InputError, match=r"K=20 regions, alpha=0.01: impossible for this pool: none of 100 Dirichlet"):
        _split(pool, tmp_path / "out", regions=20, alpha=0.01, min_train=20, min_test=1)
    assert not (tmp_path / "out").exists()


def test_a_row_without_the_by_field_is_named_by_file_and_line(pool: Path, tmp_path: Path) -> None:
    bad = tmp_path / "pool"
    write_region(bad / "z", 40, 20, seed=1)
    _write(
        bad / "b" / "train.jsonl", [{"text": "good one", "label": "pos", "lang": "x"}, {"text": "no", "label": "neg"}]
    )
    _write(bad / "b" / "test.jsonl", [{"text": "t", "label": "pos", "lang": "a/b"}])
    with pytest.raises(InputError) as err:
        read_pool(bad, by="lang")
    text = str(err.value)
    assert f"{bad / 'z' / 'train.jsonl'}:1: field 'lang' (--by lang) missing" in text
    assert f"{bad / 'b' / 'train.jsonl'}:2: field 'lang' (--by lang) missing" in text
    assert f"{bad / 'b' / 'test.jsonl'}:1: field 'lang' (--by lang): its value names a region" in text


def test_bad_rows_of_the_pool_are_all_listed(tmp_path: Path) -> None:
    _write(tmp_path / "p" / "train.jsonl", [{"text": "ok text", "label": "pos"}, {"label": "neg"}])
    (tmp_path / "p" / "test.jsonl").write_text('{"text": "fine", "label": "neg"}\n{bad json\n')
    with pytest.raises(InputError) as err:
        read_pool(tmp_path / "p")
    assert f"{tmp_path / 'p' / 'train.jsonl'}:2: missing field text" in str(err.value)
    assert f"{tmp_path / 'p' / 'test.jsonl'}:2: bad JSON" in str(err.value)


def test_by_field_regions_below_the_minimum_are_named(pool: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--by lang: 3 of 3 region\(s\) would not have at least 500 train"):
        split_pool(read_pool(pool, "lang"), SplitSettings(by="lang", min_train=500))


def test_cli_prints_progress_and_refusals_without_a_traceback(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["data", "split", str(pool), "--out", str(out), "--regions", "3", "--alpha", "0.5", "--min-train", "5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"pool {pool}: 480 train, 120 val, 240 test rows (9 files), labels neg, pos" in printed
    assert "region-0:" in printed and f"to {out}" in printed
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args[:5], "--regions", "3", "--alpha", "0"]) == 2
    assert "--alpha: must be > 0" in capsys.readouterr().err
    assert main(["data", "split", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--by", "lang"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_simulation_counts_the_label_mix_it_loaded_and_names_the_split(pool: Path, tmp_path: Path) -> None:
    from simulations.datasplit import run_label_mix

    data = {name: load_region(name, pool / name, LABELS) for name in ("east", "west")}
    record = run_label_mix(LABELS, data, [pool / "east", pool / "west"])
    assert "split" not in record  # the pool is no split's output
    train = [json.loads(line)["label"] for line in (pool / "east" / "train.jsonl").read_text().splitlines()]
    assert record["regions"]["east"]["train"] == {"neg": train.count("neg"), "pos": train.count("pos")}
    made = _split(pool, tmp_path / "s", regions=2, alpha=0.5, seed=3, min_train=5, min_test=2)
    folders = [tmp_path / "s" / name for name in ("region-0", "region-1")]
    record = run_label_mix(LABELS, {f.name: load_region(f.name, f, LABELS) for f in folders}, folders)
    assert record["split"]["parameters"] == made["parameters"]
    assert record["regions"]["region-1"]["test"] == made["regions"]["region-1"]["test"]["labels"]  # type: ignore[index]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_split_pool_simulates(tiny_bert: Path, tmp_path: Path) -> None:
    root = tmp_path / "pool"
    write_region(root / "a", 120, 40, seed=1, pos_fraction=0.5)
    write_region(root / "b", 120, 40, seed=2, pos_fraction=0.5)
    out = tmp_path / "skew"
    assert main(["data", "split", str(root), "--out", str(out), "--regions", "3", "--alpha", "0.5"]) == 0
    cfg = tiny_config(tmp_path / "run.yaml", tiny_bert, out, rounds=1)
    assert main(["simulate", str(cfg), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(summary["regions"]) == ["region-0", "region-1", "region-2"]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    mix = json.loads((tmp_path / "run" / "label_mix.json").read_text())
    assert mix["split"]["parameters"]["alpha"] == 0.5 and mix["split"]["source"] == str(root.resolve())
    for name, entry in manifest["regions"].items():
        assert summary["regions"][name]["num_test"] == entry["test"]["examples"]
        assert mix["regions"][name]["test"] == entry["test"]["labels"]  # what the run loaded is what was split
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Label mix per region" in report and "fedlocale data split" in report


def test_the_skew_config_is_the_demo_config_on_split_regions(pool: Path, tmp_path: Path) -> None:
    """configs/skew.yaml trains as the demo does (only name, regions, policies, rounds, how dual trains, how
    often the global model is validated and whether the local-only model is weighed differ) and loads over a
    split."""
    import yaml

    from common.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    skew, demo = (yaml.safe_load((configs / f"{n}.yaml").read_text()) for n in ("skew", "demo"))
    assert skew["regions_dir"] == "../data/demo-skew" and "policies" not in skew
    # under strong label skew joint training keeps the global model one class (docs/personalization.md)
    assert (skew["personalize"].pop("dual_train"), demo["personalize"].pop("dual_train")) == ("apart", "joint")
    assert (skew.pop("rounds"), demo.pop("rounds")) == (30, 12)  # a skewed global model starts learning late
    # every: 3 was measured on the demo's draws only (docs/benchmarks.md)
    assert (skew["early_stopping"].pop("every"), demo["early_stopping"].pop("every")) == (1, 3)
    # the local-only candidate by the point rule was measured on the demo's draws only (docs/benchmarks.md)
    weighs = {k: demo["personalize"].pop(k) for k in ("consider_local_only", "local_only_choice")}
    assert weighs == {"consider_local_only": True, "local_only_choice": "point"}
    assert not {"consider_local_only", "local_only_choice"} & set(skew["personalize"])
    same = {k: v for k, v in demo.items() if k not in ("name", "regions_dir", "policies")}
    assert {k: v for k, v in skew.items() if k not in ("name", "regions_dir")} == same
    _split(pool, tmp_path / "skew", regions=8, alpha=0.3, min_train=5, min_test=2)
    cfg = load_config(configs / "skew.yaml", regions_dir=tmp_path / "skew")
    assert cfg.region_names == tuple(f"region-{i}" for i in range(8))
    assert all(region.policy is None for region in cfg.regions)
