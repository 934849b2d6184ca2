"""Client-side drift and label-skew control: FedProx, logit adjustment, a frozen head, local work by steps and
FFA-LoRA, on the tiny model with real training, real Flower messages and the server's real checks."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from client.app import make_app
from client.local_only import matched_settings
from client.task import train_round
from client.train import (
    classification_loss,
    encode,
    label_prior,
    local_optimizer,
    logit_shift,
    loss_terms,
    plan_steps,
    proximal,
    train_encoded,
)
from common import keys
from common.config import (
    AggregationSettings,
    ClientTask,
    ConfigError,
    LoraSettings,
    ModelSettings,
    Region,
    RunConfig,
    TrainSettings,
    build,
    client_task,
)
from common.data import load_region
from common.model import LORA_A, LoadedModel, adapter_state, build_model
from server.aggregate import frozen_problem
from server.strategy import RegionFedAvg
from tests.conftest import write_region

LABELS = ("neg", "pos")
HEAD = ("base_model.model.classifier.weight", "base_model.model.classifier.bias")


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Region, Region]:
    """A small region (5 training examples) and a large one (120), label-skewed."""
    root = tmp_path_factory.mktemp("skewed")
    small = write_region(root / "small", 5, 16, seed=3, pos_fraction=0.8)
    large = write_region(root / "large", 120, 16, seed=4, pos_fraction=0.1)
    return Region(name="small", data=small), Region(name="large", data=large)


def make_task(tiny_bert: Path, **train: object) -> ClientTask:
    return ClientTask(
        seed=0,
        server_round=1,
        labels=LABELS,
        region_names=("small", "large"),
        model=ModelSettings(base=str(tiny_bert), max_length=32),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        train=TrainSettings(**{"lr": 5e-3, "epochs": 1, "batch_size": 8, "threads": 1, **train}),  # type: ignore[arg-type]
    )


def fresh(task: ClientTask) -> LoadedModel:
    return build_model(task.model, task.lora, task.labels, seed=task.seed)


def no_dropout(model: nn.Module) -> None:
    """Forward passes in train mode become deterministic, so a loss can be recomputed by hand."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------------------
# FedProx


def test_proximal_term_and_gradient_match_the_hand_computation() -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))]
    start = [p.detach().numpy().copy() for p in params]
    mu = 0.3
    term = proximal(params, mu)
    with torch.no_grad():
        params[0].add_(torch.full((3, 4), 0.5))
        params[1].mul_(-2.0)
    value = term(torch.zeros(1, 2), {})
    value.backward()
    moved = [p.detach().numpy() for p in params]
    expected = mu / 2 * sum(float(((w - w0) ** 2).sum()) for w, w0 in zip(moved, start, strict=True))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    for p, w, w0 in zip(params, moved, start, strict=True):
        assert p.grad is not None
        np.testing.assert_allclose(p.grad.numpy(), mu * (w - w0), rtol=1e-6, atol=1e-7)


def test_proximal_term_is_zero_at_the_start_and_only_when_asked(tiny_bert: Path) -> None:
    loaded = fresh(make_task(tiny_bert))
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    assert loss_terms(loaded.model, params, TrainSettings()) == []
    terms = loss_terms(loaded.model, params, TrainSettings(prox_mu=0.5, kl_to_global=0.1))
    assert len(terms) == 2
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    loaded.model.eval()
    logits = loaded.model(**batch).logits
    # at the model it started from, both the KL and the proximal term are 0
    assert [float(t(logits, batch).detach()) for t in terms] == pytest.approx([0.0, 0.0], abs=1e-6)


def test_prox_keeps_a_round_closer_to_the_global_adapter(tiny_bert: Path, regions: tuple[Region, Region]) -> None:
    def distance(mu: float) -> float:
        task = make_task(tiny_bert, prox_mu=mu, lr=3e-2, local_steps=20)
        state = adapter_state(fresh(task).model)
        new, _ = train_round(regions[1], task, state)
        return sum(float(((new[k] - state[k]) ** 2).sum()) for k in state)

    assert distance(50.0) < 0.5 * distance(0.0)


# ---------------------------------------------------------------------------------------------------------
# Logit adjustment


