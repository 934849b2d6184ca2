"""Personalization on a region's own node: adapt the global adapter to the region, then choose on the region's
validation split which of the global and the personalized model it serves (``choose``). Nothing here sends
anything.

Also the paired bootstrap that compares two models on the same examples: on validation for the choice, on
test for the A/B evaluation; and ``personalize_region``, the one way a region's final model is personalized and
A/B-tested, which a deployed node (``client.task.personalize_node``) and a simulation or a finished run
(``simulations.personalize``) both call, so their reports have one shape (``ABRecord``) and one seed scheme.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from client.personal import Slices, is_lora_a, is_lora_b, join, mismatch
from client.probe import fit_probe, head_features, install, output_layer
from client.tokens import Encoded
from client.train import (
    EvalResult,
    Privatize,
    TrainResult,
    encode,
    plan_steps,
    predict_proba,
    predict_proba_encoded,
    scores,
    train_local,
)
from common import keys
from common.config import CHOICE_RULES, PROBED_MODES, STACKED_MODES, PersonalizeSettings, TrainSettings
from common.data import Example, RegionData
from common.metrics import macro_f1
from common.model import LoadedModel, adapter_state, load_adapter_state
from common.runfiles import CONFUSION
from common.seeds import derive_seed

GLOBAL = "global"
PERSONALIZED = "personalized"
LOCAL_ONLY = keys.LOCAL_ONLY  # the region's own model trained from the base on its data alone (a candidate)


@dataclass(frozen=True)
class Personalized:
    """The outcome of personalizing one region: the model and why it was (or was not) chosen."""

    loaded: LoadedModel  # the personalized model
    train: TrainResult
    val_global: EvalResult
    val_personalized: EvalResult
    chosen: str  # GLOBAL, PERSONALIZED or (with a local-only candidate) LOCAL_ONLY, under personalize.choice
    val_difference: Difference | None  # personalized minus global on validation; None without a validation split
    local_only: LocalOnlyCandidate | None = None  # personalize.consider_local_only: what its choice read
    # dual under DP with nothing personal trained (``unchanged_start``): the global model is served, unchosen
    nothing_personal: bool = False


@dataclass(frozen=True)
class LocalOnlyCandidate:
    """The local-only model weighed as a third candidate (``personalize.consider_local_only``) and the evidence."""

    loaded: LoadedModel
    val: EvalResult
    compared_with: str  # GLOBAL or PERSONALIZED: the choice between those two, which it had to beat
    difference: Difference | None  # local-only minus ``compared_with`` on validation; None without validation
    rule: str  # the rule it was weighed by (``PersonalizeSettings.local_only_rule``)


def _freeze_all_but_head(loaded: LoadedModel) -> None:
    for name, param in loaded.model.named_parameters():
        param.requires_grad_("modules_to_save" in name)


def local_settings(train: TrainSettings, settings: PersonalizeSettings) -> TrainSettings:
    """The training settings of personalization: the run's, with its own lr, epochs and KL weight.

    The federated training's label-skew and drift remedies do not apply: the personalized model serves the
    region whose label mix it trains on (no logit adjustment), may train the head (a head frozen for the
    federation included), and is pulled toward the global model only by its own ``kl_to_global``. It trains
    with AdamW whatever ``train.optimizer`` is: ``personalize.lr`` is an AdamW learning rate."""
    return dataclasses.replace(
        train,
        optimizer="adamw",
        momentum=None,
        lr=settings.lr,
        epochs=settings.epochs,
        max_steps=None,
        local_steps=None,
        prox_mu=0.0,
        logit_adjust=0.0,
        head="train",
        warmup_steps=0,
        kl_to_global=settings.kl_to_global if settings.mode in ("continue", "local") else 0.0,
    )


def dp_steps(settings: PersonalizeSettings | None, train: TrainSettings, num_examples: int) -> int:
    """The DP-SGD steps personalization ``settings`` takes after the rounds on ``num_examples`` training
    examples under ``personalize.dp`` (what a DP node's calibration before round 1 plans for beside the
    rounds): 0 without dp, and for mode dual, whose personal slices train in the rounds' DP-SGD pass and whose
    head is then not refit (probe is refused with dp: its refit is no DP-SGD)."""
    if settings is None or not settings.dp or settings.mode in ("none", *PROBED_MODES) or num_examples == 0:
        return 0
    return plan_steps(num_examples, local_settings(train, settings))


def _global_lora(model: PeftModel) -> LoraConfig:
    config = model.peft_config["default"]
    if not isinstance(config, LoraConfig) or config.use_rslora or config.rank_pattern or config.alpha_pattern:
        raise ValueError("personalize.mode local and dual need a plain LoRA adapter (one rank and alpha, no rsLoRA)")
    return config


def _lora_like(config: LoraConfig, r: int, *, head: bool) -> LoraConfig:
    """A LoRA config with the targets (modules and layers), dropout and scale alpha/r of ``config`` but rank
    ``r``."""
    alpha = config.lora_alpha * r / config.r
    return LoraConfig(
        task_type=config.task_type,
        r=r,
        lora_alpha=int(alpha) if alpha.is_integer() else alpha,  # type: ignore[arg-type]  # peft takes any number
        lora_dropout=config.lora_dropout,
        target_modules=copy.copy(config.target_modules),
        layers_to_transform=copy.copy(config.layers_to_transform),  # lora.layers: the same layers as the global
        modules_to_save=list(dict.fromkeys(config.modules_to_save or [])) if head else None,
    )


def _wrap(model: torch.nn.Module, config: LoraConfig) -> PeftModel:
    with warnings.catch_warnings():
        # peft calls a transformers API that transformers 5 renamed; the warning is theirs, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)  # type: ignore[arg-type]


def local_lora(global_model: LoadedModel, r: int, seed: int) -> PeftModel:
    """The model ``local`` mode trains: the global adapter merged into a copy of the base (so it cannot change)
    with a fresh rank-``r`` LoRA (B = 0, so it starts as the global model) and the global head, trainable."""
    config = _global_lora(global_model.model)
    frozen = copy.deepcopy(global_model.model).merge_and_unload()
    torch.manual_seed(seed)  # the new A matrices are random
    return _wrap(frozen, _lora_like(config, r, head=True))


def stack(global_model: LoadedModel, personal: Mapping[str, torch.Tensor], head: PeftModel | None = None) -> PeftModel:
    """One adapter of rank r_global + r_personal that computes the global adapter plus the personal slices
    (``client.personal.join``: A = [A_g; A_p], B = [B_g, B_p], the same scale alpha/r), with the head of
    ``head`` (default: the global model's). Saved and exported like any adapter."""
    config = _global_lora(global_model.model)
    problem = mismatch(adapter_state(global_model.model), personal)
    if problem:
        raise ValueError(f"personal LoRA does not match the global adapter: {problem}")
    extra = next(v.shape[0] for k, v in personal.items() if is_lora_a(k))
    stacked = _wrap(copy.deepcopy(global_model.model).unload(), _lora_like(config, config.r + extra, head=True))
    state = join(adapter_state(global_model.model), personal)
    if head is not None:
        state.update({k: v for k, v in adapter_state(head).items() if not (is_lora_a(k) or is_lora_b(k))})
    load_adapter_state(stacked, state)
    stacked.eval()
    return stacked


def stack_local(global_model: LoadedModel, local: PeftModel) -> PeftModel:
    """``local`` mode's result as one adapter (``stack``): the local LoRA's matrices as the personal slices,
    the local model's head."""
    personal = {k: v for k, v in adapter_state(local).items() if is_lora_a(k) or is_lora_b(k)}
    return stack(global_model, personal, head=local)


def balanced(examples: list[Example], seed: int) -> list[Example]:
    """As many examples as ``examples``, an equal share of each class present: per class a random subset if
    it has more than its share, else all of it and random repeats."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    labels = sorted(by_label)
    out: list[Example] = []
    for i, label in enumerate(labels):
        group = by_label[label]
        share = len(examples) // len(labels) + (1 if i < len(examples) % len(labels) else 0)
        picked = rng.permutation(len(group))[:share].tolist()
        picked += rng.integers(0, len(group), size=share - len(picked)).tolist()
        out.extend(group[j] for j in picked)
    return out


def probe_head(loaded: LoadedModel, examples: list[Example], *, max_length: int, batch_size: int) -> TrainResult:
    """Refit ``loaded``'s output layer in place as a linear probe on what the frozen model feeds it
    (``client.probe``): one forward pass over ``examples``, no backward pass."""
    layer = output_layer(loaded.model, len(loaded.labels))
    ids = encode(loaded.tokenizer, [ex.text for ex in examples], max_length)
    pad_id = loaded.pad_id
    features = head_features(loaded.model, layer, ids, pad_id=pad_id, batch_size=batch_size)
    probe = fit_probe(features, torch.tensor([ex.label for ex in examples]), len(loaded.labels))
    install(layer, probe)
    return TrainResult(loss=probe.train_loss, steps=0, num_examples=len(examples))


def personalize(
    global_model: LoadedModel,
    data: RegionData,
    settings: PersonalizeSettings,
    train: TrainSettings,
    *,
    max_length: int,
    seed: int,
    personal: Mapping[str, torch.Tensor] | None = None,
    start: LoadedModel | None = None,
    private: Privatize | None = None,
    local_only: LoadedModel | None = None,
) -> Personalized:
    """Fine-tune a copy of ``start`` (default ``global_model``) on the region's train split and choose on
    validation between it and ``global_model``.

    ``head``: the head only. ``continue``: adapter + head, optionally pulled toward the global predictions by
    KL. ``local``: the global adapter stays frozen; a new rank-``local_r`` LoRA on top of it and the head train
    (see ``local_lora``), and the result is one stacked adapter (``stack_local``). ``probe``: the adapter stays
    as it is and the head's output layer is refit as a linear probe (``probe_head``; one forward pass, no
    epochs of SGD, deterministic). ``dual``: ``personal``, the region's LoRA slices trained alongside the
    global adapter in the rounds (``client.personal``), is stacked onto the global adapter (``stack``) and the
    head is refit as in ``probe``.

    Personalization starts from ``start`` (default ``global_model``; ``personalize.start``); the served model
    is chosen on the validation split by ``settings.choice`` (``choose``) between the personalized model and
    ``global_model``, the one the region serves without personalization.

    ``private`` (``client.dp.DpSgd``, ``personalize.dp`` on a DP node) makes the training DP-SGD
    (``train_encoded``); mode dual then keeps the head it has (trained under DP-SGD in the rounds) rather than
    refitting it, whose fit is no DP-SGD, and mode probe cannot run.

    ``local_only`` (the region's own model trained from the base on its data alone;
    ``personalize.consider_local_only``) is then weighed against that choice by
    ``settings.local_only_rule()`` (``choose_local_only``) and served if it wins.
    """
    if settings.mode not in ("head", "continue", "local", "probe", "dual"):
        raise ValueError(f"personalize.mode {settings.mode!r} cannot run (head, continue, local, probe or dual)")
    if settings.mode == "dual" and personal is None:
        raise ValueError("personalize.mode dual needs the region's personal LoRA from the rounds; there is none")
    base = start if start is not None else global_model
    if settings.mode == "local":
        trained = local_lora(base, settings.local_r, seed)
    elif settings.mode == "dual" and personal is not None:
        trained = stack(base, personal)
    else:
        trained = copy.deepcopy(base.model)
    local = dataclasses.replace(base, model=trained)
    if settings.mode == "head":
        _freeze_all_but_head(local)
    if private is not None and (settings.mode == "probe" or settings.balance):
        # PersonalizeSettings refuses these with dp; a caller passing a wrapper anyway must not get a plain fit
        raise ValueError("personalize mode probe and balance cannot train under DP-SGD")
    examples = balanced(data.train, seed) if settings.balance else data.train
    if settings.mode == "dual" and private is not None:
        # the stacked slices and the global head all come from the rounds' DP-SGD: nothing to spend here
        result = TrainResult(loss=0.0, steps=0, num_examples=len(examples))
    elif settings.mode in PROBED_MODES:
        result = probe_head(local, examples, max_length=max_length, batch_size=train.eval_batch_size)
    else:
        tuned = local_settings(train, settings)
        result = train_local(
            local.model, local.tokenizer, examples, tuned, max_length=max_length, seed=seed, private=private
        )
    if settings.mode == "local":
        local = dataclasses.replace(base, model=stack_local(base, local.model))
    n = len(global_model.labels)
    truth = np.array([ex.label for ex in data.val], dtype=int)
    texts = [ex.text for ex in data.val]
    probs_g, probs_p = (
        predict_proba(m.model, m.tokenizer, texts, max_length=max_length, batch_size=train.eval_batch_size)
        if texts
        else np.zeros((0, n))
        for m in (global_model, local)
    )
    chosen, difference = choose(
        truth,
        probs_g.argmax(axis=1),
        probs_p.argmax(axis=1),
        n,
        rule=settings.choice,
        resamples=settings.bootstrap,
        seed=derive_seed(seed, "choice"),
    )
    nothing_personal = settings.mode == "dual" and private is not None and unchanged_start(personal)
    if nothing_personal:
        # the candidate is ``base`` itself (another round's global adapter with its head, under start: last), not
        # a personal model: the region serves the federation's chosen global model, whatever validation says
        chosen = GLOBAL
    candidate = None
    if local_only is not None:
        probs_l = (
            predict_proba(
                local_only.model, local_only.tokenizer, texts, max_length=max_length, batch_size=train.eval_batch_size
            )
            if texts
            else np.zeros((0, n))
        )
        current = probs_p if chosen == PERSONALIZED else probs_g
        rule = settings.local_only_rule()
        switch, against = choose_local_only(
            truth,
            current.argmax(axis=1),
            probs_l.argmax(axis=1),
            n,
            rule=rule,
            resamples=settings.bootstrap,
            seed=derive_seed(seed, "choice", LOCAL_ONLY),
        )
        candidate = LocalOnlyCandidate(local_only, scores(probs_l, truth, n), chosen, against, rule)
        chosen = LOCAL_ONLY if switch else chosen
    return Personalized(
        local,
        result,
        scores(probs_g, truth, n),
        scores(probs_p, truth, n),
        chosen,
        difference,
        candidate,
        nothing_personal,
    )


def unchanged_start(personal: Mapping[str, torch.Tensor] | None) -> bool:
    """Whether dual's personal slices ``personal`` are still as ``client.personal.init_personal`` made them in
    what they compute: every B slice zero, so the stacked model computes exactly what its start does. Under DP
    with ``dp.train: head`` the rounds never train them; mode dual refits no head under DP either."""
    return personal is not None and not any(bool(t.any()) for k, t in personal.items() if is_lora_b(k))


def choose(
    truth: np.ndarray,
    pred_global: np.ndarray,
    pred_personalized: np.ndarray,
    num_labels: int,
    *,
    rule: str,
    resamples: int,
    seed: int,
) -> tuple[str, Difference | None]:
    """Which model a region serves (GLOBAL or PERSONALIZED), from both models' predictions on its validation
    split, and the paired-bootstrap difference (personalized minus global) the choice read.

    ``point``: the personalized model if its macro-F1 is higher; a tie keeps the global one. ``confident``: the
    personalized model unless the whole confidence interval lies below zero, i.e. the global model is better
    with 95 % confidence. No validation examples: the personalized model (there is nothing to choose by).
    """
    _check_rule(rule)  # an unknown rule is an error even without validation data
    if len(truth) == 0:
        return PERSONALIZED, None
    difference = paired_bootstrap(truth, pred_global, pred_personalized, num_labels, resamples=resamples, seed=seed)
    return (GLOBAL if keeps_global(difference, rule) else PERSONALIZED), difference


def choose_local_only(
    truth: np.ndarray,
    pred_current: np.ndarray,
    pred_local_only: np.ndarray,
    num_labels: int,
    *,
    rule: str,
    resamples: int,
    seed: int,
) -> tuple[bool, Difference | None]:
    """Whether a region serves its local-only model instead of the model ``choose`` picked (``pred_current``),
    from both models' validation predictions, and the paired-bootstrap difference (local-only minus current).

    The same rules as ``choose``, with the local-only model as the challenger: ``point`` switches if its macro-F1
    is higher (a tie keeps the current one); ``confident`` only if the whole interval lies above zero. No
    validation examples: no switch (there is no evidence for it)."""
    _check_rule(rule)
    if len(truth) == 0:
        return False, None
    difference = paired_bootstrap(truth, pred_current, pred_local_only, num_labels, resamples=resamples, seed=seed)
    return switches_to_local_only(difference, rule), difference


def switches_to_local_only(difference: Difference, rule: str) -> bool:
    """Whether choice ``rule`` serves the local-only model on validation evidence ``difference`` (local-only minus
    the current choice)."""
    _check_rule(rule)
    return difference.diff > 0 if rule == "point" else difference.low > 0


def keeps_global(difference: Difference, rule: str) -> bool:
    """Whether choice ``rule`` goes back to the global model on validation evidence ``difference``."""
    _check_rule(rule)
    return difference.diff <= 0 if rule == "point" else difference.high < 0


def _check_rule(rule: str) -> None:
    if rule not in CHOICE_RULES:
        raise ValueError(f"personalize.choice must be one of {', '.join(CHOICE_RULES)}, got {rule!r}")


def choice_record(result: Personalized, rule: str) -> dict[str, Any]:
    """What a region's personalization report says about its choice: the served model, the rule, both models'
    validation macro-F1 and the evidence the rule read (``val_ab``). Without validation examples there is no
    evidence and no score: ``val_examples`` 0 and ``choice_skipped`` say why the personalized model is served;
    dual under DP with nothing personal trained (``Personalized.nothing_personal``): ``choice_skipped`` says why
    the global model is served."""
    extra: dict[str, Any] = {} if result.local_only is None else {LOCAL_ONLY: local_only_record(result.local_only)}
    if result.nothing_personal:
        extra["choice_skipped"] = (
            "nothing personal trained (the personal LoRA's B slices are still zero and no head was refit under DP):"
            " the global model is served"
        )
    if result.val_difference is None:
        return {
            "chosen": result.chosen,
            "choice": rule,
            "val_examples": 0,
            "choice_skipped": "no validation examples to compare on: the personalized model is served",
            **extra,
        }
    return {
        "chosen": result.chosen,
        "choice": rule,
        "val_macro_f1": {GLOBAL: result.val_global.macro_f1, PERSONALIZED: result.val_personalized.macro_f1},
        "val_ab": result.val_difference.to_json(),
        **extra,
    }


def local_only_record(candidate: LocalOnlyCandidate) -> dict[str, Any]:
    """The ``local_only`` part of a choice record: the model it was weighed against, the rule, its validation
    macro-F1, the evidence (``val_ab``: local-only minus that model) and, in words, why it is or is not served."""
    d, rule = candidate.difference, candidate.rule
    if d is None:
        return {
            "compared_with": candidate.compared_with,
            "choice": rule,
            "served": False,
            "why": "no validation examples to compare on: the local-only model needs evidence to be served",
        }
    served = switches_to_local_only(d, rule)
    test = "its macro-F1 is higher" if rule == "point" else "the 95 % interval lies above 0"
    interval = f"local-only − {candidate.compared_with} on validation {d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
    return {
        "compared_with": candidate.compared_with,
        "choice": rule,
        "val_macro_f1": candidate.val.macro_f1,
        "val_ab": d.to_json(),
        "served": served,
        "why": f"{interval}: {'served' if served else 'not served'} ({rule}: served only if {test})",
    }


@dataclass(frozen=True)
class Difference:
    """Macro-F1 of B minus A on the same examples, with a paired-bootstrap confidence interval."""

    diff: float
    low: float
    high: float
    resamples: int
    level: float

    def to_json(self) -> dict[str, float]:
        """A JSON-able view."""
        return dataclasses.asdict(self)


def paired_bootstrap(
    truth: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    num_labels: int,
    *,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> Difference:
    """Macro-F1(B) − macro-F1(A) and its percentile CI from resampling examples with replacement.

    Both models are scored on the same resampled indices each time, which is what makes it paired.
    """
    if not len(truth) == len(pred_a) == len(pred_b) or len(truth) == 0:
        raise ValueError(f"need equal, non-empty arrays, got {len(truth)}, {len(pred_a)}, {len(pred_b)}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(truth), size=(resamples, len(truth)))
    diffs = np.array(
        [macro_f1(truth[i], pred_b[i], num_labels) - macro_f1(truth[i], pred_a[i], num_labels) for i in idx]
    )
    tail = (1.0 - level) / 2.0
    return Difference(
        diff=macro_f1(truth, pred_b, num_labels) - macro_f1(truth, pred_a, num_labels),
        low=float(np.quantile(diffs, tail)),
        high=float(np.quantile(diffs, 1.0 - tail)),
        resamples=resamples,
        level=level,
    )


# ---------------------------------------------------------------------------------------------------------
# One region, personalized and A/B-tested: what a node and a simulation both run


@dataclass(frozen=True)
class Start:
    """The global model personalization starts from (``personalize.start``) and the round it is from."""

    model: LoadedModel
    round: int | None  # None: a run without federation.json (its adapter/ is all there is)


@dataclass(frozen=True)
class ABRecord:
    """What personalizing one region found, in the one shape a node's ``personalized.json`` and a run's
    ``summary.json`` (``regions.REGION.personalized``) both carry (``to_json``).

    Test scores and comparisons are absent when the region has no test examples.
    """

    mode: str
    local_r: int | None  # the personal LoRA's rank (stacked modes only)
    start_round: int | None  # the round of the global adapter personalization started from
    personal_round: int | None  # the round whose personal slices were stacked (mode dual)
    balance: bool
    choice: dict[str, Any]  # ``choice_record``: chosen, choice, val_macro_f1, val_ab
    served_test: EvalResult | None  # the model the region serves (``choice["chosen"]``), on test
    personalized_test: EvalResult | None
    global_test: EvalResult | None  # the global model it was compared with (the best round's), on test
    ab: dict[str, Difference]  # "vs_<baseline>": served minus the baseline on test, paired bootstrap
    steps: int
    epochs: float  # 0 for the probed modes: no epochs of SGD (one forward pass over the train split)
    seconds: float  # personalization itself (not the test predictions)
    # personalize.dp on a DP node: what it spent (client.dp.personalization_record); None: not trained under DP
    dp: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as JSON: the keys the simulation's summary entries always had, plus ``test_macro_f1``
        (global and served), which the node's report always had."""
        tested = self.served_test is not None and self.personalized_test is not None and self.global_test is not None
        return {
            **(_accuracy_f1(self.served_test) if self.served_test is not None else {}),
            "mode": self.mode,
            **({"local_r": self.local_r} if self.local_r is not None else {}),
            **({"start_round": self.start_round} if self.start_round is not None else {}),
            **({"personal_round": self.personal_round} if self.personal_round is not None else {}),
            "balance": self.balance,
            **self.choice,
            **({"personalized_test": _accuracy_f1(self.personalized_test)} if self.personalized_test else {}),
            **({"ab": {k: v.to_json() for k, v in self.ab.items()}} if tested else {}),
            **(
                {"test_macro_f1": {GLOBAL: self.global_test.macro_f1, "served": self.served_test.macro_f1}}
                if self.global_test is not None and self.served_test is not None
                else {}
            ),
            "steps": self.steps,
            "epochs": self.epochs,
            "seconds": self.seconds,
            "bytes_sent": 0,  # personalization happens on the node; nothing leaves it
            **({"dp": self.dp} if self.dp is not None else {}),
        }


