"""Non-IID scenarios: split one pool of labelled text into regions (``fedlocale data split``).

Three ways to split, all seeded and deterministic for a given seed and input:

* **Dirichlet label skew** (``--regions K --alpha A``), the standard one (Hsu et al. 2019): for every class c the
  proportions p_c = (p_c1 … p_cK) ~ Dir(A·1_K) say which share of c's examples goes to each region. Small A
  gives each region a few dominant classes; large A gives every region about the pool's label mix.
  ``--alpha inf`` is no label skew (p_c = the regions' shares).
* **Quantity skew** (``--quantity-skew B``): the regions' shares of the pool q ~ Dir(B·1_K), and then
  p_c ~ Dir(A·K·q), whose mean is q: region r expects the share q_r of every class, and A keeps its meaning
  (without quantity skew q is uniform and this is exactly Dir(A·1_K)). ``--alpha inf --quantity-skew B`` is
  quantity skew alone (every region has the pool's label mix, sizes differ).
* **By a field** (``--by FIELD``): one region per value of a field the rows carry (``language``, ``domain``, or
  ``source``: the region a row came from when the pool is a folder of regions). No randomness in who goes where.

Each split (train, val if the pool has one, test) of class c is divided with the same p_c, so a region's test
reflects its own label mix. Counts are rounded by largest remainder, so every input row lands in exactly one
region's split. A draw that leaves a region below ``--min-train`` / ``--min-test`` examples is redrawn with the
next derived seed, at most ``MAX_DRAWS`` times; then the split is refused, naming the setting.

The pool is read with the one row reader (``common.data.iter_rows``, same rules as training data) and cleaned
with the one cleaning rule (``common.data.clean_splits``: duplicates and val/test rows leaked from train dropped,
pool-wide); every field of a row is written out unchanged. Output::

    DIR/<region>/{train,val,test}.jsonl   the rows, each split shuffled
    DIR/split.json                        parameters, seed, source and its hash, per region per split label counts
    DIR/label_mix.png                     each region's label mix (stacked bars)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import keys
from common.config import discover_regions, region_name_problem
from common.data import (
    DataError,
    RegionData,
    clean_splits,
    find_split,
    iter_rows,
    missing_split,
    normalise,
    row_problem,
)
from common.errors import ConfigError, InputError, check
from common.runfiles import LABEL_MIX_PLOT
from common.seeds import derive_seed

MANIFEST_FILE = "split.json"  # marks a folder as this command's output (and so replaceable with --overwrite)
SOURCE_FIELD = "source"  # the field a pooled row of a regions folder carries: the region it came from
MAX_DRAWS = 100  # Dirichlet draws tried before a setting is called impossible for the pool
FORMAT = 1


@dataclass(frozen=True)
class SplitSettings:
    """How to split a pool; validated on construction (every problem at once, named by its option)."""

    regions: int | None = None  # K, for a Dirichlet split
    alpha: float | None = None  # label-skew concentration; math.inf: no label skew
    quantity_skew: float | None = None  # B: region shares ~ Dir(B); None: equal expected shares
    by: str | None = None  # one region per value of this field instead of a Dirichlet split
    seed: int = 0
    min_train: int = 20
    min_test: int = 10

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if self.by is not None:
            if not self.by.strip():
                problems.append(("--by", "must name a field"))
            for name, value in (
                ("--regions", self.regions),
                ("--alpha", self.alpha),
                ("--quantity-skew", self.quantity_skew),
            ):
                if value is not None:
                    problems.append((name, "not with --by (a region per value of the field, no Dirichlet draw)"))
        else:
            if self.regions is None:
                problems.append(("--regions", "required (or --by FIELD)"))
            elif self.regions < 2:
                problems.append(("--regions", f"must be >= 2, got {self.regions}"))
            if self.alpha is None:
                problems.append(("--alpha", "required (or --by FIELD); e.g. 0.3 for strong label skew, inf for none"))
            elif math.isnan(self.alpha) or self.alpha <= 0:
                problems.append(("--alpha", f"must be > 0 (inf: no label skew), got {self.alpha}"))
            if self.quantity_skew is not None and not (math.isfinite(self.quantity_skew) and self.quantity_skew > 0):
                problems.append(("--quantity-skew", f"must be a finite number > 0, got {self.quantity_skew}"))
        if self.min_train < 1:
            problems.append(("--min-train", f"must be >= 1, got {self.min_train}"))
        if self.min_test < 0:
            problems.append(("--min-test", f"must be >= 0, got {self.min_test}"))
        check(problems)

    def describe(self) -> str:
        """The setting in one phrase, for messages."""
        if self.by is not None:
            return f"--by {self.by}"
        qs = f", quantity skew {self.quantity_skew:g}" if self.quantity_skew is not None else ""
        return f"K={self.regions} regions, alpha={self.alpha:g}{qs}"

    def to_json(self) -> dict[str, Any]:
        """The parameters as the manifest records them (``alpha`` inf as the string ``"inf"``)."""
        alpha: Any = "inf" if self.alpha is not None and math.isinf(self.alpha) else self.alpha
        return {
            "regions": self.regions,
            "alpha": alpha,
            "quantity_skew": self.quantity_skew,
            "by": self.by,
            "seed": self.seed,
            "min_train": self.min_train,
            "min_test": self.min_test,
        }


@dataclass(frozen=True)
class Row:
    """One row of the pool: where it was read, its label, and every field as read."""

    where: str  # file:line
    label: str
    text: str  # normalised, for the cleaning rule
    fields: Mapping[str, Any]


@dataclass
class Pool:
    """The labelled rows of a pool, per split, after cleaning."""

    source: Path
    splits: dict[str, list[Row]]
    sha256: str  # of every split file read (relative names and bytes), in sorted order
    files: list[str]
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Every label of the pool, sorted."""
        return sorted({row.label for rows in self.splits.values() for row in rows})