def test_label_prior_is_smoothed_and_the_loss_follows_the_formula() -> None:
    labels = [0, 0, 0, 0, 0, 0, 0, 0]  # class 2 of 3 absent: its share is small, not 0
    prior = label_prior(labels, 3).numpy()
    np.testing.assert_allclose(prior, [9 / 11, 1 / 11, 1 / 11])
    logits = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 0.0]])
    targets = torch.tensor([0, 2])
    tau = 0.7
    shift = logit_shift(labels, 3, tau)
    assert shift is not None and logit_shift(labels, 3, 0.0) is None
    adjusted = logits.numpy() + tau * np.log(prior)
    logp = adjusted - np.log(np.exp(adjusted).sum(axis=1, keepdims=True))
    expected = -np.mean(logp[[0, 1], [0, 2]])
    assert float(classification_loss(logits, targets, shift)) == pytest.approx(expected, rel=1e-6)
    assert float(classification_loss(logits, targets, None)) != pytest.approx(expected, rel=1e-3)


def test_train_encoded_trains_on_the_adjusted_loss_of_its_own_labels(tiny_bert: Path) -> None:
    task = make_task(tiny_bert)
    loaded = fresh(task)
    no_dropout(loaded.model)
    texts = ["good nice fine", "bad awful", "good good", "nice", "fine fine good", "awful bad bad"]
    labels = [1, 0, 1, 1, 1, 1]
    ids = encode(loaded.tokenizer, texts, 32)
    pad = loaded.tokenizer.pad_token_id or 0
    tau = 1.5
    from client.train import pad_batch

    with torch.no_grad():
        loaded.model.train()
        logits = loaded.model(**pad_batch(ids, pad)).logits.numpy()
    prior = np.array([(1 + 1) / (6 + 2), (5 + 1) / (6 + 2)])
    adjusted = logits + tau * np.log(prior)
    logp = adjusted - np.log(np.exp(adjusted).sum(axis=1, keepdims=True))
    expected = -np.mean(logp[np.arange(6), labels])
    settings = TrainSettings(lr=1e-3, batch_size=8, local_steps=1, logit_adjust=tau, grad_clip=None)
    result = train_encoded(copy.deepcopy(loaded.model), ids, labels, settings, pad_id=pad, seed=0)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    plain = train_encoded(
        copy.deepcopy(loaded.model), ids, labels, dataclasses.replace(settings, logit_adjust=0.0), pad_id=pad, seed=0
    )
    assert plain.loss != pytest.approx(expected, rel=1e-3)


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task identity Flower's runtime gives the server process before it builds a message."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.usefixtures("server_identity")
def test_the_label_prior_never_leaves_the_node(tiny_bert: Path, regions: tuple[Region, Region]) -> None:
    task = make_task(tiny_bert, logit_adjust=1.0)
    state = adapter_state(fresh(task).model)
    content = RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: ConfigRecord({keys.TASK: task.to_json()})})
    msg = Message(content=content, dst_node_id=77, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=77, node_config={keys.NODE_PARTITION_ID: 1}, state=RecordDict(), run_config={})
    reply = make_app(sim_regions=regions)(msg, context)
    assert not reply.has_error()
    out = reply.content
    # exactly what a reply without logit adjustment holds: the adapter and head, three metrics, no config
    assert list(out.array_records) == [keys.ARRAYS] and list(out.config_records) == []
    assert set(out.array_records[keys.ARRAYS]) == set(state)
    assert all(tuple(out.array_records[keys.ARRAYS][k].shape) == tuple(v.shape) for k, v in state.items())
    metrics = out.metric_records[keys.METRICS]
    assert set(metrics) == {keys.NUM_EXAMPLES, keys.TRAIN_LOSS, keys.REGION_INDEX}
    train = load_region("large", regions[1].data, LABELS).train
    prior = label_prior([ex.label for ex in train], 2).tolist()
    values = [float(v) for v in metrics.values() if isinstance(v, int | float)]
    assert not any(math.isclose(v, p, rel_tol=1e-6) for v in values for p in prior)


# ---------------------------------------------------------------------------------------------------------
# Frozen head


def test_frozen_head_comes_back_byte_for_byte(tiny_bert: Path, regions: tuple[Region, Region]) -> None:
    task = make_task(tiny_bert, head="frozen", lr=3e-2)
    state = adapter_state(fresh(task).model)
    new, _ = train_round(regions[1], task, state)
    for name in HEAD:
        assert new[name].numpy().tobytes() == state[name].numpy().tobytes()
    assert any(not torch.equal(new[k], state[k]) for k in state if "lora_B" in k)  # the adapter did train
    trained, _ = train_round(regions[1], make_task(tiny_bert, lr=3e-2), state)
    assert not torch.equal(trained[HEAD[0]], state[HEAD[0]])


