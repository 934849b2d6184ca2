"""Membership inference on a region's own data: how well an attacker tells the records a model trained on from
records it never saw. Runs wherever the region's data is (a node against the adapters it received, or the
operator's machine on a simulation's run folder) and returns only aggregate numbers.

Two attacks, both scoring each record by ``log p(true label | text)`` under the audited model:

- **loss**: the score itself (members have lower loss; Yeom et al. 2018);
- **reference** (RMIA-style, Zarifzadeh et al. 2024, offline): the score minus the log of the mean probability
  the reference models give the same record, i.e. the likelihood ratio ``p(x | θ) / p(x)``. Dividing by ``p(x)``
  removes how easy the record is for any model, which is what makes the low-FPR regime meaningful. RMIA then
  compares this ratio with that of population records; with its threshold γ = 1 that comparison is monotone in
  the ratio, so the ROC (and every number here) is the ratio's own.

The metrics are pure numpy functions a test checks against a brute-force computation: AUC via average ranks
(Mann-Whitney), a seeded bootstrap interval of it, the ROC, and the TPR at a fixed FPR, which is reported only
when the number of non-members can resolve that FPR (at least ``1 / fpr`` of them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from client.train import predict_proba
from common.data import Example
from common.errors import InputError
from common.model import load_adapter_state
from common.seeds import derive_seed

LOSS = "loss"
REFERENCE = "reference"
ATTACKS = (LOSS, REFERENCE)
LOW_FPRS = (0.01, 0.001)  # the FPRs whose TPR is reported: the few most exposed records are what matter
PROB_FLOOR = 1e-12  # a probability of 0 (float32 softmax underflow) is read as this, as client.train.scores does


# ----------------------------------------------------------------------------------------------- the metrics


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties given the mean of the ranks they span (as in the Mann-Whitney U test)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Area under the ROC of scores where higher means "member": the probability that a random member scores
    above a random non-member (ties count half), from the members' rank sum. NaN when either side is empty."""
    m, n = len(members), len(nonmembers)
    if m == 0 or n == 0:
        return math.nan
    ranks = average_ranks(np.concatenate([np.asarray(members, float), np.asarray(nonmembers, float)]))
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


