"""A region's personal LoRA, trained alongside the global adapter in every round and never sent
(``personalize.mode: dual``, after FedDPA's dual adapters).

The node trains one adapter of rank r + p whose first r components are the global adapter and whose last p are
its own: A = [A_g; A_p], B = [B_g, B_p] with the global scale alpha/r, so the model computes
x·(B_g·A_g + B_p·A_p)·alpha/r. With ``dual_train: joint`` training that adapter is one ordinary ``train_round``
on a wider LoRA (both parts see the same passes over the data: the personal part costs no extra epoch); with
``apart`` the global adapter trains alone and the slices then train with the global part held fixed
(``client.task.train_dual``). Before replying, the node cuts the personal slices off and keeps them, so the reply
has exactly the global adapter's keys and shapes.

The node keeps one file per round it trained (``round-NNN.safetensors``, tagged with what it belongs to), so a
round that is trained again after a failure starts from the round before it, and the model personalized at the
end pairs the run's best-round global adapter with the personal slices of that same round.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.config import MAX_LORA_RANK, LoraSettings, keeps_scale
from common.errors import FedlocaleError
from common.runfiles import PERSONAL_LORA_DIR, PERSONAL_LORA_SUFFIX, ROUND_PREFIX, round_name

TAG = "tag"  # file metadata: what the slices belong to (``personal_tag``)
ROUND = "round"  # file metadata: the round that trained them
FROM_ROUND = "from_round"  # file metadata: the round whose slices that training continued (0: fresh)
_ROUND_FILE = re.compile(re.escape(ROUND_PREFIX) + r"(\d{3,})" + re.escape(PERSONAL_LORA_SUFFIX))
_KEPT = f"{ROUND_PREFIX}*{PERSONAL_LORA_SUFFIX}"  # glob of the kept rounds


class PersonalStateError(FedlocaleError):
    """A kept personal LoRA cannot be used (unreadable, or not shaped like the global adapter); names the file."""


@dataclasses.dataclass(frozen=True)
class Slices:
    """Personal LoRA slices as kept on the node: the tensors and the round that trained them."""

    tensors: dict[str, torch.Tensor]
    round: int


def personal_tag(region: str, run_key: str, base: str, r: int, rank: int) -> str:
    """What a personal LoRA belongs to (region, run, base model, ranks); slices saved under another tag are
    never used."""
    return f"{region} run={run_key} base={base} r={r} p={rank}"


def is_lora_a(key: str) -> bool:
    """Whether ``key`` names a LoRA A matrix (rank × in) of a peft state dict."""
    return ".lora_A." in key


def is_lora_b(key: str) -> bool:
    """Whether ``key`` names a LoRA B matrix (out × rank) of a peft state dict."""
    return ".lora_B." in key


def widen(lora: LoraSettings, extra: int) -> LoraSettings:
    """The LoRA settings of the stacked adapter: rank r + ``extra`` with the same scale alpha/r."""
    if not keeps_scale(lora, extra):
        raise ValueError(
            f"personalize.local_r={extra}: lora.alpha * (lora.r + local_r) must be a multiple of lora.r to keep "
            f"the scale alpha/r, got alpha={lora.alpha}, r={lora.r}"
        )
    if lora.r + extra > MAX_LORA_RANK:
        raise ValueError(
            f"personalize.local_r={extra}: the stacked adapter's rank lora.r + local_r = {lora.r + extra} is above "
            f"{MAX_LORA_RANK}; lower one of them"
        )
    return dataclasses.replace(lora, r=lora.r + extra, alpha=lora.alpha * (lora.r + extra) // lora.r)


def init_personal(global_state: Mapping[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Fresh personal slices for the LoRA matrices of ``global_state``: A drawn as peft draws it (Kaiming
    uniform, a = √5), B = 0, so the stacked model starts as exactly the global model."""
    unsupported = [k for k in global_state if "lora_" in k and not (is_lora_a(k) or is_lora_b(k))]
    if unsupported:
        raise ValueError(f"personalize.mode dual stacks LoRA on linear layers only; this adapter has {unsupported[0]}")
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
    problem = mismatch(global_state, personal)
    if problem:
        raise ValueError(f"personal LoRA does not match the global adapter: {problem}")
    out = {}
    for key, value in global_state.items():
        if is_lora_a(key):
            out[key] = torch.cat([value, personal[key]], dim=0)
        elif is_lora_b(key):
            out[key] = torch.cat([value, personal[key]], dim=1)
        else:
            out[key] = value
    return out


