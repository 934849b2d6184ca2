"""Personalization under differential privacy (``personalize.dp``, client/dp.py): the personalization after the
rounds trains with DP-SGD on the node's own budget, planned for before round 1 and charged to the same account,
on a deployed node and in a simulation; summary and report say which served models are covered."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from client.dp import Accountant, DpRefused, DpSgd, calibrate
from client.personal import init_personal, is_lora_a, is_lora_b
from client.personalize import dp_steps, personalize
from client.task import (
    NodeConfigError,
    NodeSettings,
    load_data,
    node_settings,
    personalize_node,
    simulated_node,
    train_round,
)
from common import keys
from common.config import ClientTask, DpSettings, PersonalizeSettings, Region, client_task, load_config
from common.data import load_region
from common.errors import ConfigError
from common.model import adapter_state, build_model, save_adapter
from common.policy import DpRequirement, RegionPolicy
from common.runfiles import DP_ACCOUNT_FILE, PERSONALIZED_REPORT, Summary
from tests.conftest import perturb, tiny_config, write_region

BUDGET = DpRequirement(epsilon=8.0, delta=1e-5)


def _dp_node(tmp_path: Path, settings: PersonalizeSettings | None, budget: DpRequirement = BUDGET) -> NodeSettings:
    """A deployed DP node that personalizes with ``settings`` after the rounds."""
    return NodeSettings(
        policy=RegionPolicy("north", require_dp=budget),
        audit_dir=tmp_path / "audit",
        threads=1,
        personalize=settings,
        personal_dir=tmp_path / "own" if settings else None,
    )


class _Recording(DpSgd):
    """DpSgd that records, at every step, each example's gradient norm (Opacus's per-example gradients, all
    parameters together), the names of the parameters that have them, and checks the optimizer's clipped sum."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.norms: list[torch.Tensor] = []
        self.params: set[str] = set()  # the parameters that got per-example gradients
        self.trainable: set[str] = set()  # the parameters the personalization trains

    def __call__(self, model: Any, optimizer: Any, order: list[list[int]]) -> Any:
        names = {id(p): name for name, p in model.named_parameters()}
        self.trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        wrapped, dp_optimizer, batches = super().__call__(model, optimizer, order)

        def hook(opt: Any) -> None:
            samples = [p.grad_sample.reshape(len(p.grad_sample), -1) for p in opt.params]
            if not len(samples[0]):
                return
            norms = torch.cat(samples, dim=1).norm(dim=1)
            factor = (self.clip / (norms + 1e-6)).clamp(max=1.0)
            for p, g in zip(opt.params, samples, strict=True):
                # the sum the noise is added to is the sum of the individually clipped gradients
                assert torch.allclose(p.summed_grad.flatten(), (factor[:, None] * g).sum(0), atol=1e-6)
            self.norms.append(norms)
            self.params |= {names[id(p)] for p in opt.params}

        dp_optimizer.attach_step_hook(hook)
        return wrapped, dp_optimizer, batches


@pytest.mark.parametrize("mode", ["head", "continue", "local"])
def test_personalization_under_dp_clips_each_examples_gradient(
    tmp_path: Path, north_task: ClientTask, mode: str
) -> None:
    """The personalization's training goes through the DP-SGD wrapper: every trainable tensor of the mode (the
    head alone for head; adapter and head for continue) gets per-example gradients, each example's is clipped
    to C before summing (some were above C), and the model moves."""
    data = load_region("north", write_region(tmp_path / "north", 40, 8, seed=2), north_task.labels)
    start = perturb(build_model(north_task.model, north_task.lora, north_task.labels, seed=0), seed=3)
    settings = PersonalizeSettings(mode=mode, dp=True, lr=5e-2, bootstrap=100)  # type: ignore[arg-type]
    clip = 0.05
    n = len(data.train)
    private = _Recording(
        0.0, clip, north_task.train.batch_size / n, n, sampling_seed=1, noise_seed=2, settings=DpSettings()
    )
    result = personalize(start, data, settings, north_task.train, max_length=32, seed=0, private=private)
    assert private.applied and result.train.steps == dp_steps(settings, north_task.train, n) == len(private.norms)
    norms = torch.cat(private.norms)
    assert len(norms) > 0 and (norms > clip).any()  # clipping bit
    assert private.params == private.trainable and private.trainable
    assert all("modules_to_save" in name for name in private.params) is (mode == "head")
    before, after = adapter_state(start.model), adapter_state(result.loaded.model)
    assert any(not torch.equal(before[k], after[k]) for k in set(before) & set(after))


