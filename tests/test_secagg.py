"""Secure aggregation (SecAgg+ on the Message API): the real ClientApp (guard, ledgers, training) and the real
server loop through an in-process grid that keeps each node's context between messages, as a SuperNode does.

The secure mean equals the plain weighted mean within 1e-5; the strategy never gets one region's update; a node
that drops after the share stage is recovered; below the threshold the round fails naming the checkpoint and
resumes; a policy requiring secure aggregation refuses a plain run and takes part in a secure one; audit verify
recomputes secure rounds from their sums.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.supercore.task_identity import TaskIdentity
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.numpy import load_file

from client import secagg as node_side
from common import keys
from common.audit import load_verify_key, verify_all
from common.config import RunConfig, load_config
from common.errors import ConfigError
from common.runfiles import AUDIT_DIR, NODES_DIR, SERVER_DIR, UPDATES_DIR
from common.secagg import derive_parameters, neighbours, pack, packed_size, unpack
from server import strategy as strategy_module
from server.aggregate import aggregation_weights, weighted_average
from server.audit import recompute
from server.federation import FederationError, checkpoint_dir, federate
from server.secagg import _unmask
from server.strategy import SecureSum
from simulations.inprocess import InProcessGrid
from tests.conftest import tiny_config, write_region

TRAIN = {"lr": 3e-2, "epochs": 1, "batch_size": 8, "max_steps": 3, "threads": 1}
NODE_BASE = 100


@pytest.fixture(scope="module", autouse=True)
def server_task_identity() -> Iterator[None]:
    """Flower's runtime tells the ServerApp process who it is before the strategy builds any message."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskIdentity, "_run_id", 1)
        mp.setattr(TaskIdentity, "_node_id", 0)
        mp.setattr(TaskIdentity, "_task_id", 1)
        yield


@pytest.fixture(scope="module")
def three_regions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("three-regions")
    write_region(root / "east", 40, 16, seed=1, pos_fraction=0.6)
    write_region(root / "north", 64, 16, seed=2)
    write_region(root / "south", 24, 16, seed=3, pos_fraction=0.4)
    return root


def make_config(
    root: Path,
    tiny_bert: Path,
    regions: Path,
    secure: dict[str, Any] | None,
    aggregation_lora: str = "fedit",
    **extra: Any,
) -> RunConfig:
    aggregation: dict[str, Any] = {"min_clients": 2, "lora": aggregation_lora}
    if secure is not None:
        aggregation["secure"] = {"enabled": True, **secure}
    name = f"run-{uuid.uuid4().hex[:6]}.yaml"
    args: dict[str, Any] = {"rounds": 1, "train": TRAIN, "aggregation": aggregation, **extra}
    return load_config(tiny_config(root / name, tiny_bert, regions, **args))


def run(cfg: RunConfig, out: Path, grid: InProcessGrid | None = None, **kwargs: Any) -> InProcessGrid:
    grid = grid or InProcessGrid(cfg, out / AUDIT_DIR / NODES_DIR)
    federate(grid, cfg, out, **kwargs)  # type: ignore[arg-type]
    return grid


def checkpoint(out: Path, server_round: int) -> dict[str, np.ndarray]:
    return load_file(str(checkpoint_dir(out, server_round) / SAFETENSORS_WEIGHTS_NAME))


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


@pytest.fixture(scope="module")
def plain_and_secure(
    tiny_bert: Path, three_regions: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, Path, Path, InProcessGrid]:
    root = tmp_path_factory.mktemp("paired")
    plain = make_config(root, tiny_bert, three_regions, None, rounds=2)
    secure = make_config(root, tiny_bert, three_regions, {}, rounds=2)
    run(plain, root / "plain")
    grid = run(secure, root / "secure")
    return secure, root / "plain", root / "secure", grid


# ---------------------------------------------------------------------------------------------------------
# The sum equals the plain weighted mean


