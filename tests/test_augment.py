"""Tests for client.augment: the train-split augmentation ops, synonym files and settings validation."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from client import augment
from client.augment import augment_examples, augment_text, augment_train, tokenize
from common import augment_settings
from common.augment_settings import AugmentSettings
from common.config import build, load_config
from common.data import Example, RegionData
from common.errors import ConfigError
from tests.conftest import write_region

EN = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
ZH = "这本书的作者写得非常好我很喜欢读这样的小说"
EXAMPLES = [
    Example(EN, 0),
    Example("a very nice hotel room with a clean bathroom and friendly staff", 1),
    Example(ZH, 2),
    Example("酒店 房间 很 干净", 1),
    Example("ok", 3),
]


def _only(op: str, **extra: object) -> AugmentSettings:
    return AugmentSettings(ops=(op,), copies=1, p=0.3, **extra)  # type: ignore[arg-type]


def _runs(tokens: Sequence[str], mask: str) -> list[int]:
    """Lengths of the runs of consecutive mask tokens."""
    runs, current = [], 0
    for token in [*tokens, ""]:
        if token == mask:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


# ---------------------------------------------------------------------------------------------------------
# augment_examples


def test_same_seed_same_output_other_seed_differs() -> None:
    settings = AugmentSettings(copies=2, p=0.2)
    first = augment_examples(EXAMPLES, settings, seed=7)
    assert augment_examples(EXAMPLES, settings, seed=7) == first
    assert augment_examples(EXAMPLES, settings, seed=8) != first


def test_originals_first_then_copies_with_labels_kept() -> None:
    out = augment_examples(EXAMPLES, AugmentSettings(copies=2, p=0.2), seed=0)
    assert out[: len(EXAMPLES)] == EXAMPLES
    label_of = {ex.text: ex.label for ex in EXAMPLES}
    copies = out[len(EXAMPLES) :]
    assert 0 < len(copies) <= 2 * len(EXAMPLES)
    # every copy comes from one original; find it by the tokens it kept
    for ex in copies:
        source = max(EXAMPLES, key=lambda o: len(set(tokenize(o.text)) & set(tokenize(ex.text))))
        assert ex.label == label_of[source.text]


def test_copies_never_repeat_an_original_or_each_other() -> None:
    out = augment_examples(EXAMPLES, AugmentSettings(copies=5, p=0.2), seed=0)
    texts = [ex.text for ex in out]
    assert len(texts) == len(set(texts))
    # "ok" is one token: no op can change it, so no copy of it is kept
    assert [ex.text for ex in out].count("ok") == 1


def test_copies_zero_returns_the_originals() -> None:
    assert augment_examples(EXAMPLES, AugmentSettings(copies=0), seed=0) == EXAMPLES
    assert augment_examples([], AugmentSettings(copies=3), seed=0) == []


def test_a_copy_depends_only_on_its_own_text() -> None:
    settings = AugmentSettings(copies=1, p=0.2)
    alone = augment_examples(EXAMPLES[:1], settings, seed=3)
    together = augment_examples(EXAMPLES, settings, seed=3)
    assert alone[1] in together


# ---------------------------------------------------------------------------------------------------------
# augment_train: a region's data, train split only


def _region() -> RegionData:
    return RegionData(
        name="r1",
        train=list(EXAMPLES),
        val=[Example("a valid text about the hotel room", 1)],
        test=[Example("a test text about the quick fox", 0), Example("ok", 3)],
        dropped={"duplicate": 2},
    )


def test_augment_train_augments_train_only_and_counts() -> None:
    data = _region()
    settings = AugmentSettings(copies=2, p=0.2)
    out, counts = augment_train(data, settings, seed=4)
    assert out.train == augment_examples(EXAMPLES, settings, seed=4)
    assert (out.name, out.val, out.test, out.dropped) == (data.name, data.val, data.test, data.dropped)
    assert data.train == EXAMPLES  # the input is not changed
    # "ok" is one token: both of its copies are dropped, every other text gets its two
    assert counts == {
        "train_before": 5,
        "train_after": 13,
        "copies_requested": 10,
        "copies_added": 8,
        "copies_dropped": 2,
    }
    assert augment_train(data, settings, seed=4) == (out, counts)
    assert augment_train(data, settings, seed=5)[0].train != out.train


def test_augment_train_with_copies_zero_changes_nothing() -> None:
    data = _region()
    out, counts = augment_train(data, AugmentSettings(), seed=0)
    assert out == data
    assert counts == {
        "train_before": 5,
        "train_after": 5,
        "copies_requested": 0,
        "copies_added": 0,
        "copies_dropped": 0,
    }


def test_augment_train_passes_the_translator_on(tmp_path: Path) -> None:
    settings = AugmentSettings(ops=("backtranslate",), copies=1, translator=tmp_path, source_lang="it")
    fake = FakeTranslator()
    data = RegionData(name="r", train=[Example("one two three", 0)], test=[Example("x y", 1)])
    out, counts = augment_train(data, settings, seed=0, translator=fake)
    assert out.train == [Example("one two three", 0), Example("three two one", 0)]
    assert counts["copies_added"] == 1 and len(fake.calls) == 2


# ---------------------------------------------------------------------------------------------------------
# The ops


def test_delete_removes_tokens_and_keeps_order() -> None:
    for seed in range(30):
        out = tokenize(augment_text(EN, _only("delete"), random.Random(seed)))
        original = tokenize(EN)
        assert 1 <= len(out) < len(original)
        it = iter(original)
        assert all(token in it for token in out)  # a subsequence: nothing added, nothing moved


def test_delete_never_empties_a_text() -> None:
    settings = AugmentSettings(ops=("delete",), copies=1, p=0.99)
    for seed in range(30):
        assert augment_text("two words", settings, random.Random(seed)) in ("two", "words")


def test_swap_keeps_the_multiset_of_tokens() -> None:
    changed = 0
    for seed in range(30):
        out = augment_text(EN, _only("swap"), random.Random(seed))
        assert Counter(tokenize(out)) == Counter(tokenize(EN))
        changed += out != EN
    assert changed >= 28  # two equal tokens ("the") swapped is the only way to change nothing


@pytest.mark.parametrize("span", [1, 2, 3])
def test_mask_inserts_mask_tokens_in_spans_up_to_span(span: int) -> None:
    settings = _only("mask", span=span, mask_token="<mask>")
    seen_longest = 0
    for seed in range(40):
        out = tokenize(augment_text(EN, settings, random.Random(seed)))
        original = tokenize(EN)
        assert len(out) == len(original)  # one mask token per masked token
        runs = _runs(out, "<mask>")
        assert runs
        assert max(runs) <= span
        seen_longest = max(seen_longest, *runs)
        assert all(o == t for o, t in zip(original, out, strict=True) if o != "<mask>" and t != "<mask>")
        assert any(t != "<mask>" for t in out)
    assert seen_longest == span


def test_mask_never_masks_every_token() -> None:
    settings = AugmentSettings(ops=("mask",), copies=1, p=0.99, span=5)
    for seed in range(30):
        assert augment_text("two words", settings, random.Random(seed)) in ("[MASK] words", "two [MASK]")
        assert augment_text("one", settings, random.Random(seed)) == "one"


def test_ops_apply_in_a_fixed_order_whatever_the_listing() -> None:
    a = AugmentSettings(ops=("mask", "delete", "swap"), copies=1)
    b = AugmentSettings(ops=("swap", "delete", "mask"), copies=1)
    assert augment_text(EN, a, random.Random(1)) == augment_text(EN, b, random.Random(1))


# ---------------------------------------------------------------------------------------------------------
# Languages without spaces


def test_tokenize_splits_cjk_per_character_and_spaced_text_on_whitespace() -> None:
    assert tokenize("这本书很好") == ["这", "本", "书", "很", "好"]
    assert tokenize("日本語のテキスト") == list("日本語のテキスト")
    assert tokenize("I like 北京 a lot") == ["I", "like", "北", "京", "a", "lot"]
    assert tokenize("AI가 뭐지?") == ["AI가", "뭐지?"]  # Korean separates words with spaces
    assert tokenize("我用Python写") == ["我", "用", "Python", "写"]


@pytest.mark.parametrize("text", [EN, ZH, "我用Python写代码，很好", "AI가 뭐지?", "日本語のテキスト"])
def test_detokenize_round_trips(text: str) -> None:
    assert augment.detokenize(tokenize(text)) == text


def test_cjk_ops_work_per_character() -> None:
    deleted = augment_text(ZH, _only("delete"), random.Random(0))
    assert " " not in deleted
    assert len(deleted) < len(ZH)
    assert set(deleted) <= set(ZH)
    swapped = augment_text(ZH, _only("swap"), random.Random(0))
    assert sorted(swapped) == sorted(ZH) and swapped != ZH
    masked = augment_text(ZH, _only("mask", span=2), random.Random(0))
    tokens = tokenize(masked)
    assert "[MASK]" in tokens and len(tokens) == len(ZH)
    assert max(_runs(tokens, "[MASK]")) <= 2


# ---------------------------------------------------------------------------------------------------------
# Synonyms


def test_synonyms_from_tsv_replace_words_keeping_punctuation_and_case_fold(tmp_path: Path) -> None:
    path = tmp_path / "syn.tsv"
    path.write_text("# word, then synonyms\nquick\tfast\tspeedy\n\nDog\thound\ndog\tpooch\n", encoding="utf-8")
    assert augment_settings.load_synonyms(path) == {"quick": ("fast", "speedy"), "Dog": ("hound",), "dog": ("pooch",)}
    settings = AugmentSettings(ops=("synonym",), copies=1, p=0.99, synonyms=path)
    out = augment_text("The quick dog, quick!", settings, random.Random(0))
    assert out.split()[0] == "The"
    assert out.split()[1] in ("fast", "speedy")
    assert out.split()[2] == "pooch,"
    assert out.split()[3] in ("fast!", "speedy!")


def test_synonyms_in_text_without_spaces_use_longest_match(tmp_path: Path) -> None:
    path = tmp_path / "syn.json"
    path.write_text('{"小说": ["长篇故事"], "小": ["微"], "作者": ["写书人"]}', encoding="utf-8")
    settings = AugmentSettings(ops=("synonym",), copies=1, p=0.99, synonyms=path)
    assert augment_text("这本小说的作者", settings, random.Random(0)) == "这本长篇故事的写书人"


def test_synonym_file_bad_lines_are_reported_as_file_line(tmp_path: Path) -> None:
    path = tmp_path / "syn.tsv"
    path.write_text("good\tfine\nno tab here\n\tempty word\nlonely\t\t\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        augment_settings.load_synonyms(path)
    assert err.value.problems == [
        f"{path}:2: expected word<TAB>synonym, found no tab",
        f"{path}:3: empty word",
        f"{path}:4: no synonym for 'lonely'",
    ]
    with pytest.raises(ConfigError) as err:
        AugmentSettings(ops=("synonym",), copies=1, synonyms=path)
    assert err.value.problems[0] == f"synonyms: {path}:2: expected word<TAB>synonym, found no tab"


def test_json_synonym_file_problems_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "syn.json"
    path.write_text('{\n  "good": ["fine"],\n  "bad": "awful",\n  "": ["x"]\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        augment_settings.load_synonyms(path)
    assert err.value.problems == [
        f"{path}:3: synonyms of 'bad' must be a list of strings",
        f"{path}:4: empty word",
    ]
    path.write_text('{"good": ["fine"],\n "bad": [}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"syn\.json:2: bad JSON"):
        augment_settings.load_synonyms(path)
    path.write_text('["good", "fine"]', encoding="utf-8")
    with pytest.raises(ConfigError, match="expected an object"):
        augment_settings.load_synonyms(path)


# ---------------------------------------------------------------------------------------------------------
# Back-translation hook


class FakeTranslator:
    """Implements the Translator protocol ONLY to test the hook plumbing (batching, directions, fallback);
    it is no model: "translating" tags the text with the direction, and translating back strips the tag."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str, str]] = []

    def translate(self, texts: Sequence[str], src: str, tgt: str) -> list[str]:
        self.calls.append((list(texts), src, tgt))
        if tgt == "en":
            return [f"<{src}>{t}" for t in texts]
        # "back": a paraphrase of the original (word order reversed), or nothing for one text
        return ["" if "ok" in t else " ".join(reversed(t.split(">", 1)[1].split())) for t in texts]


