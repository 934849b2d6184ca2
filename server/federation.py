"""The federated run on the server: rounds of train + validate, early stopping, checkpoints, final test.

Written as a plain loop over the strategy's verbs (``configure_train``, ``aggregate_train_round``, …: Flower's
``aggregate_*`` that return the exchange's whole ``RoundLog``, see ``server.strategy.RoundAggregation``) rather than
``Strategy.start`` because it also stops early, keeps the best round, records every region every round, and can
resume: after each round the round's global adapter goes to ``checkpoints/round-NNN`` and then everything else
the loop knows goes to ``state.json``, so a restarted ServerApp continues where the last one stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file

from common import keys
from common.audit import SERVER, Ledger
from common.config import (
    OPTIMIZER_HYPERPARAMETERS,
    SGD_MOMENTUM,
    AggregationSettings,
    DataSettings,
    DpSettings,
    ModelSettings,
    RunConfig,
    TrainSettings,
    client_task,
)
from common.errors import EXIT_BAD_INPUT, FedlocaleError
from common.model import (
    LoadedModel,
    adapter_state,
    build_model,
    full_model_nbytes,
    load_adapter_state,
    save_adapter,
    state_nbytes,
)
from common.runfiles import (
    ADAPTER_DIR,
    AUDIT_DIR,
    CHECKPOINTS_DIR,
    FEDERATION_FILE,
    METRICS_FILE,
    SERVER_DIR,
    SERVER_OPTIMIZER_FILE,
    STATE_FILE,
    UPDATES_DIR,
    round_name,
    write_atomic,
    write_json,
)
from common.stopping import EarlyStopper as EarlyStopper  # re-exported: the federation's early stopping
from common.stopping import validated_rounds
from server.aggregate import OptimizerState, ServerOptimizer
from server.audit import LedgerStrategy
from server.secagg import SecureRoundError, secure_train_round
from server.strategy import NodeWaitTimeout, RegionFedAvg, RoundLog, RoundStrategy, to_numpy

log = logging.getLogger("fedlocale.server")

STATE_VERSION = 1
_METRIC_KEYS = {keys.ACCURACY: "accuracy", keys.MACRO_F1: "macro_f1", keys.LOSS: "loss"}

# Settings that may change between a stop and a resume: none of them changes what a finished round computed, so
# the resumed run still equals an uninterrupted one (more rounds, a longer timeout, fewer required regions).
# Everything else in the config (seed, data labels, model, LoRA, training, aggregation maths, early stopping) is
# fingerprinted. Region data folders are left out too: the server never reads them in deployment, and a moved
# folder is the same region.
RESUMABLE_CHANGES = (
    "name",
    "rounds",
    "baselines",
    "simulation",
    "personalize",  # runs after the federation, on the nodes (dual's rank is kept apart, see config_settings)
    "aggregation.round_timeout",
    "aggregation.node_timeout",
    "aggregation.min_clients",
    "audit",  # what the server keeps for auditors, not what it computes
    # which rounds are validated: the training never reads the scores, and the best round so far stays the best
    # (a run may go on validating more or less often than it began)
    "early_stopping.every",
)


class FederationError(FedlocaleError):
    """The federation cannot go on (too few regions replied, nodes never connected, a run cannot resume)."""


class ResumeError(FederationError):
    """The run folder's saved state cannot be continued with this config."""

    exit_code = EXIT_BAD_INPUT


