"""Personalization of a finished run, region by region, as each region's node would do it (nothing is sent),
and the A/B evaluation on each region's test split: global vs personalized vs local-only, paired bootstrap.

Writes RUN_DIR/personalized/REGION/ (peft folder like adapter/) and returns the ``personalized`` entries of
summary.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from client.personal import (
    PersonalStateError,
    Slices,
    latest_personal,
    personal_folder,
    personal_tag,
)
from client.personalize import PERSONALIZED, choice_record, paired_bootstrap, personalize
from client.train import evaluate, predict_proba
from common import keys
from common.config import PROBED_MODES, STACKED_MODES, RunConfig
from common.data import RegionData
from common.errors import ConfigError
from common.model import LoadedModel, build_model, load_adapter_state, save_adapter
from common.runfiles import ADAPTER_DIR, FEDERATION_FILE, PERSONALIZED_DIR, SIMULATED_PERSONAL_DIR
from common.seeds import derive_seed


def load_global(cfg: RunConfig, adapter_dir: Path) -> LoadedModel:
    """The run's global model: the base with the saved global adapter (+ head)."""
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=cfg.seed)
    load_adapter_state(loaded.model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    return loaded


def _predict(loaded: LoadedModel, region: RegionData, cfg: RunConfig) -> np.ndarray:
    texts = [ex.text for ex in region.test]
    probs = predict_proba(
        loaded.model, loaded.tokenizer, texts, max_length=cfg.model.max_length, batch_size=cfg.train.eval_batch_size
    )
    return probs.argmax(axis=1)


def _scores(loaded: LoadedModel, region: RegionData, cfg: RunConfig) -> dict[str, float]:
    r = evaluate(
        loaded.model,
        loaded.tokenizer,
        region.test,
        len(cfg.labels),
        max_length=cfg.model.max_length,
        batch_size=cfg.train.eval_batch_size,
    )
    return {"accuracy": r.accuracy, "macro_f1": r.macro_f1}


def personalize_region(
    cfg: RunConfig,
    name: str,
    region: RegionData,
    global_model: LoadedModel,
    out_dir: Path,
    start: Start,
    local_only: np.ndarray | None = None,
) -> dict[str, Any]:
    """Personalize one region from ``start`` (``start_model``), save its model, and compare the model it serves
    with the global and local-only models on test."""
    settings = cfg.personalize
    started = time.perf_counter()
    kept = run_personal(cfg, out_dir, name, start) if settings.mode == "dual" else None
    result = personalize(
        global_model,
        region,
        settings,
        cfg.train,
        max_length=cfg.model.max_length,
        seed=derive_seed(cfg.seed, "personalize", name),
        personal=kept.tensors if kept else None,
        start=start.model,
    )
    seconds = time.perf_counter() - started
    save_adapter(result.loaded, out_dir / PERSONALIZED_DIR / name)
    served = result.loaded if result.chosen == PERSONALIZED else global_model
    truth = np.array([ex.label for ex in region.test])
    pred_served, pred_global = _predict(served, region, cfg), _predict(global_model, region, cfg)
    n = len(cfg.labels)

    def ab(baseline: np.ndarray, tag: str) -> dict[str, float]:
        seed = derive_seed(cfg.seed, "bootstrap", name, tag)
        return paired_bootstrap(truth, baseline, pred_served, n, resamples=settings.bootstrap, seed=seed).to_json()

    comparisons = {f"vs_{keys.FEDERATED}": ab(pred_global, keys.FEDERATED)}
    if local_only is not None:
        comparisons[f"vs_{keys.LOCAL_ONLY}"] = ab(local_only, keys.LOCAL_ONLY)
    return {
        **_scores(served, region, cfg),
        "mode": settings.mode,
        **({"local_r": settings.local_r} if settings.mode in STACKED_MODES else {}),
        **({"start_round": start.round} if start.round is not None else {}),  # the global adapter's round
        **({"personal_round": kept.round} if kept else {}),  # the round whose personal slices were stacked
        "balance": settings.balance,
        **choice_record(result, settings.choice),
        "personalized_test": _scores(result.loaded, region, cfg),
        "ab": comparisons,
        "steps": result.train.steps,
        # a probe trains no epochs: one forward pass over the train split, then a convex fit of the output layer;
        # dual adds that to a personal LoRA trained in the rounds' own passes (no pass of its own)
        "epochs": 0.0 if settings.mode in PROBED_MODES else settings.epochs,
        "seconds": seconds,
        "bytes_sent": 0,  # personalization happens on the node; nothing leaves it
    }


@dataclass(frozen=True)
class Start:
    """The global model personalization starts from and the round it is from."""

    model: LoadedModel
    round: int | None  # None: a run without federation.json (its adapter/ is all there is)


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
    federation = json.loads(record.read_text())
    best, last = int(federation["best_round"]), len(federation["rounds"])
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


def personalize_run(
    cfg: RunConfig,
    out_dir: Path,
    data: Mapping[str, RegionData],
    local_only: Mapping[str, np.ndarray] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Personalize every region of a finished run in ``out_dir``; return the ``personalized`` entry per region."""
    from common.model import adapter_state

    global_model = load_global(cfg, out_dir / ADAPTER_DIR)
    start = start_model(cfg, out_dir, global_model)
    shared = [global_model] if start.model is global_model else [global_model, start.model]
    references = [(model, adapter_state(model.model)) for model in shared]
    entries = {}
    for name, region in data.items():
        mode = cfg.personalize.mode
        cost = {"probe": "one forward pass", "dual": "the rounds' LoRA + one forward pass"}.get(
            mode, f"{cfg.personalize.epochs:g} epoch(s)"
        )
        say(f"personalize: {name} ({mode}, {cost} on {len(region.train)})")
        entries[name] = personalize_region(
            cfg, name, region, global_model, out_dir, start, None if local_only is None else local_only.get(name)
        )
        # every region starts from the same global model: personalization must work on a copy
        for model, reference in references:
            if any(not (reference[k] == v).all() for k, v in adapter_state(model.model).items()):
                raise RuntimeError(f"personalizing {name} changed the global model")
    return entries