def test_the_initial_head_is_the_same_for_every_build(tiny_bert: Path) -> None:
    # what the server builds and what a node builds from the same seed; the server sends it every round anyway
    task = make_task(tiny_bert)
    a, b = adapter_state(fresh(task).model), adapter_state(fresh(task).model)
    for name in HEAD:
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes()


# ---------------------------------------------------------------------------------------------------------
# Local work by steps


def test_local_steps_are_exact_for_small_and_large_regions(tiny_bert: Path, regions: tuple[Region, Region]) -> None:
    task = make_task(tiny_bert, local_steps=7, epochs=3)
    state = adapter_state(fresh(task).model)
    for region, n_train in zip(regions, (5, 120), strict=True):
        _, result = train_round(region, task, state)
        # 5 examples in batches of 8: 7 steps cycle the data 7 times; 120 examples: 7 of 15 batches
        assert result.steps == 7
        assert result.num_examples == n_train == len(load_region(region.name, region.data, LABELS).train)
    assert plan_steps(5, TrainSettings(batch_size=8, epochs=3)) == 3
    assert plan_steps(120, TrainSettings(batch_size=8, epochs=3, local_steps=2)) == 2


def test_optimizer_steps_are_counted_for_real(tiny_bert: Path) -> None:
    loaded = fresh(make_task(tiny_bert))
    ids = encode(loaded.tokenizer, ["good", "bad", "fine"], 32)
    calls: list[int] = []
    model = loaded.model
    optimizer_step = torch.optim.AdamW.step

    def counting(self: torch.optim.Optimizer, *args: object, **kw: object) -> object:
        calls.append(1)
        return optimizer_step(self, *args, **kw)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", counting)
        train_encoded(model, ids, [1, 0, 1], TrainSettings(local_steps=11, batch_size=2), pad_id=0, seed=1)
    assert len(calls) == 11


def test_baselines_get_the_steps_the_federation_took() -> None:
    # the centralized baseline over 4 regions takes the steps of all four; a region alone its own (3 rounds)
    assert matched_settings(TrainSettings(local_steps=5), 3, regions=4).local_steps == 60
    assert matched_settings(TrainSettings(local_steps=5), 3).local_steps == 15
    assert matched_settings(TrainSettings(epochs=2), 3).epochs == 6
    # remedies for label skew carry over; the pull toward a round's start does not (a baseline is one long call)
    same = matched_settings(TrainSettings(logit_adjust=1.0, head="frozen", prox_mu=0.5), 3)
    assert (same.logit_adjust, same.head, same.prox_mu) == (1.0, "frozen", 0.0)


# ---------------------------------------------------------------------------------------------------------
# FFA-LoRA


def test_ffa_keeps_every_lora_a_as_received(tiny_bert: Path, regions: tuple[Region, Region]) -> None:
    task = dataclasses.replace(make_task(tiny_bert, lr=3e-2), lora_aggregation="ffa")
    state = adapter_state(fresh(task).model)
    new, _ = train_round(regions[1], task, state)
    a_names = [k for k in state if LORA_A in k]
    assert len(a_names) == 4
    for name in a_names:
        assert new[name].numpy().tobytes() == state[name].numpy().tobytes()
    assert all(not torch.equal(new[k], state[k]) for k in state if "lora_B" in k)
    assert (
        frozen_problem({k: v.numpy() for k, v in new.items()}, {k: v.numpy() for k, v in state.items()}, LORA_A) is None
    )


def test_frozen_problem_names_the_changed_tensor() -> None:
    sent = {"x.lora_A.weight": np.ones((2, 3), np.float32), "x.lora_B.weight": np.zeros((3, 2), np.float32)}
    moved_b = {**sent, "x.lora_B.weight": np.ones((3, 2), np.float32)}
    assert frozen_problem(moved_b, sent, LORA_A) is None
    moved_a = {**sent, "x.lora_A.weight": sent["x.lora_A.weight"] + np.float32(1e-7)}
    problem = frozen_problem(moved_a, sent, LORA_A)
    assert problem == "x.lora_A.weight: differs from the one sent, but aggregation.lora is ffa (lora_A stays as sent)"


