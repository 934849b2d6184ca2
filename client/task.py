"""What a region node does for one message, as plain functions of typed inputs (no Flower types here)."""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.dp import DpRefused, dp_conflict, dp_personalizing, dp_training, personalization_record, personalizing
from client.dp_secret import inputs_digest, simulated_secret
from client.local_only import train_local_only
from client.personal import (
    PersonalStateError,
    Slices,
    clear_personal,
    init_personal,
    join,
    latest_personal,
    personal_folder,
    personal_tag,
    save_personal,
    split,
    widen,
)
from client.personalize import PERSONALIZED, Start, dp_steps, personalize_region
from client.pipeline import NodeData, node_data
from client.tokens import Encoded, encode_cached
from client.train import (
    EvalResult,
    TrainResult,
    freeze,
    plan_steps,
    predict_proba_encoded,
    round_lr_scale,
    rows_kept,
    scores,
    train_encoded,
)
from common import keys
from common.augment_settings import AugmentSettings
from common.config import ClientTask, PersonalizeSettings, Region, load_config, load_yaml
from common.data import Example
from common.errors import InputError
from common.model import LORA_A, LORA_B, LoadedModel, adapter_state, build_model, load_adapter_state, save_adapter
from common.policy import RegionPolicy, load_policy
from common.runfiles import KEPT_CHECKPOINT, PERSONALIZE_ERROR_FILE, PERSONALIZED_REPORT, write_json
from common.seeds import derive_seed

log = logging.getLogger("fedlocale.node")
DEFAULT_KEEP_GLOBALS = 3  # rounds of received global adapters a node with keep-globals keeps (besides the delivered)


class NodeConfigError(InputError):
    """The node config is unusable: no region, or a bad setting (the message names the key and the value)."""


@dataclass(frozen=True)
class NodeSettings:
    """What the node's operator set for this machine in ``--node-config``, besides the region."""

    cache_dir: Path | None = None  # tokenised-data cache on the node's own disk; None: no cache
    threads: int | None = None  # torch threads; None: the run config's train.threads, else torch's default
    policy: RegionPolicy | None = None  # the region's residency policy; None: no policy (nothing redacted)
    audit_dir: Path | None = None  # the node's ledger and its signing key; None: no ledger
    augment: AugmentSettings | None = None  # training-data augmentation on this node; None: none
    # personalization of the final global model on this node, kept in personal_dir; None: none
    personalize: PersonalizeSettings | None = None
    personal_dir: Path | None = None
    # personalize mode dual: rank of the region's own LoRA, trained alongside the global adapter in every round
    # and kept in personal_dir (client.personal); None: the node trains the global adapter only
    personal_rank: int | None = None
    # personalize.dual_train apart: the global adapter trains alone and the personal LoRA after it (train_dual)
    personal_apart: bool = False
    # the global adapters the node receives, kept in keep_globals/REGION for its own privacy audit
    # (client.node_audit): the newest keep_globals_count rounds and the one the run delivered; None: none kept
    keep_globals: Path | None = None
    keep_globals_count: int = DEFAULT_KEEP_GLOBALS
    # the personalization that is run for this node after the rounds elsewhere (a simulation personalizes the
    # finished run, simulations.personalize): with personalize.dp its DP-SGD steps are part of the node's privacy
    # plan (client.dp) as a deployed node's own ``personalize`` is; None: none
    personalize_plan: PersonalizeSettings | None = None
    # the node's data pipeline (``client.pipeline.node_data``, or a wrapper of it such as the simulation's
    # canaries, ``client.canaries.with_canaries``): what ``load_data`` reads the region through
    pipeline: Callable[..., NodeData] = node_data
    # the 32 secret bytes that seed DP-SGD's sampling and noise (client.dp_secret); None: the node's own secret
    # file in audit_dir, made on first use. Only a simulation (derived from the run's seed) or a test sets it
    dp_secret: bytes | None = field(default=None, repr=False)


