"""The run configuration: one YAML file parsed once, at the edge, into frozen typed objects.

Every problem in a file is reported together, each with its path (``regions[2].data``) and, when the value
came from a YAML file, the line it sits on. Settings objects also validate themselves in ``__post_init__``, so
an object built in code is checked the same way as one read from YAML.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from common import keys
from common.augment_settings import AugmentSettings
from common.basemodels import base_problem
from common.data import DATA_SUFFIXES, find_split, json_error_text, missing_split
from common.errors import ConfigError, InputError, check
from common.secagg import secagg_parameter_problem
from common.yamlfile import parse_yaml, read_mapping

T = TypeVar("T")

AGGREGATIONS = ("weighted", "uniform")
LORA_AGGREGATIONS = ("fedit", "ffa")  # aggregation.lora
HEAD_MODES = ("train", "frozen")  # train.head
LOCAL_OPTIMIZERS = ("adamw", "sgd")  # train.optimizer
LR_SCHEDULES = ("constant", "cosine")  # train.lr_schedule
WHOLE = "whole"  # dp.batch_size: the region's whole split in every DP-SGD step
SGD_MOMENTUM = 0.9  # train.momentum when null
# aggregation.optimizer: the server optimizer each applies to the round's mean update (Reddi et al. 2021,
# "Adaptive Federated Optimization"), with the hyperparameters it reads and their defaults (a field left null
# takes these; setting one the chosen optimizer does not read is refused, never silently ignored)
OPTIMIZER_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "fedavg": {"server_lr": 1.0},
    "fedavgm": {"server_lr": 1.0, "momentum": 0.9},
    "fedadam": {"server_lr": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_lr": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"server_lr": 0.01, "beta_1": 0.0, "tau": 1e-3},
}
OPTIMIZERS = tuple(OPTIMIZER_HYPERPARAMETERS)
STOP_METRICS = ("macro_f1", "accuracy", "loss")
# lora.r (and r + local_r stacked): two thirds of the supported bases' 384-wide layers; a huge rank makes torch
# allocate without end
MAX_LORA_RANK = 256
MAX_SEED = 2**63 - 1  # the run's seed: what torch.Generator.manual_seed accepts, non-negative
_log = logging.getLogger(__name__)
MAX_VAL_FRACTION = 0.5  # data.val_fraction: carving more would leave less to train on than to validate with


@dataclass(frozen=True)
class ModelSettings:
    """Which pretrained encoder to adapt and how to tokenise for it."""

    base: str = "minilm"  # "minilm" (the offline package), "me5-small" (built here), a Hugging Face id or a folder
    max_length: int = 128
    # what the classification head reads: "cls", the architecture's own (BERT: its pooler, dense + tanh on the
    # first token); "mean", the attention-masked mean of the last hidden states, L2-normalised: how sentence
    # encoders such as multilingual-e5 are trained to be used, and the features a head trained alone under DP
    # learns from best (docs/privacy.md). BERT bases only; such a run cannot be exported for stock transformers
    pooling: Literal["cls", "mean"] = "cls"

    def __post_init__(self) -> None:
        problems = []
        if not self.base.strip():
            problems.append(("base", "must not be empty"))
        missing = base_problem(self.base)
        if missing:
            # known before anything trains or is written: the one command to run
            problems.append(("base", missing))
        if not 8 <= self.max_length <= 4096:
            problems.append(("max_length", f"must be in [8, 4096], got {self.max_length}"))
        check(problems)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules`` None picks the default for the model's architecture."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None
    # LoRA in the model's last `layers` transformer layers only (null: in every layer). The layers below then hold
    # nothing trainable, so training runs them without autograd: a training pass on me5-small (12 layers, 1
    # thread) costs x0.71 with 6 and x0.57 with 4, and the global model lost 0.8-1.5 points on the demo with 4
    # (docs/benchmarks.md, "LoRA in the last layers only")
    layers: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.layers is not None and self.layers < 1:
            problems.append(("layers", f"must be >= 1 (or null for every layer), got {self.layers}"))
        if not 1 <= self.r <= MAX_LORA_RANK:
            # a rank beyond the layers' width adds nothing, and a huge one makes torch allocate without end
            problems.append(("r", f"must be in [1, {MAX_LORA_RANK}], got {self.r}"))
        if self.alpha < 1:
            problems.append(("alpha", f"must be >= 1, got {self.alpha}"))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if self.target_modules is not None and not self.target_modules:
            problems.append(("target_modules", "must name at least one module, or be null for the default"))
        check(problems)


@dataclass(frozen=True)
class TrainSettings:
    """Local training on one region, for one round (or for a whole baseline run, times ``rounds``)."""

    lr: float = 5e-4
    weight_decay: float = 0.01
    epochs: float = 1.0  # local passes over the region's train split per round; fractions allowed
    max_steps: int | None = None  # caps the optimizer steps of the epochs per round when set
    # exactly this many optimizer steps per round in every region, whatever its size (a small region cycles its
    # data, a large one does not drift further per round); epochs is then ignored, max_steps must be null.
    # The FedAvg weight stays the region's real training-set size.
    local_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    # batches drawn together and sorted by token length, so that each pads little (1: plain shuffled batches)
    length_window: int = 8
    # clip of the batch gradient's L2 norm (null: none); a DP-SGD node clips each example's gradient to dp.clip
    # instead, and this has no effect there
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    # the learning rate over the run's rounds: constant, or cosine (lr · ½(1 + cos(π (round − 1) / rounds)): the
    # full lr in round 1, about 2 % of it in the last of 12), so that the regions' late updates, which Adam sizes
    # by lr whatever their gradients, stop swinging the global model. The baselines follow it at the same shares
    # of their steps; personalization keeps its own lr
    lr_schedule: Literal["constant", "cosine"] = "constant"
    kl_to_global: float = 0.0  # weight of KL(global || local) on the predictions, keeps regions consistent
    # FedProx: weight mu of mu/2 * ||w - w_global||^2 over the trained adapter (and head) tensors, w_global as
    # received at the start of the round; pulls each region's update toward the global model (0: off). Refused
    # on a node whose policy requires DP (DP-SGD's per-example gradients leave the term out)
    prox_mu: float = 0.0
    # logit adjustment / balanced softmax: train with CE(logits + tau * log prior, y), prior = the label shares
    # of the training data at hand (a node's own, smoothed; it never leaves the node); predictions unchanged.
    # Counters label skew: a region's majority class no longer pulls the shared head its way (0: off). Refused on
    # a node whose policy requires DP (the prior, from all its labels, would break DP-SGD's per-step bound)
    logit_adjust: float = 0.0
    # train: the classification head trains with the adapter. frozen: it keeps its seeded initial values (the
    # same on every node and the server) and only the adapter trains, as in FedBABU
    head: Literal["train", "frozen"] = "train"
    # the local optimizer: "adamw", or "sgd" with `momentum` and weight_decay. Adam scales every step to about
    # lr whatever the gradient's size, so a region whose loss is already near 0 (one class, under
    # logit_adjust) still moves the shared model its way at full speed; SGD's step is the gradient's
    # (docs/benchmarks.md, Dirichlet(0.1)). The same for the baselines; a DP node uses dp.optimizer
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # SGD's (heavy-ball) momentum, null: 0.9; setting it with optimizer: adamw is refused (Adam would ignore it)
    momentum: float | None = None
    threads: int | None = None  # torch threads; None leaves torch's default

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.lr < 1.0:
            problems.append(("lr", f"must be in (0, 1), got {self.lr}"))
        if self.weight_decay < 0:
            problems.append(("weight_decay", f"must be >= 0, got {self.weight_decay}"))
        if self.epochs <= 0:
            problems.append(("epochs", f"must be > 0, got {self.epochs}"))
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(("max_steps", f"must be >= 1 or null, got {self.max_steps}"))
        if self.local_steps is not None and self.local_steps < 1:
            problems.append(("local_steps", f"must be >= 1 or null, got {self.local_steps}"))
        if self.local_steps is not None and self.max_steps is not None:
            problems.append(
                (
                    "local_steps",
                    f"is {self.local_steps} but max_steps is {self.max_steps}: local_steps sets the steps per round "
                    "exactly (epochs ignored), max_steps caps the steps of the epochs; set one of them",
                )
            )
        if self.prox_mu < 0:
            problems.append(("prox_mu", f"must be >= 0, got {self.prox_mu}"))
        if self.logit_adjust < 0:
            problems.append(("logit_adjust", f"must be >= 0, got {self.logit_adjust}"))
        if self.head not in HEAD_MODES:
            problems.append(("head", f"must be one of {', '.join(HEAD_MODES)}, got {self.head!r}"))
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(("lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"))
        if self.optimizer not in LOCAL_OPTIMIZERS:
            problems.append(("optimizer", f"must be one of {', '.join(LOCAL_OPTIMIZERS)}, got {self.optimizer!r}"))
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            problems.append(("momentum", f"must be in [0, 1) or null, got {self.momentum}"))
        elif self.momentum is not None and self.optimizer != "sgd":
            problems.append(
                ("momentum", f"is read by optimizer sgd only, and optimizer is {self.optimizer}; remove it")
            )
        for name in ("batch_size", "eval_batch_size", "length_window"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append(("grad_clip", f"must be > 0 or null, got {self.grad_clip}"))
        if self.warmup_steps < 0:
            problems.append(("warmup_steps", f"must be >= 0, got {self.warmup_steps}"))
        if self.kl_to_global < 0:
            problems.append(("kl_to_global", f"must be >= 0, got {self.kl_to_global}"))
        if self.threads is not None and self.threads < 1:
            problems.append(("threads", f"must be >= 1 or null, got {self.threads}"))
        check(problems)


@dataclass(frozen=True)
class DataSettings:
    """How a region's splits are formed from its files (the same on every node and in every check)."""

    # a region with no val file gets this fraction of its train split as validation, stratified by label and
    # seeded by the run seed and the region (client.pipeline.carve_val); a region with fewer than
    # 1 / val_fraction train examples keeps them all for training; 0: never carve (no validation there)
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        # `not <=`: NaN fails every comparison, so it is refused too
        if not 0.0 <= self.val_fraction <= MAX_VAL_FRACTION:
            check([("val_fraction", f"must be in [0, {MAX_VAL_FRACTION}], got {self.val_fraction}")])