class Nodes:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


@pytest.mark.usefixtures("server_identity")
def test_an_ffa_server_rejects_a_reply_whose_a_changed() -> None:
    from flwr.app import Array, MetricRecord

    rng = np.random.default_rng(0)
    sent = {
        "m.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32),
        "m.lora_B.weight": np.zeros((8, 4), np.float32),
    }
    good = {**sent, "m.lora_B.weight": rng.normal(size=(8, 4)).astype(np.float32)}
    bad = {"m.lora_A.weight": sent["m.lora_A.weight"] * 2, "m.lora_B.weight": good["m.lora_B.weight"]}

    def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})

    def answer(to: Message, arrays: dict[str, np.ndarray], region: int) -> Message:
        metrics = MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 0.5, keys.REGION_INDEX: region})
        return Message(RecordDict({keys.ARRAYS: record(arrays), keys.METRICS: metrics}), reply_to=to)

    for lora, rejected in (
        ("ffa", ["m.lora_A.weight: differs from the one sent, but aggregation.lora is ffa (lora_A stays as sent)"]),
        ("fedit", []),
    ):
        strategy = RegionFedAvg(("a", "b"), min_clients=2, lora=lora)
        messages = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(1, record(sent), ConfigRecord(), Nodes([5, 6]))  # type: ignore[arg-type]
        }
        result = strategy.aggregate_train_round(1, [answer(messages[5], good, 0), answer(messages[6], bad, 1)])
        assert [r["reason"] for r in result.rejected] == rejected
        assert [r.region for r in result.replies] == (["a"] if lora == "ffa" else ["a", "b"])
    assert result.global_arrays is not None


def test_client_task_carries_the_lora_aggregation(tiny_bert: Path, regions: tuple[Region, Region]) -> None:
    cfg = RunConfig(
        regions=regions,
        labels=LABELS,
        model=ModelSettings(base=str(tiny_bert), max_length=32),
        aggregation=AggregationSettings(lora="ffa"),
    )
    task = client_task(cfg, 2)
    assert task.lora_aggregation == "ffa"
    assert ClientTask.from_json(task.to_json()) == task


# ---------------------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"train": {"prox_mu": -0.1}}, "train.prox_mu: must be >= 0, got -0.1"),
        ({"train": {"logit_adjust": -1}}, "train.logit_adjust: must be >= 0, got -1.0"),
        ({"train": {"head": "fixed"}}, "train.head: must be one of 'train', 'frozen', got 'fixed'"),
        ({"train": {"local_steps": 0}}, "train.local_steps: must be >= 1 or null, got 0"),
        (
            {"train": {"local_steps": 5, "max_steps": 3}},
            "train.local_steps: is 5 but max_steps is 3: local_steps sets the steps per round exactly (epochs "
            "ignored), max_steps caps the steps of the epochs; set one of them",
        ),
        ({"aggregation": {"lora": "fedex"}}, "aggregation.lora: must be one of 'fedit', 'ffa', got 'fedex'"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer: must be one of 'adamw', 'sgd', got 'adam'"),
        (
            {"train": {"momentum": 0.5}},
            "train.momentum: is read by optimizer sgd only, and optimizer is adamw; remove it",
        ),
        ({"train": {"optimizer": "sgd", "momentum": 1.0}}, "train.momentum: must be in [0, 1) or null, got 1.0"),
    ],
)
def test_config_errors_name_field_and_value(raw: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(RunConfig, {"labels": ["neg", "pos"], "regions": [], **raw})
    assert problem in err.value.problems


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="head: must be one of train, frozen, got 'x'"):
        TrainSettings(head="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lora: must be one of fedit, ffa"):
        AggregationSettings(lora="svd")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# The local optimizer


def test_local_optimizer_is_the_one_named_with_its_settings() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    adamw = local_optimizer(params, TrainSettings(lr=1e-3, weight_decay=0.02))
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.02
    sgd = local_optimizer(params, TrainSettings(lr=0.1, optimizer="sgd"))
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 0.1
    assert local_optimizer(params, TrainSettings(optimizer="sgd", momentum=0.0)).param_groups[0]["momentum"] == 0.0