# ---------------------------------------------------------------- the maths (pure)


def region_shares(rng: np.random.Generator, k: int, quantity_skew: float | None) -> np.ndarray:
    """Each region's expected share of the pool: uniform, or ~ Dir(B·1_K) with quantity skew B."""
    if quantity_skew is None:
        return np.full(k, 1.0 / k)
    return rng.dirichlet(np.full(k, quantity_skew))


def class_proportions(rng: np.random.Generator, n_classes: int, shares: np.ndarray, alpha: float) -> np.ndarray:
    """A (classes × regions) matrix whose row c, the share of class c each region gets, is ~ Dir(α·K·q) for the
    region shares q (mean q; for uniform q exactly Dir(α·1_K)); α = inf gives every row q itself."""
    concentration = alpha * len(shares) * shares
    if not np.all(np.isfinite(concentration)):  # alpha inf, or so large that it overflows: the same limit
        return np.tile(shares, (n_classes, 1))
    # a region whose quantity share underflowed to 0 gets nothing (Dirichlet parameters must be > 0)
    positive = concentration > 0
    out = np.zeros((n_classes, len(shares)))
    for c in range(n_classes):
        out[c, positive] = rng.dirichlet(concentration[positive])
    return out


def allocate(n: int, proportions: np.ndarray) -> np.ndarray:
    """``n`` items divided by ``proportions`` (summing to 1) into integer counts that sum to exactly ``n``:
    the floors, then one more to the largest remainders (ties to the lower index)."""
    exact = n * proportions / proportions.sum()
    counts = np.floor(exact).astype(int)
    remainder = exact - counts
    order = sorted(range(len(proportions)), key=lambda r: (-remainder[r], r))
    for r in order[: n - int(counts.sum())]:
        counts[r] += 1
    return counts


def split_counts(class_sizes: Mapping[str, Sequence[int]], proportions: np.ndarray) -> dict[str, np.ndarray]:
    """Per split, the (classes × regions) counts: class c's ``class_sizes[split][c]`` rows divided by row c of
    ``proportions`` (the same proportions for every split)."""
    return {
        split: np.array([allocate(n, proportions[c]) for c, n in enumerate(sizes)]).reshape(len(sizes), -1)
        for split, sizes in class_sizes.items()
    }


# ---------------------------------------------------------------- reading the pool