def test_dual_under_dp_keeps_the_rounds_head_and_spends_nothing(tmp_path: Path, north_task: ClientTask) -> None:
    """Mode dual under DP: the personal slices come from the rounds' DP-SGD pass; the head is not refit (its
    probe fit is no DP-SGD), so the wrapper is never applied and nothing is charged."""
    data = load_region("north", write_region(tmp_path / "north", 40, 8, seed=2), north_task.labels)
    start = perturb(build_model(north_task.model, north_task.lora, north_task.labels, seed=0), seed=3)
    personal = init_personal(adapter_state(start.model), 4, 0)
    settings = PersonalizeSettings(mode="dual", dp=True, local_r=4, bootstrap=100)
    private = DpSgd(1.0, 1.0, 0.2, len(data.train), sampling_seed=0, noise_seed=1, settings=DpSettings())
    result = personalize(
        start, data, settings, north_task.train, max_length=32, seed=0, personal=personal, private=private
    )
    assert not private.applied and result.train.steps == 0
    heads = {k: v for k, v in adapter_state(result.loaded.model).items() if not (is_lora_a(k) or is_lora_b(k))}
    assert heads and all(torch.equal(v, adapter_state(start.model)[k]) for k, v in heads.items())
    assert dp_steps(settings, north_task.train, len(data.train)) == 0
    # without DP, dual refits the head as a probe
    plain = personalize(
        start, data, dataclasses.replace(settings, dp=False), north_task.train, max_length=32, seed=0, personal=personal
    )
    assert any(not torch.equal(v, adapter_state(plain.loaded.model)[k]) for k, v in heads.items())


def test_dual_under_dp_with_nothing_personal_trained_serves_the_global_model(
    tmp_path: Path, north_task: ClientTask
) -> None:
    """Under ``dp.train: head`` the personal slices never train (B stays zero) and dual refits no head under DP:
    the candidate is its start — under ``start: last`` another round's global adapter — not a personal model, so
    the region serves the global model whatever validation says, and the record says why. Slices that did train
    are a candidate as before."""
    from client.personalize import GLOBAL, choice_record, keeps_global

    data = load_region("north", write_region(tmp_path / "north", 40, 30, seed=2), north_task.labels)
    global_model = perturb(build_model(north_task.model, north_task.lora, north_task.labels, seed=0), seed=3)
    # personalize.start: last — another round's global adapter, not the global (best-round) model
    last_round = perturb(build_model(north_task.model, north_task.lora, north_task.labels, seed=0), seed=4)
    untrained = init_personal(adapter_state(global_model.model), 4, 0)
    settings = PersonalizeSettings(mode="dual", dp=True, local_r=4, bootstrap=100, choice="confident")

    def run(personal: dict[str, torch.Tensor]) -> Any:
        private = DpSgd(1.0, 1.0, 0.2, len(data.train), sampling_seed=0, noise_seed=1, settings=DpSettings())
        return personalize(
            global_model,
            data,
            settings,
            north_task.train,
            max_length=32,
            seed=0,
            personal=personal,
            start=last_round,
            private=private,
        )

    frozen = run(untrained)
    assert frozen.nothing_personal and frozen.chosen == GLOBAL
    # the rule alone would have served the last round on this evidence
    assert frozen.val_difference is not None and not keeps_global(frozen.val_difference, "confident")
    record = choice_record(frozen, "confident")
    assert record["chosen"] == GLOBAL and record["choice_skipped"].startswith("nothing personal trained")
    trained = {k: v + 0.05 if is_lora_b(k) else v for k, v in untrained.items()}
    moved = run(trained)
    assert not moved.nothing_personal and "choice_skipped" not in choice_record(moved, "confident")