@dataclass
class FederationResult:
    """A finished federation: per-round records, the chosen round and its test results."""

    rounds: list[dict[str, Any]]
    best_round: int
    stopped_early: bool
    test: dict[str, dict[str, float]]
    adapter_bytes: int
    full_model_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view."""
        return {
            "rounds": self.rounds,
            "best_round": self.best_round,
            "stopped_early": self.stopped_early,
            "test": self.test,
            "adapter_bytes": self.adapter_bytes,
            "full_model_bytes": self.full_model_bytes,
            "seconds": self.seconds,
        }


@dataclass
class RunState:
    """What ``state.json`` holds after each round: enough to continue with the next one.

    The global adapters themselves stay in ``checkpoints/round-NNN`` (the last round's and the best round's are
    read back on resume), and so does the server optimizer's state after each round, which ``optimizer_state``
    names with its hash (``save_optimizer_state``).
    """

    completed_round: int
    rounds: list[dict[str, Any]]
    best_round: int
    best_value: float | None
    seconds: float
    fingerprint: str
    settings: dict[str, Any]
    # which federation this is, kept across resumes; sent in every task so that a node can tell what it kept
    # between rounds of this run from an earlier run's (states written before it existed have none)
    run_key: str = ""
    # {"file": path in the run folder, "sha256": of its bytes, "step": steps taken, "optimizer": name and
    # hyperparameters}; states written before server optimizers existed have none (their runs are fedavg)
    optimizer_state: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view, with a format version."""
        return {"version": STATE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, raw: Any, source: Path) -> RunState:
        """Parse a state file's content; anything inconsistent is a ResumeError naming the file."""
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION or set(required) - set(raw):
            raise ResumeError(f"cannot resume: {source} is not a version-{STATE_VERSION} state file of this program")
        wrong = [
            f"{name}: {raw[name]!r}"
            for name, types in _STATE_TYPES.items()
            if name in raw and (not isinstance(raw[name], types) or isinstance(raw[name], bool))
        ]
        if wrong:
            raise ResumeError(f"cannot resume: {source} has values of the wrong type: {'; '.join(wrong)}")
        state = cls(**{f.name: raw[f.name] for f in fields if f.name in raw})
        numbered = [r.get("round") if isinstance(r, dict) else None for r in state.rounds]
        if state.completed_round < 1 or numbered != list(range(1, state.completed_round + 1)):
            raise ResumeError(
                f"cannot resume: {source} says {state.completed_round} round(s) finished but records rounds {numbered}"
            )
        # 0 only when no round was validated yet (early_stopping.every above the rounds finished): no best value
        lowest = 0 if state.best_value is None else 1
        if not lowest <= state.best_round <= state.completed_round:
            raise ResumeError(
                f"cannot resume: {source} says round {state.best_round} was the best of {state.completed_round} "
                "finished round(s)"
            )
        return state


# what each field of a state file must hold (a hand-edited or damaged file is refused, not a traceback later)
_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "completed_round": int,
    "rounds": list,
    "best_round": int,
    "best_value": (int, float, type(None)),
    "seconds": (int, float),
    "fingerprint": str,
    "settings": dict,
    "run_key": str,
    "optimizer_state": (dict, type(None)),
}


LATER_DEFAULTS: dict[str, Any] = {
    "lora.layers": None,  # LoRA in every layer, as before the setting existed
    "data.val_fraction": DataSettings().val_fraction,
    "train.local_steps": TrainSettings().local_steps,
    "train.prox_mu": TrainSettings().prox_mu,
    "train.logit_adjust": TrainSettings().logit_adjust,
    "train.head": TrainSettings().head,
    "train.optimizer": TrainSettings().optimizer,
    "train.lr_schedule": TrainSettings().lr_schedule,
    "aggregation.lora": AggregationSettings().lora,
    "model.pooling": ModelSettings.pooling,  # a class default: ModelSettings() would check that minilm is installed
    "dp.train": DpSettings().train,
    "dp.optimizer": DpSettings().optimizer,
    "dp.lr": DpSettings().lr,
    "dp.batch_size": DpSettings().batch_size,
}


