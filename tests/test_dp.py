"""Record-level DP-SGD on the node (client/dp.py): clipping per example, calibration, the account on disk, the
guard's check against the policy, and the accountant against the closed form of the Gaussian mechanism."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from scipy.stats import norm

from client.dp import (
    Accountant,
    DpRefused,
    DpSgd,
    calibrate,
    dp_training,
    epsilon,
    poisson_batches,
    spent,
)
from client.task import NodeSettings, train_round
from client.train import pad_batch
from common.config import ClientTask, DpSettings, LoraSettings, Region
from common.model import adapter_state, build_model
from common.policy import (
    DpRecord,
    DpRequirement,
    Outbound,
    Protections,
    RegionPolicy,
    egress_problems,
)
from common.runfiles import DP_ACCOUNT_FILE
from tests.conftest import write_region


def _record(eps: float, delta: float = 1e-5) -> DpRecord:
    return DpRecord(eps, delta, 1.0, 1.0, 0.01, 100, "prv")


def test_per_example_gradients_are_clipped_one_by_one(north_task: ClientTask) -> None:
    """With no noise, the DP optimizer's gradient is the mean of each example's own gradient clipped to C: the
    per-example gradients Opacus computes in a padded batch equal each example's gradient alone, each clipped
    one is at most C, and the result differs from clipping the batch's sum (so the test can tell them apart)."""
    loaded = build_model(north_task.model, LoraSettings(r=4, alpha=8, dropout=0.0), north_task.labels, seed=0)
    model = loaded.model
    with torch.no_grad():  # B = 0 at init gives A no gradient: move every factor off its start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    # no dropout anywhere (attention's is inside SDPA when its module trains), so each example's gradient is
    # deterministic; the trainable layers stay in training mode, where Opacus's hooks record activations
    model.eval()
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()
    ids = [[2, 5, 7, 9, 3], [2, 11, 3], [2, 6, 6, 8, 10, 12, 3], [2, 4, 3]]  # different lengths: padding
    labels = torch.tensor([0, 1, 1, 0])
    params = [p for p in model.parameters() if p.requires_grad]
    alone = []
    for i, row in enumerate(ids):
        model.zero_grad()
        F.cross_entropy(model(**pad_batch([row], 0)).logits, labels[i : i + 1]).backward()
        alone.append(torch.cat([p.grad.flatten() for p in params]).clone())  # type: ignore[union-attr]
    norms = torch.stack([g.norm() for g in alone])
    clip = float(norms.median())  # some examples above C, some below
    assert (norms > clip * 1.01).any() and (norms < clip).any()
    clipped = [g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in alone]
    assert all(float(g.norm()) <= clip * (1 + 1e-5) for g in clipped)
    expected = torch.stack(clipped).sum(0) / len(ids)

    model.zero_grad()
    private = DpSgd(
        noise_multiplier=0.0,
        clip=clip,
        sample_rate=1.0,
        num_examples=len(ids),
        sampling_seed=0,
        noise_seed=1,
        settings=DpSettings(),
    )
    sgd = torch.optim.SGD(params, lr=0.0)
    wrapped, optimizer, plan = private(model, sgd, [[0]])
    assert sorted(plan[0]) == [0, 1, 2, 3]  # sample rate 1: every example in the batch
    F.cross_entropy(wrapped(**pad_batch(ids, 0)).logits, labels).backward()
    per_example = torch.cat([p.grad_sample.reshape(len(ids), -1) for p in params], dim=1)  # type: ignore[attr-defined]
    for i in range(len(ids)):
        assert torch.allclose(per_example[i], alone[i], atol=1e-5)
    optimizer.step()
    got = torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]
    assert torch.allclose(got, expected, atol=1e-5)
    summed = torch.stack(alone).sum(0)
    clipped_sum = summed * min(1.0, clip * len(ids) / float(summed.norm())) / len(ids)
    assert not torch.allclose(got, clipped_sum, atol=1e-4)
    private.close()