@dataclass(frozen=True)
class SecureSettings:
    """Secure aggregation (SecAgg+): the server learns only the sum of the sampled regions' updates.

    Each node uploads its example count n_r and n_r·θ_r, quantized and masked; the server unmasks the sum and
    divides. See docs/secure-aggregation.md.
    """

    enabled: bool = False
    # the fewest nodes that must finish a round, and the shares needed to rebuild a node's secret (a dropped
    # node's mask, a survivor's own); null: ⌈2/3⌉ of the nodes sampled, at least 2
    threshold: int | None = None
    # how many nodes (itself included) each node secret-shares with: odd, at least 3; null: every sampled node
    shares: int | None = None
    clipping_range: float = 1.0  # bound on every adapter value |θ|; a node holding a larger value refuses
    max_weight: int = 1_000_000  # bound on a region's example count; a larger region refuses
    precision: float = 1e-6  # largest quantization error allowed on the mean, per value (sets the modulus)

    def __post_init__(self) -> None:
        problems = []
        if self.threshold is not None and self.threshold < 2:
            problems.append(
                ("threshold", f"must be >= 2 (a sum of one region is that region's update), got {self.threshold}")
            )
        if self.shares is not None and (self.shares < 3 or self.shares % 2 == 0):
            problems.append(
                ("shares", f"must be an odd number >= 3, or null for every sampled node, got {self.shares}")
            )
        if self.threshold is not None and self.shares is not None and self.threshold > self.shares:
            problems.append(("threshold", f"is {self.threshold} but each node shares with only {self.shares}"))
        if not math.isfinite(self.clipping_range) or self.clipping_range <= 0:
            problems.append(("clipping_range", f"must be > 0, got {self.clipping_range}"))
        if self.max_weight < 1:
            problems.append(("max_weight", f"must be >= 1, got {self.max_weight}"))
        if not math.isfinite(self.precision) or not 0 < self.precision < self.clipping_range:
            problems.append(("precision", f"must be in (0, clipping_range), got {self.precision}"))
        check(problems)