def config_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings that decide what every round computes, as flat ``dotted.key → value`` plain data."""
    raw = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    flat = _flatten(raw)
    flat["regions"] = list(cfg.region_names)  # the order matters: it is how replies name their region
    kept = {k: v for k, v in flat.items() if not any(k == p or k.startswith(f"{p}.") for p in RESUMABLE_CHANGES)}
    # the server optimizer as it steps: its hyperparameters with the defaults filled in, only those it reads.
    # fedavg is named by its server_lr alone, as before optimizers existed, so that earlier runs still resume
    for name in {"optimizer", *(k for params in OPTIMIZER_HYPERPARAMETERS.values() for k in params)}:
        kept.pop(f"aggregation.{name}", None)
    if cfg.aggregation.optimizer != "fedavg":
        kept["aggregation.optimizer"] = cfg.aggregation.optimizer
    kept.update({f"aggregation.{k}": v for k, v in cfg.aggregation.optimizer_settings().items()})
    # personalization runs after the rounds, except dual: its nodes train a personal LoRA in them (added only
    # then, so that the fingerprints of other runs stay what they were)
    if cfg.personalize.mode == "dual":
        kept["personal_lora_rank"] = cfg.personalize.local_r
        if cfg.personalize.dual_train != "joint":  # apart: the nodes send other updates (left out at the default)
            kept["personal_lora_training"] = cfg.personalize.dual_train
    # a learning-rate schedule over the rounds (train.lr_schedule) gives each round a rate that depends on how
    # many rounds there are: a resume with more or fewer rounds would go on at another plan's rates, which is
    # the uninterrupted run of neither plan. Then rounds is fingerprinted too (at constant it is not read)
    if cfg.train.lr_schedule != "constant":
        kept["rounds"] = cfg.rounds
    kept = _one_spelling(kept)
    # settings that came later: at their defaults they are left out, so that runs started before them still resume
    for key, default in LATER_DEFAULTS.items():
        if key in kept and kept[key] == default:
            del kept[key]
    # so did dp (DP-SGD's settings, used only by nodes whose policy requires DP): left out at its defaults
    if cfg.dp == DpSettings():
        kept = {k: v for k, v in kept.items() if not k.startswith("dp.")}
    # so did secure aggregation: left out while off, so that runs started before it still resume
    if not cfg.aggregation.secure.enabled:
        kept = {k: v for k, v in kept.items() if not k.startswith("aggregation.secure.")}
    return kept


def _one_spelling(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the spellings of one training made one: SGD's momentum written at its default trains as
    null does, so both are left out (also applied to a stopped run's recorded settings, which may predate this)."""
    # (null also stands for a run started before train.momentum existed: left out, like LATER_DEFAULTS)
    if settings.get("train.momentum", SGD_MOMENTUM) in (SGD_MOMENTUM, None):
        return {k: v for k, v in settings.items() if k != "train.momentum"}
    return settings


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of ``config_settings``; equal settings give equal fingerprints in every process."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_state(out_dir: Path) -> RunState | None:
    """The state a run left in ``out_dir`` after its last finished round, or None when there is none."""
    path = out_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResumeError(f"cannot resume: {path} cannot be read ({err})") from err
    return RunState.from_json(raw, path)


def write_state(out_dir: Path, state: RunState) -> None:
    """Replace ``state.json`` atomically: a crash leaves the old file or the new one, never half of one."""
    write_json(out_dir / STATE_FILE, state.to_json(), indent=1)


def check_resumable(state: RunState, cfg: RunConfig, out_dir: Path) -> None:
    """Refuse to continue ``state`` under a config that would not have produced its rounds."""
    settings = config_settings(cfg)
    started = _one_spelling(state.settings)
    if "rounds" in settings and "rounds" not in started:
        # started under a schedule before rounds was fingerprinted with it: its plan was not recorded, so it
        # resumes as it did then (the rounds it runs from now on record it)
        del settings["rounds"]
    now = fingerprint(settings)
    if now != state.fingerprint and now != fingerprint(started):
        changed = [
            f"{k}: {started.get(k, '(absent)')!r} when started, {settings.get(k, '(absent)')!r} now"
            for k in sorted(set(settings) | set(started))
            if settings.get(k) != started.get(k)
        ]
        raise ResumeError(
            f"cannot resume {out_dir}: the config differs from the one the run started with (fingerprint "
            f"{state.fingerprint} then, {now} now): {'; '.join(changed) or 'unknown change'}. Only "
            f"{', '.join(RESUMABLE_CHANGES)} may change (rounds not under a train.lr_schedule other than "
            "constant); restore the config, or start afresh without resume."
        )
    if state.completed_round > cfg.rounds:
        raise ResumeError(
            f"cannot resume {out_dir}: {state.completed_round} rounds already finished but rounds is {cfg.rounds}; "
            f"set rounds to {state.completed_round} or more"
        )


def _region_metrics(round_log: RoundLog) -> dict[str, dict[str, float]]:
    return {
        r.region: {
            **{name: r.metrics[k] for k, name in _METRIC_KEYS.items() if k in r.metrics},
            "num_examples": r.num_examples,
        }
        for r in round_log.replies
    }


class MetricsWriter:
    """Appends one JSON line per round × region × split to ``metrics.jsonl``, flushed each round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def write(self, server_round: int, split: str, per_region: dict[str, dict[str, float]]) -> None:
        """Write the lines of one split of one round."""
        with self.path.open("a", encoding="utf-8") as fh:
            for region, values in per_region.items():
                fh.write(json.dumps({"round": server_round, "region": region, "split": split, **values}) + "\n")

    def write_round(self, record: dict[str, Any]) -> None:
        """Write a round record's train and validation lines (a region without validation data has none)."""
        self.write(record["round"], keys.TRAIN, record["train"])
        self.write(record["round"], keys.VAL, {k: v for k, v in record["val"].items() if v["num_examples"]})


