#!/usr/bin/env bash
# The README's first command: set up, then run the main job on the built-in testbed model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT_DIR:-runs/demo}
TESTBED=$(python -c 'from moeprune.testbed import testbed_path; print(testbed_path())')
echo "== the testbed model"
moeprune inspect "$TESTBED"
