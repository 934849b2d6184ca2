"""DP-SGD's randomness comes from the node's secret (client/dp_secret.py), never from what the server knows.

The server sends every node the run's seed; before this, the Poisson sampling and the Gaussian noise were seeded
from it, so the server could regenerate the noise and subtract it. These tests fail on that code."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from client.dp import Accountant, DpSgd, seeds
from client.dp_secret import SECRET_BYTES, DpSecret, DpSecretError, node_secret, simulated_secret
from client.task import (
    NodeSettings,
    _round_inputs,
    encode_split,
    global_model,
    load_data,
    simulated_node,
    train_round,
)
from client.train import plan_steps, train_encoded
from common.config import ClientTask, Region
from common.model import adapter_state, build_model
from common.policy import DpRequirement, RegionPolicy
from common.runfiles import DP_ACCOUNT_FILE, DP_SECRET_FILE
from common.seeds import derive_seed
from tests.conftest import write_region

A, B = bytes(range(32)), bytes(range(1, 33))


def _node(tmp_path: Path, name: str, secret: bytes | None) -> NodeSettings:
    policy = RegionPolicy("north", require_dp=DpRequirement(epsilon=8.0, delta=1e-5))
    return NodeSettings(policy=policy, audit_dir=tmp_path / name, threads=1, dp_secret=secret)


@pytest.fixture
def setup(tmp_path: Path, north_task: ClientTask) -> tuple[Region, ClientTask, dict[str, torch.Tensor]]:
    region = Region("north", write_region(tmp_path / "north", 48, 16, seed=1))
    task = dataclasses.replace(north_task, rounds=2, run_key="run-a")
    state = adapter_state(build_model(task.model, task.lora, task.labels, seed=0).model)
    return region, task, state


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_update_depends_on_the_nodes_secret_and_not_only_on_the_run_seed(
    tmp_path: Path, setup: tuple[Region, ClientTask, dict[str, torch.Tensor]]
) -> None:
    """Two nodes with the same run seed and different secrets send different updates; the same secret (a
    retried round on another disk) sends exactly the same update."""
    region, task, state = setup
    first, _ = train_round(region, task, state, _node(tmp_path, "a", A))
    again, _ = train_round(region, task, state, _node(tmp_path, "a-again", A))
    other, _ = train_round(region, task, state, _node(tmp_path, "b", B))
    assert _equal(first, again)
    assert not _equal(first, other)


def test_what_the_server_knows_does_not_reproduce_the_update(
    tmp_path: Path, setup: tuple[Region, ClientTask, dict[str, torch.Tensor]]
) -> None:
    """The server knows the task (the run's seed included), the global adapter and the noise multiplier (the
    reply's DP record). Training as the node does with the old seeds, derived from the run's seed, gives another
    update; the same computation with the seeds derived from the node's secret gives the node's, exactly (so
    the reconstruction itself is faithful: only the secret is missing)."""
    region, task, state = setup
    node = _node(tmp_path, "a", A)
    sent, _ = train_round(region, task, state, node)
    account = Accountant.load(node.audit_dir).accounts["run-a"]  # type: ignore[arg-type]

    def replay(sampling_seed: int, noise_seed: int) -> dict[str, torch.Tensor]:
        loaded = global_model(task, state)
        encoded = encode_split(loaded, load_data(region, task, node, training=True).train, task, node)
        settings = dataclasses.replace(task.train, threads=1)
        private = DpSgd(
            account.noise_multiplier,
            account.clip,
            account.sample_rate,
            len(encoded.ids),
            sampling_seed=sampling_seed,
            noise_seed=noise_seed,
            settings=task.dp,
        )
        train_encoded(
            loaded.model,
            encoded.ids,
            encoded.labels,
            settings,
            pad_id=loaded.pad_id,
            seed=derive_seed(task.seed, task.server_round, region.name),
            private=private,
        )
        private.close()
        return adapter_state(loaded.model)

    old = derive_seed(task.seed, task.server_round, region.name)  # the seeds the node used before the fix
    assert not _equal(replay(old, old + 1), sent)
    loaded = global_model(task, state)
    encoded = encode_split(loaded, load_data(region, task, node, training=True).train, task, node)
    steps = plan_steps(len(encoded.ids), task.train)
    private = (account.noise_multiplier, account.clip, account.sample_rate, len(encoded.ids), steps)
    own = seeds(DpSecret(A), task.server_round, "north", "round", _round_inputs(state, task, encoded), private)
    assert _equal(replay(own["sampling_seed"], own["noise_seed"]), sent)


def test_the_noise_is_fresh_for_any_other_input() -> None:
    """The same noise only for exactly the same training: another round, region, purpose, adapter, setting or
    secret draws other seeds (reused noise would cancel in the difference of two updates)."""
    secret = DpSecret(A)
    base = seeds(secret, 1, "north", "round", b"inputs", (1.0, 1.0, 0.1, 100, 10))
    assert base == seeds(DpSecret(A), 1, "north", "round", b"inputs", (1.0, 1.0, 0.1, 100, 10))
    assert base["sampling_seed"] != base["noise_seed"]
    others = [
        seeds(secret, 2, "north", "round", b"inputs", (1.0, 1.0, 0.1, 100, 10)),
        seeds(secret, 1, "south", "round", b"inputs", (1.0, 1.0, 0.1, 100, 10)),
        seeds(secret, 1, "north", "personalize", b"inputs", (1.0, 1.0, 0.1, 100, 10)),
        seeds(secret, 1, "north", "round", b"other inputs", (1.0, 1.0, 0.1, 100, 10)),
        seeds(secret, 1, "north", "round", b"inputs", (1.1, 1.0, 0.1, 100, 10)),
        seeds(DpSecret(B), 1, "north", "round", b"inputs", (1.0, 1.0, 0.1, 100, 10)),
    ]
    assert all(o["noise_seed"] != base["noise_seed"] for o in others)
    assert repr(secret) == "DpSecret(<hidden>)" and A.hex() not in repr(secret)
    with pytest.raises(ValueError, match="32 bytes"):
        DpSecret(b"short")


def test_the_secret_file_is_made_private_once_and_kept(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    first = node_secret(folder)
    path = folder / DP_SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()
    assert len(content) == SECRET_BYTES
    assert [p.name for p in folder.iterdir()] == [DP_SECRET_FILE]  # no temporary file left behind
    second = node_secret(folder)  # reused, never replaced
    assert path.read_bytes() == content
    assert first.seed(1, "north", "round", b"") == second.seed(1, "north", "round", b"")
    assert node_secret(tmp_path / "elsewhere").seed(1, "north", "round", b"") != first.seed(1, "north", "round", b"")


@pytest.mark.parametrize("damage", ["short", "long", "folder"])
def test_a_damaged_secret_stops_training_naming_the_file(
    tmp_path: Path, setup: tuple[Region, ClientTask, dict[str, torch.Tensor]], damage: str
) -> None:
    """A secret file that is not exactly 32 readable bytes is refused before anything is trained or charged,
    and is left as it was (a new secret would be made only if the operator deletes it)."""
    region, task, state = setup
    node = _node(tmp_path, "a", None)
    folder = node.audit_dir
    assert folder is not None
    folder.mkdir()
    path = folder / DP_SECRET_FILE
    if damage == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"x" * (5 if damage == "short" else 33))
    with pytest.raises(DpSecretError, match=str(path)):
        train_round(region, task, state, node)
    assert not (folder / DP_ACCOUNT_FILE).exists()  # nothing charged
    if damage != "folder":
        assert len(path.read_bytes()) in (5, 33)


def test_a_node_without_a_given_secret_uses_its_own_file(
    tmp_path: Path, setup: tuple[Region, ClientTask, dict[str, torch.Tensor]]
) -> None:
    region, task, state = setup
    node = _node(tmp_path, "a", None)
    first, _ = train_round(region, task, state, node)
    assert node.audit_dir is not None and (node.audit_dir / DP_SECRET_FILE).exists()
    secret = (node.audit_dir / DP_SECRET_FILE).read_bytes()
    again, _ = train_round(region, task, state, _node(tmp_path, "b", secret))  # the same secret: the same update
    assert _equal(first, again)


def test_simulated_nodes_derive_their_secret_from_the_run_seed(tmp_path: Path) -> None:
    region = Region("north", tmp_path)
    one = simulated_node(region, {}, tmp_path / "audit", run_seed=7)
    assert one.dp_secret == simulated_node(region, {}, tmp_path / "audit", run_seed=7).dp_secret
    assert one.dp_secret == simulated_secret(7, "north")
    assert one.dp_secret != simulated_node(region, {}, tmp_path / "audit", run_seed=8).dp_secret
    assert one.dp_secret != simulated_node(Region("south", tmp_path), {}, tmp_path / "audit", run_seed=7).dp_secret
    assert simulated_node(region, {}, tmp_path / "audit").dp_secret is None  # no seed: its own secret file
    assert "dp_secret" not in repr(one)


@pytest.mark.slow
def test_a_simulation_run_twice_gives_identical_dp_results(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real ClientApp and federation: north trains under DP-SGD; two runs with the same seed (and
    different, random run keys) end with the same adapter and the same epsilon; no secret file is written."""
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import make_app
    from tests.test_resume import LocalGrid, config, federate

    for name in ("_run_id", "_node_id", "_task_id"):  # as Flower's runtime tells a ServerApp process
        monkeypatch.setattr(TaskIdentity, name, 0 if name == "_node_id" else 1)

    policy = tmp_path / "north.yaml"
    policy.write_text("region: north\nrequire_dp: {epsilon: 8.0, delta: 1.0e-5}\n")
    base = config(tmp_path, tiny_bert, two_regions, rounds=1)
    regions = tuple(dataclasses.replace(r, policy=policy) if r.name == "north" else r for r in base.regions)
    cfg = dataclasses.replace(base, regions=regions)

    def simulate(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, bytes]]]:
        grid = LocalGrid(cfg.regions)
        grid.app = make_app(cfg.regions, audit_root=tmp_path / name / "nodes", sim_seed=cfg.seed)
        out = tmp_path / name / "out"
        result = federate(grid, cfg, out)  # type: ignore[arg-type]
        assert not (tmp_path / name / "nodes" / "north" / DP_SECRET_FILE).exists()
        # the tensors of every kept file (adapters, the server optimizer's state); not the files' metadata,
        # which names the run (its random run key)
        kept = {
            str(p.relative_to(out)): {k: v.numpy().tobytes() for k, v in load_file(p).items()}
            for p in sorted(out.rglob("*.safetensors"))
        }
        return result.rounds[0]["train"], result.test, kept

    one, two = simulate("one"), simulate("two")
    assert one[0]["north"]["dp_epsilon"] > 0 and one[2]  # north trained under DP-SGD; adapters were kept
    assert one == two


def test_a_simulation_with_stock_flower_tooling_derives_the_secret_from_its_config_file(
    tmp_path: Path, tiny_bert: Path, two_regions: Path
) -> None:
    """``flwr run`` on the simulation engine: the ClientApp gets no seed from a simulator, only the run config's
    ``config`` file, whose seed the simulated node's secret is derived from; a deployed node gets none."""
    from flwr.app import Context, RecordDict

    from client.app import _locate
    from common import keys
    from common.config import load_config
    from tests.conftest import tiny_config

    path = tiny_config(tmp_path / "run.yaml", tiny_bert, two_regions, rounds=1)
    cfg = load_config(path)
    context = Context(1, 101, {keys.NODE_PARTITION_ID: 1}, RecordDict(), {keys.RUN_CONFIG_PATH: str(path)})
    here = _locate(context, None, tmp_path / "nodes", None, None)
    assert here.node.dp_secret == simulated_secret(cfg.seed, here.region.name)
    deployed = Context(
        1, 7, {keys.NODE_REGION: "north", keys.NODE_DATA_DIR: str(two_regions / "north")}, RecordDict(), {}
    )
    assert _locate(deployed, None, None, None, None).node.dp_secret is None
