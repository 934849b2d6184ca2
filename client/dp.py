"""Record-level differential privacy on the node: DP-SGD with Opacus, each region's own budget and accountant.

A region whose policy sets ``require_dp: {epsilon, delta}`` trains everything that leaves the node (the LoRA
factors and the classifier head) with DP-SGD: each step draws its batch by Poisson sampling (every training
example independently with probability q = batch_size / N, the sampling the accountant assumes), Opacus's
``GradSampleModule`` computes every example's gradient, ``DPOptimizer`` clips each to L2 norm C
(``dp.clip``) and adds Gaussian noise N(0, (sigma C)^2) to their sum. Weighted FedAvg, the server's step and
anything else downstream of the reply are post-processing, so the guarantee holds for the federated model.

Before its first training in a run the node calibrates sigma with Opacus's ``get_noise_multiplier`` so that
all planned rounds (``task.rounds`` x the round's local steps) fit its (epsilon, delta); a budget that cannot
cover them is refused. The privacy accountant's state (sigma, q and the steps of every round trained) is kept
on the node's disk next to its ledger (``DP_ACCOUNT_FILE``), read by every message (a deployed node starts a
process per message) and written after each training; a round trained again (a retry, a resumed run) is
charged again. A round that would take the spent epsilon past the budget is refused: the region stops sending
and the run goes on with the others. No DP arithmetic is done here: epsilon always comes from Opacus's
accountants.

The Poisson sampling and the Gaussian noise are seeded from the node's DP secret (``client.dp_secret``), which
never leaves the node: the server knows the run's seed, and noise it could regenerate would protect nothing.

The training loop knows none of this: ``DpSgd`` is the ``private`` wrapper ``client.train.train_encoded``
applies to its model, optimizer and batch plan, in the shape of Opacus's ``make_private``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from client.dp_secret import DpSecret, resolve_secret
from client.personalize import dp_steps
from client.probe import cached_features
from client.train import freeze
from common.config import ClientTask, DpSettings, PersonalizeSettings, TrainSettings
from common.policy import DpRecord, DpRequirement, PolicyError, RegionPolicy
from common.runfiles import DP_ACCOUNT_FILE, write_json

if TYPE_CHECKING:
    from opacus import GradSampleModule

# Opacus is imported where DP-SGD is planned or trained, not here: a deployed node runs every message in a new
# process that imports this module, and Opacus's import (≈1.3 s on 2 cores) would be paid by nodes without DP too.

# Opacus's hooks on a model whose inputs need no gradient (the frozen embeddings) make torch warn on every
# backward pass; the per-example gradients are right (tests/test_dp.py), the warning only noise in node logs
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

# Opacus's PRV accountant needs an error bound on epsilon; 1 % of the budget keeps it well inside the 1 %
# agreement the RDP and PRV accountants are tested for (tests/test_dp.py)
_PRV_EPS_ERROR = 0.01


class DpRefused(PolicyError):
    """The region's privacy budget does not allow this training: the plan does not fit, or it is spent."""


def epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """The epsilon spent by DP-SGD steps ``history`` (``(noise_multiplier, sample_rate, steps)`` each), at
    ``delta``, by Opacus's accountant ``accountant`` ("rdp" or "prv"); 0 for no steps."""
    steps = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    from opacus.accountants import create_accountant

    acct = create_accountant(mechanism=accountant)
    acct.history = steps
    kwargs = {"eps_error": _PRV_EPS_ERROR} if accountant == "prv" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PRV's log(0) at sample rate 1, RDP's order-grid notice: both harmless
        return float(acct.get_epsilon(delta=delta, **kwargs))