def test_a_deployed_node_plans_charges_and_reports_its_dp_personalization(
    tmp_path: Path, north_task: ClientTask
) -> None:
    """Calibration before round 1 plans the rounds' steps plus the personalization's (more noise than the
    rounds alone need); the personalization is charged to the same account, its epsilon lies above the rounds'
    and within the budget, personalized.json says so; a second personalization no longer fits and is refused."""
    region = Region("north", write_region(tmp_path / "north", 64, 16, seed=1))
    settings = PersonalizeSettings(mode="head", dp=True, epochs=2, lr=5e-2, bootstrap=100)
    node = _dp_node(tmp_path, settings)
    task = dataclasses.replace(north_task, rounds=2, run_key="run-p")
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    state, result = train_round(region, task, state, node)
    account = Accountant.load(tmp_path / "audit").accounts["run-p"]
    later = dp_steps(settings, task.train, result.num_examples)
    assert later == 2 * result.steps  # two epochs of the same batch size
    assert account.personalize_steps == later and account.planned_steps == 2 * result.steps + later
    alone = calibrate(BUDGET, account.sample_rate, 2 * result.steps, task.dp)
    assert account.noise_multiplier > alone * 1.05  # the plan without personalization would need less noise
    second = dataclasses.replace(task, server_round=2)
    state, _ = train_round(region, second, state, node)
    rounds_eps = Accountant.load(tmp_path / "audit").accounts["run-p"].epsilon_spent
    assert rounds_eps < 0.8 * BUDGET.epsilon  # budget left for the personalization

    report = personalize_node(region, second, state, node, now=0.0)
    dp = report["dp"]
    assert dp["covered"] is True and dp["steps"] == later and dp["delta"] == BUDGET.delta
    assert dp["epsilon_rounds"] == pytest.approx(rounds_eps, rel=1e-6)
    assert rounds_eps < dp["epsilon_spent"] <= BUDGET.epsilon
    assert dp["epsilon_spent"] > 0.95 * BUDGET.epsilon  # the plan was calibrated to spend it all
    assert json.loads((tmp_path / "own" / "north" / PERSONALIZED_REPORT).read_text())["dp"] == dp
    raw = json.loads((tmp_path / "audit" / DP_ACCOUNT_FILE).read_text())["runs"]["run-p"]
    assert raw["charges"][-1] == {"round": 2, "steps": later, "sample_rate": account.sample_rate, "personalize": True}
    assert Accountant.load(tmp_path / "audit").accounts["run-p"].rounds() == {1, 2}

    with pytest.raises(DpRefused, match="already personalized 1 time"):
        personalize_node(region, second, state, node, now=0.0)
    assert len(Accountant.load(tmp_path / "audit").accounts["run-p"].charges) == 3  # refused: nothing charged


def test_personalizing_under_dp_outside_the_plan_is_refused(tmp_path: Path, north_task: ClientTask) -> None:
    """A node whose rounds were calibrated without personalize.dp has spent its budget on them: a DP
    personalization afterwards is refused, saying why, and nothing is charged."""
    region = Region("north", write_region(tmp_path / "north", 48, 16, seed=1))
    plain = PersonalizeSettings(mode="head", dp=False, bootstrap=100)
    task = dataclasses.replace(north_task, rounds=1, run_key="run-q")
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    state, _ = train_round(region, task, state, _dp_node(tmp_path, plain))
    assert Accountant.load(tmp_path / "audit").accounts["run-q"].personalize_steps == 0
    with pytest.raises(DpRefused, match="calibrated before round 1 for the rounds alone"):
        personalize_node(region, task, state, _dp_node(tmp_path, dataclasses.replace(plain, dp=True)), now=0.0)
    assert len(Accountant.load(tmp_path / "audit").accounts["run-q"].charges) == 1