def node_settings(node_config: Mapping[str, object]) -> NodeSettings:
    """Parse and check the node's ``cache-dir``, ``threads``, ``policy``, ``audit-dir``, ``augment``,
    ``personalize``, ``personal-dir``, ``keep-globals`` and ``keep-globals-count``; all are optional
    (``personalize`` needs ``personal-dir``, ``keep-globals-count`` needs ``keep-globals``).

    A policy file that does not load stops the node (``ConfigError`` naming file and line): running without the
    rules the operator meant to apply would be worse than not running. So does a key it does not know
    (``keys.NODE_KEYS``): a mistyped ``policy`` would otherwise run the node with no policy at all.
    """
    unknown = sorted(str(k) for k in node_config if k not in keys.NODE_KEYS)
    if unknown:
        raise NodeConfigError(
            "node config: unknown key(s) "
            + ", ".join(f"{k!r}{_did_you_mean(k, keys.NODE_KEYS)}" for k in unknown)
            + f"; a node config may hold {', '.join(keys.NODE_KEYS)}"
        )
    policy = _absolute(node_config.get(keys.NODE_POLICY), keys.NODE_POLICY, "a policy file")
    augment = _absolute(node_config.get(keys.NODE_AUGMENT), keys.NODE_AUGMENT, "an augmentation settings file")
    settings = NodeSettings(
        cache_dir=_absolute(node_config.get(keys.NODE_CACHE_DIR), keys.NODE_CACHE_DIR, "a folder"),
        threads=_threads(node_config.get(keys.NODE_THREADS)),
        policy=load_policy(policy) if policy else None,
        audit_dir=_absolute(node_config.get(keys.NODE_AUDIT_DIR), keys.NODE_AUDIT_DIR, "a folder"),
        augment=load_yaml(augment, AugmentSettings) if augment else None,
        **_personalization(node_config),
        **_kept_globals(node_config),
    )
    wants_dp = settings.personalize is not None and settings.personalize.dp
    if wants_dp and (settings.policy is None or settings.policy.require_dp is None):
        # asked for a guarantee with no (epsilon, delta) to give: training plainly would mislead the operator
        raise NodeConfigError(
            f"node config {keys.NODE_PERSONALIZE}: dp: true, but this node's policy sets no require_dp: there "
            "is no privacy budget to personalize under; set require_dp in the policy or drop dp"
        )
    return settings


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def planned_personalization(node: NodeSettings) -> PersonalizeSettings | None:
    """The personalization that follows this node's rounds: its own (deployed) or the simulation's."""
    return node.personalize if node.personalize is not None else node.personalize_plan


def _kept_globals(node_config: Mapping[str, object]) -> dict[str, Any]:
    folder = _absolute(node_config.get(keys.NODE_KEEP_GLOBALS), keys.NODE_KEEP_GLOBALS, "a folder")
    count = node_config.get(keys.NODE_KEEP_GLOBALS_COUNT)
    if count is None:
        return {"keep_globals": folder}
    if folder is None:
        raise NodeConfigError(
            f"node config {keys.NODE_KEEP_GLOBALS_COUNT} is set but {keys.NODE_KEEP_GLOBALS} is not "
            "(the folder to keep them in)"
        )
    number = _whole(count, keys.NODE_KEEP_GLOBALS_COUNT)
    return {"keep_globals": folder, "keep_globals_count": number}


def _personalization(node_config: Mapping[str, object]) -> dict[str, Any]:
    path = _absolute(node_config.get(keys.NODE_PERSONALIZE), keys.NODE_PERSONALIZE, "a personalization settings file")
    folder = _absolute(node_config.get(keys.NODE_PERSONAL_DIR), keys.NODE_PERSONAL_DIR, "a folder")
    if path is None and folder is None:
        return {}
    if path is None or folder is None:
        given = keys.NODE_PERSONAL_DIR if path is None else keys.NODE_PERSONALIZE
        raise NodeConfigError(
            f"node config {keys.NODE_PERSONALIZE} and {keys.NODE_PERSONAL_DIR} go together: the settings and "
            f"where the personalized model stays (got only {given})"
        )
    settings = load_yaml(path, PersonalizeSettings)
    if settings.mode == "none":
        raise NodeConfigError(
            f"{path}: mode: is 'none'; set head, continue, local, probe or dual (or drop {keys.NODE_PERSONALIZE})"
        )
    dual = settings.mode == "dual"
    return {
        "personalize": settings,
        "personal_dir": folder,
        "personal_rank": settings.local_r if dual else None,
        "personal_apart": dual and settings.dual_train == "apart",
    }