def bootstrap_auc(
    members: np.ndarray, nonmembers: np.ndarray, *, rounds: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """A percentile bootstrap interval of ``auc``: members and non-members resampled with replacement, each side
    on its own (their counts are fixed by the audit's design), ``rounds`` times from ``seed``."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    if len(members) == 0 or len(nonmembers) == 0 or rounds < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            auc(
                members[rng.integers(0, len(members), len(members))],
                nonmembers[rng.integers(0, len(nonmembers), len(nonmembers))],
            )
            for _ in range(rounds)
        ]
    )
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR of the rule "member if score ≥ t" for every distinct score t (descending), from (0, 0)."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    thresholds = np.unique(np.concatenate([members, nonmembers]))[::-1]
    sorted_m, sorted_n = np.sort(members), np.sort(nonmembers)
    tpr = (len(sorted_m) - np.searchsorted(sorted_m, thresholds, side="left")) / max(len(sorted_m), 1)
    fpr = (len(sorted_n) - np.searchsorted(sorted_n, thresholds, side="left")) / max(len(sorted_n), 1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def resolvable(fpr: float, nonmembers: int) -> bool:
    """Whether ``nonmembers`` records can measure a false-positive rate of ``fpr``: one false positive must be
    at most that rate, so at least ``1 / fpr`` of them (1000 for 0.1 %)."""
    return nonmembers * fpr >= 1.0 - 1e-9


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float | None:
    """The highest TPR of any threshold whose FPR is at most ``fpr``; None when ``fpr`` is not resolvable with
    this many non-members (``resolvable``): a TPR "at 0.1 % FPR" from 200 non-members would be the TPR at 0."""
    if len(members) == 0 or not resolvable(fpr, len(nonmembers)):
        return None
    fprs, tprs = roc_curve(members, nonmembers)
    return float(tprs[fprs <= fpr + 1e-12].max())


# ----------------------------------------------------------------------------------------------- the attacks


def loss_scores(logp: np.ndarray) -> np.ndarray:
    """The loss attack's score: ``log p(y | x)`` under the target (minus the loss; higher means member)."""
    return np.asarray(logp, float)


def reference_scores(logp: np.ndarray, reference_logp: np.ndarray) -> np.ndarray:
    """The reference attack's score: ``log p(y | x, θ) − log mean_r p(y | x, θ_r)`` over the reference models
    (rows of ``reference_logp``), RMIA's likelihood ratio with ``p(x)`` averaged over the references."""
    ref = np.asarray(reference_logp, float)
    if ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError("the reference attack needs at least one reference model's log-probabilities")
    peak = ref.max(axis=0)
    log_mean = peak + np.log(np.mean(np.exp(ref - peak), axis=0))  # log-mean-exp, stable
    return np.asarray(logp, float) - log_mean


@dataclass(frozen=True)
class AttackResult:
    """One attack on one model: the numbers reported, and the ROC for the plot (not written to summary.json)."""

    auc: float
    auc_low: float
    auc_high: float
    tpr: dict[float, float | None]  # FPR → TPR at that FPR, None when not resolvable
    fpr_curve: np.ndarray
    tpr_curve: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """The numbers for summary.json (``tpr_at_fpr`` keyed by the FPR as text, e.g. ``"0.001"``)."""
        return {
            "auc": _finite(self.auc),
            "auc_ci95": [_finite(self.auc_low), _finite(self.auc_high)],
            "tpr_at_fpr": {f"{fpr:g}": value for fpr, value in self.tpr.items()},
        }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def attack(members: np.ndarray, nonmembers: np.ndarray, *, bootstrap: int, seed: int) -> AttackResult:
    """AUC with its bootstrap interval, TPR at each of ``LOW_FPRS``, and the ROC, of member/non-member scores."""
    low, high = bootstrap_auc(members, nonmembers, rounds=bootstrap, seed=seed)
    fprs, tprs = roc_curve(members, nonmembers)
    return AttackResult(
        auc=auc(members, nonmembers),
        auc_low=low,
        auc_high=high,
        tpr={fpr: tpr_at_fpr(members, nonmembers, fpr) for fpr in LOW_FPRS},
        fpr_curve=fprs,
        tpr_curve=tprs,
    )


# ------------------------------------------------------------------------------------------------ one region


@dataclass(frozen=True)
class RegionRecords:
    """A region's members (training records, as its node trained on them) and non-members (its test split)."""

    members: list[Example]
    nonmembers: list[Example]


def audit_records(region: str, train: Sequence[Example], test: Sequence[Example], seed: int) -> RegionRecords:
    """Members and non-members of a region's audit, from its train and test splits as its node's pipeline gives
    them (``client.pipeline.node_data``; not augmented: augmented copies are not records of people).

    Per label, as many members as non-members: ``min(train, test)`` records of that label from each split, a
    seeded sample. Both sides then have the same label mix, so a score that only reflects the label (a model
    that predicts one class gives every record of that class a high ``p(true label)``) cannot tell them apart:
    on the demo, whose train splits are 65/35 and test splits 50/50, unmatched sides gave a one-class DP model
    AUCs of 0.44 and 0.58. The cost is bounded by the test split. The same on a simulation's run folder and on a
    deployed node, for the same ``seed`` (the run's)."""
    rng = random.Random(derive_seed(seed, "privacy-members", region))
    members: list[Example] = []
    nonmembers: list[Example] = []
    for label in sorted({ex.label for ex in train} | {ex.label for ex in test}):
        ins = [ex for ex in train if ex.label == label]
        outs = [ex for ex in test if ex.label == label]
        k = min(len(ins), len(outs))
        # sorted indices keep the splits' own order (the scores do not depend on it; the reports stay stable)
        members += [ins[i] for i in sorted(rng.sample(range(len(ins)), k))]
        nonmembers += [outs[i] for i in sorted(rng.sample(range(len(outs)), k))]
    return RegionRecords(members, nonmembers)


def record_logp(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_length: int,
    batch_size: int,
) -> np.ndarray:
    """``log p(true label | text)`` of each example under ``model`` (the model's own prediction path)."""
    if not examples:
        return np.zeros(0)
    probs = predict_proba(model, tokenizer, [ex.text for ex in examples], max_length=max_length, batch_size=batch_size)
    truth = np.array([ex.label for ex in examples])
    return np.log(np.clip(probs[np.arange(len(truth)), truth].astype(float), PROB_FLOOR, None))


@dataclass(frozen=True)
class Scored:
    """One model's ``log p(y | x)`` on a region's members and non-members."""

    members: np.ndarray
    nonmembers: np.ndarray


@dataclass(frozen=True)
class RegionAudit:
    """A region's audit: per audited model, per attack, the result; and the counts behind them."""

    region: str
    members: int
    nonmembers: int
    results: dict[str, dict[str, AttackResult]]  # model name → attack → result

    def to_json(self) -> dict[str, Any]:
        """Only aggregate numbers: what may leave the region."""
        return {
            "members": self.members,
            "nonmembers": self.nonmembers,
            "models": {
                model: {name: result.to_json() for name, result in attacks.items()}
                for model, attacks in self.results.items()
            },
        }


def audit_scored(
    region: str,
    targets: Mapping[str, Scored],
    references: Sequence[Scored],
    *,
    bootstrap: int,
    seed: int,
) -> RegionAudit:
    """Both attacks on every target model of a region, from log-probabilities already computed.

    ``references`` are the reference models' scores on the same records (at least one). The bootstrap of each
    (model, attack) is seeded from ``seed`` and its position, so the same inputs always give the same interval;
    a model whose scores equal an earlier one's (a region that serves the global adapter) gets that model's
    results, not a second bootstrap that would give the same model another interval.
    """
    if not references:
        raise ValueError("the reference attack needs at least one reference model")
    ref_m = np.stack([r.members for r in references])
    ref_n = np.stack([r.nonmembers for r in references])
    results: dict[str, dict[str, AttackResult]] = {}
    for i, (model, scored) in enumerate(targets.items()):
        earlier = next((m for m, s in targets.items() if m in results and _same_scores(s, scored)), None)
        if earlier is not None:
            results[model] = dict(results[earlier])
            continue
        results[model] = {
            LOSS: attack(
                loss_scores(scored.members), loss_scores(scored.nonmembers), bootstrap=bootstrap, seed=seed + 2 * i
            ),
            REFERENCE: attack(
                reference_scores(scored.members, ref_m),
                reference_scores(scored.nonmembers, ref_n),
                bootstrap=bootstrap,
                seed=seed + 2 * i + 1,
            ),
        }
    first = next(iter(targets.values()), None)
    return RegionAudit(
        region,
        len(first.members) if first else 0,
        len(first.nonmembers) if first else 0,
        results,
    )


def _same_scores(a: Scored, b: Scored) -> bool:
    return a is b or (np.array_equal(a.members, b.members) and np.array_equal(a.nonmembers, b.nonmembers))


@dataclass(frozen=True)
class Predictor:
    """A model as the audit uses it: the network, its tokenizer, and the token budget it reads texts with."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    max_length: int


def swap_state(
    predictor: Predictor,
    state: Mapping[str, torch.Tensor],
    source: Path | str,
    error: type[InputError],
    shape: str,
) -> None:
    """Put another adapter state of the same shape (an earlier round's global, a kept update, the initial
    adapter) into ``predictor``'s loaded model, so the base model loads once for all of them. A state that does
    not fit raises ``error`` (the caller's own type) naming ``source`` and whose ``shape`` it should have had."""
    try:
        load_adapter_state(predictor.model, dict(state))  # type: ignore[arg-type]
    except ValueError as err:
        raise error(f"{source}: not an adapter of {shape} shape ({err})") from err


def score(predictor: Predictor, members: Sequence[Example], nonmembers: Sequence[Example], batch_size: int) -> Scored:
    """One model's ``log p(y | x)`` on the members and the non-members."""
    kwargs: dict[str, Any] = {"max_length": predictor.max_length, "batch_size": batch_size}
    return Scored(
        record_logp(predictor.model, predictor.tokenizer, members, **kwargs),
        record_logp(predictor.model, predictor.tokenizer, nonmembers, **kwargs),
    )


def audit_region(
    region: str,
    members: Sequence[Example],
    nonmembers: Sequence[Example],
    targets: Mapping[str, Predictor],
    references: Sequence[Predictor],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> RegionAudit:
    """The audit a node runs on its own data: ``members`` (the records it trained on, as its pipeline gave them
    to training), ``nonmembers`` (records it never trained on, e.g. its test split), the models it received or
    serves (``targets``, by name) and ``references``. Returns only aggregate numbers (``RegionAudit.to_json``)."""
    scored = {name: score(p, members, nonmembers, batch_size) for name, p in targets.items()}
    refs = [score(p, members, nonmembers, batch_size) for p in references]
    return audit_scored(region, scored, refs, bootstrap=bootstrap, seed=seed)


def fmt_number(value: float | None) -> str:
    """A report cell: three decimals, or n/a for a value the records cannot resolve."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def results_table(result: RegionAudit, model_text: Mapping[str, str]) -> list[str]:
    """The Markdown table of a region's audit (model × attack: AUC, its interval, TPR at each of ``LOW_FPRS``),
    the same in a run folder's report and a node's."""
    cell = fmt_number
    lines = ["| model | attack | AUC | 95 % interval | TPR @ 1 % FPR | TPR @ 0.1 % FPR |", "|---|---|---|---|---|---|"]
    for model, attacks in result.results.items():
        for attack_name, r in attacks.items():
            lines.append(
                f"| {model_text.get(model, model)} | {attack_name} | {cell(r.auc)} | [{cell(r.auc_low)}, "
                f"{cell(r.auc_high)}] | {cell(r.tpr[LOW_FPRS[0]])} | {cell(r.tpr[LOW_FPRS[1]])} |"
            )
    return lines


# The plain-language paragraph that ends every privacy report (a run folder's and a node's).
MEANING_TEXT = """## What these numbers mean, and what they do not

**They mean**: an attacker who holds the model and a record of this region, and who knows how the records were
chosen, tries to tell whether the record was one the model was trained on. **AUC** is the chance that the attack
scores a random training record above a random record the model never saw: 0.5 is guessing, 1.0 is always
right. The interval is a 95 % bootstrap interval over the region's records; an interval that covers 0.5 means
this audit found no evidence that the model reveals membership. **TPR at 1 % FPR** is the share of training
records the attacker identifies with confidence while wrongly accusing only 1 % of outsiders: this is what
matters for the few people most exposed, and a TPR near the FPR (0.01) means the attacker does no better than
chance there. The **reference** attack compares the model with the run's earlier global models on the same
record, which removes how easy the record is in itself; it is usually the stronger of the two.

**They do not mean** that the data is safe, or that a number below some line is a guarantee. An empirical
audit measures these attacks on these records: a stronger attacker (more reference models trained without the
records, or access to every round's update) can do better, and with a few hundred records the low-FPR numbers
are coarse (a TPR at 0.1 % FPR needs at least 1000 non-members and is reported as n/a with fewer). Only
differential privacy gives a guarantee that holds against every attacker. Nothing about an individual record
is in this report (nor in summary.json, nor in a node's report): only counts, AUCs and rates.
"""