def test_a_plan_whose_personalization_does_not_fit_is_refused_before_round_1(
    tmp_path: Path, north_task: ClientTask
) -> None:
    """The rounds alone fit the budget under dp.max_noise_multiplier, the rounds plus ten epochs of DP
    personalization do not: the node refuses round 1, naming personalize.dp, and calibrates nothing."""
    region = Region("north", write_region(tmp_path / "north", 48, 16, seed=1))
    settings = PersonalizeSettings(mode="head", dp=True, epochs=10.0, bootstrap=100)
    task = dataclasses.replace(north_task, rounds=1, run_key="run-r")
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    n = len(load_data(region, task, NodeSettings()).data.train)  # once the validation split is carved
    steps = dp_steps(dataclasses.replace(settings, epochs=1.0), task.train, n)
    sigma = calibrate(BUDGET, task.train.batch_size / n, steps, task.dp)
    tight = dataclasses.replace(task, dp=dataclasses.replace(task.dp, max_noise_multiplier=1.2 * sigma))
    with pytest.raises(DpRefused, match=r"of the rounds \+ \d+ of personalize\.dp") as err:
        train_round(region, tight, state, _dp_node(tmp_path, settings))
    assert "dp.max_noise_multiplier" in str(err.value)
    assert not (tmp_path / "audit" / DP_ACCOUNT_FILE).exists()
    # without the personalization the same plan fits
    _, result = train_round(region, tight, state, _dp_node(tmp_path, dataclasses.replace(settings, dp=False)))
    assert result.num_examples == n


def test_personalize_dp_refuses_what_it_cannot_cover(tmp_path: Path) -> None:
    """probe (a closed-form refit) and balance (repeated records) cannot train under DP-SGD; a deployed node
    asking for dp without require_dp in its policy has no budget: refused, not silently plain."""
    with pytest.raises(ConfigError, match="dp: mode probe refits the head outside SGD"):
        PersonalizeSettings(mode="probe", dp=True)
    with pytest.raises(ConfigError, match="balance: cannot be used with dp"):
        PersonalizeSettings(mode="head", dp=True, balance=True)
    # the local-only candidate trains outside DP-SGD: serving it would leave the served model uncovered
    with pytest.raises(ConfigError, match="consider_local_only: cannot be used with dp"):
        PersonalizeSettings(mode="head", dp=True, consider_local_only=True)
    PersonalizeSettings(mode="head", consider_local_only=True)  # without dp it is allowed
    settings = tmp_path / "p.yaml"
    settings.write_text("mode: head\ndp: true\n")
    policy = tmp_path / "north.yaml"
    policy.write_text("region: north\n")
    config = {keys.NODE_PERSONALIZE: str(settings), keys.NODE_PERSONAL_DIR: str(tmp_path / "own")}
    with pytest.raises(NodeConfigError, match="dp: true, but this node's policy sets no require_dp"):
        node_settings({**config, keys.NODE_POLICY: str(policy)})
    with pytest.raises(NodeConfigError, match="no require_dp"):
        node_settings(config)
    policy.write_text("region: north\nrequire_dp: {epsilon: 8.0, delta: 1.0e-5}\n")
    assert node_settings({**config, keys.NODE_POLICY: str(policy)}).personalize.dp  # type: ignore[union-attr]


def _run_config(tmp_path: Path, tiny_bert: Path, policy: str | None, **personalize: Any) -> Path:
    regions = tmp_path / "regions"
    if not regions.exists():
        write_region(regions / "north", 48, 16, seed=1)
    entry: dict[str, Any] = {"name": "north", "data": str(regions / "north")}
    if policy is not None:
        (tmp_path / "north.yaml").write_text(policy)
        entry["policy"] = str(tmp_path / "north.yaml")
    path = tiny_config(
        tmp_path / "run.yaml",
        tiny_bert,
        regions,
        rounds=1,
        regions=[entry],
        aggregation={"min_clients": 1},
        personalize={"mode": "head", "dp": True, "bootstrap": 100, "lr": 5e-2, **personalize},
    )
    return path


