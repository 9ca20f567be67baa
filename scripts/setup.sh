#!/usr/bin/env bash
# Create .venv (once) and install moeprune with its test tools and the optional extras the tests
# exercise (lm-evaluation-harness bridge, faiss retrieval; MOEPRUNE_EXTRAS overrides). Idempotent.
# torch goes first, pinned to a CPU build, so that the project's own "torch>=2.6" is already met
# and pip never pulls a multi-GB CUDA build; any torch >= 2.6 already in the venv is kept.
# Every other package is installed at the version of constraints.txt (the environment the suite
# was last run against), so a fresh clone tests what was tested. MOEPRUNE_NEWEST=1 instead
# installs the newest versions pyproject.toml allows into .venv-newest (torch kept as installed),
# to see drift before users do: `MOEPRUNE_NEWEST=1 bash scripts/test.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
NEWEST=${MOEPRUNE_NEWEST:-}
VENV=.venv
[ -n "$NEWEST" ] && [ "$NEWEST" != 0 ] && VENV=.venv-newest
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
if ! python -c 'import torch, sys; v=tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 6) else 1)' 2>/dev/null; then
  python -m pip install -q "torch==$TORCH_VERSION"
fi
EXTRAS=${MOEPRUNE_EXTRAS-lmeval,faiss}
if [ "$VENV" = .venv ]; then
  python -m pip install -q -c constraints.txt -e ".[dev${EXTRAS:+,$EXTRAS}]"
else
  # newest: everything upgraded except torch, held at the installed build (a plain upgrade
  # could replace a CPU build by a CUDA one)
  held=$(mktemp)
  trap 'rm -f "$held"' EXIT
  python -c 'import torch; print("torch==" + torch.__version__)' > "$held"
  python -m pip install -q --upgrade --upgrade-strategy eager -c "$held" -e ".[dev${EXTRAS:+,$EXTRAS}]"
  python -c 'import transformers; print("newest: transformers", transformers.__version__)'
fi
