"""Local training and evaluation as plain functions: the same code serves clients, baselines and tests.

Privacy and policy features wrap these functions; they never add flags here.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedTokenizerBase

from common.config import SGD_MOMENTUM, TrainSettings
from common.data import Example
from common.errors import InputError
from common.metrics import accuracy, confusion, macro_f1_of

# a wrapper that makes training private: (model, optimizer, batch plan) -> the ones to train with
Privatize = Callable[
    [nn.Module, torch.optim.Optimizer, list[list[int]]], tuple[nn.Module, torch.optim.Optimizer, list[list[int]]]
]


@dataclass(frozen=True)
class TrainResult:
    """What one local training run did."""

    loss: float  # mean training loss over the steps
    steps: int
    num_examples: int  # distinct training examples (the FedAvg weight)


@dataclass(frozen=True)
class EvalResult:
    """Quality of a model on one split."""

    loss: float
    accuracy: float
    macro_f1: float
    num_examples: int
    # ``common.metrics.confusion`` as nested tuples (row = truth): regions' add up to their pooled examples'
    confusion: tuple[tuple[int, ...], ...] = ()


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated; padding happens per batch so short texts stay cheap. No texts, no ids:
    fast tokenizers fail on an empty batch, and an empty split (a region without val, a test split emptied by
    leakage removal) is an ordinary input everywhere this is called."""
    if not texts:
        return []
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]  # type: ignore[no-any-return]


def pad_batch(ids: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of token-id lists: padded to the longest with ``pad_id``, with the attention mask."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def plan_steps(num_examples: int, settings: TrainSettings) -> int:
    """Optimizer steps of one run: ``settings.local_steps`` when set (whatever ``num_examples``: a small region
    cycles its data), else ``settings.epochs`` passes, capped by ``max_steps``."""
    if settings.local_steps is not None:
        return settings.local_steps
    steps = max(1, math.ceil(settings.epochs * math.ceil(num_examples / settings.batch_size)))
    return min(steps, settings.max_steps) if settings.max_steps else steps


def batch_order(
    lengths: Sequence[int], steps: int, batch_size: int, window: int, generator: torch.Generator
) -> list[list[int]]:
    """Index batches for ``steps`` steps: fresh shuffles epoch after epoch, the last one cut short.

    With ``window`` > 1 each run of ``window`` batches of a shuffle is sorted by length before it is cut into
    batches, and those batches are then taken in a random order: every batch is still a random draw from the
    epoch, but of examples of similar length, so it pads (and costs) little (transformers' ``group_by_length``).
    ``window`` 1 gives the plain shuffled batches.
    """
    n = len(lengths)
    span = batch_size * window
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=generator).tolist()
        if window == 1:
            batches.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
            continue
        for start in range(0, n, span):
            group = sorted(perm[start : start + span], key=lambda i: lengths[i])
            cut = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
            batches.extend(cut[j] for j in torch.randperm(len(cut), generator=generator).tolist())
    return batches[:steps]