@dataclass(frozen=True)
class AggregationSettings:
    """How the server combines the regions' adapters each round."""

    method: Literal["weighted", "uniform"] = "weighted"
    # the server optimizer applied to the round's mean update Δ = mean − global (Reddi et al. 2021): fedavg
    # (θ += η·Δ), fedavgm (server momentum), fedadam, fedyogi, fedadagrad (adaptive per-weight steps); its
    # state is saved with every checkpoint and replayed by `audit verify --updates`. docs/server-optimizers.md
    optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = "fedavg"
    # η, the server step size; null: 1.0 for fedavg and fedavgm (fedavg at 1.0 is plain FedAvg), 0.01 for the
    # adaptive three (they move a weight by up to about η per round, however small its Δ)
    server_lr: float | None = None
    momentum: float | None = None  # fedavgm's β in v ← β·v + Δ, θ += η·v; null: 0.9
    beta_1: float | None = None  # fedadam, fedyogi, fedadagrad: m ← β1·m + (1−β1)·Δ; null: 0.9 (fedadagrad 0.0)
    beta_2: float | None = None  # fedadam, fedyogi: decay of the second moment v; null: 0.99
    tau: float | None = None  # fedadam, fedyogi, fedadagrad: τ in θ += η·m/(√v + τ), the adaptivity; null: 1e-3
    fraction_train: float = 1.0
    min_clients: int = 2
    round_timeout: float = 3600.0  # seconds to wait for the replies of one round
    node_timeout: float = 300.0  # seconds to wait for min_clients nodes to be connected before a round
    # fedit: every LoRA A and B trains and is averaged on its own (the average of the B·A products is not B·A
    # of the averages). ffa (FFA-LoRA): nodes keep every lora_A at the seeded init the server sent and train B
    # (and the head), so the average is exact and linear; a reply whose lora_A changed is rejected
    lora: Literal["fedit", "ffa"] = "fedit"
    secure: SecureSettings = field(default_factory=SecureSettings)  # secure aggregation (off by default)

    def __post_init__(self) -> None:
        problems = []
        if self.lora not in LORA_AGGREGATIONS:
            problems.append(("lora", f"must be one of {', '.join(LORA_AGGREGATIONS)}, got {self.lora!r}"))
        if self.round_timeout <= 0:
            problems.append(("round_timeout", f"must be > 0, got {self.round_timeout}"))
        if self.node_timeout <= 0:
            problems.append(("node_timeout", f"must be > 0, got {self.node_timeout}"))
        if self.method not in AGGREGATIONS:
            problems.append(("method", f"must be one of {', '.join(AGGREGATIONS)}, got {self.method!r}"))
        problems.extend(self._optimizer_problems())
        if not 0.0 < self.fraction_train <= 1.0:
            problems.append(("fraction_train", f"must be in (0, 1], got {self.fraction_train}"))
        if self.min_clients < 1:
            problems.append(("min_clients", f"must be >= 1, got {self.min_clients}"))
        check(problems)

    def _optimizer_problems(self) -> list[tuple[str, str]]:
        if self.optimizer not in OPTIMIZERS:
            return [("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")]
        problems = []
        reads = OPTIMIZER_HYPERPARAMETERS[self.optimizer]
        for name in ("momentum", "beta_1", "beta_2", "tau"):
            if getattr(self, name) is not None and name not in reads:
                users = [o for o, params in OPTIMIZER_HYPERPARAMETERS.items() if name in params]
                problems.append(
                    (name, f"is read by {' and '.join(users)} only, and optimizer is {self.optimizer}; remove it")
                )
        ranges = {
            "server_lr": (0.0, 10.0, "(0, 10]"),
            "momentum": (0.0, 1.0, "[0, 1)"),
            "beta_1": (0.0, 1.0, "[0, 1)"),
            "beta_2": (0.0, 1.0, "[0, 1)"),
            "tau": (0.0, 1.0, "(0, 1]"),
        }
        for name, (low, high, shown) in ranges.items():
            value = getattr(self, name)
            if value is None:
                continue
            # `not (…)`: NaN fails every comparison, so it is refused too
            inside = low < value <= high if shown[0] == "(" else low <= value < high
            if not inside:
                problems.append((name, f"must be in {shown}, got {value}"))
        return problems

    def optimizer_settings(self) -> dict[str, float]:
        """The hyperparameters ``optimizer`` reads, each as set or its default: what the server steps with, the
        ledger records and a resume must match."""
        return {
            name: default if getattr(self, name) is None else float(getattr(self, name))
            for name, default in OPTIMIZER_HYPERPARAMETERS[self.optimizer].items()
        }


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when the example-weighted validation metric has not improved for ``patience`` rounds."""

    patience: int | None = None  # None: run every round
    metric: Literal["macro_f1", "accuracy", "loss"] = "macro_f1"
    min_delta: float = 0.0
    # validate the global model after every `every`-th round and after the last one only (1: after every round);
    # the best round is the best of those, and `patience` still counts rounds. The baselines validate at as many
    # checkpoints, at the same points of their training. Each validation is a forward pass over every region's
    # val split: fewer of them make a run cheaper, at the price of a coarser choice of the round kept.
    every: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.patience is not None and self.patience < 1:
            problems.append(("patience", f"must be >= 1 or null, got {self.patience}"))
        if self.every < 1:
            problems.append(("every", f"must be >= 1, got {self.every}"))
        if self.metric not in STOP_METRICS:
            problems.append(("metric", f"must be one of {', '.join(STOP_METRICS)}, got {self.metric!r}"))
        if self.min_delta < 0:
            problems.append(("min_delta", f"must be >= 0, got {self.min_delta}"))
        check(problems)


PERSONALIZE_MODES = ("none", "head", "continue", "local", "probe", "dual")
CHOICE_RULES = ("point", "confident")  # personalize.choice
START_ROUNDS = ("best", "last")  # personalize.start
DUAL_TRAINING = ("joint", "apart")  # personalize.dual_train
PROBED_MODES = ("probe", "dual")  # the head's output layer is refit as a linear probe; no epoch of SGD
STACKED_MODES = ("local", "dual")  # the result is one adapter of rank lora.r + local_r


def keeps_scale(lora: LoraSettings, extra: int) -> bool:
    """Whether a LoRA of rank r + ``extra`` can have the scale alpha/r of ``lora`` with an integer alpha."""
    return lora.alpha * (lora.r + extra) % lora.r == 0


@dataclass(frozen=True)
class PersonalizeSettings:
    """After the federated rounds, each region adapts the global model on its own node (nothing is sent)."""

    # head: the head only; continue: adapter + head; local: a new rank-local_r LoRA + head on top of the frozen
    # global adapter (saved as one adapter of rank r + local_r); probe: the head's output layer refit as a linear
    # probe on the frozen model's features (one forward pass, convex, deterministic; lr and epochs unused);
    # dual: a rank-local_r LoRA of the region's own trained alongside the global adapter in every round (kept on
    # the node, never sent; client.personal), then stacked onto the final global adapter and the head probed
    mode: Literal["none", "head", "continue", "local", "probe", "dual"] = "none"
    epochs: float = 1.0  # passes over the region's train split
    lr: float = 2e-3
    # continue, local: weight of KL(start || personalized), keeps it near the global model it started from (start)
    kl_to_global: float = 0.0
    bootstrap: int = 1000  # resamples of the paired bootstraps: the choice on validation, the A/B on test
    local_r: int = 4  # local, dual: rank of the region's own LoRA (its scale alpha/r is the global adapter's)
    # train on an equal number of examples per class (the majority subsampled, the minority repeated; as many
    # examples as the train split has), so that a region's label skew does not become its prior
    balance: bool = False
    # which model a region serves, decided on its validation split. point: the personalized one if its macro-F1
    # is higher (a tie keeps the global one). confident: the personalized one unless the global one is better
    # with 95 % confidence (paired bootstrap). Personalization starts from a global model (with start: best,
    # the very one), so going back to it needs evidence; on a hundred validation examples a point comparison is
    # close to a coin flip.
    choice: Literal["point", "confident"] = "confident"
    # which round's global adapter personalization starts from (dual: and whose personal slices it stacks).
    # best: the federation's chosen round, the model a region serves without personalization. last: the last
    # round's; the global model's validation can peak in an early round while the personal slices, trained in
    # every round, keep improving (measured with dual only; with another mode, last starts from a round the
    # run's validation did not pick, and confident then takes evidence to go back to it). Either way the choice
    # compares with the best round's global model.
    start: Literal["best", "last"] = "best"
    # dual: how a round trains the two parts. joint: one pass trains the global adapter and the personal slices
    # together (the personal part costs no extra pass), but under strong label skew the global part then learns
    # little: each region's slices fit its own data, so the shared part gets little pressure to discriminate
    # (docs/personalization.md). apart: the global adapter trains alone, exactly as without dual, and the slices
    # then train on top of the received global adapter, held fixed with the head: twice the training steps per
    # round; not on a node whose policy requires DP (its budget plans one pass per round)
    dual_train: Literal["joint", "apart"] = "joint"
    # on a node whose policy sets require_dp: train the personalization with DP-SGD too (per-example clipping,
    # Poisson sampling, the rounds' noise), charged to the node's own budget, which is then calibrated before
    # round 1 for the rounds' steps plus these; the served model is then covered by the same (epsilon, delta).
    # dual: the personal slices are already DP (trained in the rounds' pass), so the head is not refit. Not with
    # probe (its closed-form refit is no DP-SGD: use head) nor balance (repeated records break per-record DP).
    # A region without require_dp has no budget: it personalizes as without dp (docs/privacy.md)
    dp: bool = False
    # also weigh serving the region's local-only model (its own adapter trained from the base on its data alone,
    # with the local-only baseline's budget): after choosing between the global and the personalized model, the
    # region serves the local-only one instead if validation says so by the same rule (point: higher macro-F1;
    # confident: better with 95 % confidence, so switching to it needs evidence). A simulation with the
    # local_only baseline reuses the baseline's adapter; otherwise the node trains it (client.local_only). Off by
    # default: the federation's model is what a region serves unless its own data clearly says otherwise.
    consider_local_only: bool = False
    # the rule consider_local_only weighs the local-only model by; null: choice's. point serves it when its
    # validation macro-F1 is higher: where it wins the region serves exactly its own model, so the served model is
    # never below local-only there, and a wrong switch costs only what the two models differ by. confident serves
    # it only on 95 % evidence, which a 100-example validation split rarely gives (docs/personalization.md)
    local_only_choice: Literal["point", "confident"] | None = None

    def weighs_local_only(self) -> bool:
        """Whether a region's local-only model is a serving candidate: asked for, and a personalization runs."""
        return self.consider_local_only and self.mode != "none"

    def local_only_rule(self) -> str:
        """The rule the local-only candidate is weighed by: ``local_only_choice``, else ``choice``."""
        return self.local_only_choice if self.local_only_choice is not None else self.choice

    def unused(self) -> list[str]:
        """Settings given that change nothing here, each in words: a config that weighs the local-only model (as
        the demo's does) stays usable with ``--set personalize.mode=none`` or ``consider_local_only=false``, and
        the check says what is left out rather than refusing the run."""
        found = []
        if self.consider_local_only and self.mode == "none":
            found.append(
                "personalize.consider_local_only has no effect with personalize.mode none: no region personalizes, "
                "so every region serves the global model and no local-only model is weighed"
            )
        elif self.local_only_choice is not None and not self.consider_local_only:
            found.append(
                "personalize.local_only_choice has no effect without personalize.consider_local_only: true (it is "
                "the rule that weighs the local-only model)"
            )
        return found

    def __post_init__(self) -> None:
        problems = []
        if self.dp and self.mode == "probe":
            problems.append(
                (
                    "dp",
                    "mode probe refits the head outside SGD, which DP-SGD cannot cover; use mode head (the head "
                    "trained with DP-SGD) or drop dp",
                )
            )
        if self.dp and self.balance:
            problems.append(
                (
                    "balance",
                    "cannot be used with dp: balancing repeats a minority class's records, so one record would be "
                    "several training examples and the guarantee would not be per record",
                )
            )
        if self.dp and self.consider_local_only:
            problems.append(
                (
                    "consider_local_only",
                    "cannot be used with dp: the local-only model trains outside DP-SGD, so serving it would leave "
                    "the served model uncovered (set it to false; configs/demo.yaml sets it true)",
                )
            )
        if self.choice not in CHOICE_RULES:
            problems.append(("choice", f"must be one of {', '.join(CHOICE_RULES)}, got {self.choice!r}"))
        if self.local_only_choice is not None and self.local_only_choice not in CHOICE_RULES:
            problems.append(
                (
                    "local_only_choice",
                    f"must be one of {', '.join(CHOICE_RULES)} or null, got {self.local_only_choice!r}",
                )
            )
        if self.start not in START_ROUNDS:
            problems.append(("start", f"must be one of {', '.join(START_ROUNDS)}, got {self.start!r}"))
        if self.dual_train not in DUAL_TRAINING:
            problems.append(("dual_train", f"must be one of {', '.join(DUAL_TRAINING)}, got {self.dual_train!r}"))
        if self.mode not in PERSONALIZE_MODES:
            problems.append(("mode", f"must be one of {', '.join(PERSONALIZE_MODES)}, got {self.mode!r}"))
        if not 0.0 < self.epochs <= 10.0:
            problems.append(("epochs", f"must be in (0, 10], got {self.epochs}"))
        if not 0.0 < self.lr < 1.0:
            problems.append(("lr", f"must be in (0, 1), got {self.lr}"))
        if self.kl_to_global < 0:
            problems.append(("kl_to_global", f"must be >= 0, got {self.kl_to_global}"))
        if self.bootstrap < 100:
            problems.append(("bootstrap", f"must be >= 100, got {self.bootstrap}"))
        if not 1 <= self.local_r <= 64:
            problems.append(("local_r", f"must be in [1, 64], got {self.local_r}"))
        check(problems)