def _send(grid: Grid, messages: Any, timeout: float) -> list[Any]:
    return list(grid.send_and_receive(messages=list(messages), timeout=timeout))


def _task_config(cfg: RunConfig, server_round: int, run_key: str, split: str | None = None) -> ConfigRecord:
    record = ConfigRecord({keys.TASK: client_task(cfg, server_round, run_key).to_json()})
    if split is not None:
        record[keys.SPLIT] = split
    return record


def _describe_rejected(rejected: list[dict[str, str | None]]) -> str:
    return "; ".join(f"{r['region'] or 'node ' + str(r['node'])}: {r['reason']}" for r in rejected) or "none"


def _train_round(
    grid: Grid, strategy: RoundStrategy, cfg: RunConfig, server_round: int, arrays: ArrayRecord, run_key: str
) -> tuple[ArrayRecord, dict[str, Any], OptimizerState]:
    timeout = cfg.aggregation.round_timeout
    config = _task_config(cfg, server_round, run_key)
    if cfg.aggregation.secure.enabled:
        # four message exchanges; the strategy receives only the unmasked sum (server.secagg)
        try:
            train = secure_train_round(grid, strategy, cfg, server_round, arrays, config)
        except SecureRoundError as err:
            raise FederationError(str(err)) from err
    else:
        replies = _send(grid, strategy.configure_train(server_round, arrays, config, grid), timeout)
        # the whole RoundLog, not Flower's aggregate_train pair (its arrays and metrics): the round record is per
        # region (who took part, who was rejected and why, each region's loss), which no MetricRecord can hold
        train = strategy.aggregate_train_round(server_round, replies)
    participants = train.participants
    missing = [n for n in cfg.region_names if n not in participants]
    if len(participants) < cfg.aggregation.min_clients or train.optimizer_state is None:
        raise FederationError(
            f"{len(participants)} region(s) replied, at least {cfg.aggregation.min_clients} needed; "
            f"missing: {', '.join(missing) or 'none'}; rejected: {_describe_rejected(train.rejected)}"
        )
    record = {
        "round": server_round,
        "participants": participants,
        "missing": missing,
        "rejected": train.rejected,
        "bytes_up": train.bytes_up if train.bytes_up is not None else sum(r.bytes_up for r in train.replies),
        "bytes_down": train.bytes_down,
        # per region in a plain round; a secure round knows only the sum, so its train lines are the overall ones
        # (and, below, each DP region's privacy spent)
        "train": {
            r.region: {"loss": r.metrics[keys.TRAIN_LOSS], "num_examples": r.num_examples, **_dp_spent(r.metrics)}
            for r in train.replies
        },
    }
    if train.secure is not None and train.metrics is not None:
        overall = {"loss": float(train.metrics[keys.TRAIN_LOSS])}  # type: ignore[arg-type]
        if keys.NUM_EXAMPLES in train.metrics:
            overall["num_examples"] = int(train.metrics[keys.NUM_EXAMPLES])  # type: ignore[arg-type]
        record["train_overall"] = overall
        record["secure"] = {"threshold": train.secure.params.threshold, "dropped": list(train.secure.dropped)}
        # a DP region's privacy spent travels beside its masked upload: its train line holds that alone
        record["train"] = {region: _dp_spent(spent) for region, spent in train.secure.dp.items()}
    return train.arrays or arrays, record, train.optimizer_state


def _dp_spent(metrics: dict[str, float]) -> dict[str, float]:
    """The privacy a DP node reports spent so far (its policy's require_dp), as the run folder spells it."""
    return {name.replace("-", "_"): metrics[name] for name in keys.DP_METRICS if name in metrics}


def _evaluate(
    grid: Grid,
    strategy: RoundStrategy,
    cfg: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
    split: str,
    run_key: str,
    last: tuple[int, ArrayRecord] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, float], int]:
    """Per-region metrics, their example-weighted means, and the bytes sent out for the evaluation."""
    config = _task_config(cfg, server_round, run_key, split)
    extra: dict[str, ArrayRecord] = {}
    if last is not None:
        # beside the adapter evaluated: the last round's, for nodes that personalize from it (personalize.start)
        config[keys.LAST_ROUND] = last[0]
        extra[keys.LAST_ARRAYS] = last[1]
    messages = strategy.configure_evaluate(server_round, arrays, config, grid, extra)
    result = strategy.aggregate_evaluate_round(server_round, _send(grid, messages, cfg.aggregation.round_timeout))
    overall = result.metrics
    named = {name: float(overall[k]) for k, name in _METRIC_KEYS.items()} if overall else {}  # type: ignore[arg-type]
    return _region_metrics(result), named, result.bytes_down


