#!/usr/bin/env bash
# The test command: lint, then the whole test suite (about a few minutes on 2 cores).
# MOEPRUNE_NEWEST=1: the same against the newest dependency versions (.venv-newest, see setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
[ -n "${MOEPRUNE_NEWEST:-}" ] && [ "${MOEPRUNE_NEWEST}" != 0 ] && VENV=.venv-newest
[ -x "$VENV/bin/python" ] || bash scripts/setup.sh
. "$VENV/bin/activate"
ruff check src tests benchmarks scripts
python -m pytest -n 2 --dist loadfile "$@"
