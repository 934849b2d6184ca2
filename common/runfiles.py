"""The run folder: the name of every file and folder in it, and its ``summary.json`` as a typed object.

A run folder (``runs/NAME`` of ``fedlocale simulate``, ``OUT`` of ``fedlocale deploy``) is written by the server
(federation record, metrics, state, checkpoints, the global adapter, its ledger), by the simulated nodes (their
ledgers and personal LoRAs) and by the operator's commands (summary, reports, personalized adapters). Its names
live here, in ``common``, because the server and the nodes both write into it; nothing else spells them::

    RUN_DIR/
      summary.json            Summary: per region and overall scores of every mode, communication, timing, audit
      metrics.jsonl           one line per round x region x split (the server, flushed each round)
      federation.json         the server's record of the finished federation
      state.json              the round loop's state after each round (resume)
      config.yaml             the resolved run config (simulation)
      server-error.txt        the ServerApp's traceback when it failed
      adapter/                the final global adapter (peft folder)
      checkpoints/round-NNN/  each round's global adapter (resume, personalize.start) and the server
                              optimizer's state after it, server-optimizer.safetensors (resume)
      personalized/REGION/    the adapter each region serves after personalization
      personal/REGION/        a simulated node's personal-dir: personal-lora/round-NNN.safetensors,
                              personalized.json, personalize-error.txt
      report.md + *.png       the human report and its plots
      label_mix.json          per region per split label counts (simulation only: the data is local there)
      audit/                  keys.yaml, audit-report.md + audit-bytes-REGION.png,
                              privacy-report.md + privacy-roc-REGION.png (fedlocale audit privacy),
        server/ nodes/REGION/ ledger.jsonl, ledger.key, ledger.pub of each signer
        updates/round-NNN/    kept updates (REGION.npz) and the incoming global adapter (global-in.npz)

A deployed node keeps its ledger folder and personal-dir on its own disk under the same names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from common.errors import InputError

SUMMARY_FILE: Final = "summary.json"
METRICS_FILE: Final = "metrics.jsonl"
FEDERATION_FILE: Final = "federation.json"
STATE_FILE: Final = "state.json"
CONFIG_FILE: Final = "config.yaml"  # the resolved config a simulation ran with (absolute paths)
SERVER_ERROR_FILE: Final = "server-error.txt"
ADAPTER_DIR: Final = "adapter"
CHECKPOINTS_DIR: Final = "checkpoints"
# beside each round's checkpoint: the server optimizer's state after that round (state.json names it and its hash)
SERVER_OPTIMIZER_FILE: Final = "server-optimizer.safetensors"
PERSONALIZED_DIR: Final = "personalized"  # RUN_DIR/personalized/REGION: the personalized adapter a region serves
# RUN_DIR/local_only/REGION: the region's local-only adapter, a serving candidate (personalize.consider_local_only)
LOCAL_ONLY_DIR: Final = "local_only"

# the human report and its plots
REPORT_FILE: Final = "report.md"
VAL_PLOT: Final = "val_by_round.png"
MODES_PLOT: Final = "modes_by_region.png"
BYTES_PLOT: Final = "bytes_by_round.png"
LOSS_PLOT: Final = "train_loss_by_round.png"
AB_PLOT: Final = "ab_by_region.png"
DP_PLOT: Final = "dp_epsilon_by_round.png"  # privacy spent per round, regions whose policy requires DP
LABEL_MIX_PLOT: Final = "label_mix.png"  # each region's label mix (simulation; also beside a `data split`)
# per region per split label counts of the data a simulation trained on; never in a deployment, whose server
# learns nothing about a region's data
LABEL_MIX_FILE: Final = "label_mix.json"

# audit/: the server's ledger in audit/server/, each simulated node's in audit/nodes/REGION/
AUDIT_DIR: Final = "audit"
NODES_DIR: Final = "nodes"
SERVER_DIR: Final = "server"
KEYS_FILE: Final = "keys.yaml"  # signer name → public key file, written beside a simulated run's ledgers
LEDGER_FILE: Final = "ledger.jsonl"
KEY_FILE: Final = "ledger.key"
PUBLIC_KEY_FILE: Final = "ledger.pub"
# a node's privacy accountant (client.dp), beside its ledger: what each run's DP-SGD has spent of the budget
DP_ACCOUNT_FILE: Final = "dp-accountant.json"
# a deployed node's DP secret (client.dp_secret), beside its accountant: 32 random bytes (mode 0600) that seed its
# DP-SGD sampling and noise; as sensitive as the data. A simulation derives its nodes' secrets and writes none
DP_SECRET_FILE: Final = "dp-secret.key"
AUDIT_REPORT_FILE: Final = "audit-report.md"
AUDIT_PLOT: Final = "audit-bytes-{}.png"  # .format(region)
PRIVACY_REPORT_FILE: Final = "privacy-report.md"  # the membership-inference audit (fedlocale audit privacy)
PRIVACY_PLOT: Final = "privacy-roc-{}.png"  # .format(region): log-log ROC of each audited model
UPDATES_DIR: Final = "updates"  # audit/updates/round-NNN/REGION.npz when audit.keep_updates
GLOBAL_IN_FILE: Final = "global-in.npz"  # the global adapter a round started from, beside its kept updates
UPDATE_SUFFIX: Final = ".npz"
# a secure round's unmasked sum (Σ w·q(θ) per tensor and [Σ w, Σ w·q(loss)]), kept beside GLOBAL_IN_FILE
SECURE_SUM_FILE: Final = "secure-sum.npz"

# a node's personal-dir (in a simulation RUN_DIR/personal): REGION/ holds these
SIMULATED_PERSONAL_DIR: Final = "personal"  # a simulation's stand-in for its nodes' personal-dir
SIMULATED_CACHE_DIR: Final = "node-cache"  # a simulation's stand-in for its nodes' cache-dir (token ids), per region
PERSONAL_LORA_DIR: Final = "personal-lora"  # the node's kept personal slices, round-NNN.safetensors
PERSONAL_LORA_SUFFIX: Final = ".safetensors"
PERSONALIZED_REPORT: Final = "personalized.json"  # the node's own A/B report
PERSONALIZE_ERROR_FILE: Final = "personalize-error.txt"


ROUND_PREFIX: Final = "round-"  # round_name's prefix, for globs over the rounds kept in a folder


def round_name(server_round: int) -> str:
    """The name of one round's entry in checkpoints/, updates/ and personal-lora/ (``round-NNN``)."""
    return f"{ROUND_PREFIX}{server_round:03d}"