def calibrate(
    budget: DpRequirement, sample_rate: float, steps: int, settings: DpSettings, *, personalize_steps: int = 0
) -> float:
    """The smallest noise multiplier (to Opacus's tolerance) with which ``steps`` DP-SGD steps at
    ``sample_rate`` spend at most ``budget``; ``DpRefused`` when none up to ``settings.max_noise_multiplier``
    (or Opacus's own limit) does. ``personalize_steps``: how many of ``steps`` are the personalization's
    (``personalize.dp``), named in the refusal."""
    from opacus.accountants.utils import get_noise_multiplier

    most = settings.max_noise_multiplier
    if personalize_steps:
        rounds = steps - personalize_steps
        what = f"{steps} DP-SGD steps ({rounds} of the rounds + {personalize_steps} of personalize.dp)"
    else:
        what = f"{steps} DP-SGD steps"
    if epsilon([(most, sample_rate, steps)], budget.delta, settings.accountant) > budget.epsilon:
        # even the most noise allowed spends too much: refused at once, without Opacus's search
        raise DpRefused(
            f"the privacy budget (epsilon {budget.epsilon}, delta {budget.delta}) cannot cover the planned "
            f"{what} at sampling rate {sample_rate:.4g} with noise multiplier up to "
            f"dp.max_noise_multiplier {most}: plan fewer rounds or steps, or larger batches"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about optimal RDP orders at the grid's edge
            sigma = get_noise_multiplier(
                target_epsilon=budget.epsilon,
                target_delta=budget.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=settings.accountant,
                epsilon_tolerance=0.01 * budget.epsilon,
                **({"eps_error": _PRV_EPS_ERROR} if settings.accountant == "prv" else {}),
            )
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise DpRefused(
            f"the privacy budget (epsilon {budget.epsilon}, delta {budget.delta}) cannot cover the planned "
            f"{what} at sampling rate {sample_rate:.4g}: {err}"
        ) from err
    if sigma > settings.max_noise_multiplier:
        raise DpRefused(
            f"the privacy budget (epsilon {budget.epsilon}, delta {budget.delta}) needs noise multiplier "
            f"{sigma:.3g} for the planned {what} at sampling rate {sample_rate:.4g}, more than "
            f"dp.max_noise_multiplier {settings.max_noise_multiplier}: plan fewer rounds or steps, or larger batches"
        )
    return float(sigma)


@dataclass(frozen=True)
class RoundCharge:
    """The DP-SGD steps one round's training took (a round trained twice is charged twice), or, with
    ``personalize``, the steps of the personalization after round ``round`` (``personalize.dp``)."""

    round: int
    steps: int
    sample_rate: float
    personalize: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain data for the account file (``personalize`` only when set: a round's entry keeps its shape)."""
        raw: dict[str, Any] = {"round": self.round, "steps": self.steps, "sample_rate": self.sample_rate}
        return {**raw, "personalize": True} if self.personalize else raw


@dataclass(frozen=True)
class DpAccount:
    """One run's privacy account on one node: the calibrated plan and every round charged to it."""

    run_key: str
    region: str
    epsilon_budget: float
    delta: float
    clip: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    planned_steps: int  # rounds x local steps (+ personalize_steps) the noise was calibrated for
    charges: tuple[RoundCharge, ...] = ()
    epsilon_spent: float = 0.0
    # of planned_steps, the personalization's after the rounds (personalize.dp); 0: none planned
    personalize_steps: int = 0

    @property
    def steps(self) -> int:
        """DP-SGD steps taken in this run."""
        return sum(c.steps for c in self.charges)

    def history(self, extra: RoundCharge | None = None) -> list[tuple[float, float, int]]:
        """The accountant's history: every charged round (and ``extra``) as (sigma, q, steps)."""
        charges = [*self.charges, *([extra] if extra else [])]
        return [(self.noise_multiplier, c.sample_rate, c.steps) for c in charges]

    def epsilon_after(self, extra: RoundCharge | None = None) -> float:
        """Epsilon spent after the charged rounds (and ``extra``)."""
        return epsilon(self.history(extra), self.delta, self.accountant)

    def charged(self, charge: RoundCharge, spent: float | None = None) -> DpAccount:
        """This account with ``charge`` added and the epsilon recomputed (``spent``: already computed by
        ``epsilon_after(charge)``; the PRV accountant takes a tenth of a second)."""
        after = self.epsilon_after(charge) if spent is None else spent
        return replace(self, charges=(*self.charges, charge), epsilon_spent=after)

    def record(self) -> DpRecord:
        """What the ledger records and the guard checks."""
        return DpRecord(
            epsilon_spent=self.epsilon_spent,
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            clip=self.clip,
            sample_rate=self.sample_rate,
            steps=self.steps,
            accountant=self.accountant,
        )

    def rounds(self) -> set[int]:
        """The rounds charged (their training, not a personalization after them)."""
        return {c.round for c in self.charges if not c.personalize}

    def personalized(self) -> list[RoundCharge]:
        """The personalizations charged (``personalize.dp``), oldest first."""
        return [c for c in self.charges if c.personalize]

    def to_json(self) -> dict[str, Any]:
        """Plain data for the account file."""
        raw = {k: v for k, v in self.__dict__.items() if k != "charges"}
        return {**raw, "charges": [c.to_json() for c in self.charges]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DpAccount:
        """The account written by ``to_json`` (also one written before personalize.dp existed)."""
        charges = tuple(
            RoundCharge(int(c["round"]), int(c["steps"]), float(c["sample_rate"]), bool(c.get("personalize", False)))
            for c in raw["charges"]
        )
        return cls(**{**raw, "charges": charges})


@dataclass
class Accountant:
    """A node's privacy accounts, one per run, in ``folder/DP_ACCOUNT_FILE`` beside the node's ledger."""

    folder: Path
    accounts: dict[str, DpAccount] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The account file."""
        return self.folder / DP_ACCOUNT_FILE

    @classmethod
    def load(cls, folder: Path) -> Accountant:
        """The accounts kept in ``folder`` (none when the file is not there yet)."""
        path = folder / DP_ACCOUNT_FILE
        if not path.exists():
            return cls(folder)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            accounts = {key: DpAccount.from_json(value) for key, value in raw["runs"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            # without its account the node cannot know what it has spent: it must not train on
            raise DpRefused(f"{path}: the privacy accountant's state is unreadable ({err}); nothing is sent") from err
        return cls(folder, accounts)

    def save(self) -> None:
        """Write every account (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"runs": {key: a.to_json() for key, a in self.accounts.items()}})


def plan(num_examples: int, steps_per_round: int, task: ClientTask, personalize_steps: int = 0) -> tuple[float, int]:
    """Poisson sampling rate (``dp.batch_size`` or ``train.batch_size`` over the examples) and the run's
    planned DP-SGD steps: all planned rounds x this round's steps, plus
    ``personalize_steps``, the personalization's after the rounds (``personalize.dp``; it samples at the same
    rate: the same examples and batch size)."""
    return sampling_rate(task.dp, task.train, num_examples), steps_per_round * task.rounds + personalize_steps


def sampling_rate(dp: DpSettings, train: TrainSettings, num_examples: int) -> float:
    """DP-SGD's Poisson sampling rate on ``num_examples`` examples: ``dp.batch_size`` (else ``train.batch_size``;
    1 for ``whole``) over them, at most 1; the rounds' and the personalization's alike."""
    return min(1.0, dp.sampled_batch(train.batch_size, num_examples) / max(num_examples, 1))


@dataclass(frozen=True)
class Personalizing:
    """One personalization under ``personalize.dp`` on a node, as its budget check and its DP-SGD wrapper see it
    (``personalizing_budget``, ``dp_personalizing``): of ``region`` in run ``run_key``, after round
    ``after_round``, ``steps`` DP-SGD steps on ``num_examples`` examples sampled at ``sample_rate``, training what
    the run's ``dp`` section says. Made by ``personalizing``."""

    region: str
    run_key: str
    after_round: int
    num_examples: int
    steps: int
    sample_rate: float
    dp: DpSettings


def personalizing(
    region: str,
    run_key: str,
    after_round: int,
    num_examples: int,
    settings: PersonalizeSettings,
    train: TrainSettings,
    dp: DpSettings,
) -> Personalizing:
    """The personalization ``settings`` asks for after round ``after_round`` of run ``run_key`` on
    ``num_examples`` examples of ``region``: its DP-SGD steps (``client.personalize.dp_steps``, as the node's
    calibration before round 1 planned them) at the rounds' sampling rate."""
    return Personalizing(
        region,
        run_key,
        after_round,
        num_examples,
        dp_steps(settings, train, num_examples),
        sampling_rate(dp, train, num_examples),
        dp,
    )


def open_account(
    accountant: Accountant,
    requirement: DpRequirement,
    region: str,
    task: ClientTask,
    num_examples: int,
    steps: int,
    personalize_steps: int = 0,
) -> tuple[DpAccount, RoundCharge, float]:
    """The run's account on this node (calibrated now when the run has none yet, for the planned rounds and
    ``personalize_steps`` of personalization after them), this round's charge and the epsilon spent after it;
    ``DpRefused`` when the plan does not fit the budget or this round's ``steps`` would take the spent epsilon
    past it."""
    account = accountant.accounts.get(task.run_key)
    sample_rate, planned = plan(num_examples, steps, task, personalize_steps)
    if account is None:
        sigma = calibrate(requirement, sample_rate, planned, task.dp, personalize_steps=personalize_steps)
        account = DpAccount(
            run_key=task.run_key,
            region=region,
            epsilon_budget=requirement.epsilon,
            delta=requirement.delta,
            clip=task.dp.clip,
            accountant=task.dp.accountant,
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            planned_steps=planned,
            personalize_steps=personalize_steps,
        )
        accountant.accounts[task.run_key] = account
        accountant.save()
    # the policy may have changed since the run started: the budget checked is always the policy's, now
    budget = min(requirement.epsilon, account.epsilon_budget)
    charge = RoundCharge(task.server_round, steps, sample_rate)
    after = account.epsilon_after(charge)
    if after > budget or requirement.delta < account.delta:
        raise DpRefused(
            f"the privacy budget is spent: epsilon {account.epsilon_spent:.4g} of {budget} used after "
            f"{account.steps} DP-SGD steps (round(s) {sorted(account.rounds()) or 'none'}); round "
            f"{task.server_round} would reach {after:.4g} (delta {account.delta:g}, policy delta {requirement.delta:g})"
        )
    return replace(account, sample_rate=sample_rate), charge, after


def dp_conflict(task: ClientTask, *, augmented: bool, dual: bool, apart: bool = False) -> str | None:
    """Why DP-SGD cannot train with this run's and this node's settings (None when it can): the node
    (``dp_training``, ``client.task.train_dual``) and ``fedlocale check`` (``client.preflight``) both refuse with
    this reason. ``dual``: the node trains a personal LoRA (personalize mode dual); ``apart``: in a pass of its
    own (``personalize.dual_train: apart``).

    ``train.grad_clip`` is not refused: under DP-SGD each example's gradient is clipped to ``dp.clip`` instead
    (documented in docs/privacy.md)."""
    if augmented:
        # augmented copies are several training examples made from one record: per-example clipping would
        # bound each copy, not the person, and the guarantee would not be per record
        return (
            "the policy requires differential privacy, which holds per training example; augmentation makes "
            "several examples of one record, so it cannot be used with require_dp"
        )
    if task.dp.train == "head" and task.train.head == "frozen":
        return "dp.train is head and train.head is frozen: nothing would train under DP-SGD; set one of them otherwise"
    if task.train.prox_mu > 0:
        return (
            f"train.prox_mu is {task.train.prox_mu:g}, which cannot be used with require_dp: DP-SGD's optimizer "
            "replaces the gradient by the clipped, noised per-example gradients of the loss, which leave out the "
            "proximal term, so FedProx would silently do nothing; set train.prox_mu: 0 for this run"
        )
    if task.train.logit_adjust > 0:
        return (
            f"train.logit_adjust is {task.train.logit_adjust:g}, which cannot be used with require_dp: its shift "
            "is computed from all of the region's training labels outside DP-SGD, so every step would depend on "
            "every record, not only on its sampled batch, and the per-step sensitivity the privacy accountant "
            "assumes would not hold; set train.logit_adjust: 0 for this run"
        )
    if task.train.optimizer == "sgd" and task.dp.optimizer == "adamw" and task.dp.lr is None:
        return (
            f"train.optimizer is sgd and dp.optimizer adamw without dp.lr: DP-SGD's AdamW would step at train.lr "
            f"({task.train.lr:g}), an SGD learning rate; set dp.lr (AdamW's), or dp.optimizer: sgd"
        )
    if dual and apart:
        return (
            "personalize.dual_train apart cannot be used with require_dp: it trains the personal LoRA in a second "
            "pass per round, which the node's DP budget (one DP-SGD pass per round) does not cover; use "
            "dual_train: joint, whose one pass trains both parts under DP-SGD"
        )
    if dual and task.lora_aggregation == "ffa":
        return (
            "personalize mode dual with aggregation.lora: ffa cannot be used with require_dp: ffa keeps the global "
            "rows of each stacked lora_A fixed by a parametrization, which Opacus's per-example gradients do not "
            "support; use aggregation.lora: fedit or another personalize mode"
        )
    return None


log = logging.getLogger("fedlocale.node")

FEATURE_BATCH = 64  # texts per forward pass of the frozen model when only the head trains (its memory)


class DpSgd:
    """The ``private`` wrapper of ``client.train.train_encoded``: per-example gradients (GradSampleModule),
    clipping to ``clip`` and noise ``noise_multiplier * clip`` per step (DPOptimizer), and the batch plan
    replaced by Poisson-sampled batches of as many steps. ``close`` removes Opacus's hooks from the model.

    ``sampling_seed`` and ``noise_seed`` seed the Poisson sampling and the Gaussian noise; the guarantee holds
    only against whoever cannot compute them, so they come from the node's secret (``seeds``), never from
    anything the server knows.

    ``settings`` (the run's ``dp`` section) says what the private steps train and with which optimizer:
    ``train: head`` freezes the LoRA factors (they leave as received) and, when that leaves the output layer
    alone to train, trains it on features computed once per text (``client.probe.CachedFeatures``, without
    the dropout before it); ``optimizer: sgd`` replaces the optimizer ``train_encoded`` made (``train.optimizer``'s)
    by SGD with momentum 0.9 over the same parameters, ``adamw`` a non-AdamW one by AdamW; ``lr`` replaces its
    learning rate (``train_encoded`` puts its warm-up on the optimizer returned).
    Its ``clip`` is not read: ``clip`` is the account's, fixed when the budget was calibrated."""

    def __init__(
        self,
        noise_multiplier: float,
        clip: float,
        sample_rate: float,
        num_examples: int,
        *,
        sampling_seed: int,
        noise_seed: int,
        settings: DpSettings,
    ):
        self.noise_multiplier = noise_multiplier
        self.clip = clip
        self.sample_rate = sample_rate
        self.num_examples = num_examples
        self.settings = settings
        # both must be secret to the node (client.dp_secret): whoever knows them can undo the noise
        self.sampling_seed = sampling_seed
        self.noise_seed = noise_seed
        self._wrapped: GradSampleModule | None = None
        # what ``train: head`` froze, trainable again after ``close``: the model may train on without DP
        self._frozen: list[nn.Parameter] = []
        # True once the model and optimizer are private: from then on training may have touched the data
        self.applied = False

    def __call__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, order: list[list[int]]
    ) -> tuple[nn.Module, torch.optim.Optimizer, list[list[int]]]:
        """The private model, optimizer and batch plan for ``len(order)`` steps."""
        from opacus import GradSampleModule

        from client.dp_optimizer import PoissonDPOptimizer

        optimizer = self._steps(model, optimizer)
        # only the head training (dp.train: head): its features are computed once, not at every step, which
        # makes whole-split batches affordable
        trained = cached_features(model, FEATURE_BATCH)
        if self.settings.train == "head" and trained is model:
            log.info(
                "dp.train head: the head is not a single linear layer (BERT's is; RoBERTa's and DistilBERT's are "
                "not), so the frozen model runs at every DP-SGD step"
            )
        model = trained
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Full backward hook is firing when ... no inputs require gradients"
            self._wrapped = GradSampleModule(model, loss_reduction="mean")
        generator = torch.Generator().manual_seed(self.sampling_seed)
        dp_optimizer = PoissonDPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.clip,
            expected_batch_size=max(1, round(self.sample_rate * self.num_examples)),
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(self.noise_seed),
        )
        batches = poisson_batches(self.num_examples, self.sample_rate, len(order), generator)
        self.applied = True
        return self._wrapped, dp_optimizer, batches

    def _steps(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``optimizer``, or the one ``settings`` asks for over what stays trainable."""
        dp = self.settings
        if dp.train == "head":
            frozen = set(freeze(model, "lora_"))
            self._frozen = [p for name, p in model.named_parameters() if name in frozen]
        # train.optimizer: sgd made an SGD; DP's own optimizer setting decides here
        if dp.train == "all" and dp.optimizer == "adamw" and dp.lr is None and isinstance(optimizer, torch.optim.AdamW):
            return optimizer
        group = optimizer.param_groups[0]
        params = [p for p in model.parameters() if p.requires_grad]
        lr = group["lr"] if dp.lr is None else dp.lr
        if dp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=lr, weight_decay=group["weight_decay"])

    def close(self) -> None:
        """Remove the per-example gradient hooks (the model is used plainly afterwards)."""
        if self._wrapped is not None:
            self._wrapped._close()
            self._wrapped = None
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen = []


def seeds(
    secret: DpSecret, server_round: int, region: str, purpose: str, inputs: bytes, private: tuple[float, ...]
) -> dict[str, int]:
    """``DpSgd``'s ``sampling_seed`` and ``noise_seed`` for one training (``purpose``: "round" or "personalize"),
    derived from the node's ``secret`` (``client.dp_secret``), the digest of the training's ``inputs`` and its
    ``private`` settings (noise multiplier, clip, sampling rate, examples, steps): the same noise again only for
    exactly the same training."""
    context = hashlib.sha256(inputs + json.dumps([float(x) for x in private]).encode()).digest()
    return {
        "sampling_seed": secret.seed(server_round, region, f"{purpose}/sampling", context),
        "noise_seed": secret.seed(server_round, region, f"{purpose}/noise", context),
    }


def poisson_batches(num_examples: int, sample_rate: float, steps: int, generator: torch.Generator) -> list[list[int]]:
    """``steps`` batches, each holding every example independently with probability ``sample_rate`` (batches
    vary in size and may be empty: the sampling the accountant's amplification assumes)."""
    draws = torch.rand((steps, num_examples), generator=generator) < sample_rate
    return [torch.nonzero(row).flatten().tolist() for row in draws]


@contextmanager
def dp_training(
    policy: RegionPolicy | None,
    folder: Path | None,
    region: str,
    task: ClientTask,
    num_examples: int,
    steps: int,
    augmented: bool,
    *,
    secret: bytes | None = None,
    inputs: bytes = b"",
    dual: bool = False,
    personalize_steps: int = 0,
) -> Iterator[DpSgd | None]:
    """The DP-SGD wrapper for one round's training on this node (None when the policy requires no DP), and the
    round charged to the run's account once the wrapper was applied (also when training failed after that: its
    steps may have touched the data; not when the wrapper itself failed, before any step). ``DpRefused`` before
    any training when the budget does not allow the round or the settings cannot train under DP
    (``dp_conflict``; ``dual``: the node trains a personal LoRA alongside, personalize mode dual).
    ``personalize_steps``: the DP-SGD steps of the personalization the node runs after the rounds
    (``personalize.dp``), which the calibration before round 1 plans for beside the rounds'.

    The sampling and the noise are seeded from ``secret`` (a simulation's or a test's; None: the node's own
    secret file in ``folder``, made on first use, ``client.dp_secret``) and ``inputs``, the digest of what the
    training depends on (``client.dp_secret.inputs_digest``); ``DpSecretError`` when that file is damaged."""
    if policy is None or policy.require_dp is None:
        yield None
        return
    if folder is None:
        raise DpRefused(
            f"region {region}: the policy requires differential privacy and the node has no audit-dir to keep its "
            "privacy accountant in"
        )
    conflict = dp_conflict(task, augmented=augmented, dual=dual)
    if conflict is not None:
        raise DpRefused(f"region {region}: {conflict}")
    key = resolve_secret(secret, folder)  # before anything is charged: a damaged secret stops the round here
    accountant = Accountant.load(folder)
    account, charge, after = open_account(
        accountant, policy.require_dp, region, task, num_examples, steps, personalize_steps
    )
    private = DpSgd(
        account.noise_multiplier,
        account.clip,
        account.sample_rate,
        num_examples,
        **seeds(
            key,
            task.server_round,
            region,
            "round",
            inputs,
            (account.noise_multiplier, account.clip, account.sample_rate, num_examples, steps),
        ),
        settings=task.dp,
    )
    try:
        yield private
    finally:
        private.close()
        # a wrapper that failed to apply (Opacus refusing the model) ran no private step: nothing to charge
        if private.applied:
            accountant.accounts[task.run_key] = account.charged(charge, after)
            accountant.save()


def personalizing_budget(
    requirement: DpRequirement, folder: Path, plan: Personalizing
) -> tuple[Accountant, DpAccount, RoundCharge, float]:
    """The node's accountant, the run's account, the personalization's charge and the epsilon after it, or
    ``DpRefused`` when the node has no account of the run (it trained no round under DP-SGD) or the steps would
    take the spent epsilon past the policy's budget (a plan calibrated without them, a personalization repeated).
    ``dp_personalizing`` checks this before training; a simulation checks every region before it personalizes
    any, so that a refusal leaves no region personalized and charged."""
    accountant = Accountant.load(folder)
    account = accountant.accounts.get(plan.run_key)
    steps = plan.steps
    if account is None:
        raise DpRefused(
            f"region {plan.region}: personalize.dp: {accountant.path} has no privacy account of this run "
            f"({plan.run_key}): its rounds were not trained under DP-SGD here, so there is no calibrated budget to "
            "personalize under"
        )
    budget = min(requirement.epsilon, account.epsilon_budget)
    charge = RoundCharge(plan.after_round, steps, plan.sample_rate, personalize=True)
    after = account.epsilon_after(charge) if steps else account.epsilon_spent
    if after > budget or requirement.delta < account.delta:
        if account.personalized():
            why = f"this run was already personalized {len(account.personalized())} time(s); each one spends again"
        elif account.personalize_steps == 0:
            why = (
                "the noise was calibrated before round 1 for the rounds alone: set personalize.dp (and the "
                "personalization's mode and epochs) before the run starts, so that the plan includes its steps"
            )
        else:
            why = f"the plan calibrated before round 1 included {account.personalize_steps} personalization step(s)"
        raise DpRefused(
            f"region {plan.region}: personalize.dp: the privacy budget does not allow personalizing: epsilon "
            f"{account.epsilon_spent:.4g} of {budget} used after {account.steps} DP-SGD steps; personalizing "
            f"({steps} steps) would reach {after:.4g} (delta {account.delta:g}, policy delta {requirement.delta:g}); "
            f"{why}"
        )
    return accountant, account, charge, after


@contextmanager
def dp_personalizing(
    policy: RegionPolicy | None,
    folder: Path | None,
    plan: Personalizing,
    *,
    secret: bytes | None = None,
    inputs: bytes = b"",
) -> Iterator[DpSgd | None]:
    """The DP-SGD wrapper of the personalization ``plan`` on this node (``personalize.dp``), with the account's
    noise and clip (calibrated before round 1 for the rounds and this personalization), training what the run's
    ``dp`` section says (``DpSgd``). None when the policy requires no DP (there is no budget to spend: the
    personalization trains plainly). Charged to the run's account once applied, as ``dp_training`` charges a
    round; a wrapper never applied (mode dual under DP, which trains nothing after the rounds) charges nothing.
    Seeded from ``secret`` and ``inputs`` as ``dp_training`` is.

    ``DpRefused`` before any training when the node has no account of the run (it trained no round under
    DP-SGD) or the steps would take the spent epsilon past the policy's budget (``personalizing_budget``)."""
    if policy is None or policy.require_dp is None:
        yield None
        return
    if folder is None:
        raise DpRefused(
            f"region {plan.region}: personalize.dp: the policy requires differential privacy and the node has no "
            "audit-dir, where its privacy accountant is kept"
        )
    key = resolve_secret(secret, folder)
    accountant, account, charge, after = personalizing_budget(policy.require_dp, folder, plan)
    private = DpSgd(
        account.noise_multiplier,
        account.clip,
        plan.sample_rate,
        plan.num_examples,
        **seeds(
            key,
            plan.after_round,
            plan.region,
            "personalize",
            inputs,
            (account.noise_multiplier, account.clip, plan.sample_rate, plan.num_examples, plan.steps),
        ),
        settings=plan.dp,
    )
    try:
        yield private
    finally:
        private.close()
        if private.applied:
            accountant.accounts[plan.run_key] = account.charged(charge, after)
            accountant.save()


def personalization_record(folder: Path, run_key: str) -> dict[str, Any]:
    """What a personalization under ``personalize.dp`` spent, for its report (summary.json's
    ``regions.R.personalized.dp``, a node's personalized.json): the epsilon spent after it (the run's total on
    this node), after the rounds alone, delta and the personalization's DP-SGD steps (0: mode dual, which trains
    nothing after the rounds)."""
    account = Accountant.load(folder).accounts[run_key]
    rounds = [c for c in account.charges if not c.personalize]
    personalized = account.personalized()
    return {
        "covered": True,
        "epsilon_spent": account.epsilon_spent,
        "epsilon_rounds": epsilon(
            [(account.noise_multiplier, c.sample_rate, c.steps) for c in rounds], account.delta, account.accountant
        ),
        "delta": account.delta,
        "steps": personalized[-1].steps if personalized else 0,
        "noise_multiplier": account.noise_multiplier,
        "accountant": account.accountant,
    }


def spent(policy: RegionPolicy | None, folder: Path | None, task: ClientTask, trained: bool) -> DpRecord | None:
    """The DP record of this run on this node for a reply (None when the policy requires no DP, or, for a
    ``trained`` reply, when this round was not trained with DP-SGD: the guard then refuses it)."""
    if policy is None or policy.require_dp is None or folder is None:
        return None
    account = Accountant.load(folder).accounts.get(task.run_key)
    if account is None:
        if trained:
            return None
        # an evaluation before any training: nothing of the training data has been used yet
        return DpRecord(0.0, policy.require_dp.delta, 0.0, task.dp.clip, 0.0, 0, task.dp.accountant)
    if trained and task.server_round not in account.rounds():
        return None
    return account.record()
