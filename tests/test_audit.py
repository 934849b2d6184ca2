"""Residency policy, egress guard, signed ledgers and their offline verification.

The ledger tests tamper with real files signed with real Ed25519 keys; the federation tests run the real
ClientApp (with its guard) and the real server loop in this process, through a grid that delivers messages.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import make_app as make_client_app
from common import keys
from common.audit import (
    Ledger,
    create_signing_key,
    cross_check,
    load_verify_key,
    payload_hash,
    verify_ledger,
)
from common.config import RunConfig, client_task, load_config
from common.errors import ConfigError
from common.policy import (
    DpRecord,
    DpRequirement,
    EgressRules,
    Outbound,
    Protections,
    RegionPolicy,
    TensorInfo,
    egress_problems,
    load_policy,
)
from common.runfiles import AUDIT_DIR, NODES_DIR, SERVER_DIR
from server.audit import recompute
from server.federation import federate
from tests.conftest import tiny_config, write_region

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
TRAIN = {"lr": 3e-2, "epochs": 1, "batch_size": 8, "max_steps": 3, "threads": 1}
NODE_BASE = 100


# ------------------------------------------------------------------------------------------------- ledgers


def make_ledger(tmp_path: Path, signer: str = "north", entries: int = 4) -> tuple[Path, dict[str, Any]]:
    ledger = Ledger.in_folder(tmp_path / signer, signer)
    for i in range(entries):
        ledger.append({"kind": "egress", "round": i + 1, "sha256": f"{i:064x}"}, T0 + timedelta(seconds=i))
    return ledger.path, {signer: load_verify_key(tmp_path / signer / "ledger.pub")}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_an_intact_ledger_verifies_and_is_deterministic_given_the_time(tmp_path: Path) -> None:
    path, trusted = make_ledger(tmp_path)
    check = verify_ledger(path, trusted)
    assert check.ok, check.problem
    assert [e["seq"] for e in check.entries] == [0, 1, 2, 3]
    assert check.entries[2]["time"] == "2026-11-29T12:00:02+00:00"
    assert check.entries[1]["prev"] == check.entries[0]["hash"]


def test_a_changed_byte_is_caught_naming_its_line(tmp_path: Path) -> None:
    path, trusted = make_ledger(tmp_path)
    content = lines(path)
    content[2] = content[2].replace('"round": 3', '"round": 4')
    path.write_text("".join(content))
    check = verify_ledger(path, trusted)
    assert not check.ok
    assert check.problem is not None and check.problem.startswith(f"{path}:3: content does not match its hash")


def test_a_changed_hash_and_content_together_break_the_signature_or_the_chain(tmp_path: Path) -> None:
    from common.audit import entry_hash

    path, trusted = make_ledger(tmp_path)
    entries = [json.loads(x) for x in lines(path)]
    entries[3]["body"]["sha256"] = "f" * 64
    entries[3]["hash"] = entry_hash(entries[3])  # a forger who recomputes the hash still cannot sign it
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    check = verify_ledger(path, trusted)
    assert check.problem is not None and check.problem.startswith(f"{path}:4: signature does not verify")


def test_a_deleted_entry_is_caught(tmp_path: Path) -> None:
    path, trusted = make_ledger(tmp_path)
    content = lines(path)
    path.write_text("".join(content[:1] + content[2:]))
    check = verify_ledger(path, trusted)
    assert check.problem is not None and check.problem.startswith(f"{path}:2: sequence number 2, expected 1")


def test_a_ledger_cut_at_its_tail_still_verifies_on_its_own(tmp_path: Path) -> None:
    # documented limit: a chain proves order and integrity, not completeness at the tail; the cross-check with
    # the server's ledger covers aggregated updates (test_a_changed_node_ledger_fails_the_cross_check)
    path, trusted = make_ledger(tmp_path)
    path.write_text("".join(lines(path)[:-1]))
    check = verify_ledger(path, trusted)
    assert check.ok and [e["seq"] for e in check.entries] == [0, 1, 2]


def test_reordered_entries_are_caught(tmp_path: Path) -> None:
    path, trusted = make_ledger(tmp_path)
    content = lines(path)
    content[1], content[2] = content[2], content[1]
    path.write_text("".join(content))
    check = verify_ledger(path, trusted)
    assert check.problem is not None and check.problem.startswith(f"{path}:2: sequence number 2, expected 1")


def test_a_swapped_key_is_caught(tmp_path: Path) -> None:
    path, _ = make_ledger(tmp_path)
    create_signing_key(tmp_path / "other")
    check = verify_ledger(path, {"north": load_verify_key(tmp_path / "other" / "ledger.pub")})
    assert check.problem is not None and check.problem.startswith(f"{path}:1: signature does not verify")


def test_a_ledger_signed_by_someone_without_a_trusted_key_is_refused(tmp_path: Path) -> None:
    path, trusted = make_ledger(tmp_path)
    check = verify_ledger(path, {"south": trusted["north"]})
    assert check.problem == f"{path}:1: no trusted public key for signer 'north'"


def test_bytes_that_are_not_utf8_are_named_by_their_line(tmp_path: Path) -> None:
    path, trusted = make_ledger(tmp_path)
    with path.open("ab") as out:
        out.write(b'{"seq": 4, "note": "\xff"}\n')
    check = verify_ledger(path, trusted)
    assert check.problem == f"{path}:5: not UTF-8: byte 0xFF at column 21 (save the file as UTF-8)"


def test_a_ledger_with_bytes_that_are_not_utf8_is_not_extended(tmp_path: Path) -> None:
    """Appending reads the last entry; a bad byte there is named by line and column (it raised
    UnicodeDecodeError before), and the file is left as it was."""
    from common.audit import LedgerError

    path, _ = make_ledger(tmp_path)
    with path.open("ab") as out:
        out.write(b'{"seq": 4, "note": "\xff"}\n')
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=r":5: not UTF-8: byte 0xFF at column 21 .*refusing to extend"):
        Ledger.in_folder(tmp_path / "north", "north").append({"kind": "egress"}, T0)
    assert path.read_bytes() == before


def test_a_broken_line_is_named_and_the_ledger_is_not_extended(tmp_path: Path) -> None:
    path, trusted = make_ledger(tmp_path)
    with path.open("a") as out:
        out.write('{"seq": 4, "ti\n')
    check = verify_ledger(path, trusted)
    assert check.problem is not None and check.problem.startswith(f"{path}:5: bad JSON: ")
    from common.audit import LedgerError

    with pytest.raises(LedgerError, match=r":5: bad JSON: .*refusing to extend a damaged ledger"):
        Ledger.in_folder(tmp_path / "north", "north").append({"kind": "egress"}, T0)


def test_keys_are_private_and_never_replaced(tmp_path: Path) -> None:
    from common.audit import AuditKeyError

    create_signing_key(tmp_path / "k")
    assert (tmp_path / "k" / "ledger.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(AuditKeyError, match="never replaced"):
        create_signing_key(tmp_path / "k")


def test_naive_time_is_refused(tmp_path: Path) -> None:
    ledger = Ledger.in_folder(tmp_path / "n", "north")
    with pytest.raises(ValueError, match="timezone-aware"):
        ledger.append({"kind": "egress"}, datetime(2026, 1, 1))


def test_payload_hash_depends_on_every_part() -> None:
    arrays = {"a.lora_A.weight": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    base = payload_hash(arrays, {keys.NUM_EXAMPLES: 5})
    assert base == payload_hash(dict(reversed(list(arrays.items()))), {keys.NUM_EXAMPLES: 5})  # order-free
    assert base != payload_hash(arrays, {keys.NUM_EXAMPLES: 6})
    assert base != payload_hash({**arrays, "b": np.zeros(4, np.float64)}, {keys.NUM_EXAMPLES: 5})
    assert base != payload_hash({**arrays, "b": np.zeros((2, 2), np.float32)}, {keys.NUM_EXAMPLES: 5})
    changed = {**arrays, "b": np.array([0, 0, 0, 1e-30], np.float32)}
    assert base != payload_hash(changed, {keys.NUM_EXAMPLES: 5})


# -------------------------------------------------------------------------------------------------- policy


def policy_file(path: Path, region: str, **overrides: Any) -> Path:
    raw: dict[str, Any] = {"region": region, "min_train_examples": 1}
    raw.update(overrides)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_shipped_demo_policies_load_and_name_their_region() -> None:
    folder = Path(__file__).resolve().parents[1] / "configs" / "policies"
    found = {p.stem: load_policy(p) for p in folder.glob("*.yaml")}
    assert set(found) == {"en-movies", "en-critics", "cn-hotel", "cn-electronics", "cn-books"}
    assert all(policy.region == name for name, policy in found.items())


def test_policy_problems_are_reported_together_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "region: north\n"
        "egress:\n"
        "  max_bytes: 0\n"
        "  dtypes: [float32, notatype]\n"
        "min_train_examples: -3\n"
        "server_fingerprint: abc\n"
        "pii:\n"
        "  types: [email, passport]\n"
        "require_dp: {epsilon: -1, delta: 0.5}\n"
        "colour: blue\n"
    )
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    text = str(err.value)
    for expected in (
        f"{path}:3: egress.max_bytes: must be >= 1, got 0",
        "egress.dtypes[1]: unknown dtype 'notatype'",
        f"{path}:5: min_train_examples: must be >= 1, got -3",
        f"{path}:6: server_fingerprint: must be 'sha256:'",
        "passport",
        "require_dp.epsilon: must be > 0, got -1",
        f"{path}:10: colour: unknown key",
    ):
        assert expected in text, expected


def outbound(**changes: Any) -> Outbound:
    base = Outbound(
        message="train",
        region="north",
        tensors=(
            TensorInfo("base_model.model.bert.layer.0.query.lora_A.weight", (4, 32), "float32", 512),
            TensorInfo("base_model.model.classifier.weight", (2, 32), "float32", 256),
        ),
        metrics={keys.NUM_EXAMPLES: 96, keys.TRAIN_LOSS: 0.5, keys.REGION_INDEX: 0},
        train_examples=96,
    )
    return dataclasses.replace(base, **changes)


def test_an_allowed_reply_passes() -> None:
    assert egress_problems(RegionPolicy(region="north"), outbound()) == []


@pytest.mark.parametrize(
    ("policy", "reply", "expected"),
    [
        (RegionPolicy("north"), {"region": "south"}, "the policy is for region 'north', this node serves 'south'"),
        (RegionPolicy("north", min_train_examples=100), {}, "96 training examples, the policy needs at least 100"),
        (
            RegionPolicy("north"),
            {"tensors": (TensorInfo("base_model.model.bert.embeddings.word_embeddings.weight", (9, 4), "float32", 1),)},
            "tensor 'base_model.model.bert.embeddings.word_embeddings.weight' is not allowed to leave",
        ),
        (
            RegionPolicy("north"),
            {"tensors": (TensorInfo("x.lora_A.weight", (4, 4), "float64", 128),)},
            "tensor 'x.lora_A.weight' has dtype float64, allowed: float32",
        ),
        (
            RegionPolicy("north"),
            {"metrics": {keys.NUM_EXAMPLES: 96, "predictions": 1.0}},
            "metric 'predictions' is not allowed to leave",
        ),
        (RegionPolicy("north"), {"metrics": {keys.NUM_EXAMPLES: 96, keys.LOSS: float("nan")}}, "metric 'loss' is nan"),
        (RegionPolicy("north", egress=EgressRules(max_bytes=700)), {}, "bytes, the policy allows at most 700"),
        (
            RegionPolicy("north", require_dp=DpRequirement(epsilon=8.0, delta=1e-5)),
            {},
            "requires differential privacy (epsilon 8.0), the run applies none",
        ),
        (
            RegionPolicy("north", require_dp=DpRequirement(epsilon=1.0, delta=1e-5)),
            {"protections": Protections(dp=DpRecord(3.0, 1e-5, 1.0, 1.0, 0.01, 100, "prv"))},
            "exceeds the policy's (epsilon 1.0, delta 1e-05)",
        ),
        (
            RegionPolicy("north", require_secure_aggregation=True),
            {},
            "requires secure aggregation, the run does not use it",
        ),
        (RegionPolicy("north"), {"config_records": ("notes",)}, "config record 'notes' is not allowed to leave"),
    ],
)
def test_each_kind_of_violation_is_named(policy: RegionPolicy, reply: dict[str, Any], expected: str) -> None:
    problems = egress_problems(policy, outbound(**reply))
    assert any(expected in p for p in problems), problems


def test_a_policy_must_let_the_example_count_leave() -> None:
    with pytest.raises(ConfigError, match="must allow 'num-examples'"):
        EgressRules(metrics=(keys.LOSS,))


def test_a_policy_naming_a_metric_as_the_run_folder_spells_it_is_refused_with_the_wire_spelling(
    tmp_path: Path,
) -> None:
    """summary.json says macro_f1, a reply carries macro-f1: a policy copied from the summary would stop every
    evaluation reply, so loading it fails, naming the file, the line and the spelling to use."""
    path = tmp_path / "old.yaml"
    path.write_text("region: north\negress:\n  metrics: [num-examples, accuracy, macro_f1, train_loss]\n")
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    assert err.value.problems == [
        f"{path}:3: egress.metrics[2]: 'macro_f1' is the run folder's spelling; a reply carries it as 'macro-f1'",
        f"{path}:3: egress.metrics[3]: 'train_loss' is the run folder's spelling; a reply carries it as 'train-loss'",
    ]
    path.write_text("region: north\negress:\n  metrics: [num-examples, accuracy, macro-f1, predictions]\n")
    assert load_policy(path).egress.metrics == (keys.NUM_EXAMPLES, keys.ACCURACY, keys.MACRO_F1, "predictions")


def test_the_policy_hash_follows_content_not_layout(tmp_path: Path) -> None:
    a = policy_file(tmp_path / "a.yaml", "north")
    b = tmp_path / "b.yaml"
    b.write_text("# comment\nmin_train_examples: 1\nregion:   north\n")
    c = policy_file(tmp_path / "c.yaml", "north", min_train_examples=2)
    assert load_policy(a).digest() == load_policy(b).digest() != load_policy(c).digest()


# ------------------------------------------------------------------------------------------ the federation


@pytest.fixture(scope="module", autouse=True)
def server_task_identity() -> Iterator[None]:
    """Flower's runtime tells the ServerApp process who it is before the strategy builds any message."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskIdentity, "_run_id", 7)
        mp.setattr(TaskIdentity, "_node_id", 0)
        mp.setattr(TaskIdentity, "_task_id", 1)
        yield


