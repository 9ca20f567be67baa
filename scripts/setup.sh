#!/usr/bin/env bash
# Create .venv (once) and install moeprune with its test tools and the optional extras the tests
# exercise (lm-evaluation-harness bridge, faiss retrieval; MOEPRUNE_EXTRAS overrides). Idempotent.
# torch goes first, pinned to a CPU build, so that the project's own "torch>=2.6" is already met
# and pip never pulls a multi-GB CUDA build; any torch >= 2.6 already in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c 'import torch, sys; v=tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 6) else 1)' 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
EXTRAS=${MOEPRUNE_EXTRAS-lmeval,faiss}
python -m pip install -q -e ".[dev${EXTRAS:+,$EXTRAS}]"