def test_a_secure_run_equals_the_plain_weighted_mean_within_1e_5(
    plain_and_secure: tuple[RunConfig, Path, Path, InProcessGrid],
) -> None:
    cfg, plain, secure, grid = plain_and_secure
    # from the same global adapter and the same (seeded) training, one round: quantized, not bit-equal, yet
    # within the target; later rounds start from slightly different adapters and drift apart by training
    diff = max_diff(checkpoint(secure, 1), checkpoint(plain, 1))
    assert 0 < diff <= 1e-5, diff
    stages = [f"train.{s}" for s in ("secagg_setup", "secagg_share", "secagg_mask", "secagg_unmask")]
    assert [t for t in grid.sent if t.startswith("train")] == [s for s in stages for _ in range(3)] * 2
    rounds = json.loads((secure / "federation.json").read_text())["rounds"]
    plain_rounds = json.loads((plain / "federation.json").read_text())["rounds"]
    assert rounds[0]["participants"] == ["east", "north", "south"] and rounds[0]["train"] == {}
    total = sum(v["num_examples"] for v in plain_rounds[0]["train"].values())
    assert rounds[0]["train_overall"]["num_examples"] == total
    plain_loss = sum(v["loss"] * v["num_examples"] for v in plain_rounds[0]["train"].values()) / total
    assert abs(rounds[0]["train_overall"]["loss"] - plain_loss) < 1e-3
    assert rounds[0]["secure"] == {"threshold": 2, "dropped": []}
    # masked values travel bit-packed, log2(modulus) bits each: 43 for 3 regions at the defaults
    assert cfg.aggregation.secure.max_weight == 1_000_000
    assert 43 / 32 * 0.99 < rounds[0]["bytes_up"] / plain_rounds[0]["bytes_up"] < 43 / 32 * 1.6  # + keys, shares
    test_plain = json.loads((plain / "federation.json").read_text())["test"]
    test_secure = json.loads((secure / "federation.json").read_text())["test"]
    for region, scores in test_plain.items():
        assert round(test_secure[region]["accuracy"], 3) == round(scores["accuracy"], 3)


def test_the_protocol_on_the_demo_adapters_range_is_within_1e_5() -> None:
    """Five regions of me5-small adapters (the demo's shapes; values up to 0.104, the demo adapter's measured
    largest magnitude, scaled up to the clipping range's edge for one region) through every node and server
    function of the protocol: the unmasked mean is the plain weighted mean within 1e-5 on every tensor."""
    rng = np.random.default_rng(0)
    shapes = {f"layer.{i}.{m}.lora_A.weight": (8, 384) for i in range(12) for m in ("query", "value")}
    shapes |= {f"layer.{i}.{m}.lora_B.weight": (384, 8) for i in range(12) for m in ("query", "value")}
    shapes |= {"classifier.dense.weight": (384, 384), "classifier.out_proj.weight": (2, 384)}
    updates = [
        {k: (rng.uniform(-0.104, 0.104, s) * (9.0 if r == 0 else 1.0)).astype(np.float32) for k, s in shapes.items()}
        for r in range(5)
    ]
    counts = [3000, 2400, 1200, 800, 5000]
    params = derive_parameters(1.0, 1e-6, 1_000_000, 5, 3, uniform=False)
    nodes = [11, 12, 13, 14, 15]
    secrets, public = {}, {}
    for n in nodes:
        secrets[n], pk = node_side.setup(1, params)
        public[n] = (pk["mask_pk"], pk["box_pk"])
    graph = neighbours(nodes, None, 0)
    sent = {n: node_side.share_keys(secrets[n], n, {j: public[j] for j in graph[n]})["ciphertexts"] for n in nodes}
    masked = {}
    for i, n in enumerate(nodes):
        inbox = {src: sent[src][str(n)] for src in nodes if src != n}
        masked[n] = node_side.masked_input(secrets[n], n, inbox, updates[i], counts[i], 0.5, seed=i)
    seeds: dict[int, list[bytes]] = {}
    for n in nodes:
        for target, piece in node_side.unmask(secrets[n], n, nodes, [])["seed_shares"].items():
            seeds.setdefault(int(target), []).append(piece)
    names = [*sorted(shapes), "secagg.weights"]
    shapes_in_order = [shapes[name] for name in names[:-1]] + [(2,)]
    vectors = {
        n: [unpack(masked[n][name], params.modulus, shape) for name, shape in zip(names, shapes_in_order, strict=True)]
        for n in nodes
    }
    total = _unmask(vectors, seeds, {}, [], graph, public, params, shapes_in_order)
    summed = dict(zip(names, total, strict=True))
    weights = summed.pop("secagg.weights")
    assert int(weights[0]) == sum(counts)
    from server.aggregate import mean_from_sum

    mean = mean_from_sum(summed, int(weights[0]), params.clipping_range, params.target_range)
    plain = weighted_average(updates, aggregation_weights(counts, "weighted"))
    worst = max(float(np.max(np.abs(mean[k] - plain[k]))) for k in shapes)
    assert worst <= 1e-5 and worst <= params.step
    # one masked upload alone is noise: far from the region's own update
    alone = mean_from_sum({k: vectors[11][names.index(k)] for k in shapes}, counts[0], 1.0, params.target_range)
    assert max(float(np.max(np.abs(alone[k] - updates[0][k]))) for k in shapes) > 1.0


