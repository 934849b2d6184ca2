"""The privacy audit a deployed node runs on itself: membership inference against its own data and the adapters it
actually holds, reported as aggregate numbers only (``fedlocale audit node``).

**What the node keeps.** With ``keep-globals`` in its node config (opt-in; ``NodeSettings.keep_globals``) the node
keeps, in ``KEEP_GLOBALS/REGION/round-NNN.safetensors``, the global adapter it received: each train message's
(the global adapter after round NNN = the message's round − 1; round 000 is the initial adapter) and the test
evaluation's (the adapter the run delivered, the best round's, marked ``delivered``). Each file carries the
server's task (``ClientTask`` JSON: base model, LoRA settings, labels, seed, data settings) in its metadata, so
the audit rebuilds the model exactly as the node trained it, without the run config. Bounded: only the newest
``keep-globals-count`` rounds (default 3) and the delivered one stay; a file of another run (``run_key``) is
removed when the first of a new run is written. The adapters are the ones every region and the server hold
anyway; keeping them adds nothing about the node's records to its disk.

**What is audited** (``audit_node``): the delivered global adapter (``global``) and the model the node serves
(``served``: its personalized adapter from ``personal-dir/REGION/personalized/`` when its personalization chose
it, ``personalized.json``; else the global one). Members are the region's training records as the node trained on
them, non-members its test split (``client.membership.audit_records``: the same sample a simulation's audit
draws). References: the kept global adapters of the rounds before the delivered one; when the node kept none of
them (``keep-globals-count`` smaller than the rounds trained after the best one), the run's initial global
adapter, rebuilt from the task's seed exactly as the server built it (round 0: the base model with the run's
initial head and a zero LoRA update). That fallback is sound (it never saw the members) but weak: its head is
untrained, so its ``p(y | x)`` says little about how easy a record is and the reference attack comes close to
the loss attack; the report says which references were used. The maths is ``client.membership.audit_scored``,
as for a run folder.

**What leaves the audit**: ``node-privacy.json`` and ``node-privacy.md`` in a folder the operator names: counts,
AUCs with their bootstrap intervals, TPRs at 1 % and 0.1 % FPR, which models and references. No text, score,
label or ROC point of any record (a ROC's points are thresholds at records' scores, so there is no plot).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from client.adapterfolder import DAMAGED_MODEL_ERRORS, AdapterFolderError, is_adapter, load_peft_folder, reason
from client.membership import (
    LOW_FPRS,
    MEANING_TEXT,
    REFERENCE,
    Predictor,
    RegionAudit,
    Scored,
    audit_records,
    audit_scored,
    fmt_number,
    results_table,
    score,
    swap_state,
)
from client.task import NodeSettings, global_model, use_threads
from common import keys
from common.config import ClientTask, Region
from common.data import find_split, missing_split
from common.errors import ConfigError, InputError
from common.model import adapter_state, build_model, resolve_base
from common.runfiles import PERSONALIZED_REPORT, ROUND_PREFIX, round_name, write_atomic, write_json
from common.seeds import derive_seed

KEPT_SUFFIX = ".safetensors"
TASK, ROUND, DELIVERED = "task", "round", "delivered"  # file metadata
_KEPT_FILE = re.compile(re.escape(ROUND_PREFIX) + r"(\d{3,})" + re.escape(KEPT_SUFFIX))
REPORT_JSON, REPORT_MD = "node-privacy.json", "node-privacy.md"
FORMAT = "fedlocale-node-privacy/1"
GLOBAL_MODEL, SERVED_MODEL = "global", "served"
INITIAL_ROUND = 0
DEFAULT_BOOTSTRAP = 1000
log = logging.getLogger("fedlocale.node")


class NodeAuditError(InputError):
    """The node cannot audit itself: a missing setting, data folder or split, or a kept adapter that does not
    load; the message names the file or setting."""


# whose shape an earlier kept adapter must have to be swapped into the loaded model (``swap_state``)
_SHAPE = "the delivered one's"


# ------------------------------------------------------------------------------------- keeping what arrives


@dataclass(frozen=True)
class KeptGlobal:
    """A global adapter the node kept: the round it is the result of, whether the run delivered it, the task it
    came with, and its file."""

    round: int
    delivered: bool
    task: ClientTask
    path: Path


def region_folder(keep_dir: Path, region: str) -> Path:
    """Where a node with ``keep-globals`` = ``keep_dir`` keeps region ``region``'s received global adapters."""
    return keep_dir / region


