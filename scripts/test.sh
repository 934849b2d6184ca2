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
# Two pytest workers (pytest-xdist): the deployment tests spend most of their time waiting on Flower (a killed
# SuperNode is noticed only after two missed 30 s heartbeats), time the other worker uses. A later `-n 0` in the
# arguments runs everything in this one process. One torch thread per worker (unless set): two workers on two
# cores, not four threads fighting over them.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# --maxschedchunk 1: a worker holds at most two tests, so the long ones spread over both (tests/conftest.py orders them).
.venv/bin/python -m pytest -n "${FEDLOCALE_TEST_WORKERS:-2}" --maxschedchunk 1 "$@"
