"""A region's local-only model: its own adapter trained from the base on its data alone, with as much training as
the federated run gave it (``matched_settings``) and the best of as many validation checkpoints as the run has
rounds (``train_best_checkpoint``).

The simulation's local-only baseline (``simulations.baselines``) and a node that weighs serving its local-only model
(``personalize.consider_local_only``; ``train_local_only``) train it with these same functions, so that the model
a node may serve is the one the baseline measured.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from client.train import evaluate, lr_scale_over, plan_steps, train_local
from common.config import LoraSettings, ModelSettings, TrainSettings
from common.data import Example, RegionData
from common.model import LoadedModel, adapter_state, build_model, load_adapter_state
from common.seeds import derive_seed
from common.stopping import EarlyStopper, validated_rounds


def matched_settings(train: TrainSettings, rounds: int, regions: int = 1) -> TrainSettings:
    """Training settings giving a model trained in one go as much training as a federated run of ``rounds``
    rounds with ``train``: as many passes over each example (``epochs × rounds``), or with ``train.local_steps``
    as many optimizer steps as the ``regions`` it trains on did together (``local_steps × rounds × regions``: the
    same number of examples seen).

    The label-skew remedies apply as in the run: ``logit_adjust`` with the prior of the data the model trains
    on (centralized: the pooled prior, local-only: the region's own, as its node would), a frozen head frozen.
    ``prox_mu`` does not: this is one training call, so its proximal term would pull toward the untrained
    initial adapter for the whole run, not toward a round's global model."""
    t = dataclasses.replace(train, prox_mu=0.0)
    if t.local_steps is not None:
        return dataclasses.replace(t, local_steps=t.local_steps * rounds * regions)
    return dataclasses.replace(t, epochs=t.epochs * rounds, max_steps=t.max_steps * rounds if t.max_steps else None)


def checkpoint_steps(total: int, rounds: int, every: int = 1) -> list[int]:
    """The steps after which a model of ``total`` steps is validated: one checkpoint where each round the federated
    run validates ends (every ``every``-th of ``rounds`` and the last: ``common.stopping.validated_rounds``), at
    the same share of the training (fewer when there are fewer steps), the last one at the end."""
    return sorted({max(1, math.ceil(total * k / rounds)) for k in validated_rounds(rounds, every)})


@dataclasses.dataclass(frozen=True)
class KeptCheckpoint:
    """Which validation checkpoint a model trained in one go kept: ``number`` of ``of`` (1-based; the last one
    when there was nothing to validate on; None when there was no step to train), after ``step`` of ``steps``."""

    number: int | None
    of: int
    step: int
    steps: int

    def to_json(self) -> dict[str, int | None]:
        """The summary's ``kept_checkpoint`` entry of a baseline (runfolder.summary)."""
        return dataclasses.asdict(self)


def train_best_checkpoint(
    loaded: LoadedModel,
    train: Sequence[Example],
    settings: TrainSettings,
    rounds: int,
    validate: Callable[[], float | None],
    *,
    higher_is_better: bool,
    min_delta: float,
    max_length: int,
    seed: int,
    desc: str,
    on_step: Callable[[], None] | None = None,
    every: int = 1,
) -> KeptCheckpoint:
    """Train ``loaded`` in place on ``train`` with ``settings``, validate it (``validate``: the criterion, None
    when there is nothing to validate on) after each of ``rounds`` even shares of its steps, or only after every
    ``every``-th share and the last (``checkpoint_steps``), leave the best checkpoint loaded, in eval mode, and say
    which one it is.

    Progress shows as a bar named ``desc``, or, when ``on_step`` is given, is reported to it after every step
    instead (a caller showing one bar for trainings in other processes).

    Like the federated run, which keeps its best round on validation, the model keeps its best checkpoint: more
    passes over-fit it as they do the federation."""
    from tqdm import tqdm

    total = plan_steps(len(train), settings)
    checkpoints = checkpoint_steps(total, rounds, every)
    stopper = EarlyStopper(None, higher_is_better, min_delta)
    best: dict[str, torch.Tensor] | None = None
    # disable=None: a bar on a terminal, nothing in CI logs
    with tqdm(total=total, desc=desc, unit="step", disable=True if on_step else None, leave=False) as bar:

        def progress(step: int, steps: int, loss: float) -> None:
            nonlocal best
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if on_step:
                on_step()
            if step not in checkpoints:
                return
            stopper.update(step, validate())
            if stopper.best_round == step:
                best = adapter_state(loaded.model)
            loaded.model.train()  # evaluating switched dropout off; the steps left train as before

        train_local(
            loaded.model,
            loaded.tokenizer,
            list(train),
            settings,
            max_length=max_length,
            seed=seed,
            progress=progress,
            lr_scale=lr_scale_over(settings.lr_schedule, total, rounds),
        )
    if best is not None:
        load_adapter_state(loaded.model, best)
    loaded.model.eval()
    kept = stopper.best_round  # a step number (0 when no step ran)
    return KeptCheckpoint(
        number=checkpoints.index(kept) + 1 if kept in checkpoints else None, of=len(checkpoints), step=kept, steps=total
    )


def seed_tag(region: str) -> str:
    """The tag a region's local-only training seed is derived with (``derive_seed(run seed, tag)``), the same in
    the simulation's baseline and on a node."""
    return f"local/{region}"


def train_local_only(
    region: str,
    data: RegionData,
    model: ModelSettings,
    lora: LoraSettings,
    labels: tuple[str, ...],
    train: TrainSettings,
    rounds: int,
    *,
    seed: int,
    metric: str = "macro_f1",
    min_delta: float = 0.0,
    every: int = 1,
) -> tuple[LoadedModel, KeptCheckpoint]:
    """Region ``region``'s local-only model, as the local-only baseline trains it: a fresh adapter on the base
    (``build_model`` with the run's ``seed``), ``matched_settings(train, rounds)`` on the region's train split, its
    best of ``rounds`` checkpoints (every ``every``-th and the last) on the region's val split by ``metric`` (the
    run's ``early_stopping``); and which checkpoint that is, as the baseline records it."""
    loaded = build_model(model, lora, labels, seed=seed)

    def validate() -> float | None:
        if not data.val:
            return None
        result = evaluate(
            loaded.model,
            loaded.tokenizer,
            data.val,
            len(labels),
            max_length=model.max_length,
            batch_size=train.eval_batch_size,
        )
        return float(getattr(result, metric))

    kept = train_best_checkpoint(
        loaded,
        data.train,
        matched_settings(train, rounds),
        rounds,
        validate,
        higher_is_better=metric != "loss",
        min_delta=min_delta,
        max_length=model.max_length,
        seed=derive_seed(seed, seed_tag(region)),
        desc=seed_tag(region),
        every=every,
    )
    return loaded, kept