def _run_round(
    grid: Grid,
    strategy: RoundStrategy,
    cfg: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
    run_key: str,
    validate: bool = True,
) -> tuple[ArrayRecord, dict[str, Any], OptimizerState]:
    started = time.perf_counter()
    arrays, record, optimizer_state = _train_round(grid, strategy, cfg, server_round, arrays, run_key)
    # a round not validated (early_stopping.every) has no scores
    record["val"], record["val_overall"], record["validated"] = {}, {}, validate
    if validate:
        record["val"], record["val_overall"], bytes_down = _evaluate(
            grid, strategy, cfg, server_round, arrays, keys.VAL, run_key
        )
        record["bytes_down"] += bytes_down
    record["seconds"] = time.perf_counter() - started  # wall time of train + validation, for the benchmarks
    return arrays, record, optimizer_state


def checkpoint_dir(out_dir: Path, server_round: int) -> Path:
    """Where the global adapter after ``server_round`` is saved (peft ``save_pretrained`` format)."""
    return out_dir / CHECKPOINTS_DIR / round_name(server_round)


@contextlib.contextmanager
def _naming_checkpoint(what: str, out_dir: Path, completed: int) -> Iterator[None]:
    """Re-raise a failure of the federation as a FederationError that says where the run can resume from."""
    try:
        yield
    except (FederationError, NodeWaitTimeout) as err:
        where = (
            f"the last checkpoint is {checkpoint_dir(out_dir, completed)} (restart with resume=true to go on from it)"
            if completed
            else "no round had finished, so there is no checkpoint yet"
        )
        raise FederationError(f"{what}: {err}; {where}") from err


def _make_strategy(cfg: RunConfig, out_dir: Path, optimizer_state: OptimizerState) -> RoundStrategy:
    agg = cfg.aggregation
    strategy = RegionFedAvg(
        cfg.region_names,
        method=agg.method,
        optimizer=ServerOptimizer.from_settings(agg),
        fraction_train=agg.fraction_train,
        min_clients=agg.min_clients,
        seed=cfg.seed,
        node_timeout=agg.node_timeout,
        optimizer_state=optimizer_state,
        lora=agg.lora,
    )
    audit = out_dir / AUDIT_DIR
    # a secure run keeps each round's unmasked sum there (audit verify recomputes the round from it)
    keep = audit / UPDATES_DIR if cfg.audit.keep_updates or agg.secure.enabled else None
    return LedgerStrategy(strategy, Ledger.in_folder(audit / SERVER_DIR, SERVER), keep_dir=keep)


