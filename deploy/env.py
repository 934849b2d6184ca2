"""Process environment for Flower, Ray and transformers on these machines (no GPU, no hub, no telemetry).

Kept free of heavy imports: it must run before transformers is imported, which reads some of it at import.
"""

from __future__ import annotations

import os

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Flower would otherwise `uv sync` the app's dependencies and pull a multi-GB CUDA torch
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    # per-message weight-loading bars from every actor would bury the round progress
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def apply_env() -> None:
    """Set every variable of FLOWER_ENV that the user has not set already."""
    for name, value in FLOWER_ENV.items():
        os.environ.setdefault(name, value)
