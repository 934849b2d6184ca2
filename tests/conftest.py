"""Shared fixtures: tiny transformer folders built in code and synthetic region data on disk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from assets.tiny import make_tiny_model, write_region

if TYPE_CHECKING:
    from client.personalize import Personalized
    from common.config import ClientTask
    from common.model import LoadedModel


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the minutes-long tests first, the deployments each followed by another slow test, then the quick ones.

    With two workers (scripts/test.sh: ``-n 2 --maxschedchunk 1``, each worker holds at most two tests) the
    deployments land on both workers at once and the quick tests fill the gaps; in collection order they would
    queue up on one worker at the end."""
    deployments = [item for item in items if item.get_closest_marker("deployment")]
    slow = [item for item in items if item.get_closest_marker("slow") and item not in deployments]
    order: list[pytest.Item] = []
    for i, deployment in enumerate(deployments):
        order += [deployment, *slow[i : i + 1]]
    order += slow[len(deployments) :]
    chosen = set(order)
    items[:] = order + [item for item in items if item not in chosen]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT folder that ``from_pretrained`` loads offline."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def two_regions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two synthetic regions of different sizes and label balance."""
    root = tmp_path_factory.mktemp("regions")
    write_region(root / "north", 96, 48, seed=1, pos_fraction=0.6)
    write_region(root / "south", 48, 48, seed=2, pos_fraction=0.4)
    return root


SIMULATED_TRAIN = {"lr": 3e-2, "epochs": 5, "batch_size": 8, "threads": 1}


@pytest.fixture(scope="session")
def simulated_run(
    tiny_bert: Path, two_regions: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> tuple[Path, Path]:
    """(config, run folder) of one `fedlocale simulate` of ``two_regions`` (2 rounds, both baselines), through the
    CLI in this process. Shared by the tests that read a finished simulation (test_simulation, test_bench_selection)
    and the one that compares stock `flwr run` with it (test_flwr_run), so the run is paid once: with pytest-xdist
    once for all workers (a session fixture is otherwise made by each worker; the first makes it under a lock in
    the session's common folder, the others wait and read it). The tests only read the run folder."""
    if worker_id == "master":  # one process: this session's own folder
        return _simulate_once(tmp_path_factory.mktemp("sim"), tiny_bert, two_regions)
    import fcntl

    # the workers' base folders are siblings in this session's folder (pytest-xdist); never shared across sessions
    shared = tmp_path_factory.getbasetemp().parent / "simulated-run"
    shared.mkdir(exist_ok=True)
    with (shared / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = shared / "done"
        if done.exists():
            cfg, out = done.read_text(encoding="utf-8").splitlines()
            return Path(cfg), Path(out)
        cfg_path, out_path = _simulate_once(shared, tiny_bert, two_regions)
        done.write_text(f"{cfg_path}\n{out_path}\n", encoding="utf-8")
        return cfg_path, out_path


def _simulate_once(root: Path, tiny_bert: Path, two_regions: Path) -> tuple[Path, Path]:
    """``simulated_run``'s simulation, in ``root``."""
    from fedlocale.cli import main

    cfg = tiny_config(
        root / "run.yaml",
        tiny_bert,
        two_regions,
        train=SIMULATED_TRAIN,
        baselines=["centralized", "local_only"],
        simulation={"cpus_per_client": 1, "baseline_processes": 2},  # the default: the baselines side by side
    )
    assert main(["simulate", str(cfg), "--out", str(root / "out")]) == 0
    return cfg, root / "out"


def tiny_config(path: Path, model_dir: Path, regions_dir: Path, **extra: object) -> Path:
    """Write a run config for the tiny model and synthetic regions; ``extra`` overrides top-level keys."""
    import yaml

    cfg: dict[str, object] = {
        "name": "tiny",
        "seed": 0,
        "rounds": 2,
        "labels": ["neg", "pos"],
        "regions": [{"name": sub.name, "data": str(sub)} for sub in sorted(regions_dir.iterdir()) if sub.is_dir()],
        "model": {"base": str(model_dir), "max_length": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"lr": 5e-3, "epochs": 2, "batch_size": 8, "threads": 1},
        "aggregation": {"min_clients": 2},
        # the baselines one after another in the test's process; simulated_run and test_baselines run them apart
        "simulation": {"cpus_per_client": 1, "baseline_processes": 1},
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def north_task(tiny_bert: Path) -> ClientTask:
    """A server task for one region "north" on the tiny model (round 1), as a node receives it."""
    from common.config import ClientTask, LoraSettings, ModelSettings, TrainSettings

    return ClientTask(
        seed=0,
        server_round=1,
        labels=("neg", "pos"),
        region_names=("north",),
        model=ModelSettings(base=str(tiny_bert), max_length=32),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        train=TrainSettings(lr=5e-3, epochs=1, batch_size=8, threads=1),
    )


def perturb(loaded: LoadedModel, seed: int) -> LoadedModel:
    """``loaded`` with every trainable tensor moved off its initial value (a fresh LoRA B is 0), in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in loaded.model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    loaded.model.eval()
    return loaded


def assert_chosen_by_confidence(result: Personalized) -> None:
    """The default rule (confident): the global model only if validation shows it better with confidence."""
    from client.personalize import GLOBAL, PERSONALIZED

    d = result.val_difference
    assert d is not None and d.low <= d.high
    assert d.diff == pytest.approx(result.val_personalized.macro_f1 - result.val_global.macro_f1)
    assert result.chosen == (GLOBAL if d.high < 0 else PERSONALIZED)