def read_pool(folder: Path, by: str | None = None) -> Pool:
    """Every labelled row of ``folder`` (a region folder, or a folder of regions whose rows get ``source``),
    cleaned; raise DataError listing every bad row, or a missing ``by`` field by ``file:line``."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "no such folder"
        raise InputError(f"{folder}: {what} (the pool to split: a region folder or a folder of regions)")
    if find_split(folder, keys.TRAIN) is not None:
        parts: list[tuple[str | None, Path]] = [(None, folder)]
    else:
        try:
            parts = [(r["name"], Path(r["data"])) for r in discover_regions(folder)]
        except ConfigError as err:
            raise InputError(
                f"{folder}: neither a region folder (train/test files) nor a folder of regions: "
                + "; ".join(p.removeprefix("regions: ") for p in err.problems)
            ) from err
    splits: dict[str, list[Row]] = {split: [] for split in keys.SPLITS}
    problems: list[str] = []
    digest = hashlib.sha256()
    files: list[str] = []
    for origin, region_dir in parts:
        for split in keys.SPLITS:
            path = find_split(region_dir, split)
            if path is None:
                if split != keys.VAL:
                    problems.append(missing_split(region_dir, split))
                continue
            relative = f"{origin}/{path.name}" if origin is not None else path.name
            files.append(relative)
            try:
                digest.update(f"{relative}\n{path.stat().st_size}\n".encode())
                digest.update(path.read_bytes())
            except OSError as err:
                problems.append(f"{path}: cannot read: {err.strerror or err}")
                continue
            splits[split].extend(_read_rows(path, origin, by, problems))
    if problems:
        raise DataError(problems)
    cleaned, dropped = clean_splits(splits, lambda row: row.text)
    pool = Pool(folder, cleaned, digest.hexdigest(), files, dropped)
    if not pool.splits[keys.TRAIN]:
        raise DataError([f"{folder}: no usable training rows"])
    return pool


def _read_rows(path: Path, origin: str | None, by: str | None, problems: list[str]) -> list[Row]:
    rows: list[Row] = []
    for line_no, row in iter_rows(path):
        where = f"{path}:{line_no}" if line_no else str(path)
        problem = row if isinstance(row, str) else row_problem(row)
        if isinstance(row, str) or problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        if isinstance(row["label"], (dict, list)):
            problems.append(f"{where}: label must be a name, got {type(row['label']).__name__}")
            continue
        fields = dict(row)
        if origin is not None:
            # a row that already names its origin (a split of a split) keeps it: the first origin is the real one
            fields.setdefault(SOURCE_FIELD, origin)
        if by is not None:
            value = fields.get(by)
            if value is None or isinstance(value, (dict, list)) or str(value) == "":
                got = "missing" if by not in fields else f"is {json.dumps(value, ensure_ascii=False)}"
                problems.append(f"{where}: field {by!r} (--by {by}) {got}: every row needs a value for it")
                continue
            name_problem = region_name_problem(unicodedata.normalize("NFC", str(value)))
            if name_problem is not None:
                problems.append(f"{where}: field {by!r} (--by {by}): its value names a region, which {name_problem}")
                continue
        rows.append(Row(where, str(row["label"]), normalise(str(row["text"])), fields))
    return rows


# ---------------------------------------------------------------- the split


@dataclass
class Split:
    """A pool divided into regions: the rows per region per split, and what the manifest records."""

    regions: dict[str, dict[str, list[Row]]]
    draw: int | None = None  # which Dirichlet draw was kept (0 = the first)
    draw_seed: int | None = None
    shares: dict[str, float] = field(default_factory=dict)  # expected share of the pool per region
    proportions: dict[str, dict[str, float]] = field(default_factory=dict)  # region -> label -> p_c[r]


def region_names(k: int) -> list[str]:
    """``region-0`` … ``region-{K-1}``, zero-padded so that names sort in number order."""
    width = len(str(k - 1))
    return [f"region-{i:0{width}d}" for i in range(k)]


def split_pool(pool: Pool, settings: SplitSettings, say: Callable[[str], None] = print) -> Split:
    """Divide the pool as ``settings`` say, checking every region's minimum train and test size."""
    if settings.by is not None:
        return _split_by_field(pool, settings.by, settings)
    if settings.regions is None or settings.alpha is None:  # SplitSettings refuses this already
        raise InputError("--regions and --alpha are required without --by")
    return _split_dirichlet(pool, settings.regions, settings.alpha, settings, say)