class LocalGrid:
    """A grid that hands each message to the real ClientApp (guard included) of a simulated node."""

    def __init__(self, cfg: RunConfig, audit_root: Path) -> None:
        self.app = make_client_app(cfg.regions, audit_root=audit_root)
        self.node_ids = [NODE_BASE + i for i in range(len(cfg.regions))]

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            context = Context(7, node, {keys.NODE_PARTITION_ID: node - NODE_BASE}, RecordDict(), {})
            try:
                reply = self.app(msg, context)
            except Exception as err:  # as Flower's runtime turns a raising ClientApp into an error reply
                from flwr.app import Error

                reply = Message(Error(code=0, reason=str(err)), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


@pytest.fixture(scope="module")
def regions_with_pii(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pii-regions")
    write_region(root / "north", 64, 24, seed=1)
    write_region(root / "south", 40, 24, seed=2)
    train = root / "north" / "train.jsonl"
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    rows[0]["text"] += " write to ana.silva@example.com or call +44 20 7946 0958"
    rows[1]["text"] += " see https://shop.example.com/item?id=3"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def audited_run(
    root: Path,
    tiny_bert: Path,
    regions: Path,
    policies: dict[str, dict[str, Any]],
    keep: bool = True,
    rounds: int = 2,
    aggregation: dict[str, Any] | None = None,
) -> tuple[RunConfig, Path]:
    folder = root / "policies"
    folder.mkdir(parents=True, exist_ok=True)
    for name, overrides in policies.items():
        policy_file(folder / f"{name}.yaml", name, **overrides)
    path = tiny_config(
        root / "run.yaml",
        tiny_bert,
        regions,
        rounds=rounds,
        train=TRAIN,
        policies="policies",
        audit={"keep_updates": keep},
        aggregation={"min_clients": 1, **(aggregation or {})},
    )
    cfg = load_config(path)
    out = root / "out"
    federate(LocalGrid(cfg, out / AUDIT_DIR / NODES_DIR), cfg, out)  # type: ignore[arg-type]
    return cfg, out


def trusted_keys(out: Path, names: Iterable[str]) -> dict[str, Any]:
    audit = out / AUDIT_DIR
    found = {"server": load_verify_key(audit / SERVER_DIR / "ledger.pub")}
    found.update({n: load_verify_key(audit / NODES_DIR / n / "ledger.pub") for n in names})
    return found


@pytest.fixture(scope="module")
def audited(
    tiny_bert: Path, regions_with_pii: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, Path]:
    root = tmp_path_factory.mktemp("audited")
    return audited_run(root, tiny_bert, regions_with_pii, {"north": {}, "south": {}})


def checks(out: Path, names: Iterable[str]) -> tuple[Any, list[Any]]:
    names = list(names)
    trusted = trusted_keys(out, names)
    server = verify_ledger(out / AUDIT_DIR / SERVER_DIR / "ledger.jsonl", trusted)
    nodes = [verify_ledger(out / AUDIT_DIR / NODES_DIR / n / "ledger.jsonl", trusted) for n in names]
    return server, nodes


def test_every_ledger_of_a_run_verifies_and_the_updates_match(audited: tuple[RunConfig, Path]) -> None:
    cfg, out = audited
    server, nodes = checks(out, cfg.region_names)
    assert server.ok and all(n.ok for n in nodes), [server.problem, *(n.problem for n in nodes)]
    assert cross_check(server, nodes) == []
    aggregates = [e["body"] for e in server.entries if e["body"]["kind"] == "aggregate"]
    assert [a["round"] for a in aggregates] == [1, 2]
    assert all({p["region"] for p in a["participants"]} == {"north", "south"} for a in aggregates)
    assert all(abs(sum(p["weight"] for p in a["participants"]) - 1.0) < 1e-12 for a in aggregates)
    rounds, problems = recompute(server, out / AUDIT_DIR / "updates")
    assert (rounds, problems) == (2, [])


def test_node_entries_describe_what_left_and_never_the_text(audited: tuple[RunConfig, Path]) -> None:
    cfg, out = audited
    _, nodes = checks(out, cfg.region_names)
    north = [e["body"] for e in nodes[0].entries]
    sent_train = [b for b in north if b["message"] == "train"]
    assert len(sent_train) == 2 and all(b["status"] == "sent" for b in sent_train)
    first = sent_train[0]
    assert {t["dtype"] for t in first["tensors"]} == {"float32"}
    assert any(t["name"].endswith("lora_A.weight") for t in first["tensors"])
    assert set(first["metrics"]) == {keys.NUM_EXAMPLES, keys.TRAIN_LOSS, keys.REGION_INDEX}
    assert first["policy"] == load_policy(cfg.regions[0].policy).digest()  # type: ignore[arg-type]
    assert first["redactions"] == {"email": 1, "phone": 1, "url": 1}
    text = (out / AUDIT_DIR / NODES_DIR / "north" / "ledger.jsonl").read_text()
    assert "example.com" not in text and "7946" not in text
    # evaluation replies are recorded too: val after each round, test at the end
    assert [b["message"] for b in north].count("evaluate") == 3


def test_the_node_trains_on_redacted_text(audited: tuple[RunConfig, Path]) -> None:
    from client.task import load_data, simulated_node

    cfg, _ = audited
    node = simulated_node(cfg.regions[0], {}, None)
    loaded = load_data(cfg.regions[0], client_task(cfg, 1), node)
    data, counts = loaded.data, loaded.redactions
    joined = " ".join(ex.text for ex in data.train)
    assert "[EMAIL]" in joined and "[PHONE]" in joined and "[URL]" in joined
    assert "ana.silva" not in joined
    assert counts == {"email": 1, "phone": 1, "url": 1}


def test_a_changed_node_ledger_fails_the_cross_check(audited: tuple[RunConfig, Path], tmp_path: Path) -> None:
    import shutil

    cfg, out = audited
    copy = tmp_path / "copy"
    shutil.copytree(out / AUDIT_DIR, copy / AUDIT_DIR)
    south = copy / AUDIT_DIR / NODES_DIR / "south" / "ledger.jsonl"
    # the south node drops its ledger for a fresh one: chain and signature hold, but the updates are missing
    south.unlink()
    Ledger.in_folder(south.parent, "south").append({"kind": "egress", "status": "sent"}, T0)
    server, nodes = checks(copy, cfg.region_names)
    assert server.ok and all(n.ok for n in nodes)
    problems = cross_check(server, nodes)
    assert len(problems) == 2 and all("of south is in no node's ledger" in p for p in problems)


def test_a_swapped_kept_update_fails_the_recomputation(audited: tuple[RunConfig, Path], tmp_path: Path) -> None:
    import shutil

    cfg, out = audited
    copy = tmp_path / "updates"
    shutil.copytree(out / AUDIT_DIR / "updates", copy)
    (copy / "round-002" / "north.npz").write_bytes((copy / "round-001" / "north.npz").read_bytes())
    server, _ = checks(out, cfg.region_names)
    rounds, problems = recompute(server, copy)
    assert rounds == 2 and len(problems) == 1
    assert "round 2" in problems[0] and "does not hash to the update the ledger records for north" in problems[0]


# server optimizers: the ledger records each, and the recomputation replays its state from round 1

OPTIMIZED = {
    "fedavgm": {"server_lr": 0.5, "momentum": 0.8},
    "fedadam": {"server_lr": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_lr": 0.05, "beta_1": 0.8, "beta_2": 0.9, "tau": 1e-2},
    "fedadagrad": {"server_lr": 0.05, "beta_1": 0.5, "tau": 1e-3},
}


@pytest.fixture(scope="module", params=list(OPTIMIZED))
def optimized(
    request: pytest.FixtureRequest, tiny_bert: Path, regions_with_pii: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, Path]:
    name = request.param
    root = tmp_path_factory.mktemp(f"audited-{name}")
    aggregation = {"optimizer": name, **OPTIMIZED[name]}
    return audited_run(root, tiny_bert, regions_with_pii, {"north": {}, "south": {}}, rounds=3, aggregation=aggregation)


def aggregate_bodies(server: Any) -> list[dict[str, Any]]:
    return [e["body"] for e in server.entries if e["body"]["kind"] == "aggregate"]


def test_every_optimizer_is_recorded_and_its_rounds_recompute_exactly(optimized: tuple[RunConfig, Path]) -> None:
    cfg, out = optimized
    server, nodes = checks(out, cfg.region_names)
    assert server.ok and all(n.ok for n in nodes), [server.problem, *(n.problem for n in nodes)]
    name = cfg.aggregation.optimizer
    bodies = aggregate_bodies(server)
    assert [b["optimizer"] for b in bodies] == [{"name": name, **OPTIMIZED[name]}] * 3
    assert [b["optimizer_step"] for b in bodies] == [1, 2, 3]
    assert [b["server_lr"] for b in bodies] == [OPTIMIZED[name]["server_lr"]] * 3
    assert len({b["optimizer_state_sha256"] for b in bodies}) == 3  # the state moves every round
    assert recompute(server, out / AUDIT_DIR / "updates") == (3, [])


def tampered(server: Any, server_round: int, **changes: Any) -> Any:
    """The server ledger's entries with the aggregate of ``server_round`` recording something else: what a server
    that signs a wrong record would give (the signature holds; only the recomputation can tell)."""
    entries = []
    for entry in server.entries:
        body = entry["body"]
        if body["kind"] == "aggregate" and body["round"] == server_round:
            entry = {**entry, "body": {**body, **changes}}
        entries.append(entry)
    return dataclasses.replace(server, entries=tuple(entries))


def test_a_wrong_recorded_hyperparameter_or_optimizer_is_caught_and_the_rounds_after_it_too(
    optimized: tuple[RunConfig, Path],
) -> None:
    cfg, out = optimized
    name = cfg.aggregation.optimizer
    server, _ = checks(out, cfg.region_names)
    updates = out / AUDIT_DIR / "updates"
    record = {"name": name, **OPTIMIZED[name]}
    key = "momentum" if name == "fedavgm" else "beta_1"
    wrong = tampered(server, 2, optimizer={**record, key: record[key] / 2})
    rounds, problems = recompute(wrong, updates)
    assert rounds == 3 and len(problems) == 2, problems
    assert "round 2: the kept updates, stepped by" in problems[0]
    assert "do not aggregate to the global adapter the ledger records" in problems[0]
    assert f"round 3: {name} carries its state from round to round, and round 2 could not be" in problems[1]

    # round 1 recorded as plain FedAvg at the same step size: another result (fedavgm's first step is FedAvg's:
    # its momentum starts at zero, and then the state it leaves tells them apart)
    as_fedavg = tampered(server, 1, optimizer={"name": "fedavg", "server_lr": record["server_lr"]})
    rounds, problems = recompute(as_fedavg, updates)
    assert len(problems) == 3
    why = "the replayed fedavg state does not hash" if name == "fedavgm" else "the kept updates, stepped by fedavg"
    assert f"round 1: {why}" in problems[0]

    unknown = tampered(server, 3, optimizer={"name": "fedsgd", "server_lr": 1.0})
    (problem,) = recompute(unknown, updates)[1]
    assert "round 3: the recorded server optimizer is not one this program knows" in problem

    state = tampered(server, 3, optimizer_state_sha256="0" * 64)
    (problem,) = recompute(state, updates)[1]
    assert f"round 3: the replayed {name} state does not hash to the state the ledger records" in problem


def test_a_tampered_kept_update_breaks_the_replay_from_its_round_on(
    optimized: tuple[RunConfig, Path], tmp_path: Path
) -> None:
    import shutil

    cfg, out = optimized
    copy = tmp_path / "updates"
    shutil.copytree(out / AUDIT_DIR / "updates", copy)
    path = copy / "round-001" / "south.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    first = next(k for k in arrays if k != "__metrics__")
    arrays[first] = arrays[first] + np.float32(1e-3)
    np.savez(path, **arrays)
    server, _ = checks(out, cfg.region_names)
    rounds, problems = recompute(server, copy)
    assert rounds == 3 and len(problems) == 3, problems
    assert "round 1" in problems[0] and "does not hash to the update the ledger records for south" in problems[0]
    assert all("could not be recomputed, so this one cannot be either" in p for p in problems[1:])


def test_a_policy_violation_stops_the_reply_and_the_server_records_it(
    tiny_bert: Path, regions_with_pii: Path, tmp_path: Path
) -> None:
    # south has 40 training examples; its policy wants 50 before anything may leave
    cfg, out = audited_run(tmp_path, tiny_bert, regions_with_pii, {"north": {}, "south": {"min_train_examples": 50}})
    federation_rounds = json.loads((out / "state.json").read_text())["rounds"]
    for record in federation_rounds:
        assert record["participants"] == ["north"]
        (rejected,) = record["rejected"]
        assert rejected["region"] == "south"
        assert (
            "refused by the policy of region south: 40 training examples, the policy needs at least 50"
            in rejected["reason"]
        )
    server, nodes = checks(out, cfg.region_names)
    assert server.ok and all(n.ok for n in nodes)
    assert cross_check(server, nodes) == []
    south = [e["body"] for e in nodes[1].entries]
    assert south and all(b["status"] == "refused" and b["sha256"] is None for b in south)
    # the manifest of what was stopped: the train replies' tensors, none for evaluation replies
    assert all(b["tensors"] for b in south if b["message"] == "train")
    assert all(b["tensors"] == [] for b in south if b["message"] == "evaluate")


def test_a_policy_for_another_region_is_refused_before_anything_starts(
    tiny_bert: Path, regions_with_pii: Path, tmp_path: Path
) -> None:
    from simulations.runner import load_policies

    folder = tmp_path / "policies"
    folder.mkdir()
    policy_file(folder / "north.yaml", "south")
    policy_file(folder / "south.yaml", "south", min_train_examples=0)
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, regions_with_pii, policies="policies")
    with pytest.raises(ConfigError) as err:
        load_policies(load_config(path))
    assert "north.yaml: region: is 'south', used for 'north'" in str(err.value)
    assert "south.yaml:2: min_train_examples: must be >= 1, got 0" in str(err.value)


def test_a_missing_policy_file_is_a_config_error_naming_the_region(
    tiny_bert: Path, regions_with_pii: Path, tmp_path: Path
) -> None:
    path = tiny_config(tmp_path / "run.yaml", tiny_bert, regions_with_pii, policies="nowhere")
    with pytest.raises(ConfigError, match=r"regions\[0\]\.policy: no such policy file: .*nowhere/north.yaml"):
        load_config(path)


# ------------------------------------------------------------------------------------------------------ CLI


def key_args(out: Path, names: Iterable[str]) -> list[str]:
    audit = out / AUDIT_DIR
    pairs = [f"server={audit / SERVER_DIR / 'ledger.pub'}"]
    pairs += [f"{n}={audit / NODES_DIR / n / 'ledger.pub'}" for n in names]
    return [arg for pair in pairs for arg in ("--key", pair)]


def test_audit_verify_passes_an_intact_run_and_recomputes_it(
    audited: tuple[RunConfig, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlocale.cli import main

    cfg, out = audited
    assert main(["audit", "verify", str(out / AUDIT_DIR), *key_args(out, cfg.region_names)]) == 0
    printed = capsys.readouterr().out
    assert "the kept updates recompute the recorded global adapter of 2 of 2 round(s)" in printed
    assert printed.count("ok    ") == 3 and "verified:" in printed


def test_audit_verify_names_the_first_broken_entry_and_fails(
    audited: tuple[RunConfig, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from fedlocale.cli import main

    cfg, out = audited
    copy = tmp_path / "run"
    shutil.copytree(out / AUDIT_DIR, copy / AUDIT_DIR)
    north = copy / AUDIT_DIR / NODES_DIR / "north" / "ledger.jsonl"
    content = lines(north)
    content[1] = content[1].replace('"status": "sent"', '"status": "refused"')
    north.write_text("".join(content))
    assert main(["audit", "verify", str(copy / AUDIT_DIR), *key_args(copy, cfg.region_names)]) == 1
    err = capsys.readouterr().err
    assert f"{north}:2: content does not match its hash" in err
    # the server's round that used north's (now unverifiable) ledger is not cross-checked against it, but the
    # broken chain alone fails the audit; a swapped key fails it too
    swapped = key_args(copy, cfg.region_names)
    swapped[swapped.index(f"server={copy / AUDIT_DIR / SERVER_DIR / 'ledger.pub'}")] = (
        f"server={copy / AUDIT_DIR / NODES_DIR / 'south' / 'ledger.pub'}"
    )
    assert main(["audit", "verify", str(copy / AUDIT_DIR / SERVER_DIR), *swapped]) == 1
    assert "signature does not verify with the key given for 'server'" in capsys.readouterr().err


def test_audit_verify_without_keys_is_bad_input(
    audited: tuple[RunConfig, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlocale.cli import main

    _, out = audited
    assert main(["audit", "verify", str(out / AUDIT_DIR)]) == 2
    assert "no trusted keys" in capsys.readouterr().err
    assert main(["audit", "verify", str(out / AUDIT_DIR), "--key", "server"]) == 2
    assert "expected NAME=FILE" in capsys.readouterr().err


def test_audit_report_from_the_cli(audited: tuple[RunConfig, Path], tmp_path: Path) -> None:
    from fedlocale.cli import main

    cfg, out = audited
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        yaml.safe_dump(
            {"server": str(out / AUDIT_DIR / SERVER_DIR / "ledger.pub")}
            | {n: str(out / AUDIT_DIR / NODES_DIR / n / "ledger.pub") for n in cfg.region_names}
        )
    )
    assert main(["audit", "report", str(out / AUDIT_DIR), "--keys", str(keys_file), "--out", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "audit-report.md").read_text()
    assert "VERIFIED" in report and "north" in report and "south" in report
    assert (tmp_path / "r" / "audit-bytes-north.png").stat().st_size > 1000


def test_a_tensor_the_policy_does_not_allow_stops_the_real_reply(
    tiny_bert: Path, regions_with_pii: Path, tmp_path: Path
) -> None:
    # south's policy lets only the LoRA factors leave; the run also trains and sends the classifier head
    lora_only = {"egress": {"tensors": ["*.lora_A.weight", "*.lora_B.weight"]}}
    cfg, out = audited_run(tmp_path, tiny_bert, regions_with_pii, {"north": {}, "south": lora_only}, keep=False)
    record = json.loads((out / "state.json").read_text())["rounds"][0]
    assert record["participants"] == ["north"]
    reason = record["rejected"][0]["reason"]
    assert "refused by the policy of region south: tensor 'base_model.model.classifier" in reason
    assert "is not allowed to leave" in reason
    _, nodes = checks(out, cfg.region_names)
    south = [e["body"] for e in nodes[1].entries]
    train = [b for b in south if b["message"] == "train"]
    assert train and all(b["status"] == "refused" for b in train)
    # evaluation replies carry no tensors, so they may still leave under this policy
    assert all(b["status"] == "sent" for b in south if b["message"] == "evaluate")


# ---------------------------------------------------------------------------------------------------------
# audit verify never misleads: claims only for checks that ran; unusable input is exit 2, never "tampered"


def _verify(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from fedlocale.cli import main

    code = main(["audit", "verify", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_audit_verify_with_only_node_ledgers_claims_no_cross_check(
    audited: tuple[RunConfig, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, out = audited
    code, printed, _ = _verify(capsys, str(out / AUDIT_DIR / NODES_DIR), *key_args(out, cfg.region_names))
    assert code == 0
    assert "aggregated only" not in printed.split("not checked:")[0]  # no claim before the "not checked" lines
    assert "not checked: that the server aggregated only updates the nodes recorded sending: no server ledger" in (
        printed
    )
    assert "not checked: recomputing each round's global adapter from the kept updates: no server ledger" in printed
    assert "recomputed" not in printed


def test_audit_verify_states_each_check_that_ran(
    audited: tuple[RunConfig, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, out = audited
    code, printed, _ = _verify(capsys, str(out / AUDIT_DIR), *key_args(out, cfg.region_names))
    assert code == 0
    assert "each of the 3 ledger(s) is intact" in printed
    assert "the server aggregated only updates the nodes recorded sending (4 update(s) in 2 aggregation(s)" in printed
    assert "recompute the recorded global adapter of 2 of 2 round(s)" in printed
    assert "not checked" not in printed


def test_audit_verify_a_mistyped_ledger_path_is_bad_input_not_tampering(
    audited: tuple[RunConfig, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, out = audited
    server = out / AUDIT_DIR / SERVER_DIR / "ledger.jsonl"
    missing = out / AUDIT_DIR / SERVER_DIR / "ledgr.jsonl"
    code, printed, err = _verify(capsys, str(server), str(missing), *key_args(out, cfg.region_names))
    assert code == 2
    assert err == f"fedlocale: {missing}: no such ledger file or folder\n" and "BROKEN" not in printed
    code, _, err = _verify(capsys, str(tmp_path), *key_args(out, cfg.region_names))
    assert code == 2 and f"{tmp_path}: no ledger.jsonl in this folder" in err


def test_audit_verify_checks_a_ledger_named_twice_once(
    audited: tuple[RunConfig, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, out = audited
    monkeypatch.chdir(out)
    north = Path(AUDIT_DIR) / NODES_DIR / "north" / "ledger.jsonl"
    args = [str(out / AUDIT_DIR), str(north), f"./{north}", *key_args(out, cfg.region_names)]
    code, printed, err = _verify(capsys, *args)
    assert code == 0, err
    assert "ledgers are signed by" not in err
    assert printed.count("note: ") == 2 and f"the same file as {out / north}; checked once" in printed
    assert printed.count("ok    ") == 3


def test_audit_verify_a_wrong_updates_folder_is_named_not_counted(
    audited: tuple[RunConfig, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, out = audited
    keys_args = key_args(out, cfg.region_names)
    for wrong, message in [
        (tmp_path, "holds none of the 2 round(s) the server ledger records (round-001/, …)"),
        (tmp_path / "nope", "no such folder; kept updates are a run's audit/updates folder"),
        (out / AUDIT_DIR / SERVER_DIR / "ledger.jsonl", "not a folder; kept updates are"),
    ]:
        code, printed, err = _verify(capsys, str(out / AUDIT_DIR), "--updates", str(wrong), *keys_args)
        assert code == 2 and f"fedlocale: {wrong}: {message}" in err
        assert "recompute" not in printed


@pytest.mark.parametrize(
    "damage", [b"", b"PK\x03\x04 truncated", b"\x00\xff garbage", b"not an npz at all\n"], ids=repr
)
def test_audit_verify_a_damaged_kept_update_exits_2_naming_it(
    audited: tuple[RunConfig, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: bytes
) -> None:
    import shutil

    cfg, out = audited
    copy = tmp_path / AUDIT_DIR
    shutil.copytree(out / AUDIT_DIR, copy)
    kept = copy / "updates" / "round-001" / "north.npz"
    kept.write_bytes(damage)
    code, _, err = _verify(capsys, str(copy), *key_args(out, cfg.region_names))
    assert code == 2 and err.startswith(f"fedlocale: {kept}: not a readable kept update") and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"server: [unclosed\n", "cannot read a keys file"),
        (b"\xff\xfe\x00binary", "cannot read a keys file"),
        (b"- a list\n", "must map signer names to public key files"),
        (b"server: missing.pub\n", "missing.pub: not a readable PEM public key"),
        (b"server: garbage.pub\n", "garbage.pub: not a readable PEM public key"),
    ],
)
def test_audit_verify_a_damaged_keys_file_or_key_exits_2_naming_it(
    audited: tuple[RunConfig, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    _, out = audited
    (tmp_path / "garbage.pub").write_bytes(b"-----BEGIN PUBLIC KEY-----\n\x00\xffzz\n-----END PUBLIC KEY-----\n")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_bytes(content)
    code, _, err = _verify(capsys, str(out / AUDIT_DIR), "--keys", str(keys_file))
    assert code == 2 and err.startswith("fedlocale: ") and message in err and "Traceback" not in err


def test_audit_report_lists_what_was_not_checked(
    audited: tuple[RunConfig, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlocale.cli import main

    cfg, out = audited
    args = ["audit", "report", str(out / AUDIT_DIR / NODES_DIR), "--out", str(tmp_path / "r")]
    assert main([*args, *key_args(out, cfg.region_names)]) == 0
    report = (tmp_path / "r" / "audit-report.md").read_text()
    assert "**Not checked:**" in report and "no server ledger given" in report