def test_poisson_batches_draw_each_example_independently() -> None:
    batches = poisson_batches(200, 0.1, 400, torch.Generator().manual_seed(0))
    sizes = [len(b) for b in batches]
    assert len(batches) == 400
    assert len(set(sizes)) > 5  # sizes vary, as Poisson sampling makes them
    assert abs(sum(sizes) / len(sizes) - 20) < 1.0
    assert poisson_batches(200, 0.1, 3, torch.Generator().manual_seed(0)) == batches[:3]  # seeded


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_noise_fits_the_budget_tightly(accountant: str) -> None:
    budget, rate, steps = DpRequirement(3.0, 1e-5), 0.02, 300
    sigma = calibrate(budget, rate, steps, DpSettings(accountant=accountant))  # type: ignore[arg-type]
    spent_eps = epsilon([(sigma, rate, steps)], budget.delta, accountant)
    assert spent_eps <= budget.epsilon
    assert spent_eps > 0.97 * budget.epsilon  # not more noise than needed
    assert epsilon([(0.9 * sigma, rate, steps)], budget.delta, accountant) > budget.epsilon


def test_a_budget_too_small_for_the_plan_is_refused() -> None:
    with pytest.raises(DpRefused, match=r"dp\.max_noise_multiplier"):
        calibrate(DpRequirement(0.01, 1e-5), 0.5, 1000, DpSettings(max_noise_multiplier=5.0))


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon of a mu-GDP mechanism at delta (Balle & Wang 2018; Dong, Roth & Su 2019): the exact (epsilon,
    delta) curve of the Gaussian mechanism, which T full-batch steps with noise sigma are with mu = sqrt(T)/sigma."""

    def gap(e: float) -> float:
        return float(norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta)

    return float(brentq(gap, 0, 100))


@pytest.mark.parametrize(("sigma", "steps"), [(5.0, 20), (2.0, 10), (10.0, 100)])
def test_the_accountant_agrees_with_the_closed_form_within_one_percent(sigma: float, steps: int) -> None:
    """Sample rate 1 (no subsampling): T steps compose to one Gaussian mechanism with sensitivity/noise
    sqrt(T)/sigma, whose epsilon has a closed form; the PRV accountant (the default) must match it within 1 %,
    RDP must bound it from above."""
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, 1e-5)
    prv = epsilon([(sigma, 1.0, steps)], 1e-5, "prv")
    assert abs(prv - exact) / exact < 0.01
    assert epsilon([(sigma, 1.0, steps)], 1e-5, "rdp") >= exact


def test_guard_refuses_a_reply_spent_beyond_the_policy_and_passes_the_reverse() -> None:
    strict = RegionPolicy("north", require_dp=DpRequirement(epsilon=1.0, delta=1e-5))
    loose = RegionPolicy("north", require_dp=DpRequirement(epsilon=8.0, delta=1e-5))

    def out(dp: DpRecord | None) -> Outbound:
        return Outbound("train", "north", (), {"num-examples": 10, "dp-epsilon": 1.0}, 10, Protections(dp=dp))

    assert any("exceeds the policy's (epsilon 1.0" in p for p in egress_problems(strict, out(_record(8.0))))
    assert egress_problems(loose, out(_record(8.0))) == []
    assert egress_problems(strict, out(_record(0.9))) == []
    assert any("applies none" in p for p in egress_problems(strict, out(None)))
    assert any("delta" in p for p in egress_problems(loose, out(_record(1.0, delta=1e-3))))


def _dp_node(tmp_path: Path, eps: float = 8.0) -> NodeSettings:
    policy = RegionPolicy("north", require_dp=DpRequirement(epsilon=eps, delta=1e-5))
    return NodeSettings(policy=policy, audit_dir=tmp_path / "audit", threads=1)


def test_node_trains_with_dp_sgd_and_keeps_its_account(tmp_path: Path, north_task: ClientTask) -> None:
    """A DP node calibrates for every planned round before round 1, charges each round on its disk (a
    restarted node reads it back), refuses a round beyond the budget and, with no noise, trains differently."""
    region = Region("north", write_region(tmp_path / "north", 64, 16, seed=1))
    task = dataclasses.replace(north_task, rounds=2, run_key="run-a")
    node = _dp_node(tmp_path)
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    new_state, result = train_round(region, task, state, node)
    assert any(not torch.equal(new_state[k], state[k]) for k in state)
    account = Accountant.load(node.audit_dir).accounts["run-a"]  # type: ignore[arg-type]
    assert account.planned_steps == 2 * result.steps
    assert account.sample_rate == pytest.approx(task.train.batch_size / result.num_examples)
    record = spent(node.policy, node.audit_dir, task, trained=True)
    assert record is not None and record.steps == result.steps
    assert 0 < record.epsilon_spent < 8.0 and record.delta == 1e-5
    raw = json.loads((node.audit_dir / DP_ACCOUNT_FILE).read_text())  # type: ignore[operator]
    assert raw["runs"]["run-a"]["charges"] == [{"round": 1, "steps": result.steps, "sample_rate": account.sample_rate}]

    # round 2: the last planned round fits and spends (almost) the whole budget
    train_round(region, dataclasses.replace(task, server_round=2), state, node)
    after = spent(node.policy, node.audit_dir, dataclasses.replace(task, server_round=2), trained=True)
    assert after is not None and after.steps == 2 * result.steps
    assert 7.5 < after.epsilon_spent <= 8.0
    # round 3 (the run extended beyond its plan): the budget is spent, nothing is trained
    with pytest.raises(DpRefused, match="privacy budget is spent"):
        train_round(region, dataclasses.replace(task, server_round=3, rounds=3), state, node)
    assert len(Accountant.load(node.audit_dir).accounts["run-a"].charges) == 2  # type: ignore[arg-type]
    # a reply of a round trained without DP-SGD has no record: the guard refuses it
    assert spent(node.policy, node.audit_dir, dataclasses.replace(task, server_round=3), trained=True) is None


def test_dp_needs_a_folder_for_its_accountant_and_no_augmentation(north_task: ClientTask, tmp_path: Path) -> None:
    policy = RegionPolicy("north", require_dp=DpRequirement(epsilon=8.0, delta=1e-5))
    with pytest.raises(DpRefused, match="audit-dir"), dp_training(policy, None, "north", north_task, 10, 5, False):
        pass
    augmented = dp_training(policy, tmp_path, "north", north_task, 10, 5, True)
    with pytest.raises(DpRefused, match="augmentation"), augmented:
        pass
    with dp_training(None, None, "north", north_task, 10, 5, False) as private:
        assert private is None


def test_an_unreadable_account_stops_training(tmp_path: Path) -> None:
    (tmp_path / DP_ACCOUNT_FILE).write_text("{not json")
    with pytest.raises(DpRefused, match="unreadable"):
        Accountant.load(tmp_path)


@pytest.mark.slow
def test_a_spent_budget_stops_exactly_that_region_and_the_record_survives_resume(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real ClientApp and guard: north (policy epsilon 8) trains round 1 with DP-SGD calibrated
    for the one planned round; the run resumed with a second round finds north's budget spent (read back from
    its disk) and refuses north's reply, south goes on; ledger, metrics and summary carry the DP record."""
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import make_app
    from runfolder.summary import dp_by_region
    from tests.test_resume import LocalGrid, config, federate

    for name in ("_run_id", "_node_id", "_task_id"):  # as Flower's runtime tells a ServerApp process
        monkeypatch.setattr(TaskIdentity, name, 0 if name == "_node_id" else 1)
    policy = tmp_path / "north.yaml"
    policy.write_text("region: north\nrequire_dp: {epsilon: 8.0, delta: 1.0e-5}\n")
    base = config(tmp_path, tiny_bert, two_regions, rounds=1)
    regions = tuple(dataclasses.replace(r, policy=policy) if r.name == "north" else r for r in base.regions)
    cfg = dataclasses.replace(base, regions=regions, aggregation=dataclasses.replace(base.aggregation, min_clients=1))
    nodes, out = tmp_path / "nodes", tmp_path / "out"

    def grid() -> LocalGrid:
        g = LocalGrid(cfg.regions)
        g.app = make_app(cfg.regions, audit_root=nodes)
        return g

    federate(grid(), cfg, out)  # type: ignore[arg-type]
    account = Accountant.load(nodes / "north").accounts
    assert len(account) == 1 and [c.round for c in next(iter(account.values())).charges] == [1]
    first = json.loads((out / "federation.json").read_text())["rounds"]
    assert first[0]["participants"] == ["north", "south"]
    eps1 = first[0]["train"]["north"]["dp_epsilon"]
    assert 7.0 < eps1 <= 8.0 and "dp_epsilon" not in first[0]["train"]["south"]
    sent = [json.loads(line)["body"] for line in (nodes / "north" / "ledger.jsonl").read_text().splitlines()]
    trained = [b for b in sent if b["message"] == "train" and b["status"] == "sent"]
    assert trained and trained[0]["protections"]["dp"]["epsilon_spent"] == pytest.approx(eps1)
    assert trained[0]["protections"]["dp"]["accountant"] == "prv" and trained[0]["protections"]["dp"]["clip"] == 1.0
    assert not any(b.get("protections", {}).get("dp") is None for b in sent if b["status"] == "sent")

    federate(grid(), dataclasses.replace(cfg, rounds=2), out, resume=True)  # type: ignore[arg-type]
    rounds = json.loads((out / "federation.json").read_text())["rounds"]
    assert rounds[1]["participants"] == ["south"]
    assert [r["region"] for r in rounds[1]["rejected"]] == ["north"]
    assert "privacy budget is spent" in str(rounds[1]["rejected"][0]["reason"])
    assert [c.round for c in Accountant.load(nodes / "north").accounts[next(iter(account))].charges] == [1]
    refused = [json.loads(line)["body"] for line in (nodes / "north" / "ledger.jsonl").read_text().splitlines()]
    assert any(b["status"] == "refused" and b["round"] == 2 and b["message"] == "train" for b in refused)
    dp = dp_by_region(rounds)
    assert set(dp) == {"north"} and dp["north"]["by_round"] == {"1": eps1}
    assert dp["north"]["covers"] == {"federated": True, "personalized": False}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(x["region"] == "north" and x["split"] == "train" and x.get("dp_epsilon") == eps1 for x in lines)


