"""Loading a peft adapter folder (``common.model.save_adapter``'s output: a run's ``adapter/``, a node's
``personalized/``, an unmerged export) onto its base model, with the checks that make a damaged folder an error
naming it rather than a model that silently classifies with a random head.

Shared by the operator's side (``runfolder.export.load_exported``) and the node's own privacy audit
(``client.node_audit``), which loads the personalized model a node serves; it lives here because runfolder may
import client and not the reverse.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from common.errors import InputError
from common.model import LABELS_FILE, POOLING_KEY, classifier_kwargs, head_modules, mean_pooling, quiet_loading

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# What loading a damaged model folder raises in transformers, peft and safetensors (OSError: transformers' "not a
# valid JSON file"; ValueError/KeyError/TypeError: configs and tokenizers with wrong fields; SafetensorError:
# truncated weights; RuntimeError: torch state dicts that do not fit the model).
DAMAGED_MODEL_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, UnicodeDecodeError)


class AdapterFolderError(InputError):
    """An adapter folder that does not load; the message names the folder or file and why."""


def reason(err: BaseException) -> str:
    """An exception's message on one line (transformers' messages run over several)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def is_adapter(folder: Path) -> bool:
    """Whether ``folder`` is a peft adapter folder (it has ``adapter_config.json``)."""
    return (folder / ADAPTER_CONFIG).is_file()


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder's weights file, by the names peft saved them under."""
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise AdapterFolderError(f"{folder}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    try:
        if weights[0].suffix == ".safetensors":
            return load_file(str(weights[0]))
        loaded = torch.load(str(weights[0]), map_location="cpu", weights_only=True)
    except DAMAGED_MODEL_ERRORS as err:  # truncated or not a weights file at all
        raise AdapterFolderError(f"{weights[0]}: damaged adapter weights ({reason(err)})") from err
    if not isinstance(loaded, dict):
        raise AdapterFolderError(f"{weights[0]}: not a state dict")
    return loaded


def saved_pooling(folder: Path) -> object:
    """The pooling an adapter folder's ``labels.json`` names (``common.model.save_adapter``); "cls" when it
    names none or the folder has no such file (the architecture's own pooler). A damaged file is the caller's
    to report: it reads the labels from it too."""
    try:
        meta = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "cls"
    return meta.get(POOLING_KEY, "cls") if isinstance(meta, dict) else "cls"


def load_peft_folder(folder: Path, base_path: str, labels: Sequence[str]) -> PeftModel:
    """The base model at ``base_path`` with ``labels`` as its classes, carrying the adapter of ``folder`` (which
    must hold the trained head: the base's own or a random one would classify instead), pooled as the folder's
    ``labels.json`` says (``saved_pooling``; ``model.pooling: mean``). Errors of a damaged
    folder propagate as transformers, peft and safetensors raise them (``DAMAGED_MODEL_ERRORS``); the caller names
    the folder."""
    # Whatever head the base checkpoint has (none, another size, the same size) is replaced by the adapter's.
    try:
        with quiet_loading():  # the adapter brings the head; the base's "newly initialised" report is noise
            base = AutoModelForSequenceClassification.from_pretrained(base_path, **classifier_kwargs(tuple(labels)))
    except DAMAGED_MODEL_ERRORS as err:  # not the folder's fault: its base is missing or unreadable here
        raise AdapterFolderError(
            f"{folder}: its base model {base_path!r} does not load on this machine ({reason(err)}); the base is the "
            f"run's model.base when the folder or its run names one, else {ADAPTER_CONFIG}'s base_model_name_or_path"
        ) from err
    pooling = saved_pooling(folder)
    if pooling == "mean":  # the head was trained on mean-pooled features: stock peft would feed it the pooler's
        problem = mean_pooling(base)
        if problem:
            raise AdapterFolderError(f"{folder / LABELS_FILE}: {POOLING_KEY} mean: {problem}")
    elif pooling != "cls":
        raise AdapterFolderError(f"{folder / LABELS_FILE}: {POOLING_KEY} must be cls or mean, got {pooling!r}")
    saved = adapter_weights(folder)
    head = [name for name in head_modules(str(base.config.model_type)) if hasattr(base, name)]
    for name in head:
        if not any(key.startswith(f"base_model.model.{name}.") for key in saved):
            raise AdapterFolderError(
                f"{folder}: the adapter holds no trained weights for the head module {name!r}; "
                "the base model's own (or a random) head would classify instead"
            )
    _check_head_size(folder, saved, base, head, labels)
    with warnings.catch_warnings():
        # peft calls a transformers API that transformers 5 renamed; the warning is theirs, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # peft opens the base path the adapter recorded (often another machine's) only to see whether the
        # vocabulary was resized; fedlocale never resizes it, and the base actually used is ``base_path``
        warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
        model = PeftModel.from_pretrained(base, str(folder))
        # and the head that classifies is the adapter's, tensor for tensor
        state = get_peft_model_state_dict(model)
    mine = [k for k in state if k.split(".")[2:3] and k.split(".")[2] in head]
    differ = [k for k in mine if k not in saved or not torch.equal(state[k].cpu(), saved[k].to(state[k].dtype))]
    if differ:
        raise AdapterFolderError(f"{folder}: the head weights {differ[:3]} did not load from the adapter")
    model.eval()
    return model


def _check_head_size(
    folder: Path, saved: dict[str, torch.Tensor], base: torch.nn.Module, head: Sequence[str], labels: Sequence[str]
) -> None:
    """Refuse, naming ``labels.json``, a label list whose size does not fit the adapter's trained head (peft would
    report a size mismatch deep in its state dict, naming neither file)."""
    shapes = {name: tuple(param.shape) for name, param in base.state_dict().items()}
    prefix = "base_model.model."
    for key, tensor in saved.items():
        name = key.removeprefix(prefix)
        if name.split(".")[0] in head and name in shapes and tuple(tensor.shape) != shapes[name]:
            raise AdapterFolderError(
                f"{folder / LABELS_FILE}: {len(labels)} label(s) {list(labels)}, but the adapter's trained head "
                f"{name} has shape {list(tensor.shape)}: the labels do not belong to this adapter"
            )