def test_backtranslate_goes_through_the_pivot_in_two_batches(tmp_path: Path) -> None:
    fake = FakeTranslator()
    assert isinstance(fake, augment.Translator)
    examples = [Example("one two three", 0), Example("ok then", 1)]
    settings = AugmentSettings(ops=("backtranslate",), copies=2, translator=tmp_path, source_lang="it")
    out = augment_examples(examples, settings, seed=0, translator=fake)
    assert [(src, tgt) for _, src, tgt in fake.calls] == [("it", "en"), ("en", "it")]
    assert fake.calls[0][0] == ["one two three", "ok then"]
    # copy 2 equals copy 1 (no token op to vary it) and the failed translation falls back to the original
    assert out == [*examples, Example("three two one", 0)]


def test_backtranslate_then_token_ops(tmp_path: Path) -> None:
    settings = AugmentSettings(ops=("backtranslate", "delete"), copies=1, p=0.3, translator=tmp_path, source_lang="it")
    out = augment_examples([Example(EN, 0)], settings, seed=0, translator=FakeTranslator())
    assert len(out) == 2
    assert set(tokenize(out[1].text)) < set(tokenize(EN))


def test_translator_model_is_loaded_lazily_from_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Path] = []

    class Loaded(FakeTranslator):
        def __init__(self, folder: Path) -> None:
            super().__init__()
            loads.append(folder)

    monkeypatch.setattr(augment, "load_translator", Loaded)
    settings = AugmentSettings(ops=("backtranslate",), copies=1, translator=tmp_path, source_lang="it")
    assert loads == []  # building settings reads no model
    augment_examples([Example("one two", 0)], settings, seed=0)
    assert loads == [tmp_path]
    # the real hook only stores the folder until it translates
    hook = augment.Seq2SeqTranslator(tmp_path / "absent")
    assert hook._loaded is None