def test_dual_mode_trains_global_and_personal_lora_in_one_dp_pass(tmp_path: Path, north_task: ClientTask) -> None:
    """Personalize mode dual under DP: one DP-SGD pass over the widened adapter (its clipping covers the global
    part that leaves and the personal slices that stay), one round charged, the reply exactly a global adapter."""
    from client.task import train_dual

    region = Region("north", write_region(tmp_path / "north", 48, 16, seed=3))
    task = dataclasses.replace(north_task, rounds=1, run_key="run-dual")
    node = dataclasses.replace(_dp_node(tmp_path), personal_dir=tmp_path / "personal", personal_rank=4)
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    sent, result = train_dual(region, task, state, node)
    assert {k: tuple(v.shape) for k, v in sent.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert any(not torch.equal(sent[k], state[k]) for k in state)
    account = Accountant.load(node.audit_dir).accounts["run-dual"]  # type: ignore[arg-type]
    assert [c.round for c in account.charges] == [1] and account.steps == result.steps
    assert 0 < account.epsilon_spent <= 8.0


def test_dual_under_dp_train_head_keeps_personal_slices_that_compute_nothing(
    tmp_path: Path, north_task: ClientTask
) -> None:
    """dp.train: head on a dual node: the personal slices stay as they started (B zero), so personalization
    serves the global model (``client.personalize.unchanged_start``); with everything under DP they train."""
    from safetensors.torch import load_file

    from client.personal import personal_folder
    from client.personalize import unchanged_start
    from client.task import train_dual

    region = Region("north", write_region(tmp_path / "north", 48, 16, seed=3))
    levers = DpSettings(train="head", optimizer="sgd", lr=0.5, batch_size=1000)
    mean = dataclasses.replace(north_task.model, pooling="mean")
    for dp, untrained in ((levers, True), (DpSettings(), False)):
        task = dataclasses.replace(north_task, rounds=1, run_key=f"run-{dp.train}", dp=dp, model=mean)
        root = tmp_path / dp.train
        node = NodeSettings(
            policy=_dp_node(root).policy,
            audit_dir=root / "audit",
            threads=1,
            personal_dir=root / "personal",
            personal_rank=4,
        )
        state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
        train_dual(region, task, state, node)
        (kept,) = personal_folder(root / "personal", "north").iterdir()
        assert unchanged_start(load_file(str(kept))) is untrained, dp.train


def test_empty_poisson_batches_take_a_noise_only_step(north_task: ClientTask) -> None:
    """Poisson sampling at a low rate draws empty batches: training goes through them (no forward pass), and
    each still takes a noisy optimizer step, as the accountant assumes every step does."""
    from client.train import train_encoded

    loaded = build_model(north_task.model, north_task.lora, north_task.labels, seed=0)
    before = {k: v.clone() for k, v in adapter_state(loaded.model).items()}
    ids, labels = [[2, 5, 7, 3], [2, 6, 3], [2, 8, 9, 10, 3]], [0, 1, 0]
    private = DpSgd(
        noise_multiplier=1.0,
        clip=1.0,
        sample_rate=0.05,
        num_examples=3,
        sampling_seed=4,
        noise_seed=5,
        settings=DpSettings(),
    )
    plan = poisson_batches(3, 0.05, 6, torch.Generator().manual_seed(4))
    assert [] in plan  # the seeded plan the wrapper draws has empty batches
    settings = dataclasses.replace(north_task.train, max_steps=6, epochs=6.0)
    result = train_encoded(loaded.model, ids, labels, settings, pad_id=0, seed=0, private=private)
    private.close()
    assert result.steps == 6
    after = adapter_state(loaded.model)
    assert all(not torch.equal(after[k], before[k]) for k in before)  # every tensor moved: noise on every step


@pytest.mark.parametrize(
    ("train", "field", "why"),
    [
        ({"prox_mu": 0.1}, "train.prox_mu", "leave out the proximal term"),
        ({"logit_adjust": 1.0}, "train.logit_adjust", "per-step sensitivity"),
    ],
)
def test_dp_refuses_training_options_it_would_silently_defeat(
    tmp_path: Path, north_task: ClientTask, train: dict[str, float], field: str, why: str
) -> None:
    """FedProx's term and the logit shift are outside what DP-SGD clips: the node refuses to train with them,
    naming the field and why, before anything is charged to the region's budget."""
    region = Region("north", write_region(tmp_path / "north", 32, 16, seed=1))
    task = dataclasses.replace(north_task, run_key="run-x", train=dataclasses.replace(north_task.train, **train))
    node = _dp_node(tmp_path)
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    with pytest.raises(DpRefused, match=rf"region north: {field} is .*cannot be used with require_dp") as err:
        train_round(region, task, state, node)
    assert why in str(err.value)
    assert not (tmp_path / "audit" / DP_ACCOUNT_FILE).exists()  # nothing calibrated, nothing spent
    # the plain node trains with the same settings
    train_round(region, task, state, dataclasses.replace(node, policy=None))


def test_the_proximal_gradient_is_what_dp_sgd_drops(north_task: ClientTask) -> None:
    """Why prox_mu is refused under DP: with Opacus's optimizer (no noise, no effective clipping) a huge mu
    changes nothing, where the plain optimizer is pulled by it."""
    from client.train import train_encoded

    ids, labels = [[2, 5 + i % 7, 7, 3] for i in range(16)], [i % 2 for i in range(16)]

    def trained(mu: float, private: bool) -> dict[str, torch.Tensor]:
        loaded = build_model(north_task.model, north_task.lora, north_task.labels, seed=0)
        settings = dataclasses.replace(north_task.train, prox_mu=mu, lr=5e-2, max_steps=5, epochs=5.0)
        dp = (
            DpSgd(
                noise_multiplier=0.0,
                clip=1e6,
                sample_rate=0.5,
                num_examples=16,
                sampling_seed=1,
                noise_seed=2,
                settings=DpSettings(),
            )
            if private
            else None
        )
        train_encoded(loaded.model, ids, labels, settings, pad_id=0, seed=0, private=dp)
        if dp is not None:
            dp.close()
        return adapter_state(loaded.model)

    for private, differs in ((False, True), (True, False)):
        plain, pulled = trained(0.0, private), trained(1e3, private)
        assert any(not torch.equal(plain[k], pulled[k]) for k in plain) is differs


def test_dual_with_ffa_under_dp_is_refused_before_anything_is_charged(tmp_path: Path, north_task: ClientTask) -> None:
    """Opacus cannot take per-example gradients through ffa's kept rows on a dual node: refused up front with a
    clear reason (it used to fail inside Opacus and still charge the round)."""
    from client.task import train_dual

    region = Region("north", write_region(tmp_path / "north", 48, 16, seed=3))
    task = dataclasses.replace(north_task, rounds=1, run_key="run-dual-ffa", lora_aggregation="ffa")
    node = dataclasses.replace(_dp_node(tmp_path), personal_dir=tmp_path / "personal", personal_rank=4)
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    with pytest.raises(DpRefused, match=r"personalize mode dual with aggregation\.lora: ffa cannot be used"):
        train_dual(region, task, state, node)
    assert not (tmp_path / "audit" / DP_ACCOUNT_FILE).exists()


def test_dual_apart_under_dp_is_refused_before_anything_is_charged(tmp_path: Path, north_task: ClientTask) -> None:
    """dual_train apart trains the slices in a second pass the DP budget does not plan for: refused before the
    global part trains, so nothing is charged and no slices are kept."""
    from client.task import train_dual

    region = Region("north", write_region(tmp_path / "north", 48, 16, seed=3))
    task = dataclasses.replace(north_task, rounds=1, run_key="run-dual-apart")
    node = dataclasses.replace(
        _dp_node(tmp_path), personal_dir=tmp_path / "personal", personal_rank=4, personal_apart=True
    )
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    with pytest.raises(DpRefused, match=r"region north: personalize\.dual_train apart cannot be used with require_dp"):
        train_dual(region, task, state, node)
    assert not (tmp_path / "audit" / DP_ACCOUNT_FILE).exists()
    assert not list((tmp_path / "personal").rglob("*.safetensors"))


def test_a_round_is_charged_only_once_dp_sgd_was_applied(tmp_path: Path, north_task: ClientTask) -> None:
    """A wrapper Opacus refuses (here: a parametrized weight, which GradSampleModule does not support) ran no
    private step and spends nothing; a training that fails after the wrapper was applied is charged."""
    from client.train import rows_kept

    policy = RegionPolicy("north", require_dp=DpRequirement(epsilon=8.0, delta=1e-5))
    task = dataclasses.replace(north_task, rounds=2, run_key="run-c")
    loaded = build_model(task.model, task.lora, task.labels, seed=0)
    params = [p for p in loaded.model.parameters() if p.requires_grad]

    def charges() -> list[int]:
        return [c.round for c in Accountant.load(tmp_path).accounts["run-c"].charges]

    with (
        rows_kept(loaded.model, "lora_A", 2),
        pytest.raises(NotImplementedError),
        dp_training(policy, tmp_path, "north", task, 10, 5, False) as private,
    ):
        assert private is not None
        private(loaded.model, torch.optim.SGD(params, lr=0.1), [[0]] * 5)
    assert charges() == []
    with (
        pytest.raises(RuntimeError, match="midway"),
        dp_training(policy, tmp_path, "north", task, 10, 5, False) as p,
    ):
        assert p is not None
        p(loaded.model, torch.optim.SGD(params, lr=0.1), [[0]] * 5)
        raise RuntimeError("failed midway")
    assert charges() == [1]


def test_dp_train_head_noises_only_the_head_and_leaves_the_lora_factors_as_received(
    tmp_path: Path, north_task: ClientTask
) -> None:
    """dp.train: head with dp.optimizer: sgd and dp.batch_size, on a mean-pooling model: the reply's LoRA factors
    are bitwise the received ones, its head moved, the round is charged as any DP round at sampling rate 1;
    afterwards the model trains everything again. With the head frozen too nothing would train: refused."""
    region = Region("north", write_region(tmp_path / "north", 64, 16, seed=1))
    levers = DpSettings(train="head", optimizer="sgd", lr=0.5, batch_size=1000)
    mean = dataclasses.replace(north_task.model, pooling="mean")  # what these levers are meant for
    task = dataclasses.replace(north_task, rounds=2, run_key="run-h", dp=levers, model=mean)
    node = _dp_node(tmp_path)
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    # a received adapter whose LoRA B is not zero, so that a trained LoRA would show
    state = {k: v + 0.01 if "lora_B" in k else v for k, v in state.items()}
    new_state, result = train_round(region, task, state, node)
    lora = [k for k in state if "lora_" in k]
    head = [k for k in state if "lora_" not in k]
    assert lora and head
    assert all(torch.equal(new_state[k], state[k]) for k in lora)
    assert all(not torch.equal(new_state[k], state[k]) for k in head)
    account = Accountant.load(node.audit_dir).accounts["run-h"]  # type: ignore[arg-type]
    assert account.charges[0].steps == result.steps > 0
    assert account.sample_rate == 1.0  # dp.batch_size beyond the region's 64 examples: the whole split per step

    frozen = dataclasses.replace(task, run_key="run-f", train=dataclasses.replace(task.train, head="frozen"))
    with pytest.raises(DpRefused, match=r"dp\.train is head and train\.head is frozen: nothing would train"):
        train_round(region, frozen, state, node)

    # the wrapper itself: SGD over the head alone, and everything trainable again once closed
    loaded = build_model(task.model, task.lora, task.labels, seed=0)
    before = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    adamw = torch.optim.AdamW([p for p in loaded.model.parameters() if p.requires_grad], lr=1e-3)
    private = DpSgd(1.0, 1.0, 0.5, 8, sampling_seed=0, noise_seed=1, settings=levers)
    _, optimizer, _ = private(loaded.model, adamw, [[0]])
    inner = optimizer.original_optimizer  # type: ignore[attr-defined]
    assert isinstance(inner, torch.optim.SGD) and inner.param_groups[0]["lr"] == 0.5
    trained = {id(p) for p in inner.param_groups[0]["params"]}
    named = dict(loaded.model.named_parameters())
    assert {n for n in before if id(named[n]) in trained} == {n for n in before if "lora_" not in n}
    private.close()
    assert {n for n, p in loaded.model.named_parameters() if p.requires_grad} == before


def test_head_only_dp_sgd_runs_the_frozen_model_once_per_text(north_task: ClientTask) -> None:
    """dp.train: head trains the output layer on features the frozen model computes once per distinct text
    (client.probe.CachedFeatures): over three whole-split steps the encoder sees each of the three texts once,
    the per-example gradients equal those through the whole model (no dropout: eval mode) and the layer trained
    is the model's own."""
    loaded = build_model(north_task.model, north_task.lora, north_task.labels, seed=0)
    model = loaded.model
    model.eval()
    ids = [[2, 5, 7, 9, 3], [2, 11, 3], [2, 5, 7, 9, 3], [2, 6, 8, 3]]  # one text twice
    labels = torch.tensor([0, 1, 0, 1])
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    alone = []
    for i, row in enumerate(ids):
        model.zero_grad()
        F.cross_entropy(model(**pad_batch([row], 0)).logits, labels[i : i + 1]).backward()
        alone.append(torch.cat([p.grad.flatten() for p in head]).clone())  # type: ignore[union-attr]
    model.zero_grad()

    seen: list[int] = []  # rows through the encoder, per call
    encoder = model.get_base_model().bert
    hook = encoder.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(len(args[0] if args else kwargs["input_ids"])), with_kwargs=True
    )
    levers = DpSettings(train="head", optimizer="sgd", lr=0.1)
    private = DpSgd(0.0, 1e6, 1.0, len(ids), sampling_seed=0, noise_seed=1, settings=levers)
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()  # as train_encoded has it; the features are computed in eval mode all the same
    wrapped, optimizer, plan = private(model, adamw, [[0]] * 3)
    for step, batch in enumerate(plan):
        assert sorted(batch) == [0, 1, 2, 3]
        optimizer.zero_grad()
        F.cross_entropy(wrapped(**pad_batch([ids[i] for i in batch], 0)).logits, labels[batch]).backward()
        if step == 0:
            per_example = torch.cat([p.grad_sample.reshape(len(ids), -1) for p in head], dim=1)  # type: ignore[attr-defined]
            for i in range(len(ids)):
                assert torch.allclose(per_example[i], alone[i], atol=1e-5)
        optimizer.step()
    hook.remove()
    wrapped.eval()  # as train_encoded leaves it: the frozen model too, though it is no submodule of the wrapper
    assert not any(m.training for m in model.modules())
    private.close()
    assert seen == [3]  # the three distinct texts, once, in the first step
    layer = wrapped._module.layer  # type: ignore[union-attr]
    assert any(layer.weight is p for p in head)


