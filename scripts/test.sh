#!/usr/bin/env bash
# Set up (first time only), then run lint, type checks and the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. -m "not slow" for the quick unit tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy common server client assets runfolder simulations deploy fedlocale benchmarks
.venv/bin/python -m pytest "$@"