def test_check_refuses_personalize_dp_when_no_region_requires_dp(tmp_path: Path, tiny_bert: Path) -> None:
    """`fedlocale check`/simulate: personalize.dp with no region's require_dp is refused naming the field and
    its line; with one it passes."""
    from client.preflight import preflight
    from simulations.runner import load_policies

    path = _run_config(tmp_path, tiny_bert, None)
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: personalize\.dp: no region's policy sets require_dp"):
        preflight(load_config(path), {}, path)
    path = _run_config(tmp_path, tiny_bert, "region: north\nrequire_dp: {epsilon: 8.0, delta: 1.0e-5}\n")
    cfg = load_config(path)
    assert not [w for w in preflight(cfg, load_policies(cfg), path).warnings if "personalize.dp" in w]
    plain = dataclasses.replace(cfg, personalize=dataclasses.replace(cfg.personalize, dp=False))
    (said,) = [w for w in preflight(plain, load_policies(cfg), path).warnings if "personalize.dp" in w]
    assert "region(s) north require DP, but personalize.dp is not set" in said and "not covered" in said


def test_a_simulation_personalizes_under_dp_and_the_summary_and_report_say_it_is_covered(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """The simulation's path: the simulated node plans for the run's personalization (personalize_plan), the
    finished run's personalization (simulations.personalize) is charged to that node's account; summary.json's
    covers.personalized is true with the epsilon after personalization, the report says the served model is
    covered. Without personalize.dp it is not, and the report says so."""
    from runfolder.report import write_report
    from runfolder.summary import dp_by_region, with_personalized
    from server.federation import RunState, write_state
    from simulations.personalize import personalize_run
    from simulations.runner import load_all

    cfg = load_config(_run_config(tmp_path, tiny_bert, "region: north\nrequire_dp: {epsilon: 8.0, delta: 1.0e-5}\n"))
    out = tmp_path / "run"
    region = cfg.regions[0]
    node = simulated_node(region, {}, out / "audit" / "nodes", personalize_plan=cfg.personalize)
    task = client_task(cfg, 1, run_key="k")
    start = adapter_state(build_model(cfg.model, cfg.lora, cfg.labels, seed=0).model)
    state, result = train_round(region, task, start, node)
    account = Accountant.load(out / "audit" / "nodes" / "north").accounts["k"]
    assert account.personalize_steps == dp_steps(cfg.personalize, cfg.train, result.num_examples) > 0
    loaded = build_model(cfg.model, cfg.lora, cfg.labels, seed=0)
    from common.model import load_adapter_state

    load_adapter_state(loaded.model, state)
    save_adapter(loaded, out / "adapter")
    (out / "federation.json").write_text(json.dumps({"best_round": 1, "rounds": [{}]}))
    write_state(out, RunState(1, [{"round": 1}], 1, 0.5, 1.0, "", {}, run_key="k"))
    rounds = [{"round": 1, "train": {"north": {"dp_epsilon": account.epsilon_spent, "dp_delta": 1e-5}}}]
    summary = Summary(regions={"north": {"num_test": 16, "dp": dp_by_region(rounds)["north"]}})

    entries = personalize_run(cfg, out, load_all(cfg, lambda _: None), say=lambda _: None)
    dp = entries["north"]["dp"]
    assert account.epsilon_spent < dp["epsilon_spent"] <= 8.0 and dp["steps"] == account.personalize_steps
    after = with_personalized(summary, entries)
    block = after.regions["north"]["dp"]
    assert block["covers"] == {"federated": True, "personalized": True}
    assert block["epsilon_spent"] == dp["epsilon_spent"] and block["epsilon_rounds"] == pytest.approx(
        account.epsilon_spent, rel=1e-6
    )
    assert summary.regions["north"]["dp"]["covers"]["personalized"] is False  # the given summary is untouched
    write_report(out, after, [])
    text = (out / "report.md").read_text()
    chosen = entries["north"]["chosen"]
    assert (
        "yes (personalized, under personalize.dp)" if chosen == "personalized" else "yes (global model chosen)"
    ) in text

    # personalized without DP: not covered, and a served personalized model is said not to be
    plain = {"north": {**{k: v for k, v in entries["north"].items() if k != "dp"}, "chosen": "personalized"}}
    uncovered = with_personalized(summary, plain)
    assert uncovered.regions["north"]["dp"]["covers"] == {"federated": True, "personalized": False}
    write_report(out, uncovered, [])
    assert "**no** (personalized without DP)" in (out / "report.md").read_text()
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["personalize"]["dp"] is True


def test_check_plans_the_personalization_in_a_simulation_and_on_a_deployed_node(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """`fedlocale check` calibrates as the node will: the run's personalization (simulation) or the node's own
    (deployment) counts in the plan, so a plan that fits only without it is refused naming personalize.dp; a
    deployed node asking for dp without require_dp is refused before it starts."""
    from client.pipeline import carved
    from client.preflight import preflight
    from client.train import plan_steps
    from simulations.runner import load_policies

    dp_policy = "region: north\nrequire_dp: {epsilon: 8.0, delta: 1.0e-5}\n"
    cfg = load_config(_run_config(tmp_path, tiny_bert, dp_policy, epochs=10.0))
    region = cfg.regions[0]
    n = len(carved(load_region("north", region.data, cfg.labels), region.data, cfg.data, cfg.seed)[0].train)
    sigma = calibrate(BUDGET, cfg.train.batch_size / n, plan_steps(n, cfg.train), cfg.dp)
    cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, max_noise_multiplier=1.2 * sigma))
    policies = load_policies(cfg)
    with pytest.raises(ConfigError, match=r"of the rounds \+ \d+ of personalize\.dp"):
        preflight(cfg, policies)
    plain = dataclasses.replace(cfg, personalize=dataclasses.replace(cfg.personalize, dp=False))
    preflight(plain, policies)  # the rounds alone fit

    # a deployment: the run config's personalize is not the nodes'; each node's own is
    deployed = [region]
    preflight(cfg, policies, regions=deployed, personalize={})  # this node personalizes nothing
    with pytest.raises(ConfigError, match=r"personalize\.dp"):
        preflight(plain, policies, regions=deployed, personalize={"north": cfg.personalize})
    with pytest.raises(
        ConfigError, match="its node's personalization sets dp: true, but its policy sets no require_dp"
    ):
        preflight(plain, {}, regions=[dataclasses.replace(region, policy=None)], personalize={"north": cfg.personalize})