def test_a_replaced_dp_optimizer_keeps_the_warm_up(north_task: ClientTask) -> None:
    """train_encoded puts its warm-up schedule on the optimizer that steps, also when the DP wrapper replaced
    AdamW by SGD: the learning rate climbs over train.warmup_steps to dp.lr."""
    from client.train import train_encoded

    loaded = build_model(north_task.model, north_task.lora, north_task.labels, seed=0)
    ids = [loaded.tokenizer(t)["input_ids"] for t in ("good", "bad", "fine film", "awful film")]
    stepping: list[torch.optim.Optimizer] = []

    class Watching(DpSgd):
        def __call__(self, model, optimizer, order):  # type: ignore[no-untyped-def]
            model, optimizer, order = super().__call__(model, optimizer, order)
            stepping.append(optimizer)
            return model, optimizer, order

    levers = DpSettings(optimizer="sgd", lr=0.4)
    private = Watching(0.0, 1.0, 1.0, len(ids), sampling_seed=0, noise_seed=1, settings=levers)
    settings = dataclasses.replace(north_task.train, warmup_steps=4, local_steps=6, batch_size=4, threads=1)
    seen: list[float] = []  # the learning rate of the step after each step
    train_encoded(
        loaded.model,
        ids,
        [1, 0, 1, 0],
        settings,
        pad_id=loaded.pad_id,
        seed=0,
        private=private,
        progress=lambda *_: seen.append(stepping[0].param_groups[0]["lr"]),
    )
    private.close()
    assert isinstance(stepping[0].original_optimizer, torch.optim.SGD)  # type: ignore[attr-defined]
    assert seen == pytest.approx([0.2, 0.3, 0.4, 0.4, 0.4, 0.4])