# ---------------------------------------------------------------------------------------------------------
# Validation


def test_validation_names_every_bad_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        AugmentSettings(ops=("delete", "shuffle", "delete"), copies=-1, p=1.5, span=0, mask_token="a b")
    names = [p.split(":", 1)[0] for p in err.value.problems]
    assert names == ["ops", "ops", "mask_token", "copies", "p", "span"]
    assert "unknown op 'shuffle'" in err.value.problems[0]


def test_backtranslate_needs_a_translator_and_languages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        AugmentSettings(ops=("backtranslate",), copies=1)
    assert err.value.problems == [
        "translator: required when ops lists 'backtranslate'",
        "source_lang: required when ops lists 'backtranslate'",
    ]
    with pytest.raises(ConfigError, match="translator: no such folder"):
        AugmentSettings(ops=("backtranslate",), copies=1, translator=tmp_path / "nope", source_lang="zh")
    with pytest.raises(ConfigError, match="pivot_lang: must differ"):
        AugmentSettings(ops=("backtranslate",), copies=1, translator=tmp_path, source_lang="en")


def test_synonym_op_needs_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="synonyms: required"):
        AugmentSettings(ops=("synonym",), copies=1)
    with pytest.raises(ConfigError, match=r"synonyms: .*cannot read"):
        AugmentSettings(ops=("synonym",), copies=1, synonyms=tmp_path / "missing.tsv")