def train_local(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: TrainSettings,
    *,
    max_length: int,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
    private: Privatize | None = None,
    lr_scale: Callable[[int], float] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``examples`` with ``settings.optimizer``; all randomness comes from ``seed``;
    ``private`` makes the training private and ``lr_scale`` scales the learning rate per step (``train_encoded``).

    With ``settings.kl_to_global > 0`` the loss adds KL(start || current) on the predictions, and with
    ``settings.prox_mu > 0`` the proximal term mu/2 · ||w − w_start||², where *start* is the model as it was
    when the call began (the global model in a federated round); see ``train_encoded``.
    """
    ids = encode(tokenizer, [ex.text for ex in examples], max_length)
    labels = [ex.label for ex in examples]
    pad_id = tokenizer.pad_token_id or 0
    return train_encoded(
        model, ids, labels, settings, pad_id=pad_id, seed=seed, progress=progress, private=private, lr_scale=lr_scale
    )


def round_lr_scale(schedule: str, server_round: int, rounds: int) -> float:
    """The factor on the learning rate in round ``server_round`` of ``rounds`` under ``train.lr_schedule``:
    1 when constant; cosine: ½(1 + cos(π (server_round − 1) / rounds)), 1 in round 1 and above 0 in the last.
    A round past ``rounds`` (a task that planned fewer) takes the last round's factor, never 0."""
    if schedule == "constant":
        return 1.0
    done = min(max(server_round, 1), rounds) - 1
    return 0.5 * (1.0 + math.cos(math.pi * done / rounds))


def lr_scale_over(schedule: str, steps: int, rounds: int) -> Callable[[int], float]:
    """Step (1-based) → ``round_lr_scale`` of the round whose share of ``steps`` the step falls in, for a model
    trained in one go (a baseline): round k's share ends at step ⌈steps · k / rounds⌉, where the baseline's k-th
    validation checkpoint is (``client.local_only.checkpoint_steps``)."""
    return lambda step: round_lr_scale(schedule, (step - 1) * rounds // steps + 1, rounds)


LossTerm = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
"""One extra term of the training loss: (the batch's logits, the batch's model inputs) -> a scalar that is added
to the classification loss. Made at the start of a run (``loss_terms``), so it may hold what the run started from."""


def kl_to_start(model: nn.Module, weight: float) -> LossTerm:
    """``weight`` · KL(start || current) on the predictions, *start* being ``model`` as it is now."""
    reference = _frozen_copy(model)

    def term(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            ref_logp = F.log_softmax(reference(**batch).logits, dim=-1)
        kl = F.kl_div(F.log_softmax(logits, dim=-1), ref_logp, log_target=True, reduction="batchmean")
        return weight * kl

    return term


def proximal(params: Sequence[nn.Parameter], mu: float) -> LossTerm:
    """FedProx: mu/2 · ||w − w_start||² summed over ``params``, w_start their values now (its gradient is
    mu · (w − w_start))."""
    anchors = [p.detach().clone() for p in params]

    def term(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))  # type: ignore[return-value]

    return term


def loss_terms(model: nn.Module, params: Sequence[nn.Parameter], settings: TrainSettings) -> list[LossTerm]:
    """The extra loss terms ``settings`` asks for, anchored at ``model`` as it is when training starts (the
    global model in a federated round): KL to its predictions, the proximal term on the trained ``params``."""
    terms: list[LossTerm] = []
    if settings.kl_to_global > 0:
        terms.append(kl_to_start(model, settings.kl_to_global))
    if settings.prox_mu > 0:
        terms.append(proximal(params, settings.prox_mu))
    return terms


def label_prior(labels: Sequence[int], num_labels: int) -> torch.Tensor:
    """The label shares of ``labels``, add-one smoothed ((count + 1) / (n + K)): a class absent from the data
    gets a small share, not log 0 = −inf."""
    counts = torch.bincount(torch.tensor(list(labels), dtype=torch.long), minlength=num_labels).double()
    return (counts + 1.0) / (counts.sum() + num_labels)


def logit_shift(labels: Sequence[int], num_labels: int, tau: float) -> torch.Tensor | None:
    """τ · log prior of ``labels``, added to the logits in the training loss (logit adjustment, balanced softmax
    at τ = 1); None when τ is 0. Computed from the data being trained on and kept in the training run only."""
    if tau == 0:
        return None
    return (tau * torch.log(label_prior(labels, num_labels))).float()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of ``logits`` (+ ``shift`` per class, when given) against ``targets``."""
    return F.cross_entropy(logits if shift is None else logits + shift, targets)


HEAD_PARAMETER = "modules_to_save"  # peft's trained copy of the classification head


def freeze(model: nn.Module, fragment: str) -> list[str]:
    """Stop training every parameter whose name contains ``fragment``; the names frozen."""
    frozen = []
    for name, param in model.named_parameters():
        if fragment in name and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


class _KeptRows(nn.Module):
    """A weight parametrization: the first slices along ``dim`` are ``kept`` (a constant), the rest the trained
    tensor's."""

    def __init__(self, kept: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.register_buffer("kept", kept)
        self.dim = dim

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        kept: torch.Tensor = self.kept  # type: ignore[assignment]
        rest = weight.narrow(self.dim, kept.shape[self.dim], weight.shape[self.dim] - kept.shape[self.dim])
        return torch.cat([kept, rest], dim=self.dim)


@contextlib.contextmanager
def rows_kept(model: nn.Module, fragment: str, rows: int, dim: int = 0) -> Iterator[list[str]]:
    """Within the block, the first ``rows`` rows (``dim`` 1: columns) of every weight of a module whose name
    contains ``fragment`` keep their values; the others train. Every forward pass puts the kept ones back (a
    parametrization, so they get no gradient and neither weight decay nor the optimizer moves what the model
    uses); on leaving, the weights are plain parameters again holding the kept values and the trained rest. The
    names of the modules."""
    modules = {
        name: module
        for name, module in model.named_modules()
        if fragment in name and isinstance(module, nn.Linear) and module.weight.requires_grad
    }
    for module in modules.values():
        kept = module.weight.detach().narrow(dim, 0, rows).clone()
        parametrize.register_parametrization(module, "weight", _KeptRows(kept, dim))
    try:
        yield sorted(modules)
    finally:
        for module in modules.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def local_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer ``settings.optimizer`` names over ``params``: AdamW, or SGD with ``settings.momentum``
    (``SGD_MOMENTUM`` when null); both with ``settings.lr`` and ``settings.weight_decay``."""
    if settings.optimizer == "sgd":
        momentum = SGD_MOMENTUM if settings.momentum is None else settings.momentum
        return torch.optim.SGD(params, lr=settings.lr, momentum=momentum, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def train_encoded(
    model: nn.Module,
    ids: Sequence[list[int]],
    labels: Sequence[int],
    settings: TrainSettings,
    *,
    pad_id: int,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
    private: Privatize | None = None,
    lr_scale: Callable[[int], float] | None = None,
) -> TrainResult:
    """``train_local`` on examples already tokenised (``encode``): token ids and label indices per example.
    No examples is an InputError (the batch sampler would wait forever for a first batch).

    The loss is the cross-entropy (logit-adjusted by ``settings.logit_adjust`` with the prior of ``labels``)
    plus ``loss_terms``; with ``settings.head`` frozen the head keeps the values it has.

    ``private`` (e.g. ``client.dp.DpSgd``) receives the model, optimizer and batch plan before the first step
    and returns the versions to train with, as Opacus's ``make_private`` does; an empty batch in its plan
    (Poisson sampling draws them) takes an optimizer step without a forward pass.

    ``lr_scale`` (step, 1-based → factor) scales the learning rate of the optimizer that steps, on top of the
    warm-up: ``train.lr_schedule`` over a run's rounds (``round_lr_scale``, ``lr_scale_over``).
    """
    if not ids:
        raise InputError("no training examples to train on")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(seed)  # dropout draws from the global generator
    generator = torch.Generator().manual_seed(seed)
    label_tensor = torch.tensor(list(labels))
    steps = plan_steps(len(ids), settings)
    if settings.head == "frozen":
        freeze(model, HEAD_PARAMETER)
    params = [p for p in model.parameters() if p.requires_grad]
    terms = loss_terms(model, params, settings)
    shift = logit_shift(labels, num_labels_of(model) or int(label_tensor.max()) + 1, settings.logit_adjust)
    optimizer = local_optimizer(params, settings)
    model.train()
    total = 0.0
    order = batch_order([len(x) for x in ids], steps, settings.batch_size, settings.length_window, generator)
    if private is not None:
        model, optimizer, order = private(model, optimizer, order)
    # on the optimizer that steps: ``private`` may have replaced the one made above (client.dp, dp.optimizer)
    warmup = settings.warmup_steps
    scale = lr_scale or (lambda _step: 1.0)
    # LambdaLR counts the steps already taken (s): step s + 1 comes next
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (min(1.0, (s + 1) / warmup) if warmup else 1.0) * scale(s + 1)
    )
    for step, batch_idx in enumerate(order, start=1):
        if not batch_idx:
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            scheduler.step()
            continue
        batch = pad_batch([ids[i] for i in batch_idx], pad_id)
        logits = model(**batch).logits
        loss = classification_loss(logits, label_tensor[batch_idx], shift)
        for term in terms:
            loss = loss + term(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        scheduler.step()
        total += float(loss.detach())
        if progress is not None:
            progress(step, steps, total / step)
    model.eval()
    return TrainResult(loss=total / steps, steps=steps, num_examples=len(ids))


def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def predict_proba(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, max_length: int, batch_size: int
) -> np.ndarray:
    """Class probabilities for each text, shape (len(texts), num_labels)."""
    ids = encode(tokenizer, texts, max_length)
    return predict_proba_encoded(model, ids, pad_id=tokenizer.pad_token_id or 0, batch_size=batch_size)


@torch.no_grad()
def predict_proba_encoded(model: nn.Module, ids: Sequence[list[int]], *, pad_id: int, batch_size: int) -> np.ndarray:
    """``predict_proba`` on texts already tokenised (``encode``); no texts give an array of shape (0, num_labels)."""
    model.eval()
    # Sorting by length keeps padding (wasted compute) small; the original order is restored at the end.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[np.ndarray] = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        logits = model(**pad_batch([ids[i] for i in chunk], pad_id)).logits
        out.append(torch.softmax(logits.float(), dim=-1).numpy())
    probs = np.concatenate(out) if out else np.zeros((0, num_labels_of(model)))
    restored = np.empty_like(probs)
    restored[order] = probs
    return restored


def num_labels_of(model: nn.Module) -> int:
    """The model's class count (0 when the model does not say)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "num_labels", 0) or 0)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    num_labels: int,
    *,
    max_length: int,
    batch_size: int = 64,
) -> EvalResult:
    """Loss, accuracy and macro-F1 of ``model`` on ``examples``."""
    ids = encode(tokenizer, [ex.text for ex in examples], max_length)
    labels = [ex.label for ex in examples]
    return evaluate_encoded(model, ids, labels, num_labels, pad_id=tokenizer.pad_token_id or 0, batch_size=batch_size)


def evaluate_encoded(
    model: nn.Module,
    ids: Sequence[list[int]],
    labels: Sequence[int],
    num_labels: int,
    *,
    pad_id: int,
    batch_size: int = 64,
) -> EvalResult:
    """``evaluate`` on examples already tokenised (``encode``): token ids and label indices per example."""
    probs = predict_proba_encoded(model, ids, pad_id=pad_id, batch_size=batch_size)
    return scores(probs, np.array(list(labels)), num_labels)


def scores(probs: np.ndarray, truth: np.ndarray, num_labels: int) -> EvalResult:
    """Loss, accuracy and macro-F1 of class probabilities ``probs`` (one row per example) against ``truth``."""
    if len(truth) == 0:
        return EvalResult(loss=0.0, accuracy=0.0, macro_f1=0.0, num_examples=0)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, None))))
    pred = probs.argmax(axis=1)
    counts = confusion(truth, pred, num_labels)
    return EvalResult(
        loss=loss,
        accuracy=accuracy(truth, pred),
        macro_f1=macro_f1_of(counts),
        num_examples=len(truth),
        confusion=tuple(tuple(int(c) for c in row) for row in counts),
    )