def run_rounds(
    grid: Grid,
    cfg: RunConfig,
    loaded: LoadedModel,
    out_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume_from: RunState | None = None,
    run_key: str = "",
) -> FederationResult:
    """Run the federation for ``cfg`` from the adapter in ``loaded``; write metrics, checkpoints, the adapter.
    Every task sent carries ``run_key`` (see ``RunState``).

    With ``resume_from`` (checked by ``check_resumable``) the rounds it records are kept, their metrics lines are
    written again, and the loop goes on after its last round from that round's checkpoint. ``on_round`` is called
    for the rounds run here only.
    """
    started = time.perf_counter()
    stop = cfg.early_stopping
    stopper = EarlyStopper(stop.patience, higher_is_better=stop.metric != "loss", min_delta=stop.min_delta)
    writer = MetricsWriter(out_dir / METRICS_FILE)
    settings = config_settings(cfg)
    arrays = best = ArrayRecord(adapter_state(loaded.model))
    rounds: list[dict[str, Any]] = []
    seconds_before = 0.0
    optimizer = ServerOptimizer.from_settings(cfg.aggregation)
    optimizer_state = OptimizerState()
    optimizer_ref: dict[str, Any] | None = None
    if resume_from is not None:
        rounds = list(resume_from.rounds)
        stopper.best_round, stopper.best_value = resume_from.best_round, resume_from.best_value
        seconds_before = resume_from.seconds
        for record in rounds:
            writer.write_round(record)
        arrays = _load_checkpoint(loaded, out_dir, resume_from.completed_round)
        best = _load_checkpoint(loaded, out_dir, resume_from.best_round) if resume_from.best_round else arrays
        optimizer_state = load_optimizer_state(resume_from, optimizer, out_dir, to_numpy(arrays))
        optimizer_ref = resume_from.optimizer_state
    strategy = _make_strategy(cfg, out_dir, optimizer_state)
    server_round = len(rounds)
    should_stop = bool(rounds) and stopper.exhausted(server_round)
    if rounds and (should_stop or server_round == cfg.rounds):
        log.info("the run had finished after round %d; only its final test evaluation runs again", server_round)
    validated = validated_rounds(cfg.rounds, stop.every)
    while not should_stop and server_round < cfg.rounds:
        server_round += 1
        validate = server_round in validated
        with _naming_checkpoint(f"round {server_round}", out_dir, server_round - 1):
            arrays, record, optimizer_state = _run_round(grid, strategy, cfg, server_round, arrays, run_key, validate)
        writer.write_round(record)
        if validate:  # a round not validated is never the best one, nor a round that brought nothing
            should_stop = stopper.update(server_round, record["val_overall"].get(stop.metric))
        if stopper.best_round == server_round:
            best = arrays
        # the checkpoint first: a crash before the state is written redoes this round, never skips it
        _save_checkpoint(loaded, arrays, checkpoint_dir(out_dir, server_round))
        optimizer_ref = save_optimizer_state(out_dir, server_round, optimizer, optimizer_state)
        rounds.append(record)
        state = RunState(
            completed_round=server_round,
            rounds=rounds,
            best_round=stopper.best_round,
            best_value=stopper.best_value,
            seconds=seconds_before + time.perf_counter() - started,
            fingerprint=fingerprint(settings),
            settings=settings,
            run_key=run_key,
            optimizer_state=optimizer_ref,
        )
        write_state(out_dir, state)
        if on_round is not None:
            on_round(record)
    if stopper.best_round == 0:
        # no round was validated: a resumed run whose rounds were cut to those it had finished. The newest model
        # is the best known, as EarlyStopper keeps it when there is nothing to compare
        stopper.update(server_round, None)
        best = arrays
    stopped_early = should_stop and server_round < cfg.rounds
    if stopped_early:
        log.info(
            "early stop after round %d: no better %s since round %d", server_round, stop.metric, stopper.best_round
        )
    with _naming_checkpoint(f"test evaluation of round {stopper.best_round}", out_dir, server_round):
        last = (server_round, arrays) if server_round != stopper.best_round else None
        test, _, _ = _evaluate(grid, strategy, cfg, stopper.best_round, best, keys.TEST, run_key, last)
    writer.write(stopper.best_round, keys.TEST, test)
    load_adapter_state(loaded.model, best.to_torch_state_dict())
    save_adapter(loaded, out_dir / ADAPTER_DIR)
    state_dict = adapter_state(loaded.model)
    return FederationResult(
        rounds=rounds,
        best_round=stopper.best_round,
        stopped_early=stopped_early,
        test=test,
        adapter_bytes=state_nbytes(state_dict),
        full_model_bytes=full_model_nbytes(loaded.model),
        seconds=seconds_before + time.perf_counter() - started,
    )


def _save_checkpoint(loaded: LoadedModel, arrays: ArrayRecord, folder: Path) -> None:
    load_adapter_state(loaded.model, arrays.to_torch_state_dict())
    loaded.model.save_pretrained(str(folder))