@pytest.mark.slow
def test_a_simulated_run_plans_and_charges_its_dp_personalization_end_to_end(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real ClientApp and server loop (in process): the simulated node gets the run's
    personalization as its plan (make_app's personalize_plan, as simulate passes it), calibrates for it before
    round 1, and the finished run's personalization is charged to its account; the summary built as simulate
    builds it says the personalized model is covered, with the epsilon after personalization."""
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import make_app
    from runfolder.summary import build_summary, with_personalized
    from simulations.personalize import personalize_run
    from simulations.runner import load_all
    from tests.test_resume import LocalGrid, federate

    for name in ("_run_id", "_node_id", "_task_id"):  # as Flower's runtime tells a ServerApp process
        monkeypatch.setattr(TaskIdentity, name, 0 if name == "_node_id" else 1)
    path = _run_config(tmp_path, tiny_bert, "region: north\nrequire_dp: {epsilon: 8.0, delta: 1.0e-5}\n")
    cfg = load_config(path)
    out = tmp_path / "out"
    grid = LocalGrid(cfg.regions)
    grid.app = make_app(
        cfg.regions, audit_root=out / "audit" / "nodes", personalize_plan=cfg.personalize, sim_seed=cfg.seed
    )
    federate(grid, cfg, out)  # type: ignore[arg-type]
    (account,) = Accountant.load(out / "audit" / "nodes" / "north").accounts.values()
    assert account.personalize_steps > 0 and account.planned_steps > account.steps
    federation = json.loads((out / "federation.json").read_text())
    rounds_eps = federation["rounds"][0]["train"]["north"]["dp_epsilon"]
    data = load_all(cfg, lambda _: None)
    summary = build_summary(cfg, data, federation, {}, 0.0, str(path))
    assert summary.regions["north"]["dp"]["covers"]["personalized"] is False  # before personalization

    after = with_personalized(summary, personalize_run(cfg, out, data, say=lambda _: None))
    dp = after.regions["north"]["dp"]
    assert dp["covers"] == {"federated": True, "personalized": True}
    assert dp["epsilon_rounds"] == pytest.approx(rounds_eps, rel=1e-6)
    assert rounds_eps < dp["epsilon_spent"] <= 8.0 and dp["personalize_steps"] == account.personalize_steps