def simulated_node(
    region: Region,
    node_config: Mapping[str, object],
    audit_root: Path | None,
    personal: Personal | None = None,
    cache_root: Path | None = None,
    canaries: int = 0,
    personalize_plan: PersonalizeSettings | None = None,
    run_seed: int | None = None,
) -> NodeSettings:
    """A simulated node's settings: its operator's choices come from the run config's region entry;
    ``personal`` is where its personal LoRA stays when the run personalizes with mode dual, ``cache_root`` the
    folder of its token cache (``cache_root/REGION``) unless its node config names one; ``canaries``
    synthetic secrets are inserted into its training data (``audit.canaries``, for the privacy audit);
    ``personalize_plan`` the run's personalization after the rounds (its DP-SGD steps are planned for);
    ``run_seed`` the run's seed, from which its DP secret is derived (``client.dp_secret.simulated_secret``: a
    simulation-only convenience that keeps simulations reproducible; None: a secret file in its audit dir, as a
    deployed node has)."""
    from client.canaries import with_canaries

    base = node_settings(node_config)
    return replace(
        base,
        cache_dir=base.cache_dir or (cache_root / region.name if cache_root else None),
        policy=load_policy(region.policy) if region.policy else None,
        audit_dir=audit_root / region.name if audit_root else None,
        augment=region.augment,
        personal_dir=personal.root if personal else base.personal_dir,
        personal_rank=personal.rank if personal else base.personal_rank,
        personal_apart=personal.apart if personal else base.personal_apart,
        pipeline=with_canaries(base.pipeline, canaries) if canaries else base.pipeline,
        personalize_plan=personalize_plan,
        dp_secret=simulated_secret(run_seed, region.name) if run_seed is not None else None,
    )


@dataclass(frozen=True)
class Personal:
    """Where simulated nodes keep their personal LoRA (``root`` stands in for their personal-dir), its rank and
    whether it trains apart from the global adapter (personalize mode dual, ``dual_train``)."""

    root: Path
    rank: int
    apart: bool = False


def load_data(region: Region, task: ClientTask, node: NodeSettings, *, training: bool = False) -> NodeData:
    """The region's data through the node's pipeline (``client.pipeline.node_data``): redacted by the node's
    policy and, for ``training``, with the train split augmented as the node's operator set it."""
    use_threads(node, task)  # back-translation runs a model: the node's thread setting applies to it too
    augment = node.augment if training else None
    return node.pipeline(
        region.name, region.data, task.labels, node.policy, augment=augment, seed=task.seed, settings=task.data
    )


def _threads(value: object) -> int | None:
    return None if value is None else _whole(value, keys.NODE_THREADS)


def _whole(value: object, key: str) -> int:
    # --node-config "threads=2" arrives as an int; accept the quoted form too, nothing fractional or boolean
    number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise NodeConfigError(f"node config {key}={value!r}: must be a whole number >= 1")
    return number


