"""What a region node does for one message, as plain functions of typed inputs (no Flower types here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from common import keys
from common.config import ClientTask, Region, load_config
from common.data import RegionData, load_region
from common.model import LoadedModel, adapter_state, build_model, load_adapter_state
from common.train import EvalResult, TrainResult, derive_seed, evaluate, train_local


class NodeConfigError(ValueError):
    """The node cannot tell which region it serves."""


def resolve_region(
    node_config: Mapping[str, object],
    run_config: Mapping[str, object],
    sim_regions: Sequence[Region] | None = None,
) -> Region:
    """The region this node serves: from ``--node-config`` in deployment, from the partition id in simulation.

    In simulation the region list comes from ``sim_regions`` (the in-process simulator passes it) or else from
    the run config file named by the run config's ``config`` key.
    """
    if keys.NODE_REGION in node_config or keys.NODE_DATA_DIR in node_config:
        name, data = node_config.get(keys.NODE_REGION), node_config.get(keys.NODE_DATA_DIR)
        if not isinstance(name, str) or not isinstance(data, str):
            raise NodeConfigError(
                f"node config needs both {keys.NODE_REGION}='…' and {keys.NODE_DATA_DIR}='…', got {dict(node_config)}"
            )
        return Region(name=name, data=Path(data))
    if keys.NODE_PARTITION_ID not in node_config:
        raise NodeConfigError(
            f"node config names no region ({keys.NODE_REGION}, {keys.NODE_DATA_DIR}): {dict(node_config)}"
        )
    if sim_regions is None:
        path = run_config.get(keys.RUN_CONFIG_PATH)
        if not isinstance(path, str):
            raise NodeConfigError(f"simulation node needs the run config key {keys.RUN_CONFIG_PATH!r}")
        sim_regions = load_config(Path(path)).regions
    pid = int(node_config[keys.NODE_PARTITION_ID])  # type: ignore[call-overload]
    if not 0 <= pid < len(sim_regions):
        raise NodeConfigError(f"partition id {pid} but the run has {len(sim_regions)} regions")
    return sim_regions[pid]


def region_index(region: Region, task: ClientTask) -> int:
    """This region's position in the run's region list; a node outside the run refuses to take part."""
    if region.name not in task.region_names:
        raise NodeConfigError(f"region {region.name!r} is not in this run ({', '.join(task.region_names)})")
    return task.region_names.index(region.name)


def prepare(region: Region, task: ClientTask, state: Mapping[str, torch.Tensor]) -> tuple[RegionData, LoadedModel]:
    """Load the region's data and a model carrying the received global adapter."""
    data = load_region(region.name, region.data, task.labels)
    loaded = build_model(task.model, task.lora, task.labels, seed=task.seed)
    load_adapter_state(loaded.model, dict(state))
    return data, loaded


def train_round(
    region: Region, task: ClientTask, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Train the global adapter on the region's train split; return the new adapter state."""
    data, loaded = prepare(region, task, state)
    seed = derive_seed(task.seed, task.server_round, region.name)
    result = train_local(
        loaded.model, loaded.tokenizer, data.train, task.train, max_length=task.model.max_length, seed=seed
    )
    return adapter_state(loaded.model), result


def evaluate_round(region: Region, task: ClientTask, state: Mapping[str, torch.Tensor], split: str) -> EvalResult:
    """Evaluate the global adapter on one split of the region's data (empty if the region has no such split)."""
    data, loaded = prepare(region, task, state)
    return evaluate(
        loaded.model,
        loaded.tokenizer,
        data.split(split),
        len(task.labels),
        max_length=task.model.max_length,
        batch_size=task.train.eval_batch_size,
    )