def _too_small(sizes: Mapping[str, Mapping[str, int]], settings: SplitSettings) -> list[str]:
    """The regions below the minimum train or test size, each with its sizes."""
    return [
        f"{name} ({counts[keys.TRAIN]} train, {counts[keys.TEST]} test)"
        for name, counts in sizes.items()
        if counts[keys.TRAIN] < settings.min_train or counts[keys.TEST] < settings.min_test
    ]


def _minimums(settings: SplitSettings) -> str:
    return f"at least {settings.min_train} train and {settings.min_test} test examples (--min-train, --min-test)"


def _split_by_field(pool: Pool, by: str, settings: SplitSettings) -> Split:
    # read_pool has checked that every row carries a value of ``by`` that can name a region
    regions: dict[str, dict[str, list[Row]]] = {}
    for split, rows in pool.splits.items():
        for row in rows:
            name = unicodedata.normalize("NFC", str(row.fields[by]))
            regions.setdefault(name, {s: [] for s in keys.SPLITS})[split].append(row)
    regions = dict(sorted(regions.items()))
    small = _too_small({n: {s: len(r) for s, r in splits.items()} for n, splits in regions.items()}, settings)
    if small:
        raise InputError(
            f"--by {by}: {len(small)} of {len(regions)} region(s) would not have {_minimums(settings)}: "
            + ", ".join(small)
        )
    return Split(regions)


def _split_dirichlet(pool: Pool, k: int, alpha: float, settings: SplitSettings, say: Callable[[str], None]) -> Split:
    labels = pool.labels
    sizes = {split: [sum(r.label == label for r in rows) for label in labels] for split, rows in pool.splits.items()}
    total = {split: sum(counts) for split, counts in sizes.items()}
    if total[keys.TRAIN] < k * settings.min_train or total[keys.TEST] < k * settings.min_test:
        raise InputError(
            f"{settings.describe()}: impossible for this pool: {total[keys.TRAIN]} train and {total[keys.TEST]} test "
            f"examples cannot give {k} regions {_minimums(settings)} each; use fewer regions or lower the minimums"
        )
    names = region_names(k)
    best: tuple[int, str] | None = None  # (smallest train size, its description) over the draws
    for draw in range(MAX_DRAWS):
        draw_seed = derive_seed("data-split", settings.seed, draw)
        rng = np.random.default_rng(draw_seed)
        shares = region_shares(rng, k, settings.quantity_skew)
        proportions = class_proportions(rng, len(labels), shares, alpha)
        if not np.all(np.isfinite(proportions)):
            continue
        counts = split_counts(sizes, proportions)
        per_region = {name: {s: int(c[:, r].sum()) for s, c in counts.items()} for r, name in enumerate(names)}
        small = _too_small(per_region, settings)
        if small:
            smallest = min(c[keys.TRAIN] for c in per_region.values())
            if best is None or smallest > best[0]:
                best = (smallest, ", ".join(small))
            continue
        if draw:
            say(f"draw {draw + 1} of at most {MAX_DRAWS}: the first {draw} left a region below the minimum")
        return Split(
            _assign(pool, labels, counts, names, np.random.default_rng(derive_seed("data-split-rows", draw_seed))),
            draw=draw,
            draw_seed=draw_seed,
            shares={name: float(shares[r]) for r, name in enumerate(names)},
            proportions={
                name: {label: float(proportions[c, r]) for c, label in enumerate(labels)}
                for r, name in enumerate(names)
            },
        )
    closest = f"; the closest draw still had {best[1]} below it" if best else ""
    raise InputError(
        f"{settings.describe()}: impossible for this pool: none of {MAX_DRAWS} Dirichlet draws (seeds derived from "
        f"--seed {settings.seed}) gives every region {_minimums(settings)}{closest}. "
        "Use fewer regions, a larger --alpha (or --quantity-skew), or lower minimums"
    )


