"""``fedlocale simulate`` drops Flower's run_simulation deprecation banner, and no other Flower log line."""

from __future__ import annotations

import logging

from flwr.supercore.logger import FLOWER_LOGGER, warn_deprecated_feature

from simulations.runner import RunSimulationBanner


class Kept(logging.Handler):
    """Keeps every record that reaches Flower's logger's handlers (the way to the user's terminal)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_only_the_run_simulation_banner_is_dropped() -> None:
    banner, kept = RunSimulationBanner(), Kept()
    FLOWER_LOGGER.addFilter(banner)
    FLOWER_LOGGER.addHandler(kept)
    try:
        # the words Flower 1.42's run_simulation passes (flwr/simulation/run_simulation.py), through its own logger
        warn_deprecated_feature(
            "The `run_simulation` function is deprecated and will be removed in a future version of Flower. "
            "Please use `flwr run` in the CLI instead to run your simulation."
        )
        warn_deprecated_feature("Passing `clients_ids` to `start_simulation` is deprecated.")
        FLOWER_LOGGER.warning("a node did not reply")
    finally:
        FLOWER_LOGGER.removeFilter(banner)
        FLOWER_LOGGER.removeHandler(kept)
    shown = [r.getMessage() for r in kept.records]
    assert not any("`run_simulation` function is deprecated" in m for m in shown)
    assert any("clients_ids" in m for m in shown) and "a node did not reply" in shown