def keep_global(
    keep_dir: Path,
    region: str,
    task: ClientTask,
    state: Mapping[str, torch.Tensor],
    *,
    delivered: bool,
    count: int,
) -> Path:
    """Keep the global adapter ``state`` a message of ``task`` brought: a train message's is the result of the
    round before it, the test evaluation's (``delivered``) that of ``task.server_round``, the best round.
    Written to a temporary file and renamed; then files of other runs and all but the newest ``count`` rounds
    (and the delivered one) are removed."""
    folder = region_folder(keep_dir, region)
    folder.mkdir(parents=True, exist_ok=True)
    result_of = task.server_round if delivered else task.server_round - 1
    path = folder / f"{round_name(result_of)}{KEPT_SUFFIX}"
    tmp = path.with_name(f".{path.name}.tmp")
    metadata = {TASK: task.to_json(), ROUND: str(result_of), DELIVERED: "1" if delivered else "0"}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    _prune(folder, task.run_key, count)
    return path


def keep_received(
    region: str, node: NodeSettings, task: ClientTask, state: Mapping[str, torch.Tensor], *, delivered: bool
) -> None:
    """``keep_global`` on a node with ``keep-globals``; nothing otherwise. The federation does not depend on it: a
    failure to write is logged and the message goes on."""
    if node.keep_globals is None:
        return
    try:
        keep_global(node.keep_globals, region, task, state, delivered=delivered, count=node.keep_globals_count)
    except OSError as err:
        log.warning("%s: could not keep the global adapter of round %d (%s)", region, task.server_round, err)


def _prune(folder: Path, run_key: str, count: int) -> None:
    kept: list[tuple[int, bool, Path]] = []
    for path in _round_files(folder):
        try:
            meta = _metadata(path)
            same_run = ClientTask.from_json(meta[TASK]).run_key == run_key
        except (NodeAuditError, ConfigError, KeyError) as err:
            # not provably a kept adapter (damaged, or a file of the operator's that has this name): left alone
            log.warning("%s: not a kept global adapter that can be read (%s); left as it is", path, err)
            continue
        if not same_run:
            path.unlink()  # a kept adapter of an earlier run: the audit is of this one
            continue
        kept.append((int(meta[ROUND]), meta.get(DELIVERED) == "1", path))
    ordinary = sorted((item for item in kept if not item[1]), key=lambda item: item[0], reverse=True)
    for _, _, path in ordinary[count:]:
        path.unlink()


def _round_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(f"{ROUND_PREFIX}*{KEPT_SUFFIX}") if _KEPT_FILE.fullmatch(p.name))


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise NodeAuditError(f"{path}: not a readable kept global adapter ({reason(err)})") from err


def kept_globals(keep_dir: Path, region: str) -> list[KeptGlobal]:
    """The global adapters the node kept for ``region``, by round; a file that does not read raises
    ``NodeAuditError`` naming it and the field."""
    folder = region_folder(keep_dir, region)
    if not folder.is_dir():
        raise NodeAuditError(
            f"{folder}: no such folder; the node keeps the global adapters it receives there only with "
            f"{keys.NODE_KEEP_GLOBALS} in its node config, from the run's first round on"
        )
    found = []
    for path in _round_files(folder):
        meta = _metadata(path)
        missing = [field for field in (TASK, ROUND, DELIVERED) if field not in meta]
        if missing:
            raise NodeAuditError(f"{path}: metadata has no {', '.join(missing)}; not a kept global adapter")
        try:
            task = ClientTask.from_json(meta[TASK])
        except ConfigError as err:
            raise NodeAuditError(f"{path}: metadata field {TASK!r}: {'; '.join(err.problems)}") from err
        if not meta[ROUND].isdigit():
            raise NodeAuditError(f"{path}: metadata field {ROUND!r} is {meta[ROUND]!r}, not a round number")
        found.append(KeptGlobal(int(meta[ROUND]), meta[DELIVERED] == "1", task, path))
    return sorted(found, key=lambda k: k.round)


def _state(kept: KeptGlobal) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(kept.path))
    except DAMAGED_MODEL_ERRORS as err:
        raise NodeAuditError(f"{kept.path}: damaged adapter weights ({reason(err)})") from err


# ---------------------------------------------------------------------------------------------- the audit


