#!/usr/bin/env bash
# Set up (first time only), build the demo data if absent, and run the demo simulation with its baselines.
# Extra arguments go to `fedlocale simulate`, e.g. --set rounds=2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
.venv/bin/fedlocale data demo data/demo
# runs/demo is the demo's own folder: each demo run replaces the previous one (simulate refuses otherwise)
.venv/bin/fedlocale simulate configs/demo.yaml --out runs/demo --overwrite "$@"
echo "open runs/demo/report.md"