def save_optimizer_state(
    out_dir: Path, server_round: int, optimizer: ServerOptimizer, state: OptimizerState
) -> dict[str, Any]:
    """Write the optimizer's ``state`` after ``server_round`` beside that round's checkpoint (safetensors,
    atomically); the reference ``RunState.optimizer_state`` keeps: the file, its hash, the step, the optimizer."""
    path = checkpoint_dir(out_dir, server_round) / SERVER_OPTIMIZER_FILE
    # np.asarray, not ascontiguousarray: that one makes a 0-d tensor 1-d
    tensors = {k: np.asarray(state.arrays[k], order="C") for k in sorted(state.arrays)}
    record = optimizer.to_record()
    data = safetensors.numpy.save(tensors, metadata={"optimizer": json.dumps(record), "step": str(state.step)})
    write_atomic(path, data)
    return {
        "file": path.relative_to(out_dir).as_posix(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "step": state.step,
        "optimizer": record,
    }


def load_optimizer_state(
    state: RunState, optimizer: ServerOptimizer, out_dir: Path, reference: dict[str, np.ndarray]
) -> OptimizerState:
    """The optimizer state after ``state``'s last round, read back from the file its reference names; a
    ResumeError when it is missing, changed, of another optimizer, or does not fit the adapter ``reference``."""
    ref = state.optimizer_state
    cannot = f"cannot resume {out_dir}:"
    if ref is None:
        if optimizer.name == "fedavg":
            # a state written before server optimizers existed: its run was fedavg, which keeps nothing
            return OptimizerState(step=state.completed_round)
        raise ResumeError(
            f"{cannot} {STATE_FILE} records no server optimizer state, and {optimizer.name} cannot go on without "
            "its moments; start afresh without resume"
        )
    if not isinstance(ref, dict) or not {"file", "sha256", "step", "optimizer"} <= set(ref):
        raise ResumeError(f"{cannot} {STATE_FILE}: optimizer_state is not a reference this program writes: {ref!r}")
    if ref["optimizer"] != optimizer.to_record():
        raise ResumeError(
            f"{cannot} its server optimizer state is of {ref['optimizer']}, the config asks for {optimizer.to_record()}"
        )
    if ref["step"] != state.completed_round:
        raise ResumeError(
            f"{cannot} its server optimizer state took {ref['step']} step(s), but {state.completed_round} round(s) "
            "finished"
        )
    path = out_dir / str(ref["file"])
    if not path.is_file():
        raise ResumeError(f"{cannot} {STATE_FILE} names the server optimizer state {path}, which is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise ResumeError(
            f"{cannot} {path} does not hash to the sha256 {STATE_FILE} records for it (changed or damaged since)"
        )
    try:
        arrays = safetensors.numpy.load(data)
    except SafetensorError as err:
        raise ResumeError(f"{cannot} {path} is not a readable safetensors file ({err})") from err
    loaded = OptimizerState(int(ref["step"]), arrays)
    problem = optimizer.state_problem(loaded, reference)
    if problem:
        raise ResumeError(f"{cannot} {path}: {problem}")
    return loaded


def _load_checkpoint(loaded: LoadedModel, out_dir: Path, server_round: int) -> ArrayRecord:
    path = checkpoint_dir(out_dir, server_round) / SAFETENSORS_WEIGHTS_NAME
    if not path.is_file():
        raise ResumeError(
            f"cannot resume {out_dir}: {STATE_FILE} says round {server_round} finished but {path} is missing"
        )
    load_adapter_state(loaded.model, load_file(str(path)))
    # read back through the model so that names and order are exactly those of a run that never stopped
    return ArrayRecord(adapter_state(loaded.model))


def _resume_state(cfg: RunConfig, out_dir: Path) -> RunState | None:
    state = read_state(out_dir)
    if state is None:
        log.info("resume: no %s in %s, so the run starts at round 1", STATE_FILE, out_dir)
        return None
    check_resumable(state, cfg, out_dir)
    log.info("resume: %s finished %d of %d rounds; going on from there", out_dir, state.completed_round, cfg.rounds)
    return state


def federate(
    grid: Grid,
    cfg: RunConfig,
    out_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    new_key: Callable[[], str] = lambda: secrets.token_hex(8),
) -> FederationResult:
    """Build the initial global model for ``cfg``, run every round, and write ``federation.json``.

    A run started afresh gets a run key from ``new_key``; a resumed one keeps the key its state recorded.

    With ``resume`` and a ``state.json`` in ``out_dir``, the run goes on after the last round it records (the
    config must match, see ``check_resumable``); a run that had finished only repeats its final test evaluation,
    which also rewrites ``adapter/`` and ``federation.json``. With ``resume`` and no state the run starts afresh;
    without ``resume`` it always does, dropping any earlier state.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _resume_state(cfg, out_dir) if resume else None
    if state is None:
        # an older run's state must never be continued from this run's checkpoints
        (out_dir / STATE_FILE).unlink(missing_ok=True)
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    run_key = state.run_key if state is not None and state.run_key else new_key()
    result = run_rounds(grid, cfg, loaded, out_dir, on_round, state, run_key)
    write_json(out_dir / FEDERATION_FILE, result.to_json())
    return result