@dataclass(frozen=True)
class SimulationSettings:
    """Resources of the in-process Flower simulation and of its baselines."""

    cpus_per_client: int = 2
    # Processes that train the baselines' models (the centralized one, each region's local-only one) side by side,
    # each with an even share of the cores as torch threads; 1 trains them one after another in this process.
    # On 2 cores two 1-thread processes take the demo's baselines in x0.83 of the time one 2-thread process takes
    # (benchmarks/bench_processes.py; docs/benchmarks.md, "Baselines side by side").
    baseline_processes: int = 2

    def __post_init__(self) -> None:
        problems = []
        if self.cpus_per_client < 1:
            problems.append(("cpus_per_client", f"must be >= 1, got {self.cpus_per_client}"))
        if self.baseline_processes < 1:
            problems.append(("baseline_processes", f"must be >= 1, got {self.baseline_processes}"))
        check(problems)


@dataclass(frozen=True)
class Region:
    """One region (country, language, market): a name and the folder of its data."""

    name: str
    data: Path
    # the simulated node's residency policy file (common.policy); in a deployment the node's own config names it
    policy: Path | None = None
    # the simulated node's own train-split augmentation (client.augment); a deployed node's config sets its own
    augment: AugmentSettings | None = None

    def __post_init__(self) -> None:
        problem = region_name_problem(self.name)
        if problem:
            check([("name", problem)])

    def folder_problems(self) -> list[str]:
        """What is wrong with the region's data folder (checked by RunConfig, so that every region is checked)."""
        if self.policy is not None and not self.policy.is_file():
            return [f"no such policy file: {self.policy}"]
        if not self.data.is_dir():
            return [f"{self.data} is a file, not a folder" if self.data.exists() else f"no such folder: {self.data}"]
        problems = []
        for split in keys.SPLITS:
            try:
                path = find_split(self.data, split)
            except InputError as err:
                problems.append(str(err))
                continue
            if path is None and split != keys.VAL:  # without a val file the node carves one from train
                problems.append(missing_split(self.data, split))
        return problems


