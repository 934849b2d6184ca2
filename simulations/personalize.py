"""Personalization of a finished run, region by region, as each region's node does it (nothing is sent): the
node's own ``client.personalize.personalize_region``, with the run folder as the source of the start model and
the personal slices, and the local-only baseline's test predictions as a second comparison.

Writes RUN_DIR/personalized/REGION/ (peft folder like adapter/) and returns the ``personalized`` entries of
summary.json (``ABRecord.to_json``). With ``personalize.dp`` a region whose policy requires DP personalizes
under DP-SGD charged to its simulated node's privacy account (``client.dp.dp_personalizing``), as its node would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from client.dp import dp_personalizing, personalization_record, personalizing, personalizing_budget
from client.dp_secret import simulated_secret
from client.personal import (
    PersonalStateError,
    Slices,
    latest_personal,
    personal_folder,
    personal_tag,
)
from client.personalize import GLOBAL, Start, bootstrap_seed, paired_bootstrap, personalize_region
from client.task import personalization_inputs
from client.tokens import Encoded, encode_examples
from client.train import predict_proba_encoded
from common import keys
from common.config import RunConfig
from common.data import RegionData
from common.errors import ConfigError, InputError
from common.model import LoadedModel, build_model, load_adapter_state, save_adapter
from common.policy import RegionPolicy, load_policy
from common.runfiles import (
    ADAPTER_DIR,
    AUDIT_DIR,
    FEDERATION_FILE,
    LOCAL_ONLY_DIR,
    NODES_DIR,
    PERSONALIZED_DIR,
    SIMULATED_PERSONAL_DIR,
)


def load_global(cfg: RunConfig, adapter_dir: Path) -> LoadedModel:
    """The run's global model: the base with the saved global adapter (+ head)."""
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    load_adapter_state(loaded.model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    return loaded


def run_rounds(record: Path) -> tuple[int, int]:
    """The best and the last round a finished run's ``federation.json`` (``record``) names; a file that cannot
    say is an InputError naming it (checked before any model is loaded)."""
    try:
        federation = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{record}: cannot be read ({err})") from err
    best = federation.get("best_round") if isinstance(federation, dict) else None
    rounds = federation.get("rounds") if isinstance(federation, dict) else None
    if not isinstance(rounds, list) or not isinstance(best, int) or isinstance(best, bool):
        raise InputError(f"{record}: not a finished run's record (needs best_round and the list of rounds)")
    if not 1 <= best <= len(rounds):
        raise InputError(f"{record}: best_round {best} is not one of its {len(rounds)} rounds")
    return best, len(rounds)


def start_model(cfg: RunConfig, out_dir: Path, global_model: LoadedModel) -> Start:
    """The global model personalization starts from, as ``personalize.start`` says: ``global_model`` (the run's
    ``adapter/``, its best round) or the last round's checkpoint."""
    from server.federation import checkpoint_dir

    record = out_dir / FEDERATION_FILE
    if not record.is_file():
        if cfg.personalize.start == "last":
            raise ConfigError([f"personalize.start: last needs {record} (which round was the last)"])
        if cfg.personalize.mode == "dual":
            raise ConfigError([f"personalize.mode: dual needs {record} (the round whose personal slices to stack)"])
        return Start(global_model, None)
    best, last = run_rounds(record)
    if cfg.personalize.start == "best" or last == best:
        return Start(global_model, best)
    folder = checkpoint_dir(out_dir, last)
    if not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise ConfigError([f"personalize.start: last needs the last round's global adapter, {folder} has none"])
    return Start(load_global(cfg, folder), last)


def run_personal(cfg: RunConfig, out_dir: Path, name: str, start: Start) -> Slices:
    """The personal LoRA that region ``name``'s simulated node kept in ``out_dir`` (personalize mode dual):
    the newest kept up to the round of the global adapter it will be stacked onto (``start``)."""
    from common.model import adapter_state
    from server.federation import ResumeError, read_state

    try:
        state = read_state(out_dir)
    except ResumeError as err:
        raise ConfigError([f"personalize.mode: dual: {err}"]) from err
    if state is None or start.round is None:
        raise ConfigError([f"personalize.mode: dual needs the run's state in {out_dir} (which run the slices are of)"])
    folder = personal_folder(out_dir / SIMULATED_PERSONAL_DIR, name)
    rank = cfg.personalize.local_r
    tag = personal_tag(name, state.run_key, cfg.model.base, cfg.lora.r, rank)
    try:
        kept = latest_personal(
            folder, before=start.round + 1, tag=tag, global_state=adapter_state(start.model.model), rank=rank
        )
    except PersonalStateError as err:
        raise ConfigError([f"personalize.mode: dual, but {err}"]) from err
    if kept is None:
        raise ConfigError(
            [
                f"personalize.mode: dual, but {folder} holds no personal LoRA of this run for {name} (rank "
                f"{cfg.personalize.local_r}, up to round {start.round}); dual trains it during the rounds, so set it "
                f"before `fedlocale simulate` (or personalize this run with probe, head, continue or local)"
            ]
        )
    return kept


def _dp_policies(cfg: RunConfig, out_dir: Path) -> tuple[dict[str, RegionPolicy], str]:
    """Under ``personalize.dp``: the policies of the regions that require DP, and the run's key (their nodes'
    accounts are kept under it); none without ``personalize.dp``."""
    if not cfg.personalize.dp:
        return {}, ""
    from server.federation import ResumeError, read_state

    # each simulated node's own policy, as its node reads it (simulate has checked them all before the run)
    loaded = {r.name: load_policy(r.policy) for r in cfg.regions if r.policy is not None}
    policies = {n: p for n, p in loaded.items() if p.require_dp is not None}
    if not policies:
        return {}, ""
    try:
        state = read_state(out_dir)
    except ResumeError as err:
        raise ConfigError([f"personalize.dp: {err}"]) from err
    if state is None:
        raise ConfigError([f"personalize.dp needs the run's state in {out_dir} (which privacy account to charge)"])
    return policies, state.run_key


def local_only_model(
    cfg: RunConfig,
    name: str,
    region: RegionData,
    adapters: Mapping[str, Mapping[str, torch.Tensor]] | None,
    say: Callable[[str], None] = print,
) -> LoadedModel:
    """Region ``name``'s local-only model for ``personalize.consider_local_only``: the local-only baseline's
    adapter when it ran (``adapters``; nothing is trained twice), else trained as the baseline trains it
    (``client.local_only.train_local_only``, as a node does)."""
    from client.local_only import train_local_only

    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    if adapters is not None and name in adapters:
        load_adapter_state(loaded.model, dict(adapters[name]))
        loaded.model.eval()
        return loaded
    say(f"personalize: {name}: training its local-only model ({len(region.train)} examples, the baseline's budget)")
    trained, _ = train_local_only(  # which checkpoint it kept: the baseline's record says, when the baseline ran
        name,
        region,
        cfg.model,
        cfg.lora,
        cfg.labels,
        cfg.train,
        cfg.rounds,
        seed=cfg.seed,
        metric=cfg.early_stopping.metric,
        min_delta=cfg.early_stopping.min_delta,
        every=cfg.early_stopping.every,
    )
    return trained


def personalize_run(
    cfg: RunConfig,
    out_dir: Path,
    data: Mapping[str, RegionData],
    local_only: Mapping[str, np.ndarray] | None = None,
    say: Callable[[str], None] = print,
    local_adapters: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    made: GlobalPass | None = None,
) -> dict[str, dict[str, Any]]:
    """Personalize every region of a finished run in ``out_dir``; return the ``personalized`` entry per region.
    ``made``: the run's ``global_pass`` when the caller has made it (else it is made here).

    With ``personalize.consider_local_only`` each region's local-only model (``local_only_model``: the
    baseline's adapter from ``local_adapters`` when it ran) is a third candidate of the choice; it is saved in
    RUN_DIR/local_only/REGION/, which export serves when it is chosen."""
    from common.model import adapter_state

    if made is None:
        made = global_pass(cfg, out_dir, data)
    global_model = made.model
    start = start_model(cfg, out_dir, global_model)
    dp_policies, run_key = _dp_policies(cfg, out_dir)
    shared = [global_model] if start.model is global_model else [global_model, start.model]
    references = [(model, adapter_state(model.model)) for model in shared]
    plans = {
        name: personalizing(name, run_key, start.round or 0, len(data[name].train), cfg.personalize, cfg.train, cfg.dp)
        for name in dp_policies
        if name in data
    }
    for name, policy in dp_policies.items():
        # every DP region's budget before any region personalizes: a refusal leaves none personalized and charged
        if policy.require_dp is not None and name in plans:
            personalizing_budget(policy.require_dp, out_dir / AUDIT_DIR / NODES_DIR / name, plans[name])
    entries = {}
    for name, region in data.items():
        mode = cfg.personalize.mode
        cost = {"probe": "one forward pass", "dual": "the rounds' LoRA + one forward pass"}.get(
            mode, f"{cfg.personalize.epochs:g} epoch(s)"
        )
        say(f"personalize: {name} ({mode}, {cost} on {len(region.train)})")
        kept = run_personal(cfg, out_dir, name, start) if mode == "dual" else None
        baseline = None if local_only is None else local_only.get(name)
        candidate = (
            local_only_model(cfg, name, region, local_adapters, say) if cfg.personalize.consider_local_only else None
        )
        if baseline is None and candidate is not None and region.test:
            # the candidate is the local-only baseline's model (the same function, seed and budget), so its test
            # predictions give the A/B against local-only that a finished run does not keep (fedlocale personalize)
            baseline = predict_proba_encoded(
                candidate.model, made.tests[name].ids, pad_id=candidate.pad_id, batch_size=cfg.train.eval_batch_size
            ).argmax(axis=1)
        node_dir = out_dir / AUDIT_DIR / NODES_DIR / name  # the simulated node's ledger and privacy account
        private: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if name in plans:
            private = dp_personalizing(
                dp_policies[name],
                node_dir,
                plans[name],
                # the simulated node's secret, as in its rounds (client.task.simulated_node): reproducible
                secret=simulated_secret(cfg.seed, name),
                inputs=personalization_inputs(start.model, repr(cfg.train), cfg.personalize, region.train),
            )
        with private as wrapper:
            result, record = personalize_region(
                name,
                region,
                global_model,
                cfg.personalize,
                cfg.train,
                made.tests[name],
                max_length=cfg.model.max_length,
                seed=cfg.seed,
                start=start,
                personal=kept,
                baselines=None if baseline is None else {keys.LOCAL_ONLY: baseline},
                private=wrapper,
                local_only=candidate,
                global_probs=made.probs.get(name),
            )
        if wrapper is not None:
            record = dataclasses.replace(record, dp=personalization_record(node_dir, run_key))
        save_adapter(result.loaded, out_dir / PERSONALIZED_DIR / name)
        if candidate is not None:
            save_adapter(candidate, out_dir / LOCAL_ONLY_DIR / name)
        else:
            shutil.rmtree(out_dir / LOCAL_ONLY_DIR / name, ignore_errors=True)  # a candidate of an earlier choice
        entries[name] = record.to_json()
        # every region starts from the same global model: personalization must work on a copy
        for model, reference in references:
            if any(not (reference[k] == v).all() for k, v in adapter_state(model.model).items()):
                raise RuntimeError(f"personalizing {name} changed the global model")
    return entries


@dataclasses.dataclass(frozen=True)
class GlobalPass:
    """The run's saved global model, each region's test split tokenised for it, and its class probabilities on
    every non-empty one: made once after the rounds and read by everything that follows (the summary's pooled
    score, personalization's A/B, the comparison with local-only).

    The federation's own test predictions stay on the nodes (only scores leave), so the simulation makes this one
    pass itself."""

    model: LoadedModel
    tests: dict[str, Encoded]
    probs: dict[str, np.ndarray]


def global_pass(cfg: RunConfig, out_dir: Path, data: Mapping[str, RegionData]) -> GlobalPass:
    """Load the run's global adapter (``out_dir``/adapter) once and predict every region's test split with it."""
    loaded = load_global(cfg, out_dir / ADAPTER_DIR)
    # tokenised and padded as personalization's A/B reads them (the model's pad id)
    tests = {
        name: encode_examples(loaded.tokenizer, region.test, cfg.model.max_length) for name, region in data.items()
    }
    probs = {
        name: predict_proba_encoded(
            loaded.model, tests[name].ids, pad_id=loaded.pad_id, batch_size=cfg.train.eval_batch_size
        )
        for name, region in data.items()
        if region.test
    }
    return GlobalPass(loaded, tests, probs)


def global_vs_local_only(
    cfg: RunConfig,
    data: Mapping[str, RegionData],
    local_only: Mapping[str, np.ndarray],
    global_probs: Mapping[str, np.ndarray],
) -> dict[str, dict[str, Any]]:
    """Per region with local-only test predictions (and test examples), the ``served_vs_local_only`` entry of a
    run without personalization, whose regions serve the global model: global (``global_probs``,
    ``global_pass``) − local-only test macro-F1 with the paired bootstrap and seed of personalization's A/B
    against local-only (``bootstrap_seed``), so that the two agree when personalization keeps the global model."""
    from runfolder.summary import served_vs_local_only

    entries = {}
    for name in data:
        if name not in local_only or name not in global_probs or not data[name].test:
            continue
        difference = paired_bootstrap(
            np.array([ex.label for ex in data[name].test], dtype=int),
            local_only[name],
            global_probs[name].argmax(axis=1),
            len(cfg.labels),
            resamples=cfg.personalize.bootstrap,
            seed=bootstrap_seed(cfg.seed, name, keys.LOCAL_ONLY),
        )
        entries[name] = served_vs_local_only(GLOBAL, difference.to_json())
    return entries
