"""A region's personal LoRA, trained alongside the global adapter in every round and never sent
(``personalize.mode: dual``, after FedDPA's dual adapters).

The node trains one adapter of rank r + p whose first r components are the global adapter and whose last p are
its own: A = [A_g; A_p], B = [B_g, B_p] with the global scale alpha/r, so the model computes
x·(B_g·A_g + B_p·A_p)·alpha/r. Training that adapter is one ordinary ``train_round`` on a wider LoRA; before
replying, the node cuts the personal slices off and keeps them, so the reply has exactly the global adapter's
keys and shapes. Both parts see the same passes over the data: the personal part costs no extra epoch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.config import LoraSettings

PERSONAL_FILE = "personal-lora.safetensors"  # in the node's personal folder, per region: never sent
RUN_PERSONAL_DIR = "personal-lora"  # in a simulation's run folder: what the simulated nodes keep, per region


def personal_tag(region: str, seed: int, r: int, rank: int) -> str:
    """What a personal LoRA belongs to; slices saved under another tag are not reused."""
    return f"{region} seed={seed} r={r} p={rank}"


def is_lora_a(key: str) -> bool:
    """Whether ``key`` names a LoRA A matrix (rank × in) of a peft state dict."""
    return ".lora_A." in key


def is_lora_b(key: str) -> bool:
    """Whether ``key`` names a LoRA B matrix (out × rank) of a peft state dict."""
    return ".lora_B." in key


def widen(lora: LoraSettings, extra: int) -> LoraSettings:
    """The LoRA settings of the stacked adapter: rank r + ``extra`` with the same scale alpha/r."""
    alpha = lora.alpha * (lora.r + extra)
    if alpha % lora.r:
        raise ValueError(
            f"lora.alpha * (lora.r + personalize.local_r) must be a multiple of lora.r to keep the scale "
            f"alpha/r, got alpha={lora.alpha}, r={lora.r}, local_r={extra}"
        )
    return dataclasses.replace(lora, r=lora.r + extra, alpha=alpha // lora.r)


def init_personal(global_state: Mapping[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Fresh personal slices for the LoRA matrices of ``global_state``: A drawn as peft draws it (Kaiming
    uniform, a = √5), B = 0, so the stacked model starts as exactly the global model."""
    generator = torch.Generator().manual_seed(seed)
    personal = {}
    for key in sorted(global_state):
        value = global_state[key]
        if is_lora_a(key):
            # kaiming_uniform_ with a = sqrt(5) draws from U(-b, b) with b = 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(value.shape[1])
            personal[key] = (torch.rand(rank, value.shape[1], generator=generator, dtype=value.dtype) * 2 - 1) * bound
        elif is_lora_b(key):
            personal[key] = torch.zeros(value.shape[0], rank, dtype=value.dtype)
    return personal


def join(global_state: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stacked adapter's state: each LoRA matrix of ``global_state`` with its personal slice appended
    (A along the rank rows, B along the rank columns); every other tensor (the head) as it is."""
    lora_keys = {k for k in global_state if is_lora_a(k) or is_lora_b(k)}
    if set(personal) != lora_keys:
        missing, extra = sorted(lora_keys - set(personal))[:3], sorted(set(personal) - lora_keys)[:3]
        raise ValueError(f"personal LoRA does not match the global adapter: missing {missing}, unexpected {extra}")
    out = {}
    for key, value in global_state.items():
        if is_lora_a(key):
            out[key] = torch.cat([value, personal[key]], dim=0)
        elif is_lora_b(key):
            out[key] = torch.cat([value, personal[key]], dim=1)
        else:
            out[key] = value
    return out


def split(state: Mapping[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Undo ``join``: the global adapter (first ``rank`` components, and the head) and the personal slices."""
    global_state, personal = {}, {}
    for key, value in state.items():
        if is_lora_a(key):
            global_state[key], personal[key] = value[:rank].clone(), value[rank:].clone()
        elif is_lora_b(key):
            global_state[key], personal[key] = value[:, :rank].clone(), value[:, rank:].clone()
        else:
            global_state[key] = value
    return global_state, personal


def save_personal(path: Path, personal: Mapping[str, torch.Tensor], tag: str) -> None:
    """Write the personal slices to ``path`` (safetensors) with ``tag`` (which run and settings they belong to).
    Written to a temporary file first, so a node killed mid-write keeps the previous round's slices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in personal.items()}, str(tmp), metadata={"tag": tag})
    tmp.replace(path)


def load_personal(path: Path, tag: str) -> dict[str, torch.Tensor] | None:
    """The personal slices saved at ``path`` for ``tag``; None if there are none, or they belong to another
    run or other settings (then training starts them afresh)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        saved = (handle.metadata() or {}).get("tag")
    return load_file(str(path)) if saved == tag else None
