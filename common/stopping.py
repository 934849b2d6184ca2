"""The best round (or checkpoint) of a validation metric, and when to stop: the federation's early stopping and
the local-only model's best checkpoint (``client.local_only``) read it alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopper:
    """Tracks the best round of a validation metric and says when ``patience`` rounds brought nothing."""

    patience: int | None
    higher_is_better: bool = True
    min_delta: float = 0.0
    best_round: int = 0
    best_value: float | None = None

    def update(self, server_round: int, value: float | None) -> bool:
        """Record a round's value; True when training should stop."""
        if value is not None:
            better = self.best_value is None or (
                value > self.best_value + self.min_delta
                if self.higher_is_better
                else value < self.best_value - self.min_delta
            )
            if better:
                self.best_round, self.best_value = server_round, value
        elif self.best_value is None:
            self.best_round = server_round  # nothing to compare: the newest model is the best we know
        return self.exhausted(server_round)

    def exhausted(self, server_round: int) -> bool:
        """True when ``patience`` rounds up to ``server_round`` brought nothing better; never before the first
        round was recorded (with early_stopping.every the first rounds are not validated)."""
        return self.patience is not None and self.best_round > 0 and server_round - self.best_round >= self.patience


def validated_rounds(rounds: int, every: int) -> list[int]:
    """The rounds (1-based, of ``rounds``) after which the model is validated: every ``every``-th and the last."""
    return [r for r in range(1, rounds + 1) if r % every == 0 or r == rounds]