def _assign(
    pool: Pool,
    labels: Sequence[str],
    counts: Mapping[str, np.ndarray],
    names: Sequence[str],
    rng: np.random.Generator,
) -> dict[str, dict[str, list[Row]]]:
    """Hand out each split's rows of each class, shuffled, in the counts drawn; then shuffle every region's split
    so its order carries no label signal."""
    regions: dict[str, dict[str, list[Row]]] = {name: {s: [] for s in keys.SPLITS} for name in names}
    for split, rows in pool.splits.items():
        for c, label in enumerate(labels):
            of_class = [row for row in rows if row.label == label]
            order = rng.permutation(len(of_class))
            start = 0
            for r, name in enumerate(names):
                n = int(counts[split][c, r])
                regions[name][split].extend(of_class[i] for i in order[start : start + n])
                start += n
    for splits in regions.values():
        for split, rows in splits.items():
            splits[split] = [rows[i] for i in rng.permutation(len(rows))]
    return regions


# ---------------------------------------------------------------- the manifest and the plot


def positive_label(labels: Sequence[str]) -> str | None:
    """The label whose share the manifest calls ``positive_share``: of two labels the later one in sorted order
    (``pos`` of neg/pos, ``1`` of 0/1, ``yes`` of no/yes); None for more than two."""
    return sorted(labels)[1] if len(labels) == 2 else None


def label_counts(rows: Sequence[Row], labels: Sequence[str]) -> dict[str, Any]:
    """How many rows of each label, and the share of the positive label (binary pools)."""
    counts = Counter(row.label for row in rows)
    out: dict[str, Any] = {"examples": len(rows), "labels": {label: counts.get(label, 0) for label in labels}}
    positive = positive_label(labels)
    if positive is not None:
        out["positive_share"] = round(counts.get(positive, 0) / len(rows), 4) if rows else None
    return out


def manifest(pool: Pool, settings: SplitSettings, split: Split) -> dict[str, Any]:
    """What ``split.json`` holds: how the split was made, from what, and each region's label counts."""
    labels = pool.labels
    regions: dict[str, Any] = {}
    for name, splits in split.regions.items():
        entry: dict[str, Any] = {s: label_counts(rows, labels) for s, rows in splits.items() if rows or s != keys.VAL}
        if name in split.shares:
            entry["expected_share"] = round(split.shares[name], 6)
            entry["class_proportions"] = {label: round(p, 6) for label, p in split.proportions[name].items()}
        sources = Counter(
            str(row.fields[SOURCE_FIELD]) for rows in splits.values() for row in rows if SOURCE_FIELD in row.fields
        )
        if sources:
            entry["sources"] = dict(sorted(sources.items()))
        regions[name] = entry
    return {
        "format": FORMAT,
        "command": "fedlocale data split",
        "parameters": settings.to_json(),
        "draw": split.draw,
        "draw_seed": split.draw_seed,
        "source": str(pool.source.resolve()),
        "source_sha256": pool.sha256,
        "source_files": pool.files,
        "dropped": pool.dropped,
        "labels": labels,
        "positive_label": positive_label(labels),
        "pool": {s: label_counts(rows, labels) for s, rows in pool.splits.items() if rows or s != keys.VAL},
        "regions": regions,
    }


def run_label_mix(labels: Sequence[str], data: Mapping[str, RegionData], folders: Sequence[Path]) -> dict[str, Any]:
    """What a simulation records in ``label_mix.json``: per region per split label counts of the data it loaded
    (``labels`` in class-index order), and the parameters of the ``data split`` its regions came from, when the
    region folders share a parent holding a ``split.json``. Only a simulation has the data to count."""
    record: dict[str, Any] = {
        "regions": {
            name: {
                split: {label: sum(ex.label == i for ex in region.split(split)) for i, label in enumerate(labels)}
                for split in keys.SPLITS
            }
            for name, region in data.items()
        }
    }
    parents = {folder.resolve().parent for folder in folders}
    if len(parents) == 1:
        path = parents.pop() / MANIFEST_FILE
        try:
            made = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            made = None
        if isinstance(made, dict) and made.get("command") == "fedlocale data split":
            record["split"] = {
                "manifest": str(path),
                "source": made.get("source"),
                "parameters": made.get("parameters"),
            }
    return record


# ---------------------------------------------------------------- writing