@dataclass(frozen=True)
class NodeAudit:
    """A node's audit of itself: the region's result, and how it was made. ``to_json`` is all that is written."""

    result: RegionAudit
    delivered_round: int
    served: str  # global | personalized | local_only
    served_reason: str
    references: list[str]
    bootstrap: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """Aggregate numbers only: counts, AUCs and their intervals, TPRs at low FPR; no record, score or ROC."""
        return {
            "format": FORMAT,
            "region": self.result.region,
            "delivered_round": self.delivered_round,
            "served": self.served,
            "served_reason": self.served_reason,
            "references": list(self.references),
            "bootstrap": self.bootstrap,
            "seconds": round(self.seconds, 1),
            **self.result.to_json(),
        }


def _delivered(kept: list[KeptGlobal], folder: Path) -> KeptGlobal:
    delivered = [k for k in kept if k.delivered]
    if not delivered:
        raise NodeAuditError(
            f"{folder}: holds no delivered global adapter; the node keeps it when the run's test evaluation "
            "reaches it (did the run finish with this node?)"
        )
    return delivered[-1]


def _records(region: Region, node: NodeSettings, task: ClientTask) -> Any:
    if not region.data.is_dir():
        raise NodeAuditError(f"{region.data}: no such folder (node config {keys.NODE_DATA_DIR})")
    if find_split(region.data, keys.TEST) is None:
        raise NodeAuditError(
            f"{region.data}: region {region.name} has no test split ({missing_split(region.data, keys.TEST)}); the "
            "audit's non-members are records the models never trained on, which only the test split is"
        )
    # the node's own pipeline (redaction by its policy, val carved as in training); no augmentation: augmented
    # copies are not records of people
    data = node.pipeline(
        region.name, region.data, task.labels, node.policy, augment=None, seed=task.seed, settings=task.data
    ).data
    if not data.test or not data.train:
        raise NodeAuditError(
            f"{region.data}: region {region.name} has {len(data.train)} training and {len(data.test)} test "
            "records; the audit needs both"
        )
    return audit_records(region.name, data.train, data.test, task.seed)


def _served(region: str, node: NodeSettings) -> tuple[Path | None, str]:
    """The adapter folder the node serves when its personalization chose another model than the global one
    (``personalized``, or ``local_only`` with ``personalize.consider_local_only``), else None; and why."""
    if node.personal_dir is None:
        return None, "the node does not personalize (no personal-dir)"
    folder = node.personal_dir / region
    report = folder / PERSONALIZED_REPORT
    if not report.is_file():
        return None, f"{report} is not there (personalization did not finish): the global adapter is audited as served"
    try:
        chosen = json.loads(report.read_text(encoding="utf-8")).get("chosen")
    except (OSError, ValueError, AttributeError) as err:
        raise NodeAuditError(f"{report}: not readable JSON with a 'chosen' field ({reason(err)})") from err
    if chosen not in (keys.PERSONALIZED, keys.LOCAL_ONLY):
        return None, f"{report}: chosen is {chosen!r}"
    served = folder / str(chosen)  # personalize_node keeps either next to personalized.json
    if not is_adapter(served):
        raise NodeAuditError(f"{served}: chosen in {report} but not a peft adapter folder (no adapter_config.json)")
    return served, f"{report}: chosen is {chosen!r}"