def mismatch(
    global_state: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor], rank: int | None = None
) -> str | None:
    """Why ``personal`` cannot be stacked onto ``global_state`` (keys, shapes, or a rank other than ``rank``
    when given), or None."""
    lora_keys = {k for k in global_state if is_lora_a(k) or is_lora_b(k)}
    if set(personal) != lora_keys:
        missing, extra = sorted(lora_keys - set(personal))[:3], sorted(set(personal) - lora_keys)[:3]
        return f"missing {missing}, unexpected {extra}"
    for key, value in personal.items():
        shape, theirs = tuple(value.shape), tuple(global_state[key].shape)
        if value.dim() != 2 or (shape[1] != theirs[1] if is_lora_a(key) else shape[0] != theirs[0]):
            return f"{key} has shape {shape}, the global adapter's is {theirs}"
    ranks = sorted({v.shape[0] if is_lora_a(k) else v.shape[1] for k, v in personal.items()})
    if len(ranks) != 1 or (rank is not None and ranks != [rank]):
        return f"the slices have rank {ranks}" + (f", expected {rank}" if rank is not None else "")
    return None


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


def personal_folder(personal_dir: Path, region: str) -> Path:
    """Where a node with ``personal_dir`` keeps region ``region``'s personal LoRA, one file per round."""
    return personal_dir / region / PERSONAL_LORA_DIR


def round_file(folder: Path, server_round: int) -> Path:
    """Where the slices trained in ``server_round`` are kept."""
    return folder / f"{round_name(server_round)}{PERSONAL_LORA_SUFFIX}"


def save_personal(folder: Path, slices: Slices, tag: str, from_round: int) -> Path:
    """Write ``slices`` to their round's file in ``folder``, with ``tag`` and the round they continued from.
    Written to a temporary file first, so a node killed mid-write leaves no half file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = round_file(folder, slices.round)
    tmp = path.with_suffix(".tmp")
    metadata = {TAG: tag, ROUND: str(slices.round), FROM_ROUND: str(from_round)}
    save_file({k: v.contiguous() for k, v in slices.tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _read(path: Path, tag: str | None) -> tuple[dict[str, str], dict[str, torch.Tensor] | None]:
    """A kept file's metadata, and its tensors when its tag is ``tag``; one opening of the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            if tag is None or metadata.get(TAG) != tag:
                return metadata, None
            # copies: a tensor backed by the mapped file would change if the file were rewritten in place
            return metadata, {k: handle.get_tensor(k).clone() for k in handle.keys()}  # noqa: SIM118  (not a dict)
    except (SafetensorError, OSError) as err:
        raise PersonalStateError(f"{path}: not a readable personal LoRA file ({err})") from err


def read_metadata(path: Path) -> dict[str, str]:
    """A kept file's metadata (``TAG``, ``ROUND``, ``FROM_ROUND``)."""
    return _read(path, None)[0]


def latest_personal(
    folder: Path, before: int, tag: str, global_state: Mapping[str, torch.Tensor], rank: int | None = None
) -> Slices | None:
    """The newest slices in ``folder`` trained before round ``before`` under ``tag``, checked against the
    global adapter they will be stacked onto (and ``rank``, when given); None if there are none. A file that
    cannot be used raises ``PersonalStateError`` naming it."""
    kept = sorted(
        ((int(m.group(1)), p) for p in folder.glob(_KEPT) if (m := _ROUND_FILE.fullmatch(p.name))),
        reverse=True,
    )
    for server_round, path in (item for item in kept if item[0] < before):
        _, tensors = _read(path, tag)
        if tensors is None:
            continue
        problem = mismatch(global_state, tensors, rank)
        if problem:
            raise PersonalStateError(f"{path}: does not fit the global adapter: {problem}")
        return Slices(tensors, server_round)
    return None


def clear_personal(folder: Path) -> None:
    """Remove every kept round (and any half-written one) from ``folder``: a run's round 1 starts afresh."""
    for path in [*folder.glob(_KEPT), *folder.glob(f"{ROUND_PREFIX}*.tmp")]:
        path.unlink()