def test_built_from_yaml_like_data_by_the_config_builder(tmp_path: Path) -> None:
    settings = build(AugmentSettings, {"ops": ["delete", "mask"], "copies": 2, "p": 0.2, "span": 3})
    assert settings == AugmentSettings(ops=("delete", "mask"), copies=2, p=0.2, span=3)
    with pytest.raises(ConfigError) as err:
        build(AugmentSettings, {"ops": ["backtranslate"], "copies": "two", "p": 0})
    assert err.value.problems == [
        "copies: must be int, got str 'two'",
        "p: must be in (0, 1), got 0.0",
        "translator: required when ops lists 'backtranslate'",
        "source_lang: required when ops lists 'backtranslate'",
    ]


def test_target_language_token_for_multilingual_tokenizers() -> None:
    class M2M:  # M2M100 names a language by code and maps it with get_lang_id
        def get_lang_id(self, lang: str) -> int:
            return {"fr": 7}[lang]

    class NLLB:  # NLLB / mBART-50 have the language codes as vocabulary tokens
        def get_vocab(self) -> dict[str, int]:
            return {"fra_Latn": 9, "hello": 1}

    assert augment._language_token_id(M2M(), "fr") == 7
    assert augment._language_token_id(NLLB(), "fra_Latn") == 9
    assert augment._language_token_id(NLLB(), "xx") is None


