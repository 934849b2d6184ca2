"""EarlyStopper: the best round of the example-weighted validation metric, and when to stop."""

from __future__ import annotations

from common.stopping import validated_rounds
from server.federation import EarlyStopper


def test_stops_after_patience_rounds_without_improvement() -> None:
    stopper = EarlyStopper(patience=2)
    decisions = [stopper.update(r, v) for r, v in enumerate([0.5, 0.6, 0.59, 0.6], start=1)]
    # round 2 is best; rounds 3 and 4 bring nothing better -> stop at round 4
    assert decisions == [False, False, False, True]
    assert stopper.best_round == 2 and stopper.best_value == 0.6


def test_lower_is_better_for_loss_and_min_delta_counts() -> None:
    stopper = EarlyStopper(patience=1, higher_is_better=False, min_delta=0.05)
    assert not stopper.update(1, 0.70)
    assert stopper.update(2, 0.68)  # better by less than min_delta: no improvement
    assert stopper.best_round == 1


def test_without_patience_never_stops_and_tracks_best() -> None:
    stopper = EarlyStopper(patience=None)
    assert not any(stopper.update(r, v) for r, v in enumerate([0.3, 0.9, 0.1], start=1))
    assert stopper.best_round == 2


def test_without_validation_data_the_newest_round_is_best() -> None:
    stopper = EarlyStopper(patience=3)
    for r in (1, 2, 3):
        assert not stopper.update(r, None)
    assert stopper.best_round == 3


def test_patience_is_not_exhausted_before_the_first_round_is_recorded() -> None:
    # with early_stopping.every the first rounds are not validated; a resumed run must not stop on them
    stopper = EarlyStopper(patience=1)
    assert not stopper.exhausted(3)
    assert not stopper.update(4, 0.5)
    assert stopper.exhausted(5)


def test_the_validated_rounds_are_every_kth_and_the_last() -> None:
    assert validated_rounds(12, 3) == [3, 6, 9, 12]
    assert validated_rounds(10, 3) == [3, 6, 9, 10]
    assert validated_rounds(2, 5) == [2]
    assert validated_rounds(4, 1) == [1, 2, 3, 4]