# ---------------------------------------------------------------------------------------------------------
# The strategy never receives one region's update


def test_the_strategy_never_receives_a_single_update(
    tiny_bert: Path, three_regions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a single region's update reached the aggregation")

    # the plain path's per-update entry points: a secure run must use neither
    monkeypatch.setattr(strategy_module.RegionFedAvg, "aggregate_train_round", forbidden)
    monkeypatch.setattr(strategy_module, "weighted_average", forbidden)
    seen: list[SecureSum] = []
    real = strategy_module.RegionFedAvg.aggregate_train_sum

    def spy(self: Any, server_round: int, secure: SecureSum, *rest: Any) -> Any:
        seen.append(secure)
        return real(self, server_round, secure, *rest)

    monkeypatch.setattr(strategy_module.RegionFedAvg, "aggregate_train_sum", spy)
    cfg = make_config(tmp_path, tiny_bert, three_regions, {})
    run(cfg, tmp_path / "out")
    assert [s.regions for s in seen] == [("east", "north", "south")]
    with pytest.raises(ValueError, match="at least max"):
        SecureSum(("east",), (100,), (), seen[0].total, 40, 0, dataclasses.replace(seen[0].params, threshold=2))


# ---------------------------------------------------------------------------------------------------------
# Dropouts


def test_a_node_lost_after_the_share_stage_is_recovered(tiny_bert: Path, three_regions: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, tiny_bert, three_regions, {"threshold": 2})
    grid = InProcessGrid(cfg, tmp_path / "secure" / AUDIT_DIR / NODES_DIR)
    grid.down["train.secagg_mask"] = {NODE_BASE + 1}  # north: keys shared, then gone
    run(cfg, tmp_path / "secure", grid)
    # the plain weighted mean of the two that stayed
    plain_cfg = make_config(tmp_path, tiny_bert, three_regions, None)
    plain = InProcessGrid(plain_cfg, tmp_path / "plain" / AUDIT_DIR / NODES_DIR)
    plain.down["train"] = {NODE_BASE + 1}
    run(plain_cfg, tmp_path / "plain", plain)
    assert max_diff(checkpoint(tmp_path / "secure", 1), checkpoint(tmp_path / "plain", 1)) <= 1e-5
    record = json.loads((tmp_path / "secure" / "federation.json").read_text())["rounds"][0]
    assert record["participants"] == ["east", "south"] and record["missing"] == ["north"]
    assert record["secure"]["dropped"] == [f"node {NODE_BASE + 1}"]


def test_below_the_threshold_the_round_fails_naming_the_checkpoint_then_resumes(
    tiny_bert: Path, three_regions: Path, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, tiny_bert, three_regions, {"threshold": 3}, rounds=2)
    out = tmp_path / "out"
    grid = InProcessGrid(cfg, out / AUDIT_DIR / NODES_DIR)

    def lose_south(record: dict[str, Any]) -> None:
        grid.down["train.secagg_mask"] = {NODE_BASE + 2}

    with pytest.raises(FederationError) as info:
        run(cfg, out, grid, on_round=lose_south)
    message = str(info.value)
    assert message.startswith("round 2: secure aggregation: 2 of 3 node(s) finished the secagg_mask stage, the ")
    assert "threshold is 3 (aggregation.secure.threshold)" in message
    assert message.endswith(
        f"the last checkpoint is {out / 'checkpoints' / 'round-001'} (restart with resume=true to go on from it)"
    )
    grid.down.clear()
    run(cfg, out, grid, resume=True)
    state = json.loads((out / "state.json").read_text())
    assert state["completed_round"] == 2 and [r["participants"] for r in state["rounds"]][1] == [
        "east",
        "north",
        "south",
    ]


# ---------------------------------------------------------------------------------------------------------
# Residency policy, range refusals, config


def with_policies(root: Path, tiny_bert: Path, regions: Path, secure: dict[str, Any] | None) -> RunConfig:
    folder = root / "policies"
    folder.mkdir(exist_ok=True)
    for name in ("east", "north", "south"):
        raw = {"region": name, "require_secure_aggregation": name == "north"}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return make_config(root, tiny_bert, regions, secure, policies="policies")


def test_a_policy_requiring_secure_aggregation_refuses_a_plain_run_and_joins_a_secure_one(
    tiny_bert: Path, three_regions: Path, tmp_path: Path
) -> None:
    plain = with_policies(tmp_path, tiny_bert, three_regions, None)
    run(plain, tmp_path / "plain")
    record = json.loads((tmp_path / "plain" / "federation.json").read_text())["rounds"][0]
    assert record["missing"] == ["north"]
    assert "the policy requires secure aggregation, the run does not use it" in record["rejected"][0]["reason"]
    secure = with_policies(tmp_path, tiny_bert, three_regions, {})
    run(secure, tmp_path / "secure")
    record = json.loads((tmp_path / "secure" / "federation.json").read_text())["rounds"][0]
    assert record["participants"] == ["east", "north", "south"] and record["rejected"] == []
    assert record["val"]["north"]["num_examples"] > 0  # its evaluation metrics leave too (no update in them)
    ledger = tmp_path / "secure" / AUDIT_DIR / NODES_DIR / "north" / "ledger.jsonl"
    bodies = [json.loads(line)["body"] for line in ledger.read_text().splitlines()]
    masked = [b for b in bodies if b.get("message") == "train"]
    assert len(masked) == 1 and masked[0]["status"] == "sent"
    assert masked[0]["protections"]["secure_aggregation"] is True
    assert {t["dtype"] for t in masked[0]["tensors"]} == {"uint8"}
    assert [b["message"] for b in bodies if b.get("message", "").startswith("secagg")] == [
        "secagg_setup",
        "secagg_share",
        "secagg_unmask",
    ]


def test_a_value_outside_the_clipping_range_makes_the_node_refuse_and_record_it(
    tiny_bert: Path, three_regions: Path, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, tiny_bert, three_regions, {"clipping_range": 0.01, "precision": 1e-6})
    with pytest.raises(FederationError, match="finished the secagg_mask stage"):
        run(cfg, tmp_path / "out")
    ledger = tmp_path / "out" / AUDIT_DIR / NODES_DIR / "east" / "ledger.jsonl"
    last = [json.loads(line)["body"] for line in ledger.read_text().splitlines()][-1]
    assert last["status"] == "failed" and "outside aggregation.secure.clipping_range 0.01" in last["reason"]


def test_options_needing_single_updates_are_refused_with_secure_aggregation(
    tiny_bert: Path, three_regions: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(tmp_path, tiny_bert, three_regions, {}, audit={"keep_updates": True})
    assert "audit.keep_updates" in str(info.value) and "aggregation.secure.enabled" in str(info.value)
    with pytest.raises(ConfigError, match=r"aggregation\.secure\.threshold: is 4 but there are only 3 regions"):
        make_config(tmp_path, tiny_bert, three_regions, {"threshold": 4})
    with pytest.raises(ConfigError, match=r"aggregation.secure.shares: must be an odd number >= 3"):
        make_config(tmp_path, tiny_bert, three_regions, {"shares": 4})
    with pytest.raises(ConfigError, match=r"aggregation\.secure\.threshold: must be >= 2"):
        make_config(tmp_path, tiny_bert, three_regions, {"threshold": 1})
    with pytest.raises(ConfigError, match="precision"):
        make_config(tmp_path, tiny_bert, three_regions, {"clipping_range": 1000.0, "precision": 1e-9})
    # ffa needs lora_A back exactly as sent; the secure mean's quantization moves it
    with pytest.raises(ConfigError) as info:
        make_config(tmp_path, tiny_bert, three_regions, {}, aggregation_lora="ffa")
    assert "aggregation.lora: is ffa" in str(info.value) and "aggregation.secure.enabled" in str(info.value)
    make_config(tmp_path, tiny_bert, three_regions, None, aggregation_lora="ffa")  # ffa alone is fine


def test_a_dp_region_s_privacy_is_recorded_every_round_of_a_secure_run(
    tiny_bert: Path, three_regions: Path, tmp_path: Path
) -> None:
    """The masked reply carries the region's epsilon and delta (public settings, not data): federation.json,
    metrics.jsonl and the summary's DP block record them per round, as in a plain run, and they are the ones
    the node's accountant computed."""
    from client.dp import Accountant
    from runfolder.summary import dp_by_region

    folder = tmp_path / "policies"
    folder.mkdir()
    for name in ("east", "north", "south"):
        raw: dict[str, Any] = {"region": name}
        if name == "north":
            raw["require_dp"] = {"epsilon": 8.0, "delta": 1e-5}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    cfg = make_config(tmp_path, tiny_bert, three_regions, {}, rounds=2, policies="policies", dp={"accountant": "rdp"})
    out = tmp_path / "out"
    run(cfg, out)
    rounds = json.loads((out / "federation.json").read_text())["rounds"]
    assert [r["participants"] for r in rounds] == [["east", "north", "south"]] * 2
    assert all(set(r["train"]) == {"north"} and "train_overall" in r for r in rounds)
    eps = [r["train"]["north"]["dp_epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1] <= 8.0 and all(r["train"]["north"]["dp_delta"] == 1e-5 for r in rounds)
    (account,) = Accountant.load(out / AUDIT_DIR / NODES_DIR / "north").accounts.values()
    assert account.epsilon_spent == eps[1]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["dp_epsilon"] for x in lines if x["split"] == "train"] == eps
    assert dp_by_region(rounds)["north"]["by_round"] == {"1": eps[0], "2": eps[1]}


# ---------------------------------------------------------------------------------------------------------
# Audit


def test_audit_verify_names_secure_rounds_and_recomputes_them_from_the_sum(
    plain_and_secure: tuple[RunConfig, Path, Path, InProcessGrid],
) -> None:
    cfg, _, out, _ = plain_and_secure
    audit = out / AUDIT_DIR
    trusted = {"server": load_verify_key(audit / SERVER_DIR / "ledger.pub")}
    trusted |= {n: load_verify_key(audit / NODES_DIR / n / "ledger.pub") for n in cfg.region_names}
    ledgers = [audit / SERVER_DIR / "ledger.jsonl", *(audit / NODES_DIR / n / "ledger.jsonl" for n in cfg.region_names)]
    result = verify_all(ledgers, trusted, lambda server: recompute(server, audit / UPDATES_DIR))
    assert result.ok, result.findings
    assert result.rounds_recomputed == 2
    assert any("round(s) 1, 2 of 2 were securely aggregated" in c for c in result.checked)
    assert sorted(p.name for p in (audit / UPDATES_DIR / "round-001").iterdir()) == [
        "global-in.npz",
        "secure-sum.npz",
    ]
    # a changed sum is caught
    kept = audit / UPDATES_DIR / "round-002" / "secure-sum.npz"
    with np.load(kept) as npz:
        arrays = {k: npz[k] for k in npz.files}
    name = next(k for k in arrays if k.endswith("lora_B.weight"))
    arrays[name] = arrays[name] + 1
    np.savez(kept, **arrays)
    broken = verify_all(ledgers, trusted, lambda server: recompute(server, audit / UPDATES_DIR))
    assert any("round 2: " in f and "does not hash to the sum the ledger records" in f for f in broken.findings)


# ---------------------------------------------------------------------------------------------------------
# The real Flower simulation (Ray), through the CLI


@pytest.mark.slow
def test_simulate_with_secure_aggregation_end_to_end(tiny_bert: Path, three_regions: Path, tmp_path: Path) -> None:
    from fedlocale.cli import main

    path = tiny_config(
        tmp_path / "run.yaml",
        tiny_bert,
        three_regions,
        rounds=2,
        train=TRAIN,
        aggregation={"min_clients": 3, "secure": {"enabled": True}},
    )
    out = tmp_path / "out"
    assert main(["simulate", str(path), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit"]["verified"] is True and summary["audit"]["rounds_recomputed"] == 2
    rounds = json.loads((out / "federation.json").read_text())["rounds"]
    assert [r["participants"] for r in rounds] == [["east", "north", "south"]] * 2
    assert all(r["secure"]["dropped"] == [] for r in rounds)
    report = (out / AUDIT_DIR / "audit-report.md").read_text()
    assert "secagg_setup" in report or "secure" in report


def test_secure_settings_change_the_fingerprint_only_when_enabled(
    tiny_bert: Path, three_regions: Path, tmp_path: Path
) -> None:
    from server.federation import config_settings

    plain = config_settings(make_config(tmp_path, tiny_bert, three_regions, None))
    secure = config_settings(make_config(tmp_path, tiny_bert, three_regions, {"threshold": 2}))
    assert not any(k.startswith("aggregation.secure") for k in plain)  # runs from before it still resume
    assert secure["aggregation.secure.enabled"] is True and secure["aggregation.secure.threshold"] == 2


# ---------------------------------------------------------------------------------------------------------
# fedlocale check asks each policy about the masked reply


def test_check_describes_the_masked_reply_exactly(tmp_path: Path, tiny_bert: Path) -> None:
    from client.preflight import preflight
    from common.audit import canonical_json
    from common.model import check_model
    from simulations.runner import load_policies
    from tests.test_preflight import config_with_policies, write_policy

    regions = tmp_path / "regions"
    write_region(regions / "north", 40, 16, seed=1)
    write_region(regions / "south", 40, 16, seed=2)
    secure = {"min_clients": 2, "secure": {"enabled": True}}
    plain_cfg = load_config(tiny_config(tmp_path / "probe.yaml", tiny_bert, regions))
    size = sum(
        nbytes for _, _, nbytes in check_model(plain_cfg.model, plain_cfg.lora, plain_cfg.labels).tensors.values()
    )
    # bit-packed masked tensors, the masked [w, w·q(loss)] and the region index: all a masked upload carries
    params = derive_parameters(1.0, 1e-6, 1_000_000, 2, 2, uniform=False)
    tensors = check_model(plain_cfg.model, plain_cfg.lora, plain_cfg.labels).tensors.values()
    exact = sum(packed_size(nbytes // 4, params.modulus) for _, _, nbytes in tensors)
    exact += packed_size(2, params.modulus) + len(canonical_json({keys.REGION_INDEX: 0}))
    assert 1.3 * size < exact < 1.4 * size  # 42 bits a value, against float32's 32
    for limit, ok in ((exact, True), (exact - 1, False)):
        north = write_policy(tmp_path, "north", egress={"max_bytes": limit}, require_secure_aggregation=True)
        path = config_with_policies(tmp_path, tiny_bert, regions, north, train=TRAIN, rounds=1, aggregation=secure)
        cfg = load_config(path)
        if not ok:
            with pytest.raises(ConfigError, match=rf"bytes, the policy allows at most {limit}"):
                preflight(cfg, load_policies(cfg), path)
            continue
        preflight(cfg, load_policies(cfg), path)
        run(cfg, tmp_path / "out")  # the real masked upload fits the limit to the byte (else north refuses)
        record = json.loads((tmp_path / "out" / "federation.json").read_text())["rounds"][0]
        assert record["participants"] == ["north", "south"]
    # the same policy refuses every train reply of a plain run, before anything starts
    path = config_with_policies(tmp_path, tiny_bert, regions, north, aggregation={"min_clients": 2})
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="require_secure_aggregation: region north: every train reply"):
        preflight(cfg, load_policies(cfg), path)


def test_packing_keeps_every_bit_of_values_below_the_modulus() -> None:
    rng = np.random.default_rng(1)
    for bits in (1, 7, 33, 44, 62):
        values = rng.integers(0, 2**bits, size=(5, 7), dtype=np.int64)
        packed = pack(values, 2**bits)
        assert packed.dtype == np.uint8 and packed.nbytes == packed_size(35, 2**bits) == -(-35 * bits // 8)
        assert np.array_equal(unpack(packed, 2**bits, (5, 7)), values)
    with pytest.raises(ValueError, match="is not 35 packed 44-bit values"):
        unpack(pack(values[:, :7] % 2**44, 2**44)[:-1], 2**44, (5, 7))


def test_an_unusable_protocol_reply_counts_as_a_dropout_not_a_crash() -> None:
    from common.secagg import encode
    from server.secagg import _payload_problem

    good = encode({"mask_pk": b"k1", "box_pk": b"k2"})
    assert _payload_problem("secagg_setup", good) == (None, {"mask_pk": b"k1", "box_pk": b"k2"})
    assert "expected the fields" in str(_payload_problem("secagg_setup", encode({"mask_pk": b"k1"}))[0])
    assert "not the protocol's JSON" in str(_payload_problem("secagg_setup", "{not json")[0])
    bad_share = encode({"ciphertexts": {"east": b"x"}})
    assert "ciphertexts is not dict of node id → bytes" in str(_payload_problem("secagg_share", bad_share)[0])
    bad_unmask = encode({"seed_shares": {"12": "text"}, "key_shares": {}})
    assert "seed_shares is not dict" in str(_payload_problem("secagg_unmask", bad_unmask)[0])


def test_check_counts_the_dp_metrics_of_a_dp_region_s_masked_reply(tmp_path: Path, tiny_bert: Path) -> None:
    """A DP region's masked reply carries its epsilon and delta beside the region index: ``fedlocale check``
    sizes the reply with them, to the byte."""
    from client.preflight import _dp_plan, preflight
    from common.audit import canonical_json
    from common.model import check_model
    from simulations.runner import load_policies
    from tests.test_preflight import config_with_policies, write_policy

    regions = tmp_path / "regions"
    write_region(regions / "north", 40, 16, seed=1)
    write_region(regions / "south", 40, 16, seed=2)
    secure = {"min_clients": 2, "secure": {"enabled": True}}
    params = derive_parameters(1.0, 1e-6, 1_000_000, 2, 2, uniform=False)
    dp = {"require_dp": {"epsilon": 8.0, "delta": 1e-5}}
    path = config_with_policies(
        tmp_path, tiny_bert, regions, write_policy(tmp_path, "north", **dp), train=TRAIN, rounds=1, aggregation=secure
    )
    cfg = load_config(path)
    plan = _dp_plan(cfg, load_policies(cfg)["north"], cfg.regions[0], 40, cfg.personalize)
    assert plan is not None and not isinstance(plan, str)
    tensors = check_model(cfg.model, cfg.lora, cfg.labels).tensors.values()
    bare = sum(packed_size(nbytes // 4, params.modulus) for _, _, nbytes in tensors) + packed_size(2, params.modulus)
    bare += len(canonical_json({keys.REGION_INDEX: 0}))
    exact = bare - len(canonical_json({keys.REGION_INDEX: 0}))
    exact += len(canonical_json({keys.REGION_INDEX: 0, keys.DP_EPSILON: plan.epsilon_spent, keys.DP_DELTA: 1e-5}))
    assert exact > bare
    for limit, ok in ((exact, True), (exact - 1, False)):
        north = write_policy(tmp_path, "north", egress={"max_bytes": limit}, **dp)
        path = config_with_policies(tmp_path, tiny_bert, regions, north, train=TRAIN, rounds=1, aggregation=secure)
        cfg = load_config(path)
        if ok:
            preflight(cfg, load_policies(cfg), path)
        else:
            with pytest.raises(ConfigError, match=rf"bytes, the policy allows at most {limit}"):
                preflight(cfg, load_policies(cfg), path)
