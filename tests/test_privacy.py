"""The membership-inference audit: its metrics against brute force, its attacks on a tiny model that memorised
its members (AUC well above 0.5) and on one that never saw them (≈ 0.5), and the CLI's refusals."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from assets.tiny import FILLER, NEG_WORDS, POS_WORDS
from client.membership import (
    LOSS,
    REFERENCE,
    Predictor,
    Scored,
    auc,
    audit_region,
    audit_scored,
    average_ranks,
    bootstrap_auc,
    reference_scores,
    resolvable,
    roc_curve,
    score,
    swap_state,
    tpr_at_fpr,
)
from common.config import AuditSettings
from common.data import Example
from common.errors import ConfigError, InputError
from fedlocale.cli import main

# ------------------------------------------------------------------------------------------------- metrics


def brute_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Every (member, non-member) pair: 1 when the member scores higher, ½ on a tie."""
    pairs = members[:, None] - nonmembers[None, :]
    return float(((pairs > 0) + 0.5 * (pairs == 0)).mean())


def brute_tpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """The best TPR of "member if score ≥ t" over every t (and t = ∞) whose FPR is at most ``fpr``."""
    best = 0.0
    for t in np.concatenate([members, nonmembers]):
        if np.mean(nonmembers >= t) <= fpr:
            best = max(best, float(np.mean(members >= t)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_by_ranks_equals_the_pair_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    members = np.round(rng.normal(0.3, 1.0, 37), 1)  # rounding makes many ties, across and within the sides
    nonmembers = np.round(rng.normal(0.0, 1.0, 53), 1)
    assert auc(members, nonmembers) == pytest.approx(brute_auc(members, nonmembers), abs=1e-12)
    assert auc(members, members) == pytest.approx(0.5)
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert np.isnan(auc(np.array([]), nonmembers))


def test_average_ranks_give_ties_their_mean_rank() -> None:
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_tpr_at_fpr_and_roc_equal_brute_force(fpr: float) -> None:
    rng = np.random.default_rng(7)
    members = np.round(rng.normal(1.0, 1.0, 150), 2)
    nonmembers = np.round(rng.normal(0.0, 1.0, 400), 2)
    assert tpr_at_fpr(members, nonmembers, fpr) == pytest.approx(brute_tpr(members, nonmembers, fpr))
    fprs, tprs = roc_curve(members, nonmembers)
    assert fprs[0] == 0 and tprs[0] == 0 and fprs[-1] == 1 and tprs[-1] == 1
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(tprs) >= 0)
    # the trapezoid area under the ROC is the AUC (ties become the diagonal segments)
    assert np.trapezoid(tprs, fprs) == pytest.approx(auc(members, nonmembers), abs=1e-12)


def test_tpr_at_an_fpr_the_nonmembers_cannot_resolve_is_none() -> None:
    members, nonmembers = np.arange(50.0), np.arange(200.0) - 100
    assert not resolvable(0.001, 200) and resolvable(0.001, 1000) and resolvable(0.01, 100)
    assert tpr_at_fpr(members, nonmembers, 0.001) is None
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(brute_tpr(members, nonmembers, 0.01))


def test_bootstrap_interval_is_seeded_and_holds_the_auc() -> None:
    rng = np.random.default_rng(3)
    members, nonmembers = rng.normal(0.5, 1, 80), rng.normal(0, 1, 120)
    first = bootstrap_auc(members, nonmembers, rounds=300, seed=11)
    assert first == bootstrap_auc(members, nonmembers, rounds=300, seed=11)
    assert first != bootstrap_auc(members, nonmembers, rounds=300, seed=12)
    assert first[0] < auc(members, nonmembers) < first[1]


def test_a_model_audited_twice_gets_the_same_numbers_and_the_others_keep_theirs() -> None:
    """A region that serves the global adapter has it as its served model too: the same scores must give the same
    interval, not a second bootstrap seeded by its position (an auditor would read two intervals as two models)."""
    rng = np.random.default_rng(5)

    def scored(shift: float) -> Scored:
        return Scored(rng.normal(shift, 1, 40), rng.normal(0, 1, 40))

    delivered, personalized, update, ref = scored(0.4), scored(0.2), scored(0.8), scored(0.1)
    copy = Scored(delivered.members.copy(), delivered.nonmembers.copy())
    same = audit_scored("r", {"global": delivered, "served": copy, "update": update}, [ref], bootstrap=300, seed=7)
    numbers = same.to_json()["models"]
    assert numbers["served"] == numbers["global"]
    own = audit_scored(
        "r", {"global": delivered, "served": personalized, "update": update}, [ref], bootstrap=300, seed=7
    )
    own_numbers = own.to_json()["models"]
    assert own_numbers["served"] != own_numbers["global"]  # a served model of its own is audited on its own
    # and the other models' numbers do not depend on whether the served one was the global one
    assert (own_numbers["global"], own_numbers["update"]) == (numbers["global"], numbers["update"])


def test_reference_score_is_the_log_likelihood_ratio_over_the_mean_reference() -> None:
    logp = np.log(np.array([0.9, 0.5, 0.2]))
    refs = np.log(np.array([[0.8, 0.5, 0.1], [0.6, 0.3, 0.3]]))
    expected = np.log(np.array([0.9 / 0.7, 0.5 / 0.4, 0.2 / 0.2]))
    assert reference_scores(logp, refs) == pytest.approx(expected)
    with pytest.raises(ValueError):
        reference_scores(logp, np.zeros((0, 3)))


# ----------------------------------------------------------------------------------- attacks on a tiny model

VOCAB = FILLER + POS_WORDS + NEG_WORDS


def random_records(n: int, seed: int) -> list[Example]:
    """Distinct texts with labels drawn at random: a model can only get them right by memorising them."""
    rng = random.Random(seed)
    return [Example(" ".join(rng.choice(VOCAB) for _ in range(10)), rng.randrange(2)) for _ in range(n)]


def trained(tiny_bert: Path, examples: list[Example] | None, seed: int = 0) -> Predictor:
    from client.train import train_local
    from common.config import LoraSettings, ModelSettings, TrainSettings
    from common.model import build_model

    loaded = build_model(ModelSettings(base=str(tiny_bert), max_length=32), LoraSettings(r=8, alpha=16), ("a", "b"), 0)
    if examples:
        settings = TrainSettings(lr=2e-2, epochs=60, batch_size=8, weight_decay=0.0, threads=1)
        train_local(loaded.model, loaded.tokenizer, examples, settings, max_length=32, seed=seed)
    loaded.model.eval()
    return Predictor(loaded.model, loaded.tokenizer, 32)


@pytest.fixture(scope="module")
def records() -> tuple[list[Example], list[Example], list[Example]]:
    """Members, non-members, and a third set the 'never saw them' model trains on."""
    return random_records(48, 1), random_records(48, 2), random_records(48, 3)


def test_an_overfit_model_is_caught_and_one_that_never_saw_the_members_is_not(
    tiny_bert: Path, records: tuple[list[Example], list[Example], list[Example]]
) -> None:
    members, nonmembers, other = records
    initial = trained(tiny_bert, None)
    overfit = trained(tiny_bert, members)
    unseen = trained(tiny_bert, other)
    result = audit_region(
        "north", members, nonmembers, {"overfit": overfit, "unseen": unseen}, [initial], bootstrap=500, seed=0
    )
    for name in (LOSS, REFERENCE):
        hit = result.results["overfit"][name]
        assert hit.auc > 0.8, (name, hit.auc)
        assert hit.auc_low > 0.6
        miss = result.results["unseen"][name]
        assert abs(miss.auc - 0.5) < 0.15, (name, miss.auc)
        assert miss.auc_low < 0.5 < miss.auc_high
    assert result.members == 48 and result.nonmembers == 48
    # 48 non-members resolve neither 1 % nor 0.1 % FPR: both are reported as not measurable
    assert result.results["overfit"][LOSS].tpr == {0.01: None, 0.001: None}
    body = result.to_json()
    assert set(body["models"]) == {"overfit", "unseen"}
    assert set(body["models"]["overfit"][LOSS]) == {"auc", "auc_ci95", "tpr_at_fpr"}


# ------------------------------------------------------------------------------------------------ the CLI


class _Refused(InputError):
    """A caller's own error type, as the node audit and the run-folder audit each have one."""


def test_swap_state_loads_a_same_shaped_adapter_and_names_one_that_does_not_fit(
    tiny_bert: Path, records: tuple[list[Example], list[Example], list[Example]]
) -> None:
    from common.config import LoraSettings, ModelSettings
    from common.model import adapter_state, build_model

    members, nonmembers, _ = records
    settings = ModelSettings(base=str(tiny_bert), max_length=32)
    predictor = trained(tiny_bert, None)  # head seeded with 0
    other = build_model(settings, LoraSettings(r=8, alpha=16), ("a", "b"), seed=1).model
    other.eval()
    expected = score(Predictor(other, predictor.tokenizer, 32), members[:8], nonmembers[:8], 8)
    assert not np.allclose(score(predictor, members[:8], nonmembers[:8], 8).members, expected.members)
    swap_state(predictor, adapter_state(other), "round-001", _Refused, "this run's")
    for name, tensor in adapter_state(other).items():  # every tensor, not only the head that moves the scores
        assert torch.equal(adapter_state(predictor.model)[name], tensor), name
    swapped = score(predictor, members[:8], nonmembers[:8], 8)
    np.testing.assert_allclose(swapped.members, expected.members, rtol=1e-5)
    np.testing.assert_allclose(swapped.nonmembers, expected.nonmembers, rtol=1e-5)
    fewer = LoraSettings(r=8, alpha=16, target_modules=("query",))  # LoRA on fewer modules: other tensors
    elsewhere = adapter_state(build_model(settings, fewer, ("a", "b"), 0).model)
    with pytest.raises(_Refused, match=r"^elsewhere: not an adapter of this run's shape \(adapter state"):
        swap_state(predictor, elsewhere, "elsewhere", _Refused, "this run's")
    # the same tensors at another rank: torch would fail on the sizes; the caller's error names them instead
    smaller = adapter_state(build_model(settings, LoraSettings(r=4, alpha=8), ("a", "b"), 0).model)
    with pytest.raises(_Refused, match=r"^rank-4: not an adapter of this run's shape \(.*shapes: .*lora_A"):
        swap_state(predictor, smaller, "rank-4", _Refused, "this run's")


def test_cli_refuses_what_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "privacy", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["audit", "privacy", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "summary.json" in err and "Traceback" not in err


def _fake_run(tmp_path: Path, tiny_bert: Path, two_regions: Path, rounds: int) -> Path:
    """A folder shaped like a finished run (summary, config, adapter, checkpoints), without training."""
    import json

    import yaml

    from common.config import load_config
    from tests.conftest import tiny_config

    run = tmp_path / "run"
    run.mkdir()
    cfg_path = tiny_config(tmp_path / "cfg.yaml", tiny_bert, two_regions)
    shutil.copy(cfg_path, run / "config.yaml")
    cfg = load_config(run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"regions": {r: {} for r in cfg.region_names}}))
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    for r in range(1, rounds + 1):
        (run / "checkpoints" / f"round-{r:03d}").mkdir(parents=True)
    (run / "checkpoints").mkdir(exist_ok=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["rounds"] == 2
    return run


def test_cli_refuses_an_unknown_region_and_missing_checkpoints(
    tmp_path: Path, tiny_bert: Path, two_regions: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _fake_run(tmp_path, tiny_bert, two_regions, rounds=0)
    assert main(["audit", "privacy", str(run), "--region", "atlantis"]) == 2
    err = capsys.readouterr().err
    assert "no region 'atlantis'" in err and "north, south" in err
    assert main(["audit", "privacy", str(run)]) == 2
    err = capsys.readouterr().err
    assert "checkpoints: holds no round" in err
    shutil.rmtree(run / "checkpoints")
    assert main(["audit", "privacy", str(run)]) == 2
    assert "checkpoints: no such folder" in capsys.readouterr().err


def test_members_and_nonmembers_have_the_same_label_mix() -> None:
    """A score that reflects only the label (a model predicting one class) must not tell members from
    non-members: each label gets as many of each, min(train, test), even when the splits' label mixes differ
    (the demo's train splits are 65/35, its test splits 50/50)."""
    from client.membership import audit_records

    train = [Example(f"t{i}", 1) for i in range(30)] + [Example(f"u{i}", 0) for i in range(10)]
    test = [Example(f"s{i}", i % 2) for i in range(40)]  # 20 of each label
    records = audit_records("north", train, test, seed=0)
    by_label = [[ex.label for ex in side].count(1) for side in (records.members, records.nonmembers)]
    assert by_label == [20, 20] and len(records.members) == len(records.nonmembers) == 30
    one_class = {1: -0.1, 0: -2.3}  # log p(true label) of a model that always says label 1
    members = np.array([one_class[ex.label] for ex in records.members])
    nonmembers = np.array([one_class[ex.label] for ex in records.nonmembers])
    assert auc(members, nonmembers) == pytest.approx(0.5)
    assert {ex.text for ex in records.members} <= {ex.text for ex in train}
    assert audit_records("north", train, test, seed=0) == records  # seeded


def test_the_references_are_the_latest_rounds_before_the_delivered_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """By default the audit calibrates against the ``audit.references`` rounds just before the delivered adapter
    (each costs a pass over every record; a 12-round run would otherwise take 11); explicit rounds must be
    earlier ones."""
    from runfolder.privacy import PrivacyAuditError, pick_references

    assert pick_references(tmp_path, [1, 2, 3, 4, 5], None, 2) == [4, 5]
    assert pick_references(tmp_path, [0], None, 2) == [0]  # only the initial adapter before round 1's
    assert pick_references(tmp_path, [1, 2, 3], [1, 3], 2) == [1, 3]
    with pytest.raises(PrivacyAuditError, match=r"reference round\(s\) \[4\] not among the earlier rounds kept"):
        pick_references(tmp_path, [1, 2, 3], [1, 4], 2)
    with pytest.raises(ConfigError, match="references: must be a whole number in"):
        AuditSettings(references=0)
    assert main(["audit", "privacy", str(tmp_path), "--references", "0"]) == 2
    assert "--references 0: must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ canaries


def test_exposure_is_bits_of_rank_among_the_candidates() -> None:
    from client.canaries import exposure

    candidates = np.arange(7.0)  # 7 candidates: log2(8) = 3 bits at most
    assert exposure(10.0, candidates) == pytest.approx(3.0)  # ranked first
    assert exposure(-1.0, candidates) == pytest.approx(0.0)  # ranked last of 8
    assert exposure(5.5, candidates) == pytest.approx(3.0 - 1.0)  # rank 2 (only 6.0 above)
    assert exposure(6.0, candidates) == pytest.approx(3.0 - 1.0)  # a tie counts above: never inflates


def test_canaries_are_a_wrapper_on_the_node_pipeline(two_regions: Path) -> None:
    from client.canaries import make_canaries, with_canaries
    from client.pipeline import node_data
    from common.config import DataSettings

    plain = node_data("north", two_regions / "north", ("neg", "pos"), seed=0, settings=DataSettings())
    wrapped = with_canaries(node_data, 3)(
        "north", two_regions / "north", ("neg", "pos"), seed=0, settings=DataSettings()
    )
    expected = make_canaries("north", 3, 2, 0)
    assert wrapped.train == [*plain.train, *(c.example for c in expected)]
    assert wrapped.data.train == plain.data.train  # the real examples (the guard's count, the FedAvg weight)
    assert make_canaries("north", 3, 2, 0) == expected and make_canaries("south", 3, 2, 0) != expected
    assert all(c.example not in c.candidates and len(c.candidates) == 100 for c in expected)


def test_a_model_trained_on_its_canaries_exposes_them(tiny_bert: Path) -> None:
    from client.canaries import exposures, make_canaries
    from client.membership import record_logp

    canaries = make_canaries("north", 8, 2, 0, alphabet=VOCAB, template="{}", candidates=63)
    background = random_records(24, 5)
    # each canary inserted 4 times, as The Secret Sharer does to measure memorisation in few epochs
    seen = trained(tiny_bert, [*background, *(c.example for c in canaries for _ in range(4))])
    unseen = trained(tiny_bert, background)

    def scorer(p: Predictor):  # type: ignore[no-untyped-def]
        return lambda examples: record_logp(p.model, p.tokenizer, examples, max_length=32, batch_size=64)

    high, low = exposures(scorer(seen), canaries), exposures(scorer(unseen), canaries)
    assert high["max_possible"] == pytest.approx(6.0)
    assert high["mean_exposure"] > 3.0, high
    assert low["mean_exposure"] < high["mean_exposure"] - 1.0, (low, high)


# ------------------------------------------------------------------------------- end to end, in a simulation


@pytest.mark.slow
def test_simulate_audits_privacy_with_kept_updates_and_canaries(
    tiny_bert: Path, two_regions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from tests.conftest import tiny_config

    cfg = tiny_config(
        tmp_path / "run.yaml",
        tiny_bert,
        two_regions,
        train={"lr": 3e-2, "epochs": 3, "batch_size": 8, "threads": 1},
        audit={"keep_updates": True, "privacy": True, "canaries": 2},
    )
    out = tmp_path / "out"
    assert main(["simulate", str(cfg), "--out", str(out)]) == 0
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    # the global adapter is the best round's: round 1's references the initial adapter, round 2's round 1
    assert privacy["references"] in (["checkpoints/round-001"], ["initial global adapter (round 0)"])
    for region in ("north", "south"):
        body = privacy["regions"][region]
        assert set(body["models"]) == {"global", "served", "update"}
        assert body["served"] == "global"
        # per label as many members as non-members (audit_records): at most the 48 test records
        assert 0 < body["members"] == body["nonmembers"] <= 48
        for attacks in body["models"].values():
            assert set(attacks) == {"loss", "reference"}
            low, high = attacks["reference"]["auc_ci95"]
            assert 0.0 <= low <= attacks["reference"]["auc"] <= high <= 1.0
        assert set(body["canaries"]) == {"global", "served", "update"}
        assert body["canaries"]["update"]["canaries"] == 2
    report = (out / "audit" / "privacy-report.md").read_text()
    assert "## north" in report and "own last update" in report and "do not mean" in report
    assert (out / "audit" / "privacy-roc-south.png").stat().st_size > 1000
    # the CLI audits one region again and keeps the other's numbers
    before = privacy["regions"]["south"]
    capsys.readouterr()
    assert main(["audit", "privacy", str(out), "--region", "north", "--bootstrap", "200"]) == 0
    again = json.loads((out / "summary.json").read_text())["privacy"]
    assert again["bootstrap"] == 200 and again["regions"]["south"] == before