class SummaryError(InputError):
    """A summary.json that is missing, not JSON, or not the shape a run writes; the message names the file."""


SECTIONS: Final = ("run", "regions", "overall", "communication", "timing", "audit", "privacy")
CONFUSION: Final = "confusion"  # a region's test confusion matrix in a mode's block (common.metrics.confusion)
# in a baseline's block of a region (simulation): which of its validation checkpoints it kept
# (client.local_only.KeptCheckpoint.to_json), as the run records its best round
KEPT_CHECKPOINT: Final = "kept_checkpoint"
POOLED: Final = "pooled_macro_f1"  # overall per mode: macro-F1 of all regions' test examples pooled


@dataclass(frozen=True)
class Summary:
    """What ``summary.json`` holds; deployment and simulation both fill this one type.

    - ``run``: name, seed, config, model, aggregation, server_lr, optimizer (its name and hyperparameters),
      rounds_planned, rounds_done, best_round, stopped_early;
    - ``regions``: per region its counts (num_train, num_val, num_test, dropped; a deployment knows only
      num_train and num_test) and ``{accuracy, macro_f1}`` per mode (federated, centralized, local_only), plus
      ``personalized`` (the choice and its A/B) after personalization, and ``served_vs_local_only`` when the
      local-only baseline ran (``runfolder.summary.served_vs_local_only``); a baseline's block (simulation) also
      says which of its validation checkpoints it kept (``KEPT_CHECKPOINT``: ``number``, ``of``, ``step``,
      ``steps``);
    - ``overall``: per mode ``{accuracy, macro_f1}``, weighted by test size, and in a simulation ``POOLED``: the
      macro-F1 of all regions' test examples as one set, summed from each region's ``CONFUSION`` matrix (rows:
      truth; in the region's mode blocks), when the mode scored every region with test examples;
    - ``communication``: adapter_bytes, full_model_bytes, bytes_up_total, bytes_down_total, per_round;
    - ``timing``: seconds of the federation, each baseline and personalization;
    - ``audit``: the ledger check of the run (``None`` when the run was not audited);
    - ``privacy``: the membership-inference audit (``fedlocale audit privacy``; ``None`` until one ran):
      ``references`` (the reference models), ``bootstrap``, ``seed``, ``seconds``, and ``regions``: per region
      ``members``, ``nonmembers``, ``served`` (global, personalized or local_only) and ``models``: per audited model
      (global, served, update) per attack (loss, reference) ``{auc, auc_ci95, tpr_at_fpr: {"0.01", "0.001"}}``
      (a TPR is null when that FPR is not resolvable with the region's non-members), plus ``canaries`` when
      the run inserted them.

    Only ``regions`` is required when reading: every reader treats the other sections as optional.
    """

    regions: Mapping[str, Any]
    run: Mapping[str, Any] = field(default_factory=dict)
    overall: Mapping[str, Any] = field(default_factory=dict)
    communication: Mapping[str, Any] = field(default_factory=dict)
    timing: Mapping[str, Any] = field(default_factory=dict)
    audit: Mapping[str, Any] | None = None
    privacy: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to summary.json (sections in the order they have always had)."""
        out: dict[str, Any] = {
            "run": dict(self.run),
            "regions": dict(self.regions),
            "overall": dict(self.overall),
            "communication": dict(self.communication),
            "timing": dict(self.timing),
        }
        if self.audit is not None:
            out["audit"] = dict(self.audit)
        if self.privacy is not None:
            out["privacy"] = dict(self.privacy)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = SUMMARY_FILE) -> Summary:
        """The summary in ``data`` (parsed JSON); ``source`` names it in a SummaryError when its shape is wrong."""
        if not isinstance(data, dict):
            raise SummaryError(f"{source}: not a JSON object")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise SummaryError(f"{source}: unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
        if not isinstance(data.get("regions"), dict):
            raise SummaryError(f"{source}: no 'regions' object (is it a fedlocale run's summary?)")
        for name in SECTIONS:
            if name in data and not isinstance(data[name], dict):
                raise SummaryError(f"{source}: '{name}' is a {type(data[name]).__name__}, not an object")
        return cls(**{name: data[name] for name in SECTIONS if name in data})


def read_summary(run_dir: Path) -> Summary:
    """RUN_DIR/summary.json; a SummaryError naming the file when it is missing, not JSON or not a summary."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        raise SummaryError(f"{path}: no such file (is {run_dir} a finished run?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SummaryError(f"{path}: not valid JSON ({err})") from err
    return Summary.from_json(data, str(path))


def write_summary(run_dir: Path, summary: Summary) -> Path:
    """Write RUN_DIR/summary.json atomically (a temp sibling renamed over it): a crash leaves the old file or the
    new one, never half of one, so a reader such as ``fedlocale export`` never sees a torn summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_json(run_dir / SUMMARY_FILE, summary.to_json())


def write_json(path: Path, data: object, indent: int = 2) -> Path:
    """Replace ``path`` with ``data`` as JSON atomically: a crash leaves the old file or the new one, never half."""
    return write_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8) atomically: the old file or the new one, never half.

    The one writer of every user-visible file fedlocale makes (JSON, YAML, Markdown, PNG). The temporary sibling
    is a fixed name opened as any file is (not mkstemp), so the file keeps the umask's permissions; it is synced
    before the rename so the rename never exposes unwritten blocks, and removed if writing it fails.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# Every entry of a run folder that a run writes: a folder holding any of them holds a run (or part of one).
RUN_ENTRIES: Final = (
    SUMMARY_FILE,
    METRICS_FILE,
    FEDERATION_FILE,
    STATE_FILE,
    CONFIG_FILE,
    SERVER_ERROR_FILE,
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    PERSONALIZED_DIR,
    LOCAL_ONLY_DIR,
    SIMULATED_PERSONAL_DIR,
    SIMULATED_CACHE_DIR,
    REPORT_FILE,
    VAL_PLOT,
    MODES_PLOT,
    BYTES_PLOT,
    LOSS_PLOT,
    AB_PLOT,
    DP_PLOT,
    LABEL_MIX_FILE,
    LABEL_MIX_PLOT,
    AUDIT_DIR,
)


class RunFolderExistsError(InputError):
    """The output folder already holds a run and neither --overwrite nor --resume was given."""


def run_entries(run_dir: Path) -> list[str]:
    """The names of ``RUN_ENTRIES`` present in ``run_dir`` (none when it does not exist)."""
    return [name for name in RUN_ENTRIES if os.path.lexists(run_dir / name)]


def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an output folder that is a file, or that holds a run when neither ``overwrite`` nor ``resume``.

    Only checks (writes nothing): callers run it with their other checks, before the first write.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderExistsError(f"{run_dir}: exists and is not a folder; choose another --out")
    found = run_entries(run_dir)
    if found and not (overwrite or resume):
        shown = ", ".join(found[:4]) + (", …" if len(found) > 4 else "")
        raise RunFolderExistsError(
            f"{run_dir}: already holds a run ({shown}); nothing was written. Pass --overwrite to replace it "
            f"(only the run's own files; others in the folder are kept), --resume to continue it, "
            f"or choose another --out"
        )


def clear_run_dir(run_dir: Path) -> None:
    """Remove the run's own entries (``RUN_ENTRIES``) from ``run_dir``, leaving any other file there alone.

    They are first moved together into a hidden sibling folder and only then deleted, so a failure part way
    leaves the old run whole: either still in ``run_dir`` or in ``.NAME.replaced-*`` beside it, never half gone.
    """
    found = run_entries(run_dir)
    if not found:
        return
    aside = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.replaced-"))
    moved: list[str] = []
    try:
        for name in found:
            os.replace(run_dir / name, aside / name)
            moved.append(name)
    except BaseException:
        for name in moved:  # put the old run back as it was
            os.replace(aside / name, run_dir / name)
        aside.rmdir()
        raise
    shutil.rmtree(aside)