@dataclass(frozen=True)
class DpSettings:
    """How a node runs DP-SGD when its policy requires differential privacy (``require_dp: {epsilon, delta}``).

    The budget itself is the node's (its policy); these are the run's hyperparameters, which change how useful
    the model is but never the guarantee: each node calibrates its noise so that every planned round fits its own
    budget (client.dp).
    """

    clip: float = 1.0  # C: each training example's gradient (adapter + head, all of it) is clipped to this L2 norm
    # Opacus's accountant: privacy random variables (numerically tight: within 0.3 % of the exact epsilon of the
    # composed Gaussian mechanism, tests/test_dp.py) or Renyi DP (a looser upper bound, ~8 % higher, faster)
    accountant: Literal["rdp", "prv"] = "prv"
    # a node whose budget needs more noise than this for the planned rounds refuses to train (the model would be
    # noise); Opacus's own limit applies too
    max_noise_multiplier: float = 50.0
    # what DP-SGD trains: "all" that leaves the node (LoRA factors and head), or "head" alone (the LoRA factors
    # stay as received): the noise grows with the number of values noised, ~148,000 against ~770 on me5-small
    train: Literal["all", "head"] = "all"
    # the optimizer of DP-SGD steps: "adamw" (train.lr, as without DP) or "sgd" with momentum 0.9 and no weight
    # decay (Adam divides each value by its own noise-dominated second moment: under heavy noise each value
    # random-walks)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # the learning rate of DP-SGD steps, the personalization's under personalize.dp too; null: train.lr
    lr: float | None = None
    # the expected batch of DP-SGD's Poisson sampling (rate q = batch_size / the region's examples, at most 1:
    # a batch_size of at least the region's size puts the whole split in every step, the least noise per step
    # for a budget; with train: all each step then runs the model on the whole split, with train: head and a
    # one-layer head (BERT's) only the head does, on features computed once per round); "whole": the region's
    # size, q = 1, whatever the region holds; null: train.batch_size. The steps per round are train's
    batch_size: int | Literal["whole"] | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.clip > 0:
            problems.append(("clip", f"must be > 0, got {self.clip}"))
        if not self.max_noise_multiplier > 0:
            problems.append(("max_noise_multiplier", f"must be > 0, got {self.max_noise_multiplier}"))
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(("lr", f"must be > 0 (or null: train.lr), got {self.lr}"))
        if self.batch_size is not None and self.batch_size != WHOLE and not _positive_int(self.batch_size):
            problems.append(
                (
                    "batch_size",
                    f"must be a number of examples >= 1, {WHOLE!r} (the region's size) or null (train.batch_size), "
                    f"got {self.batch_size!r}",
                )
            )
        check(problems)

    def sampled_batch(self, train_batch_size: int, num_examples: int) -> int:
        """The expected batch of DP-SGD's Poisson sampling on a region of ``num_examples``: ``batch_size``, the
        region's size for ``whole``, or the run's ``train.batch_size``."""
        if self.batch_size == WHOLE:
            return max(num_examples, 1)
        return self.batch_size if isinstance(self.batch_size, int) else train_batch_size


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class AuditSettings:
    """What the server keeps for auditors besides its signed ledger."""

    # every accepted update and each round's incoming global adapter, so that `fedlocale audit verify` can
    # recompute the aggregation; costs one adapter per region and round on the server's disk
    keep_updates: bool = False
    # run the membership-inference audit (`fedlocale audit privacy`) at the end of `simulate`: per region, how
    # well an attacker tells its training records from its test records, on the global, served and (with
    # keep_updates) its own last update; needs rounds >= 2 (earlier rounds' global models are the references)
    privacy: bool = False
    # simulation only: this many synthetic secret-like records (canaries, client.canaries) inserted into each
    # region's training data, seeded; the privacy audit reports each model's exposure of them. 0: none
    canaries: int = 0
    # the privacy audit's reference models: the global adapters of this many rounds just before the delivered
    # one (fewer when the run has fewer). Each costs one pass over every audited record, about a fifth of the
    # demo's audit; the latest rounds are the strongest references (docs/audit.md, benchmarks/bench_privacy.py)
    references: int = 2

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.canaries, bool) or not 0 <= self.canaries <= 1000:
            problems.append(("canaries", f"must be a whole number in [0, 1000], got {self.canaries!r}"))
        if isinstance(self.references, bool) or not isinstance(self.references, int) or not 1 <= self.references <= 100:
            problems.append(("references", f"must be a whole number in [1, 100], got {self.references!r}"))
        check(problems)


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs, validated as a whole."""

    regions: tuple[Region, ...] = ()
    labels: tuple[str, ...] = ()  # required: the class names, in class-index order
    name: str = "run"
    seed: int = 0
    rounds: int = 3
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    baselines: tuple[Literal["centralized", "local_only"], ...] = ()
    simulation: SimulationSettings = field(default_factory=SimulationSettings)
    personalize: PersonalizeSettings = field(default_factory=PersonalizeSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    dp: DpSettings = field(default_factory=DpSettings)

    def __post_init__(self) -> None:
        problems = []
        # the name is the default run folder runs/NAME: a '/', '..' or absolute path would write elsewhere, so
        # it follows the same folder-name rule as a region's name
        if (why := region_name_problem(self.name)) is not None:
            problems.append(("name", f"{why} (it names the folder runs/NAME)"))
        if not 0 <= self.seed <= MAX_SEED:
            # torch's generators take seeds below 2**64; numpy's and ours any: the narrowest bound, checked here
            problems.append(("seed", f"must be in [0, 2**63 - 1], got {self.seed}"))
        if self.rounds < 1:
            problems.append(("rounds", f"must be >= 1, got {self.rounds}"))
        if not self.labels:
            problems.append(("labels", "required: the class names, in class-index order (e.g. [neg, pos])"))
        elif len(self.labels) < 2:
            problems.append(("labels", f"need at least 2 labels, got {list(self.labels)}"))
        if len(set(self.labels)) != len(self.labels):
            problems.append(("labels", f"must be distinct, got {list(self.labels)}"))
        if not self.regions:
            problems.append(("regions", "need at least one region"))
        for i, region in enumerate(self.regions):
            problems.extend(
                (f"regions[{i}].{'policy' if p.startswith('no such policy') else 'data'}", p)
                for p in region.folder_problems()
            )
        names = [r.name for r in self.regions]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(("regions", f"region name {dup!r} appears more than once"))
        for b in self.baselines:
            if b not in keys.BASELINES:
                problems.append(("baselines", f"unknown baseline {b!r}; known: {', '.join(keys.BASELINES)}"))
        stacked = self.lora.r + self.personalize.local_r
        if self.personalize.mode in STACKED_MODES and stacked > MAX_LORA_RANK:
            problems.append(
                (
                    "personalize.local_r",
                    f"{self.personalize.mode} stacks an adapter of rank lora.r + local_r = {stacked}, above "
                    f"{MAX_LORA_RANK}; lower one of them",
                )
            )
        if self.personalize.mode == "dual" and not keeps_scale(self.lora, self.personalize.local_r):
            problems.append(
                (
                    "personalize.local_r",
                    f"dual keeps the scale alpha/r, so lora.alpha * (lora.r + local_r) must be a multiple of "
                    f"lora.r; got alpha={self.lora.alpha}, r={self.lora.r}, local_r={self.personalize.local_r}",
                )
            )
        if self.audit.privacy and self.rounds < 2:
            problems.append(
                ("audit.privacy", "needs rounds >= 2: earlier rounds' global models are the attack's references")
            )
        if self.aggregation.min_clients > len(self.regions) and self.regions:
            problems.append(
                (
                    "aggregation.min_clients",
                    f"is {self.aggregation.min_clients} but there are only {len(self.regions)} regions",
                )
            )
        problems.extend(_secure_problems(self))
        check(problems)

    @property
    def region_names(self) -> tuple[str, ...]:
        """The regions' names, in the order that simulation partition ids follow."""
        return tuple(r.name for r in self.regions)