def test_dp_adamw_is_adamw_also_when_the_run_trains_with_sgd(north_task: ClientTask) -> None:
    """dp.optimizer decides a DP node's optimizer: train.optimizer sgd does not leak into DP-SGD's adamw."""
    loaded = build_model(north_task.model, north_task.lora, north_task.labels, seed=0)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    private = DpSgd(0.0, 1.0, 1.0, 4, sampling_seed=0, noise_seed=1, settings=DpSettings())
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    chosen = private._steps(loaded.model, sgd)
    assert isinstance(chosen, torch.optim.AdamW)
    assert chosen.param_groups[0]["lr"] == 0.1 and chosen.param_groups[0]["weight_decay"] == 0.01
    adamw = torch.optim.AdamW(params, lr=0.1)
    assert private._steps(loaded.model, adamw) is adamw  # nothing to replace


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("lr", 0.0, "must be > 0"),
        ("lr", math.nan, "must be > 0"),
        ("batch_size", 0, "must be a number of examples >= 1"),
    ],
)
def test_dp_levers_are_validated_naming_the_field(field: str, value: float, why: str) -> None:
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"{field}: {why}"):
        DpSettings(**{field: value})  # type: ignore[arg-type]


def test_dp_batch_size_whole_samples_every_record_of_any_region() -> None:
    """``dp.batch_size: whole`` (as a config file or the server's task gives it) is q = 1 on a region of any size,
    where a number is q = n / N."""
    from client.dp import sampling_rate
    from common.config import TrainSettings, build

    whole = build(DpSettings, {"batch_size": "whole"})
    numbered = build(DpSettings, {"batch_size": 64})
    train = TrainSettings(batch_size=16)
    for n in (1, 63, 640, 100_000):
        assert sampling_rate(whole, train, n) == 1.0
        assert whole.sampled_batch(train.batch_size, n) == n
    assert sampling_rate(numbered, train, 640) == pytest.approx(0.1)
    assert sampling_rate(DpSettings(), train, 640) == pytest.approx(16 / 640)


@pytest.mark.parametrize("value", ["all", 0, True, 2.5])
def test_a_wrong_dp_batch_size_names_the_field_and_what_it_may_be(value: object) -> None:
    from common.config import build
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"batch_size: must be .*'whole'"):
        build(DpSettings, {"batch_size": value})