def test_an_sgd_round_steps_by_the_gradient(tiny_bert: Path) -> None:
    """One SGD step of train_encoded moves every trained value by -lr * (its gradient + weight_decay * itself),
    the gradient computed by hand on the same batch: unlike Adam, a small gradient makes a small step."""
    task = make_task(tiny_bert)
    loaded = fresh(task)
    no_dropout(loaded.model)
    ids = encode(loaded.tokenizer, ["good nice fine", "bad awful", "good good", "awful bad bad"], 32)
    labels = [1, 0, 1, 0]
    settings = TrainSettings(
        lr=0.3, optimizer="sgd", weight_decay=0.01, batch_size=8, local_steps=1, grad_clip=None, threads=1
    )
    by_hand = copy.deepcopy(loaded.model)
    from client.train import pad_batch

    by_hand.train()
    loss = classification_loss(by_hand(**pad_batch(ids, loaded.pad_id)).logits, torch.tensor(labels), None)
    loss.backward()
    before = {n: p.detach().clone() for n, p in by_hand.named_parameters() if p.requires_grad}
    grads = {n: p.grad.detach().clone() for n, p in by_hand.named_parameters() if p.grad is not None}
    trained = copy.deepcopy(loaded.model)
    train_encoded(trained, ids, labels, settings, pad_id=loaded.pad_id, seed=0)
    after = dict(trained.named_parameters())
    moved = 0
    for name, value in before.items():
        expected = value - 0.3 * (grads[name] + 0.01 * value)
        torch.testing.assert_close(after[name].detach(), expected, rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(after[name].detach(), value))
    assert moved > 0


# ---------------------------------------------------------------------------------------------------------
# End to end: `fedlocale simulate` with every option of this file at once