def _secure_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """What secure aggregation cannot go with: options that need one region's update on the server or an exact
    mean (ffa's fixed lora_A), and thresholds or share counts the run's regions cannot meet."""
    secure = cfg.aggregation.secure
    if not secure.enabled:
        return []
    problems = []
    if cfg.audit.keep_updates:
        problems.append(
            (
                "audit.keep_updates",
                "keeps each region's update, which aggregation.secure.enabled exists to keep from the server: "
                "turn one of them off (a secure run keeps each round's unmasked sum for audit verify)",
            )
        )
    if cfg.aggregation.lora == "ffa":
        problems.append(
            (
                "aggregation.lora",
                "is ffa, which needs every lora_A to stay exactly as initialized, but aggregation.secure.enabled "
                "quantizes each update before masking, which moves A by up to a quantization step every round: "
                "turn one of them off (aggregation.lora: fedit works with secure aggregation)",
            )
        )
    regions = len(cfg.regions)
    for name in ("threshold", "shares"):
        value = getattr(secure, name)
        if value is not None and regions and value > regions:
            problems.append((f"aggregation.secure.{name}", f"is {value} but there are only {regions} regions"))
    if regions and regions < 2:
        problems.append(("aggregation.secure.enabled", "needs at least 2 regions (a sum of one is its update)"))
    why = secagg_parameter_problem(secure.clipping_range, secure.precision, secure.max_weight, max(regions, 2))
    if why:
        problems.append(("aggregation.secure.precision", why))
    return problems


@dataclass(frozen=True)
class ClientTask:
    """What the server tells a client for one round; sent as JSON in the message's ConfigRecord."""

    seed: int
    server_round: int
    labels: tuple[str, ...]
    region_names: tuple[str, ...]
    model: ModelSettings
    lora: LoraSettings
    train: TrainSettings
    # how the node forms its splits (a validation split carved from train when the region has none)
    data: DataSettings = field(default_factory=DataSettings)
    # which federation the task belongs to, the same across resumes: a node ties what it keeps between rounds
    # (personalize mode dual) to it, so that an earlier run's state is never continued
    run_key: str = ""
    # the rounds the run plans: a node whose policy requires DP calibrates its noise so that all of them fit
    rounds: int = 1
    dp: DpSettings = field(default_factory=DpSettings)
    # aggregation.lora: with ffa the node keeps every lora_A as received and trains the rest
    lora_aggregation: Literal["fedit", "ffa"] = "fedit"
    # how the run keeps its best round: a node training its local-only model (personalize.consider_local_only)
    # keeps that model's checkpoint the same way, as the simulation's local-only baseline does
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)

    def to_json(self) -> str:
        """Serialise for a ConfigRecord."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientTask:
        """Parse and validate a task received from the server."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError([f"task: not valid JSON ({json_error_text(err)})"], "task from server") from err
        return build(cls, raw, source="task from server")


