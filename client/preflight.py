"""Everything knowable about a run before it trains: ``fedlocale check`` and ``fedlocale simulate`` both ask here.

``preflight`` loads the model's config and tokenizer (no weights) and builds the reply a region would send
(``common.model.check_model``), reads every region's data, and asks each region's policy about the train and
evaluate replies of this model and LoRA, exactly as the node's egress guard will (``egress_violations``). A
policy that would refuse every reply, a PII pattern that would redact most of a region's text or hang on it, a
model folder that is not there or LoRA targets the model lacks: each is an error naming the file, the line and
the field, before any process starts or any file is written. What makes a run weak rather than impossible
(one class only in a region's train split, an evaluation split emptied by leakage removal) is a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.dp import DpRefused, calibrate, dp_conflict, epsilon, plan
from client.personalize import dp_steps
from client.pipeline import carved
from client.train import plan_steps
from common import keys
from common.config import PersonalizeSettings, Region, RunConfig, client_task, locate
from common.data import DataError, RegionData, load_region
from common.errors import ConfigError
from common.model import check_model
from common.pii import PatternTimeout, custom_share
from common.policy import DpRecord, Outbound, Protections, RegionPolicy, TensorInfo, egress_violations
from common.secagg import MASKED_DTYPE, WEIGHTS, SecAggParams, derive_parameters, packed_size

# a custom pattern that replaces more than this share of a region's train text leaves little to learn from
REDACTION_WARN = 0.5
# ... and one that replaces this much leaves nothing: refused
REDACTION_ERROR = 0.9


@dataclass(frozen=True)
class Checked:
    """What ``preflight`` found: its warnings, and each region's data as read (``load_region``: cleaned, not yet
    redacted), which the caller hands to ``client.pipeline.node_data`` so that no file is read twice."""

    warnings: list[str]
    loaded: dict[str, RegionData]


def preflight(
    cfg: RunConfig,
    policies: Mapping[str, RegionPolicy],
    config_path: Path | None = None,
    say: Callable[[str], None] | None = None,
    regions: Sequence[Region] | None = None,
    overrides: Sequence[str] = (),
    personalize: Mapping[str, PersonalizeSettings] | None = None,
) -> Checked:
    """Check what ``cfg`` and the regions' ``policies`` will meet when the run starts; return the warnings and
    the regions' data as read.

    Raises one ``ConfigError`` listing every error, each located as ``file:line: field: ...`` (the run config
    ``config_path``, or the region's policy file). ``say`` gets each region's split sizes as data loads.
    ``regions`` replaces ``cfg.regions`` where the nodes' own data and policies are checked (a deployment);
    ``overrides`` are the ``--set`` assignments the config was loaded with, so a problem with a value one of them
    gave names it, not a line of the file. ``personalize``: with ``regions``, each deployed node's own
    personalization settings (its DP plan includes them); a simulated node personalizes as ``cfg`` says.
    """
    problems: list[str] = []
    model = check_model(cfg.model, cfg.lora, cfg.labels)
    found = [f"{name}: {message}" for name, message in model.problems]
    if found:
        problems += locate(found, config_path, overrides) if config_path is not None else found
    warnings: list[str] = []
    if regions is None:
        warnings += cfg.personalize.unused()
    if regions is None and cfg.personalize.weighs_local_only() and keys.LOCAL_ONLY not in cfg.baselines:
        # a simulation reuses the baseline's adapters; without the baseline personalization trains them
        warnings.append(
            "personalize.consider_local_only without the local_only baseline: personalization trains each "
            "region's local-only model itself (the baseline's training time); add local_only to baselines to "
            "train it once and also see served − local-only per region"
        )
    agg = cfg.aggregation
    # the masked upload's size depends on the modulus, which the server derives the same way each round
    secure = (
        derive_parameters(
            agg.secure.clipping_range,
            agg.secure.precision,
            agg.secure.max_weight,
            len(cfg.regions),
            agg.secure.threshold or 2,
            agg.method == "uniform",
        )
        if agg.secure.enabled
        else None
    )
    loaded: dict[str, RegionData] = {}
    for region in cfg.regions if regions is None else regions:
        index = cfg.region_names.index(region.name) if region.name in cfg.region_names else 0
        try:
            data = load_region(region.name, region.data, cfg.labels, log=say)
        except DataError as err:
            problems += err.problems
            continue
        loaded[region.name] = data
        warnings += _data_warnings(data, cfg.labels)
        policy = policies.get(region.name)
        own = cfg.personalize if regions is None else (personalize or {}).get(region.name)
        if regions is not None and own is not None:
            warnings += [f"region {region.name}: its node's {w}" for w in own.unused()]
        if regions is not None and own is not None and own.dp and (policy is None or policy.require_dp is None):
            problems.append(
                f"region {region.name}: its node's personalization sets dp: true, but its policy sets no "
                "require_dp: there is no privacy budget to personalize under (the node refuses to start)"
            )
        if policy is None or region.policy is None:
            continue
        # the node trains on what is left of train once a val split is carved from it (client.pipeline)
        trained = len(carved(data, region.data, cfg.data, cfg.seed)[0].train)
        # without a model (its problems are reported above) the reply's tensors are unknown: the rest still counts
        dp = _dp_plan(cfg, policy, region, trained, own)
        found = _policy_problems(policy, data, index, model.tensors, dp, secure, trained)
        found += _redaction_problems(policy, data, warnings, region.policy)
        if found:
            problems += locate(found, region.policy)
    if regions is None:  # a deployed node's personalization is its own, checked on the node
        found, said = _personalize_dp_problems(cfg, policies)
        problems += locate(found, config_path, overrides) if found and config_path is not None else found
        warnings += said
    if problems:
        raise ConfigError(problems)
    return Checked(warnings, loaded)


def _personalize_dp_problems(cfg: RunConfig, policies: Mapping[str, RegionPolicy]) -> tuple[list[str], list[str]]:
    """``personalize.dp`` in a run where no region's policy requires DP is refused: there is no budget to train
    under, and personalizing plainly would give the user none of what was asked (most likely a policy forgotten).
    Where some regions require DP and others do not, the others personalize plainly: a warning names them. A
    run that personalizes DP regions without ``personalize.dp`` is warned that their personalized models are
    not covered."""
    if cfg.personalize.mode == "none":
        return [], []
    if not cfg.personalize.dp:
        private = [r.name for r in cfg.regions if (p := policies.get(r.name)) is not None and p.require_dp is not None]
        if not private:
            return [], []
        return [], [
            f"region(s) {', '.join(private)} require DP, but personalize.dp is not set: their personalized models "
            "train on their data again without DP and are not covered by the guarantee (docs/privacy.md)"
        ]
    plain = [
        r.name for r in cfg.regions if (p := policies.get(r.name)) is None or p.require_dp is None
    ]  # regions without a budget
    if len(plain) == len(cfg.regions):
        return [
            "personalize.dp: no region's policy sets require_dp, so there is no privacy budget to personalize "
            "under (it would have no effect); set require_dp in the regions' policies or drop personalize.dp"
        ], []
    if plain:
        return [], [
            f"personalize.dp: region(s) {', '.join(plain)} set no require_dp in their policy: they personalize "
            "without DP (there is no budget to cover them with)"
        ]
    return [], []


def _data_warnings(data: RegionData, labels: tuple[str, ...]) -> list[str]:
    warnings = []
    classes = sorted({ex.label for ex in data.train})
    if len(classes) == 1:
        warnings.append(
            f"region {data.name}: every train example is {labels[classes[0]]!r}; its updates teach the federation "
            "one class only, and its local-only baseline predicts that class for everything"
        )
    for split in (keys.VAL, keys.TEST):
        leaked = data.dropped.get(f"leaked_{split}", 0)
        if leaked and not data.split(split):
            warnings.append(
                f"region {data.name}: all {leaked} {split} rows also occur in train and were removed (leakage), "
                f"so its {split} split is empty and the region is not {'validated' if split == keys.VAL else 'tested'}"
            )
    return warnings


def _dp_plan(
    cfg: RunConfig, policy: RegionPolicy, region: Region, num_examples: int, own: PersonalizeSettings | None
) -> DpRecord | str | None:
    """The privacy the region's node will have spent at the end of the run when its policy requires DP (its
    DP-SGD calibrated as the node will calibrate it, ``client.dp``, for the rounds and, under personalize.dp,
    its personalization ``own``), or why it cannot train under it."""
    need = policy.require_dp
    if need is None or num_examples == 0:
        return None
    task = client_task(cfg, 1)
    dual = own is not None and own.mode == "dual"
    apart = dual and own is not None and own.dual_train == "apart"
    conflict = dp_conflict(task, augmented=region.augment is not None, dual=dual, apart=apart)
    if conflict is not None:
        return conflict
    steps = plan_steps(num_examples, cfg.train)
    # the personalization after the rounds spends from the same budget under personalize.dp (client.dp)
    later = dp_steps(own, cfg.train, num_examples)
    sample_rate, planned = plan(num_examples, steps, task, later)
    try:
        sigma = calibrate(need, sample_rate, planned, cfg.dp, personalize_steps=later)
    except DpRefused as err:
        return str(err)
    spent = epsilon([(sigma, sample_rate, planned)], need.delta, cfg.dp.accountant)
    return DpRecord(spent, need.delta, sigma, cfg.dp.clip, sample_rate, planned, cfg.dp.accountant)


def _policy_problems(
    policy: RegionPolicy,
    data: RegionData,
    index: int,
    tensors: Mapping[str, tuple[tuple[int, ...], str, int]],
    dp: DpRecord | str | None = None,
    secure: SecAggParams | None = None,
    trained: int | None = None,
) -> list[str]:
    """What the policy would refuse in every train and evaluate reply of this run (``field: reason``); ``dp`` is
    the privacy the node's DP-SGD would spend by the end of the run, or why it cannot train (``_dp_plan``); with
    ``secure`` the train reply is secure aggregation's masked upload (client.secagg), which carries the DP
    metrics besides the region index; ``trained``: the train examples left once a val split is carved (default:
    all of ``data.train``)."""
    if isinstance(dp, str):
        return [f"require_dp: region {policy.region}: every train reply would be refused: {dp}"]
    n = len(data.train) if trained is None else trained
    # metric values as long as any real one encodes, so that the byte count is the most a reply can carry
    worst = -0.12345678901234567
    if secure is not None:
        described = tuple(
            TensorInfo(name, shape, MASKED_DTYPE, packed_size(nbytes // np.dtype(dtype).itemsize, secure.modulus))
            for name, (shape, dtype, nbytes) in tensors.items()
        )
        described = (*described, TensorInfo(WEIGHTS, (2,), MASKED_DTYPE, packed_size(2, secure.modulus)))
        train = Outbound(
            "train",
            policy.region,
            described,
            {keys.REGION_INDEX: index, **(dp.metrics() if dp is not None else {})},
            n,
            Protections(secure_aggregation=True, dp=dp),
        )
    else:
        train = Outbound(
            "train",
            policy.region,
            tuple(TensorInfo(name, shape, dtype, nbytes) for name, (shape, dtype, nbytes) in tensors.items()),
            {
                name: (n if name == keys.NUM_EXAMPLES else index if name == keys.REGION_INDEX else worst)
                for name in keys.TRAIN_REPLY_METRICS
            },
            n,
            Protections(dp=dp),
        )
    evaluate = Outbound(
        "evaluate",
        policy.region,
        (),
        {
            name: (n if name == keys.NUM_EXAMPLES else index if name == keys.REGION_INDEX else worst)
            for name in keys.EVALUATE_REPLY_METRICS
        },
        n,
        Protections(dp=dp),
    )
    refusing: dict[tuple[str, str], list[str]] = {}
    for out in (train, evaluate):
        for name, reason in egress_violations(policy, out):
            refusing.setdefault((name or "egress", reason), []).append(out.message)
    return [
        f"{name}: region {policy.region}: every {' and '.join(messages)} reply would be refused: {reason}"
        for (name, reason), messages in refusing.items()
    ]


def _redaction_problems(policy: RegionPolicy, data: RegionData, warnings: list[str], path: Path) -> list[str]:
    """Custom PII patterns that would replace most of the region's train text (or run past their time limit)."""
    problems = []
    texts = [ex.text for ex in data.train]
    for i, pattern in enumerate(policy.pii.custom):
        field = f"pii.custom[{i}].pattern"
        try:
            share = custom_share(pattern, texts)
        except PatternTimeout as err:
            problems.append(f"{field}: region {policy.region}, train split: {err}")
            continue
        said = (
            f"{pattern.name} ({pattern.pattern!r}) would replace {share:.0%} of the characters of region "
            f"{policy.region}'s train text"
        )
        if share >= REDACTION_ERROR:
            problems.append(f"{field}: {said}, leaving nothing to learn from")
        elif share > REDACTION_WARN:
            warnings.append(f"{locate([f'{field}: {said}'], path)[0]}")
    return problems