def _accuracy_f1(result: EvalResult) -> dict[str, Any]:
    # the confusion matrix too: a simulation pools the regions' into one macro-F1 (runfolder.summary)
    return {"accuracy": result.accuracy, "macro_f1": result.macro_f1, CONFUSION: [list(r) for r in result.confusion]}


def bootstrap_seed(seed: int, region: str, baseline: str) -> int:
    """The seed of the test A/B against ``baseline`` (``keys.FEDERATED``, ``keys.LOCAL_ONLY``): from the run's
    seed, the region and the baseline, so that every comparison resamples its own way, the same on a node and
    in a simulation."""
    return derive_seed(seed, "bootstrap", region, baseline)


def personalize_region(
    region: str,
    data: RegionData,
    global_model: LoadedModel,
    settings: PersonalizeSettings,
    train: TrainSettings,
    test: Encoded,
    *,
    max_length: int,
    seed: int,
    start: Start,
    personal: Slices | None = None,
    baselines: Mapping[str, np.ndarray] | None = None,
    private: Privatize | None = None,
    local_only: LoadedModel | None = None,
    global_probs: np.ndarray | None = None,
) -> tuple[Personalized, ABRecord]:
    """Personalize region ``region``'s final model on its ``data`` (``personalize``, from ``start``, with the
    personal slices for mode dual), then A/B-test the model it serves on its test split against the global
    model (``vs_federated``) and any other ``baselines`` (their test predictions, e.g. local-only).

    ``local_only`` (``personalize.consider_local_only``): the region's local-only model, a third candidate of the
    choice; when it is chosen, it is the served model on test (the caller saves it). ``global_probs``: the global
    model's class probabilities on ``test``, when the caller has them already (else computed here).

    ``test`` is the test split tokenised by the caller (a node through its token cache); ``seed`` is the run's:
    personalization draws from ``derive_seed(seed, "personalize", region)``, each A/B from ``bootstrap_seed``.
    Returns the personalization (whose model the caller saves) and the record. ``private``: personalize under
    DP-SGD (``personalize``); the caller, who charges it, adds what it spent to the record (``ABRecord.dp``).
    """
    started = time.perf_counter()
    result = personalize(
        global_model,
        data,
        settings,
        train,
        max_length=max_length,
        seed=derive_seed(seed, "personalize", region),
        personal=personal.tensors if personal else None,
        start=start.model,
        private=private,
        local_only=local_only,
    )
    seconds = time.perf_counter() - started
    n = len(global_model.labels)
    truth = np.array(test.labels, dtype=int)
    served_test: EvalResult | None = None
    personalized_test: EvalResult | None = None
    global_test: EvalResult | None = None
    ab: dict[str, Difference] = {}
    if len(truth):
        if global_probs is None:
            global_probs = predict_proba_encoded(
                global_model.model, test.ids, pad_id=global_model.pad_id, batch_size=train.eval_batch_size
            )
        elif global_probs.shape != (len(truth), n):
            raise ValueError(f"{region}: global predictions of shape {global_probs.shape}, not ({len(truth)}, {n})")
        probs_global = global_probs
        probs_personalized = predict_proba_encoded(
            result.loaded.model, test.ids, pad_id=result.loaded.pad_id, batch_size=train.eval_batch_size
        )
        probs_served = probs_personalized if result.chosen == PERSONALIZED else probs_global
        if result.chosen == LOCAL_ONLY and result.local_only is not None:
            served_model = result.local_only.loaded
            probs_served = predict_proba_encoded(
                served_model.model, test.ids, pad_id=served_model.pad_id, batch_size=train.eval_batch_size
            )
        served = probs_served.argmax(axis=1)
        compared = {keys.FEDERATED: probs_global.argmax(axis=1), **(baselines or {})}
        ab = {
            f"vs_{name}": paired_bootstrap(
                truth, pred, served, n, resamples=settings.bootstrap, seed=bootstrap_seed(seed, region, name)
            )
            for name, pred in compared.items()
        }
        served_test = scores(probs_served, truth, n)
        personalized_test = scores(probs_personalized, truth, n)
        global_test = scores(probs_global, truth, n)
    record = ABRecord(
        mode=settings.mode,
        local_r=settings.local_r if settings.mode in STACKED_MODES else None,
        start_round=start.round,
        personal_round=personal.round if personal else None,
        balance=settings.balance,
        choice=choice_record(result, settings.choice),
        served_test=served_test,
        personalized_test=personalized_test,
        global_test=global_test,
        ab=ab,
        steps=result.train.steps,
        epochs=0.0 if settings.mode in PROBED_MODES or result.train.steps == 0 else settings.epochs,
        seconds=seconds,
    )
    return result, record