def _absolute(value: object, key: str, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser() if isinstance(value, str) and value.strip() else None
    # relative paths would depend on the working folder Flower starts each ClientApp process in
    if path is None or not path.is_absolute():
        raise NodeConfigError(f"node config {key}={value!r}: must be the absolute path of {what} on this node")
    return path


def use_threads(node: NodeSettings, task: ClientTask) -> int | None:
    """Set torch's thread count before any work: the node's own setting wins (its operator knows the machine),
    then the run config's ``train.threads``; None leaves torch's default."""
    threads = node.threads if node.threads is not None else task.train.threads
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


def resolve_region(
    node_config: Mapping[str, object],
    run_config: Mapping[str, object],
    sim_regions: Sequence[Region] | None = None,
) -> Region:
    """The region this node serves: from ``--node-config`` in deployment, from the partition id in simulation.

    In simulation the region list comes from ``sim_regions`` (the in-process simulator passes it) or else from
    the run config file named by the run config's ``config`` key.
    """
    if keys.NODE_REGION in node_config or keys.NODE_DATA_DIR in node_config:
        name, data = node_config.get(keys.NODE_REGION), node_config.get(keys.NODE_DATA_DIR)
        if not isinstance(name, str) or not isinstance(data, str):
            raise NodeConfigError(
                f"node config needs both {keys.NODE_REGION}='…' and {keys.NODE_DATA_DIR}='…', got {dict(node_config)}"
            )
        return Region(name=name, data=Path(data))
    if keys.NODE_PARTITION_ID not in node_config:
        raise NodeConfigError(
            f"node config names no region ({keys.NODE_REGION}, {keys.NODE_DATA_DIR}): {dict(node_config)}"
        )
    if sim_regions is None:
        path = run_config.get(keys.RUN_CONFIG_PATH)
        if not isinstance(path, str):
            raise NodeConfigError(f"simulation node needs the run config key {keys.RUN_CONFIG_PATH!r}")
        sim_regions = load_config(Path(path)).regions
    pid = int(node_config[keys.NODE_PARTITION_ID])  # type: ignore[call-overload]
    if not 0 <= pid < len(sim_regions):
        raise NodeConfigError(f"partition id {pid} but the run has {len(sim_regions)} regions")
    return sim_regions[pid]


def region_index(region: Region, task: ClientTask) -> int:
    """This region's position in the run's region list; a node outside the run refuses to take part."""
    if region.name not in task.region_names:
        raise NodeConfigError(f"region {region.name!r} is not in this run ({', '.join(task.region_names)})")
    return task.region_names.index(region.name)


def global_model(task: ClientTask, state: Mapping[str, torch.Tensor]) -> LoadedModel:
    """The task's base model carrying the global adapter ``state``."""
    loaded = build_model(task.model, task.lora, task.labels, seed=task.seed)
    load_adapter_state(loaded.model, dict(state))
    return loaded


def encode_split(loaded: LoadedModel, examples: Sequence[Example], task: ClientTask, node: NodeSettings) -> Encoded:
    """Token ids of one split, through the node's cache when it has one."""
    return encode_cached(loaded, examples, task.model.max_length, task.labels, node.cache_dir)


def train_round(
    region: Region,
    task: ClientTask,
    state: Mapping[str, torch.Tensor],
    node: NodeSettings | None = None,
    data: NodeData | None = None,
    global_rank: int | None = None,
    encoded: Encoded | None = None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Train the global adapter on the region's train split (``data``, else loaded with ``load_data``;
    ``encoded``: that split already tokenised); return the new adapter state. With ``aggregation.lora`` ffa
    every lora_A keeps the values received: whole, or only its first ``global_rank`` rows (the global adapter's,
    when ``train_dual`` stacks the region's personal LoRA below them, whose A trains as without ffa)."""
    node = node or NodeSettings()
    settings = replace(task.train, threads=use_threads(node, task))
    data = data or load_data(region, task, node, training=True)
    loaded = global_model(task, state)
    keep: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if task.lora_aggregation == "ffa" and global_rank is None:
        freeze(loaded.model, LORA_A)
    elif task.lora_aggregation == "ffa" and global_rank is not None:
        keep = rows_kept(loaded.model, LORA_A, global_rank)
    encoded = encode_split(loaded, data.train, task, node) if encoded is None else encoded
    seed = derive_seed(task.seed, task.server_round, region.name)
    n, steps = len(encoded.ids), plan_steps(len(encoded.ids), settings)
    augmented = node.augment is not None
    dual = global_rank is not None
    # the personalization after the rounds (personalize.dp) spends from the same budget: planned for now
    later = dp_steps(planned_personalization(node), settings, n)
    dp = dp_training(
        node.policy,
        node.audit_dir,
        region.name,
        task,
        n,
        steps,
        augmented,
        secret=node.dp_secret,
        # the noise is the node's secret's, and fresh for anything trained on other inputs (client.dp_secret)
        inputs=_round_inputs(state, task, encoded) if _needs_dp(node) else b"",
        dual=dual,
        personalize_steps=later,
    )
    with keep, dp as private:
        result = train_encoded(
            loaded.model,
            encoded.ids,
            encoded.labels,
            settings,
            pad_id=loaded.pad_id,
            seed=seed,
            private=private,
            lr_scale=_round_scale(task),
        )
    # augmented copies are not new examples: the FedAvg weight stays the region's real training-set size
    return adapter_state(loaded.model), replace(result, num_examples=len(data.data.train))


def _round_scale(task: ClientTask) -> Callable[[int], float]:
    """The factor on every step's learning rate in this round (``train.lr_schedule``)."""
    factor = round_lr_scale(task.train.lr_schedule, task.server_round, task.rounds)
    return lambda _step: factor


def _round_inputs(state: Mapping[str, torch.Tensor], task: ClientTask, encoded: Encoded) -> bytes:
    """The digest of what a round's DP-SGD training depends on (``client.dp_secret``): the adapter it starts
    from, the task's settings (all but the run key, drawn at random per run: a simulation must reproduce) and the
    training data."""
    settings = replace(task, run_key="").to_json()
    return inputs_digest(state, settings, json.dumps([encoded.ids, encoded.labels]))


def _needs_dp(node: NodeSettings) -> bool:
    return node.policy is not None and node.policy.require_dp is not None


def personalization_inputs(
    start: LoadedModel, task: str, settings: PersonalizeSettings, train: Sequence[Example]
) -> bytes:
    """The digest of what a personalization under ``personalize.dp`` depends on (``client.dp_secret``): the
    adapter it starts from, the run's ``task`` settings (JSON), its own settings and the training examples."""
    data = json.dumps([[ex.text, ex.label] for ex in train])
    return inputs_digest(adapter_state(start.model), task, repr(settings), data)


def personal_state(region: Region, task: ClientTask, node: NodeSettings) -> tuple[Path, str, int]:
    """Where this node keeps the region's personal LoRA, the tag of this run's slices, and their rank."""
    if node.personal_dir is None or node.personal_rank is None:
        raise NodeConfigError(f"this node has no {keys.NODE_PERSONAL_DIR} or rank for a personal LoRA (mode dual)")
    tag = personal_tag(region.name, task.run_key, task.model.base, task.lora.r, node.personal_rank)
    return personal_folder(node.personal_dir, region.name), tag, node.personal_rank


def _continued(folder: Path, task: ClientTask, tag: str, rank: int, state: Mapping[str, torch.Tensor]) -> Slices | None:
    """The slices this round continues: the newest kept before it; none in round 1 (which clears the folder,
    so that no earlier run's slices are ever picked up) or when the kept ones cannot be used (logged)."""
    if task.server_round == 1:
        clear_personal(folder)
        return None
    try:
        kept = latest_personal(folder, before=task.server_round, tag=tag, global_state=state, rank=rank)
    except PersonalStateError as err:
        log.warning("%s; the personal LoRA starts afresh in round %d", err, task.server_round)
        return None
    if kept is None:
        log.info("%s: no personal LoRA of this run kept before round %d; it starts afresh", folder, task.server_round)
    return kept


def _trained_apart(
    region: Region, wide: ClientTask, loaded: LoadedModel, encoded: Encoded, rank: int, node: NodeSettings
) -> dict[str, torch.Tensor]:
    """The stacked adapter of ``loaded`` (the received global adapter of rank ``rank`` with the personal
    slices, rank ``wide.lora.r`` in all) after a round's steps on the region's tokenised train split
    ``encoded`` that train only the slices: the first ``rank`` rows of every lora_A and columns of every lora_B,
    and the head, stay as received (``personalize.dual_train: apart``; no DP-SGD, ``train_dual`` refuses it on a
    DP node). Its seed is not the global training's, so the two parts do not draw the same batches."""
    settings = replace(wide.train, threads=use_threads(node, wide), head="frozen")
    seed = derive_seed(wide.seed, wide.server_round, region.name, "personal")
    with rows_kept(loaded.model, LORA_A, rank), rows_kept(loaded.model, LORA_B, rank, dim=1):
        train_encoded(
            loaded.model,
            encoded.ids,
            encoded.labels,
            settings,
            pad_id=loaded.pad_id,
            seed=seed,
            lr_scale=_round_scale(wide),
        )
    return adapter_state(loaded.model)


def train_dual(
    region: Region,
    task: ClientTask,
    state: Mapping[str, torch.Tensor],
    node: NodeSettings,
    data: NodeData | None = None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """``train_round`` with the region's personal LoRA alongside the global adapter (personalize mode dual):
    one adapter of rank r + p is trained (``client.personal``), the personal slices are kept in the node's
    folder as this round's file, and the reply carries the global adapter only, with its keys and shapes.

    Each round continues the newest slices kept before it (also after a restart, and a round trained again
    after a failure starts from the round before it); round 1 starts them afresh, seeded.

    With ``node.personal_apart`` (``personalize.dual_train: apart``) the global adapter trains alone, exactly as
    ``train_round`` trains it, and the slices then train on top of the received global adapter, which stays
    fixed with the head (``_trained_apart``): the reply is what the node would send without dual. The slices
    of round k are thus fitted to the global adapter of round k - 1 and served with round k's (as in joint
    training, where both move together); the head refit after the rounds absorbs part of that difference.
    """
    if node.personal_apart and _needs_dp(node):
        # the node's DP budget plans one DP-SGD pass per round; the slices' own pass would go uncounted
        conflict = dp_conflict(task, augmented=node.augment is not None, dual=True, apart=True)
        raise DpRefused(f"region {region.name}: {conflict}")
    folder, tag, rank = personal_state(region, task, node)
    previous = _continued(folder, task, tag, rank, state)
    if previous is None:
        start = init_personal(state, rank, derive_seed(task.seed, "personal", region.name))
    else:
        start = previous.tensors
    try:
        wide = replace(task, lora=widen(task.lora, rank))
    except ValueError as err:
        raise NodeConfigError(f"{keys.NODE_PERSONALIZE} settings of this node: {err}") from err
    if node.personal_apart:
        data = data or load_data(region, task, node, training=True)
        stacked = global_model(wide, join(state, start))
        encoded = encode_split(stacked, data.train, task, node)  # once: both passes read the same tokens
        sent, result = train_round(region, task, state, node, data, encoded=encoded)
        personal = split(_trained_apart(region, wide, stacked, encoded, task.lora.r, node), task.lora.r)[1]
    else:
        new_state, result = train_round(region, wide, join(state, start), node, data, global_rank=task.lora.r)
        sent, personal = split(new_state, task.lora.r)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if {k: tuple(v.shape) for k, v in sent.items()} != shapes:  # the reply must be exactly a global adapter
        raise RuntimeError(f"{region.name}: the global part of the trained adapter does not match the received one")
    save_personal(folder, Slices(personal, task.server_round), tag, from_round=previous.round if previous else 0)
    return sent, result


def evaluate_round(
    region: Region,
    task: ClientTask,
    state: Mapping[str, torch.Tensor],
    split: str,
    node: NodeSettings | None = None,
    data: NodeData | None = None,
    loaded: LoadedModel | None = None,
) -> EvalResult:
    """Evaluate the global adapter ``state`` on one split of the region's data (empty if the region has no such
    split); ``data`` and ``loaded`` (the model carrying ``state``) are loaded here when not given."""
    node = node or NodeSettings()
    use_threads(node, task)
    data = data or load_data(region, task, node)
    return _evaluated(task, split, node, data, loaded or global_model(task, state))[0]


def _evaluated(
    task: ClientTask, split: str, node: NodeSettings, data: NodeData, loaded: LoadedModel
) -> tuple[EvalResult, np.ndarray]:
    """``evaluate_round``'s result and the class probabilities it came from (personalization's A/B reads them
    on the test split instead of predicting again)."""
    encoded = encode_split(loaded, data.data.split(split), task, node)
    probs = predict_proba_encoded(
        loaded.model, encoded.ids, pad_id=loaded.pad_id, batch_size=task.train.eval_batch_size
    )
    return scores(probs, np.array(encoded.labels, dtype=int), len(task.labels)), probs


def evaluate_message(
    region: Region,
    task: ClientTask,
    state: Mapping[str, torch.Tensor],
    split: str,
    node: NodeSettings,
    data: NodeData,
    last: Callable[[], tuple[int, Mapping[str, torch.Tensor]] | None],
    now: float,
) -> EvalResult:
    """One evaluate message: the global adapter ``state`` on ``split`` of ``data``; after the test split, the
    node's own personalization (``node.personalize``) on the same data and model. ``last`` gives the last
    round's number and adapter when the test evaluation carries them (``personalize_node``); ``now`` stamps
    the personalization report."""
    use_threads(node, task)
    loaded = global_model(task, state)
    result, probs = _evaluated(task, split, node, data, loaded)
    if split == keys.TEST and node.personalize is not None:
        _personalize_locally(region, task, state, node, data, loaded, last, now, probs)
    return result


def _personalize_locally(
    region: Region,
    task: ClientTask,
    state: Mapping[str, torch.Tensor],
    node: NodeSettings,
    data: NodeData,
    loaded: LoadedModel,
    last: Callable[[], tuple[int, Mapping[str, torch.Tensor]] | None],
    now: float,
    global_probs: np.ndarray,
) -> None:
    """``personalize_node`` as the test message runs it. The federation does not depend on it, so a failure
    is logged and written next to where the model would be, and the test reply still goes out."""
    try:
        personalize_node(
            region, task, state, node, now=now, last=last(), data=data, loaded=loaded, global_probs=global_probs
        )
    except Exception as err:  # any failure here is the node's own business, reported locally
        log.exception("%s: personalization failed", region.name)
        folder = (node.personal_dir or Path(".")) / region.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PERSONALIZE_ERROR_FILE).write_text(f"{type(err).__name__}: {err}\n")


def _start(
    region: Region,
    task: ClientTask,
    state: Mapping[str, torch.Tensor],
    loaded: LoadedModel,
    node: NodeSettings,
    last: tuple[int, Mapping[str, torch.Tensor]] | None,
) -> tuple[Start, Slices | None]:
    """The round and global model personalization starts from (``personalize.start``: ``loaded``, the best
    round's, or the last round's) and, on a node with a personal LoRA, the slices to stack onto it."""
    start_round, start_state, start = task.server_round, state, loaded
    if node.personalize is not None and node.personalize.start == "last" and last is not None:
        start_round, start_state = last
        start = global_model(task, start_state)
    if node.personal_rank is None:
        return Start(start, start_round), None
    # the slices' partner is the global adapter of their round: the newest kept up to the start's round
    folder, tag, rank = personal_state(region, task, node)
    kept = latest_personal(folder, before=start_round + 1, tag=tag, global_state=start_state, rank=rank)
    if kept is None:
        raise NodeConfigError(f"{folder}: no personal LoRA of this run to personalize with")
    return Start(start, start_round), kept


def personalize_node(
    region: Region,
    task: ClientTask,
    state: Mapping[str, torch.Tensor],
    node: NodeSettings,
    now: float,
    last: tuple[int, Mapping[str, torch.Tensor]] | None = None,
    data: NodeData | None = None,
    loaded: LoadedModel | None = None,
    global_probs: np.ndarray | None = None,
) -> dict[str, Any]:
    """Personalize the run's final model on this node's data, as ``node.personalize`` says
    (``client.personalize.personalize_region``, as a simulation does), and keep the result here:
    ``personal_dir/REGION/`` gets ``global/`` and ``personalized/`` (peft folders like a run's ``adapter/``; with
    ``personalize.consider_local_only`` also ``local_only/``, the region's local-only model, trained here by
    ``client.local_only.train_local_only`` with the baseline's budget and checkpoints, by the run's
    ``early_stopping``) and
    ``personalized.json``: the region, ``time`` (``now``, seconds since the epoch) and the ``round`` of the
    test evaluation, then the ``ABRecord`` (the choice on validation, the A/B on test; its local-only entry also
    says which checkpoint the local-only model kept). Nothing is sent.

    ``state`` is the global adapter of the run's best round, which the test evaluation carries; ``last`` the
    last round's number and global adapter, which it carries beside it when the two differ. Personalization
    starts from the one ``personalize.start`` names and is compared with the best round's. ``data`` and
    ``loaded`` (the model carrying ``state``) are what the test evaluation already loaded, ``global_probs`` its
    predictions on the test split; they are loaded or computed here when not given.
    """
    if node.personalize is None or node.personal_dir is None:
        raise NodeConfigError(f"this node has no {keys.NODE_PERSONALIZE} / {keys.NODE_PERSONAL_DIR} settings")
    use_threads(node, task)
    examples = (data or load_data(region, task, node)).data
    loaded = loaded or global_model(task, state)
    start, kept = _start(region, task, state, loaded, node, last)
    settings = node.personalize
    local_only, local_kept = None, None
    if settings.consider_local_only:
        # the local-only baseline's model, trained here with its budget and kept at its checkpoint by the run's
        # early_stopping: the node's own data, nothing sent (personalize.dp refuses consider_local_only: this
        # training is no DP-SGD)
        log.info("%s: training the local-only model (%d examples)", region.name, len(examples.train))
        stopping = task.early_stopping
        local_only, local_kept = train_local_only(
            region.name,
            examples,
            task.model,
            task.lora,
            task.labels,
            task.train,
            task.rounds,
            seed=task.seed,
            metric=stopping.metric,
            min_delta=stopping.min_delta,
            every=stopping.every,
        )
    private: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if settings.dp:
        # DP-SGD charged to the node's account of the run, planned for before round 1 (train_round)
        after = start.round if start.round is not None else task.server_round
        plan = personalizing(region.name, task.run_key, after, len(examples.train), settings, task.train, task.dp)
        private = dp_personalizing(
            node.policy,
            node.audit_dir,
            plan,
            secret=node.dp_secret,
            inputs=personalization_inputs(start.model, replace(task, run_key="").to_json(), settings, examples.train),
        )
    with private as wrapper:
        result, record = personalize_region(
            region.name,
            examples,
            loaded,
            settings,
            task.train,
            encode_split(loaded, examples.test, task, node),
            max_length=task.model.max_length,
            seed=task.seed,
            start=start,
            personal=kept,
            private=wrapper,
            local_only=local_only,
            global_probs=global_probs,
        )
    if wrapper is not None and node.audit_dir is not None:
        record = replace(record, dp=personalization_record(node.audit_dir, task.run_key))
    folder = node.personal_dir / region.name
    save_adapter(loaded, folder / "global")
    save_adapter(result.loaded, folder / PERSONALIZED)
    if local_only is not None:
        save_adapter(local_only, folder / keys.LOCAL_ONLY)  # the served model when the choice is local_only
    report = {"region": region.name, "time": now, "round": task.server_round, **record.to_json()}
    if local_kept is not None:
        # which validation checkpoint the local-only model kept, as the simulation's baseline records it
        report[keys.LOCAL_ONLY][KEPT_CHECKPOINT] = local_kept.to_json()
    write_json(folder / PERSONALIZED_REPORT, report)
    log.info("%s: personalized (%s), serves %s", region.name, node.personalize.mode, result.chosen)
    return report