@pytest.mark.slow
def test_simulate_with_logit_adjust_local_steps_ffa_and_prox_is_verified_by_the_audit(
    tiny_bert: Path, regions: tuple[Region, Region], tmp_path: Path
) -> None:
    from safetensors.numpy import load_file

    from fedlocale.cli import main
    from tests.conftest import tiny_config

    train = {"lr": 3e-2, "local_steps": 6, "batch_size": 8, "threads": 1, "logit_adjust": 1.0, "prox_mu": 0.01}
    cfg = tiny_config(
        tmp_path / "run.yaml",
        tiny_bert,
        regions[0].data.parent,
        train=train,
        aggregation={"min_clients": 2, "lora": "ffa"},
        audit={"keep_updates": True},
        baselines=["centralized", "local_only"],
    )
    out = tmp_path / "out"
    assert main(["simulate", str(cfg), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["rounds_done"] == 2
    audit = summary["audit"]
    assert audit["verified"] is True and audit["findings"] == [] and audit["missing_ledgers"] == []
    assert set(audit["ledgers"]) == {"server", "small", "large"}
    assert audit["rounds_recomputed"] == 2  # the kept updates give back each round's aggregate
    # nothing was rejected: every node kept A as sent, and the weights are the real example counts
    per_round = summary["communication"]["per_round"]
    assert all(r["participants"] == ["large", "small"] or r["participants"] == ["small", "large"] for r in per_round)
    assert {n: summary["regions"][n]["num_train"] for n in ("small", "large")} == {"small": 5, "large": 120}
    # the final global adapter still has the seeded A every node started from; B moved
    initial = adapter_state(fresh(make_task(tiny_bert)).model)
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a_keys = [k for k in initial if LORA_A in k]
    assert a_keys
    for key in a_keys:
        np.testing.assert_array_equal(final[key], initial[key].numpy())
    assert any(np.abs(final[k]).max() > 0 for k in final if "lora_B" in k)
    # no node's label prior (the logit shift's input) is in any ledger line, metrics line or kept reply
    texts = [p.read_text() for p in [*sorted((out / "audit").rglob("*.jsonl")), out / "metrics.jsonl"]]
    blobs = [p.read_bytes() for p in sorted((out / "audit" / "updates").rglob("*.npz"))]
    assert len(texts) == 4 and len(blobs) == 6  # three ledgers, metrics; 2 rounds x (2 replies + the adapter sent)
    for region in regions:
        prior = label_prior([ex.label for ex in load_region(region.name, region.data, LABELS).train], 2).numpy()
        assert prior_leaks(prior, texts, blobs) == []


def prior_leaks(prior: np.ndarray, texts: list[str], blobs: list[bytes]) -> list[str]:
    """Where a label prior (or its log, which the logit shift adds) shows: a number in ``texts`` equal to one of
    its values to 1e-6, or its vector's float32/float64 bytes or one value's float64 bytes in ``blobs``."""
    values = [*prior.tolist(), *np.log(prior).tolist()]
    found = [
        f"text {i}: {number}"
        for i, text in enumerate(texts)
        for number in re.findall(r"-?\d+\.\d+(?:[eE][-+]?\d+)?", text)
        if any(math.isclose(float(number), v, rel_tol=1e-6) for v in values)
    ]
    patterns = [np.asarray(v, dtype=dt).tobytes() for v in (prior, np.log(prior)) for dt in (np.float32, np.float64)]
    patterns += [np.float64(v).tobytes() for v in values]
    return found + [f"blob {i}" for i, blob in enumerate(blobs) for pattern in patterns if pattern in blob]


def test_the_prior_leak_check_finds_a_prior_where_it_is() -> None:
    """The check the end-to-end test runs can fail: a prior written as JSON numbers or as tensor bytes is found."""
    prior = label_prior([0, 1, 1, 1, 1], 2).numpy()
    assert prior_leaks(prior, ['{"loss": 0.61, "num-examples": 5}'], [b"\x00" * 64]) == []
    assert prior_leaks(prior, [json.dumps({"shares": prior.tolist()})], []) == [
        "text 0: 0.2857142857142857",
        "text 0: 0.7142857142857143",
    ]
    assert prior_leaks(prior, [json.dumps({"shift": float(np.log(prior[0]))})], []) != []
    assert prior_leaks(prior, [], [b"npz" + prior.astype(np.float32).tobytes() + b"end"]) == ["blob 0"]


@pytest.mark.parametrize("apart", [False, True])
def test_ffa_on_a_dual_node_sends_a_as_received_and_its_personal_lora_trains_as_before(
    tiny_bert: Path, regions: tuple[Region, Region], tmp_path: Path, apart: bool
) -> None:
    from safetensors.torch import load_file

    from client.personal import init_personal, personal_folder, round_file
    from client.task import NodeSettings, train_dual
    from common.seeds import derive_seed

    # with the KL and proximal terms too: their copies and anchors see the kept rows
    task = make_task(tiny_bert, lr=3e-2, kl_to_global=0.1, prox_mu=0.01)
    task = dataclasses.replace(task, lora_aggregation="ffa")
    state = adapter_state(fresh(task).model)
    node = NodeSettings(threads=1, personal_dir=tmp_path / "own", personal_rank=2, personal_apart=apart)
    sent, _ = train_dual(regions[1], task, state, node)
    assert set(sent) == set(state)
    problem = frozen_problem({k: v.numpy() for k, v in sent.items()}, {k: v.numpy() for k, v in state.items()}, LORA_A)
    assert problem is None
    assert any(not torch.equal(sent[k], state[k]) for k in state if "lora_B" in k)
    kept = load_file(str(round_file(personal_folder(tmp_path / "own", "large"), 1)))
    start = init_personal(state, 2, derive_seed(task.seed, "personal", "large"))
    # the personal LoRA is not aggregated: its A trains, as without ffa, and so does its B
    assert all(not torch.equal(kept[k], start[k]) for k in start if LORA_A in k)
    assert any(kept[k].abs().max() > 0 for k in start if "lora_B" in k)


def test_rows_kept_keeps_the_first_rows_and_leaves_plain_parameters(tiny_bert: Path) -> None:
    from torch.nn.utils import parametrize

    from client.train import rows_kept

    loaded = fresh(make_task(tiny_bert))
    before = adapter_state(loaded.model)
    ids = encode(loaded.tokenizer, ["good fine", "bad awful", "nice"], 32)
    with rows_kept(loaded.model, LORA_A, 3) as names:
        assert len(names) == 4
        train_encoded(
            loaded.model, ids, [1, 0, 1], TrainSettings(lr=5e-2, local_steps=5, batch_size=2), pad_id=0, seed=0
        )
    after = adapter_state(loaded.model)
    assert set(after) == set(before)  # the parametrization is gone: the exchanged keys are the same
    assert not any(parametrize.is_parametrized(m) for m in loaded.model.modules())
    for key in (k for k in before if LORA_A in k):
        assert after[key][:3].numpy().tobytes() == before[key][:3].numpy().tobytes()
        assert not torch.equal(after[key][3:], before[key][3:])
