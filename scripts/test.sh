#!/usr/bin/env bash
# The test command: lint, then the whole test suite (about a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks scripts
python -m pytest -n 2 --dist loadfile "$@"