# ---------------------------------------------------------------------------------------------------------
# A region's `augment` in the run config


def _run_yaml(root: Path, augment_lines: str) -> Path:
    """A run config with two regions; ``augment_lines`` (indented under region a) goes after a's data line."""
    for name in ("a", "b"):
        write_region(root / "data" / name, 8, 8, seed=len(name))
    (root / "conf").mkdir(exist_ok=True)
    path = root / "conf" / "run.yaml"
    path.write_text(
        "labels: [neg, pos]\n"  # 1
        "regions:\n"  # 2
        "  - name: a\n"  # 3
        "    data: ../data/a\n" + augment_lines + "  - name: b\n    data: ../data/b\n",  # 4
        encoding="utf-8",
    )
    return path


def test_region_augment_is_read_with_paths_relative_to_the_config(tmp_path: Path) -> None:
    path = _run_yaml(
        tmp_path,
        "    augment:\n"
        "      ops: [synonym, delete, mask]\n"
        "      copies: 2\n"
        "      p: 0.2\n"
        "      mask_token: <mask>\n"
        "      synonyms: syn.tsv\n",
    )
    (path.parent / "syn.tsv").write_text("good\tfine\n", encoding="utf-8")
    cfg = load_config(path)
    a, b = cfg.regions
    assert a.augment == AugmentSettings(
        ops=("synonym", "delete", "mask"), copies=2, p=0.2, mask_token="<mask>", synonyms=path.parent / "syn.tsv"
    )
    assert b.augment is None
    # the same settings through --set, on a region that has none
    cfg = load_config(path, ["regions.1.augment={copies: 1}"])
    assert cfg.regions[1].augment == AugmentSettings(copies=1)


def test_bad_region_augment_fields_are_reported_as_file_line_path(tmp_path: Path) -> None:
    path = _run_yaml(
        tmp_path,
        "    augment:\n"  # 5
        "      ops: [delete, shuffle]\n"  # 6
        "      copies: 50\n"  # 7
        "      p: often\n"  # 8
        "      colour: blue\n"  # 9
        "      synonyms: missing.tsv\n",  # 10
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    p = str(path)
    assert err.value.problems == [
        f"{p}:6: regions[0].augment.ops: unknown op 'shuffle'; known: {', '.join(augment_settings.OPS)}",
        f"{p}:7: regions[0].augment.copies: must be in [0, 20], got 50",
        f"{p}:8: regions[0].augment.p: must be float, got str 'often'",
        f"{p}:9: regions[0].augment.colour: unknown key (known: copies, mask_token, ops, p, pivot_lang, source_lang, "
        "span, synonyms, translator)",
        f"{p}:10: regions[0].augment.synonyms: {path.parent / 'missing.tsv'}: cannot read: No such file or directory",
    ]


def test_bad_line_of_a_region_synonym_file_is_named(tmp_path: Path) -> None:
    path = _run_yaml(tmp_path, "    augment:\n      ops: [synonym]\n      copies: 1\n      synonyms: syn.tsv\n")
    syn = path.parent / "syn.tsv"
    syn.write_text("good\tfine\nno tab here\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [
        f"{path}:8: regions[0].augment.synonyms: {syn}:2: expected word<TAB>synonym, found no tab"
    ]