# ---------------------------------------------------------------------------------------------------------
# Building typed objects from plain data, collecting every problem


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``tp`` or add a problem and return None."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, path, problems)
        # several types (dp.batch_size: a number or "whole"): the first that takes the value, else one problem
        for option in inner:
            attempt: list[str] = []
            converted = _convert(option, value, path, attempt)
            if not attempt:
                return converted
        problems.append(f"{path}: must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    if origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{path}: must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            problems.append(f"{path}: must be a list, got {type(value).__name__} {value!r}")
            return None
        item_tp = get_args(tp)[0]
        return tuple(_convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build_into(typing.cast(type, tp), value, path, problems)
    if tp is Path:
        if not isinstance(value, str | Path):
            problems.append(f"{path}: must be a path, got {type(value).__name__} {value!r}")
        return Path(value) if isinstance(value, str | Path) else None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**1023:
            problems.append(f"{path}: must be a finite number, got an integer of {len(str(abs(value)))} digits")
            return None
        value = float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "5e-4" as a string; accept it as the number a user meant
        with contextlib.suppress(ValueError):
            value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(f"{path}: must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    if tp is float and not math.isfinite(value):
        # YAML's .nan and .inf, "1e999", "nan": every range check of NaN is False, so it would pass them all
        problems.append(f"{path}: must be a finite number, got {value!r}")
        return None
    return value


def _build_into(cls: type[T], raw: Any, path: str, problems: list[str]) -> T | None:
    if not isinstance(raw, dict):
        problems.append(f"{path or 'config'}: must be a mapping, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    prefix = f"{path}." if path else ""
    before = len(problems)
    for key in raw:
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key (known: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    failed: set[str] = set()
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in raw:
            if required:
                problems.append(f"{prefix}{name}: required")
                failed.add(name)
            continue
        count = len(problems)
        values[name] = _convert(hints[name], raw[name], f"{prefix}{name}", problems)
        if len(problems) > count:
            failed.add(name)
            del values[name]  # its default stands in, so the checks of this level still run and report
    if any(
        fields[n].default is dataclasses.MISSING and fields[n].default_factory is dataclasses.MISSING for n in failed
    ):
        return None
    try:
        obj = cls(**values)
    except ConfigError as err:
        problems.extend(f"{prefix}{p}" for p in err.problems if p.split(":", 1)[0].split(".")[0] not in failed)
        return None
    return obj if len(problems) == before else None


def build(cls: type[T], raw: Any, source: str | None = None) -> T:
    """Build a settings object from plain data, raising one ConfigError that lists every problem."""
    problems: list[str] = []
    obj = _build_into(cls, raw, "", problems)
    if obj is None:
        raise ConfigError(problems or ["config: invalid"], source)
    return obj


# ---------------------------------------------------------------------------------------------------------
# YAML files, overrides and region folders


def _with_line(problem: str, lines: dict[str, int], source: str, overridden: dict[str, str] | None = None) -> str:
    """``problem`` located: by the ``--set`` that gave its value, else by its line in ``source``."""
    if problem.startswith(("--set ", "--regions")):
        return problem
    path = problem.split(":", 1)[0]
    for key, assignment in (overridden or {}).items():
        # a value from --set is not the file's: blaming the file's line would send the user to the wrong place
        if path == key or path.startswith((f"{key}.", f"{key}[")):
            return f"--set {assignment}: {problem}"
        if key.startswith((f"{path}.", f"{path}[")) and path not in lines:
            return f"--set {assignment}: {problem}"  # the --set made up the section the problem is about
    while path:
        if path in lines:
            return f"{source}:{lines[path]}: {problem}"
        path = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", path) if re.search(r"[.\[]", path) else ""
    return f"{source}: {problem}"


def _line_of(problem: str) -> int:
    match = re.match(r"^[^:]*:(\d+): ", problem)
    return int(match.group(1)) if match else 1 << 30


def apply_override(raw: dict[str, Any], assignment: str) -> str:
    """Apply ``a.b.c=value`` (value read as YAML) to a raw config mapping, in place; returns the path it set
    as problems name it (``regions.0.data`` -> ``regions[0].data``)."""
    if "=" not in assignment:
        raise ConfigError([f"--set {assignment}: expected KEY=VALUE"])
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError([f"--set {assignment}: {dotted.strip()!r} is no key path (e.g. train.lr)"])
    value = _yaml_value(text, assignment)
    node: Any = raw
    path = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            path += f"[{part}]"
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            path += f".{part}" if path else part
            if last:
                node[part] = value
            node = node.setdefault(part, {})
        else:
            parent = ".".join(parts[:i])
            what = "a list (index it with a number in range)" if isinstance(node, list) else f"{node!r}"
            raise ConfigError([f"--set {assignment}: {parent} is {what}, not a mapping"])
    return path


def _yaml_value(text: str, assignment: str) -> Any:
    try:
        return parse_yaml(text, "--set")[0] if text.strip() else None
    except ConfigError as err:
        # "--set:1: not valid YAML: ..." -> the reason, named by the whole assignment
        reasons = "; ".join(p.split(": ", 1)[-1] for p in err.problems)
        raise ConfigError([f"--set {assignment}: value {text!r} is {reasons}"]) from err


# a region name becomes a folder (runs/NAME/…, a node's cache) and the name a ledger is signed under
REGION_NAME_MAX = 64
REGION_NAME_RULE = (
    f"must be 1 to {REGION_NAME_MAX} Unicode letters, digits, '.', '_' or '-', starting with a letter or digit "
    "(it names a folder and a ledger)"
)


def region_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a region's name, or None (``REGION_NAME_RULE``; e.g. ``são-paulo`` is fine)."""
    if not 1 <= len(name) <= REGION_NAME_MAX:
        return f"{REGION_NAME_RULE}; got {len(name)} characters"
    bad = [ch for ch in name if not (unicodedata.category(ch)[0] == "L" or unicodedata.category(ch) == "Nd")]
    bad = [ch for ch in bad if ch not in "._-"]
    if bad:
        return f"{REGION_NAME_RULE}; {bad[0]!r} is none of these, in {name!r}"
    if not (unicodedata.category(name[0])[0] == "L" or unicodedata.category(name[0]) == "Nd"):
        # also rules out ".", "..", hidden folders and names that read as a command-line option
        return f"{REGION_NAME_RULE}; got {name!r}"
    if unicodedata.normalize("NFC", name) != name:
        # "são" typed as s, a, combining tilde, o: two spellings of one name would be two regions and two folders
        return f"must be in Unicode NFC form (composed characters), got {name!r}"
    return None


def discover_regions(folder: Path) -> list[dict[str, str]]:
    """Every subfolder of ``folder`` that holds region data, named after the subfolder, sorted.

    Hidden subfolders (``.archives``) and files are passed over silently. A subfolder that looks like a region
    (it holds a ``train``/``val``/``test`` file under another name, such as ``Train.JSONL`` or ``train.json``)
    but has no ``train.jsonl`` or ``train.csv`` is an error naming what it found; any other subfolder without one
    is skipped with a warning saying so.
    """
    if not folder.is_dir():
        what = f"{folder} is a file, not a folder" if folder.exists() else f"no such folder: {folder}"
        raise ConfigError([f"regions: {what}"])
    found: list[dict[str, str]] = []
    problems: list[str] = []
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith(".") or not sub.is_dir():
            continue
        try:
            train = find_split(sub, keys.TRAIN)
        except InputError as err:
            problems.append(f"regions: {err}")
            continue
        if train is not None:
            name = unicodedata.normalize("NFC", sub.name)
            found.append({"name": name, "data": str(sub.resolve())})
            continue
        try:
            near = [p.name for p in sorted(sub.iterdir()) if p.name.lower().split(".")[0] in keys.SPLITS]
        except OSError as err:
            problems.append(f"regions: {sub}: cannot read: {err.strerror or err}")
            continue
        if any(name in near for name in (f"{keys.TRAIN}{suffix}" for suffix in DATA_SUFFIXES)):
            problems.append(f"regions: {missing_split(sub, keys.TRAIN)}")  # train.jsonl is there, but no file
        elif near:
            problems.append(
                f"regions: {sub}: holds {', '.join(near)} but no train.jsonl or train.csv "
                "(split files are named train, val, test with .jsonl or .csv, in lower case)"
            )
        else:
            _log.warning("regions: skipped %s: no train.jsonl or train.csv in it", sub)
    if problems:
        raise ConfigError(problems)
    if not found:
        raise ConfigError([f"regions: no subfolder of {folder} holds a train.jsonl or train.csv"])
    return found


def load_config(path: Path, overrides: typing.Sequence[str] = (), regions_dir: Path | None = None) -> RunConfig:
    """Read, override and validate a run config file; relative data paths are taken from the file's folder.

    ``regions_dir`` (``--regions DIR``) replaces the region list with every region subfolder of that folder; in
    the file, ``regions:`` and ``regions_dir:`` exclude each other. Problems with a ``--set`` value name it,
    not a line of the file.
    """
    source = str(path)
    raw, lines = read_yaml(path)
    early: list[str] = []
    overridden: dict[str, str] = {}
    for assignment in overrides:
        try:
            overridden[apply_override(raw, assignment)] = assignment
        except ConfigError as err:
            early.extend(err.problems)
    base = path.parent
    if regions_dir is None and "regions_dir" in raw and "regions" in raw:
        where = f"--set {overridden['regions']}" if "regions" in overridden else f"line {lines.get('regions', '?')}"
        early.append(
            f"regions_dir: cannot be combined with regions ({where}): list the regions or name the folder "
            "that holds them, not both"
        )
    listed_dir = raw.pop("regions_dir", None)
    discovery_failed = False
    folder = regions_dir if regions_dir is not None else (base / str(listed_dir) if listed_dir is not None else None)
    if folder is not None and not early:
        try:
            raw["regions"] = discover_regions(folder)
        except ConfigError as err:
            raw.pop("regions", None)
            discovery_failed = True
            # name the file's key, so the problem gets its line
            label = "--regions" if regions_dir is not None else "regions_dir"
            early.extend(p.replace("regions:", f"{label}:", 1) for p in err.problems)
    # `policies: DIR` gives every simulated node without its own `policy` the file DIR/<region>.yaml
    policies = raw.pop("policies", None)
    if policies is not None and not isinstance(policies, str):
        early.append(f"policies: must be a folder, got {type(policies).__name__} {policies!r}")
        policies = None
    elif policies is not None and (base / policies).exists() and not (base / policies).is_dir():
        # else every region would report a missing DIR/<region>.yaml under a file
        early.append(f"policies: {base / policies} is a file, not a folder of <region>.yaml policy files")
        policies = None
    if isinstance(raw.get("regions"), list):
        for region in raw["regions"]:
            if not isinstance(region, dict):
                continue
            if policies is not None and "policy" not in region and isinstance(region.get("name"), str):
                region["policy"] = str(Path(policies) / f"{region['name']}.yaml")
            for key in ("data", "policy"):
                if isinstance(region.get(key), str):
                    region[key] = str(base / region[key])
    _resolve_augment_paths(raw.get("regions"), base)
    problems: list[str] = list(early)
    cfg = _build_into(RunConfig, raw, "", problems)
    if discovery_failed or (folder is not None and early):
        # the folder's own problems say why there is no region, or it was not read because of the problems
        # before it: "need at least one region" would only repeat them or be false
        problems = [p for p in problems if not p.startswith("regions: need at least one region")]
    if cfg is None or early:
        raise located_error(problems, lines, source, overridden)
    return cfg


def _resolve_augment_paths(regions: Any, base: Path) -> None:
    """Relative files of the regions' ``augment`` settings (synonyms, translator) are taken from ``base``."""
    for region in regions if isinstance(regions, list) else ():
        augment = region.get("augment") if isinstance(region, dict) else None
        for key in ("synonyms", "translator"):
            if isinstance(augment, dict) and isinstance(augment.get(key), str):
                augment[key] = str(base / augment[key])


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML file's top-level mapping and the line of every dotted path in it (``common.yamlfile``'s rules)."""
    return read_mapping(path)


def located_error(
    problems: list[str], lines: dict[str, int], source: str, overridden: dict[str, str] | None = None
) -> ConfigError:
    """One ConfigError with each problem prefixed by ``file:line`` (or the ``--set`` that gave the value, per
    ``overridden``: path -> assignment) and sorted by line."""
    located = [_with_line(p, lines, source, overridden) for p in problems] or [f"{source}: invalid"]
    return ConfigError(sorted(located, key=_line_of), source)


def locate(problems: list[str], path: Path, overrides: typing.Sequence[str] = ()) -> list[str]:
    """``field: message`` problems about the YAML file at ``path`` found after it was loaded (a run config's
    model checks, a policy's redaction checks), located as ``load_config`` locates its own: ``file:line: …``, or
    ``--set …: …`` for a value one of ``overrides`` gave (applied without error when the config was loaded)."""
    raw, lines = read_yaml(path)
    overridden = {apply_override(raw, assignment): assignment for assignment in overrides}
    return located_error(problems, lines, str(path), overridden).problems


def load_yaml(path: Path, cls: type[T], raw_hook: typing.Callable[[dict[str, Any]], None] | None = None) -> T:
    """Read a YAML file into ``cls``, every problem located; ``raw_hook`` may adjust the raw mapping first."""
    raw, lines = read_yaml(path)
    if raw_hook is not None:
        raw_hook(raw)
    problems: list[str] = []
    obj = _build_into(cls, raw, "", problems)
    if obj is None:
        raise located_error(problems, lines, str(path))
    return obj


def client_task(cfg: RunConfig, server_round: int, run_key: str = "") -> ClientTask:
    """The task the server sends to every client in ``server_round`` of the run ``run_key``."""
    return ClientTask(
        seed=cfg.seed,
        server_round=server_round,
        labels=cfg.labels,
        region_names=cfg.region_names,
        model=cfg.model,
        lora=cfg.lora,
        train=cfg.train,
        data=cfg.data,
        run_key=run_key,
        rounds=cfg.rounds,
        dp=cfg.dp,
        lora_aggregation=cfg.aggregation.lora,
        early_stopping=cfg.early_stopping,
    )