def audit_node(
    region: Region,
    node: NodeSettings,
    *,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    say: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
) -> NodeAudit:
    """Audit the adapters this node holds against its own data (see the module's docstring); writes nothing."""
    start = clock()
    if node.keep_globals is None:
        raise NodeAuditError(
            f"node config has no {keys.NODE_KEEP_GLOBALS}: the node kept no global adapter to audit (set it to an "
            "absolute folder before the run; docs/audit.md)"
        )
    kept = kept_globals(node.keep_globals, region.name)
    folder = region_folder(node.keep_globals, region.name)
    delivered = _delivered(kept, folder)
    task = delivered.task
    if region.name not in task.region_names:
        raise NodeAuditError(
            f"{delivered.path}: the run's regions are {', '.join(task.region_names)}, not {region.name}"
        )
    earlier = [k for k in kept if k.round < delivered.round and k.task.run_key == task.run_key]
    use_threads(node, task)
    records = _records(region, node, task)
    size = task.train.eval_batch_size
    state = _state(delivered)
    try:
        loaded = global_model(task, state)
    except (ValueError, *DAMAGED_MODEL_ERRORS) as err:
        raise NodeAuditError(f"{delivered.path}: does not load onto {task.model.base} ({reason(err)})") from err
    loaded.model.eval()
    predictor = Predictor(loaded.model, loaded.tokenizer, task.model.max_length)
    references = [f"{ROUND_PREFIX}{k.round:03d} (kept global adapter)" for k in earlier]
    say(
        f"node privacy audit of {region.name}: {len(records.members)} members / {len(records.nonmembers)} "
        f"non-members; global adapter: round {delivered.round}"
    )
    targets = {GLOBAL_MODEL: score(predictor, records.members, records.nonmembers, size)}
    refs: list[Scored] = []
    for k in earlier:
        swap_state(predictor, _state(k), k.path, NodeAuditError, _SHAPE)
        refs.append(score(predictor, records.members, records.nonmembers, size))
    if not refs:
        initial = adapter_state(build_model(task.model, task.lora, task.labels, seed=task.seed).model)
        swap_state(predictor, initial, "the initial global adapter", NodeAuditError, _SHAPE)
        refs.append(score(predictor, records.members, records.nonmembers, size))
        references = ["round 0: the initial global adapter, rebuilt from the run's seed (no earlier round kept)"]
    personal, why = _served(region.name, node)
    if personal is None:
        targets[SERVED_MODEL] = targets[GLOBAL_MODEL]
    else:
        try:
            personalized = load_peft_folder(personal, resolve_base(task.model.base), task.labels)
        except (AdapterFolderError, *DAMAGED_MODEL_ERRORS) as err:
            raise NodeAuditError(f"{personal}: the served adapter does not load ({reason(err)})") from err
        served = Predictor(personalized, loaded.tokenizer, task.model.max_length)
        targets[SERVED_MODEL] = score(served, records.members, records.nonmembers, size)
    result = audit_scored(
        region.name,
        targets,
        refs,
        bootstrap=bootstrap,
        seed=derive_seed(task.seed, "privacy-audit", region.name) % 2**32,
    )
    for name, attacks in result.results.items():
        ref = attacks[REFERENCE]
        say(f"  {name}: reference AUC {fmt_number(ref.auc)} [{fmt_number(ref.auc_low)}, {fmt_number(ref.auc_high)}]")
    return NodeAudit(
        result=result,
        delivered_round=delivered.round,
        served=personal.name if personal is not None else GLOBAL_MODEL,
        served_reason=why,
        references=references,
        bootstrap=bootstrap,
        seconds=clock() - start,
    )


# ---------------------------------------------------------------------------------------------- the report

MODEL_TEXT = {GLOBAL_MODEL: "global adapter (delivered)", SERVED_MODEL: "served model"}


def render_node_report(audit: NodeAudit) -> str:
    """The node's Markdown report: one table (model × attack), what was used, and what the numbers mean."""
    result = audit.result
    lines = [
        f"# Privacy audit of region {result.region}, on its own node",
        "",
        f"{result.members} members (training records) and {result.nonmembers} non-members (test records); the "
        f"global adapter delivered by the run is round {audit.delivered_round}'s; the node serves the "
        f"{audit.served} model ({audit.served_reason}).",
        "",
        f"References: {'; '.join(audit.references)}. Bootstrap: {audit.bootstrap} resamples; {audit.seconds:.0f} s.",
        "",
        *results_table(result, MODEL_TEXT),
    ]
    for fpr in LOW_FPRS:
        if result.nonmembers * fpr < 1.0 - 1e-9:
            lines += [
                "",
                f"TPR at {fpr * 100:g} % FPR: n/a, {result.nonmembers} non-members resolve FPRs down to "
                f"{100 / max(result.nonmembers, 1):.2g} % only (it needs at least {round(1 / fpr)}).",
            ]
            break
    lines += ["", "No ROC plot: its points are thresholds at individual records' scores, which stay on the node.", ""]
    return "\n".join(lines) + "\n" + MEANING_TEXT


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or that holds an earlier report, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise NodeAuditError(f"--out {out} is a file; the node audit writes a folder ({REPORT_JSON}, {REPORT_MD})")
    there = [out / name for name in (REPORT_JSON, REPORT_MD) if (out / name).exists()]
    if there and not overwrite:
        raise NodeAuditError(f"{there[0]}: exists; pass --overwrite to replace the earlier report")


def write_node_report(out: Path, audit: NodeAudit, *, overwrite: bool) -> tuple[Path, Path]:
    """Write ``node-privacy.json`` and ``node-privacy.md`` into ``out`` (each atomically); refuses an earlier
    report unless ``overwrite``."""
    check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / REPORT_JSON, audit.to_json()), write_atomic(out / REPORT_MD, render_node_report(audit))