def check_out_dir(out: Path, pool: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists (unless ``overwrite`` and it holds an earlier split), or that is, holds
    or lies inside the pool."""
    out_r, pool_r = out.resolve(), pool.resolve()
    if out_r == pool_r or out_r.is_relative_to(pool_r) or pool_r.is_relative_to(out_r):
        raise InputError(f"--out {out}: is, holds or lies inside the pool {pool}; choose a folder outside it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError(f"--out {out}: exists and is not a folder; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"--out {out}: exists; pass --overwrite to replace it (nothing was written)")
        if not (out / MANIFEST_FILE).is_file():
            raise InputError(
                f"--out {out}: holds no {MANIFEST_FILE}, so it is not an earlier `fedlocale data split`; "
                "--overwrite replaces only those (nothing was written)"
            )
        foreign = _not_written_by_split(out)
        if foreign:
            shown = ", ".join(str(path) for path in foreign[:5]) + (
                f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            )
            raise InputError(
                f"--out {out}: holds files an earlier split did not write ({shown}); --overwrite would delete "
                "them with the folder: move them out first (nothing was written)"
            )


def _not_written_by_split(out: Path) -> list[Path]:
    """What ``out`` holds beyond what ``write_split`` writes (its manifest, plot and region folders of split
    files): a user's own files, which replacing the folder would delete."""
    written = {f"{name}.jsonl" for name in keys.SPLITS}
    foreign: list[Path] = []
    for entry in sorted(out.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            foreign += [
                p for p in sorted(entry.iterdir()) if p.name not in written or not p.is_file() or p.is_symlink()
            ]
        elif entry.name not in (MANIFEST_FILE, LABEL_MIX_PLOT) or not entry.is_file():
            foreign.append(entry)
    return foreign


def write_split(out: Path, pool: Pool, settings: SplitSettings, split: Split, overwrite: bool) -> dict[str, Any]:
    """Write the regions, ``split.json`` and ``label_mix.png`` into a temporary sibling of ``out``, then rename it
    into place (replacing an earlier split only with ``overwrite``); return the manifest."""
    check_out_dir(out, pool.source, overwrite)
    record = manifest(pool, settings, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, splits in split.regions.items():
            (tmp / name).mkdir()
            for split_name, rows in splits.items():
                if split_name == keys.VAL and not rows:
                    continue  # no val file: the node carves one from train (data.val_fraction)
                _write_text(
                    tmp / name / f"{split_name}.jsonl",
                    "".join(json.dumps(row.fields, ensure_ascii=False) + "\n" for row in rows),
                )
        _write_text(tmp / MANIFEST_FILE, json.dumps(record, ensure_ascii=False, indent=2) + "\n")
        mix = {name: dict(record["regions"][name][keys.TRAIN]["labels"]) for name in split.regions}
        from runfolder.report import plot_label_mix

        plot_label_mix(tmp / LABEL_MIX_PLOT, mix, f"Label mix of the train split per region ({settings.describe()})")
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return record


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_text(path: Path, text: str) -> None:
    # fixed newline and encoding: identical bytes for identical seeds on any platform
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def run_split(
    pool_dir: Path, out: Path, settings: SplitSettings, *, overwrite: bool = False, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """``fedlocale data split``: read, split, check and write; nothing is written unless every check passes."""
    check_out_dir(out, pool_dir, overwrite)  # before reading a large pool
    pool = read_pool(pool_dir, settings.by)
    counts = ", ".join(f"{len(rows)} {s}" for s, rows in pool.splits.items() if rows)
    dropped = ", ".join(f"{k} {v}" for k, v in pool.dropped.items()) or "nothing"
    say(f"pool {pool_dir}: {counts} rows ({len(pool.files)} files), labels {', '.join(pool.labels)}; dropped {dropped}")
    say(f"splitting: {settings.describe()}, seed {settings.seed}")
    split = split_pool(pool, settings, say)
    record = write_split(out, pool, settings, split, overwrite)
    positive = record["positive_label"]
    for name, entry in record["regions"].items():
        sizes = ", ".join(f"{entry[s]['examples']} {s}" for s in keys.SPLITS if s in entry)
        share = f" ({entry[keys.TRAIN]['positive_share']:.0%} {positive} in train)" if positive else ""
        say(f"  {name}: {sizes}{share}")
    say(f"wrote {len(split.regions)} regions, {MANIFEST_FILE} and {LABEL_MIX_PLOT} to {out}")
    return record
