#!/usr/bin/env bash
# Opt-in check (not in CI): moeprune's uniform pruned checkpoints run in llama.cpp as in transformers.
#
#   scripts/check_llamacpp.sh [WORK_DIR]        (default /tmp/moeprune-llamacpp)
#
# Builds llama.cpp from the llama-cpp-python source package on PyPI (it vendors llama.cpp and its
# convert_hf_to_gguf.py) into a venv of its own. Converts to f32 GGUF with that converter, runs in
# llama.cpp and compares with transformers on 20 prompts of the testbed's eval data (greedy tokens
# and every prompt position's logits, scripts/llamacpp_compare.py):
#   - the testbed as shipped (DeepSeek-V3 type), a uniform prune of it (16 of 32 experts per
#     layer), a --pad-uniform prune of a ragged plan (8/16/24 experts padded to 24) and
#     `moeprune export --uniform` of a ragged (--scope global) prune; the GGUF must say sigmoid
#     gating;
#   - a tiny random Qwen3-MoE (testbed vocabulary) and a uniform prune of it (4 of 8 experts).
# Exit 0 only if all agree.
#
# Needs: a C/C++ compiler and cmake, the network to PyPI, and PYTHON (default: python) with
# moeprune installed. Building llama.cpp takes minutes (10+ on two busy cores); the build is kept
# in WORK_DIR and reused by the next run. LLAMA_CPP_PYTHON_VERSION pins the package (default 0.3.36,
# the version the figures in docs/deploying.md were measured with).
set -euo pipefail

WORK=${1:-/tmp/moeprune-llamacpp}
PY=${PYTHON:-python}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
HERE=$(cd "$(dirname "$0")" && pwd)
HELPER="$HERE/llamacpp_compare.py"
mkdir -p "$WORK"

SRC="$WORK/llama_cpp_python-$VERSION"
if [ ! -d "$SRC" ]; then
  echo "== downloading llama-cpp-python $VERSION (source)"
  "$PY" -m pip download --no-binary llama-cpp-python --no-deps "llama-cpp-python==$VERSION" -d "$WORK"
  tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi
VENDOR="$SRC/vendor/llama.cpp"

VENV="$WORK/venv"
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "== building llama.cpp (llama-cpp-python $VERSION) into $VENV: minutes"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q numpy
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
    "$VENV/bin/pip" install "$SRC"
fi

echo "== checkpoints and prompts"
"$PY" "$HELPER" prepare "$WORK"
TESTBED=$("$PY" -c "from moeprune.testbed import MODEL_DIR; print(MODEL_DIR)")

status=0
# The testbed (DeepSeek-V3 type, no query LoRA), a uniform prune, a --pad-uniform prune and
# `moeprune export --uniform` of a ragged (--scope global) prune of it:
# converted (llama.cpp's gating must read sigmoid; deepseek2.attention.q_lora_rank = 0 written, see
# llamacpp_compare.py), run, compared.
for pair in "testbed:$TESTBED" "uniform16:$WORK/uniform16" "padded:$WORK/padded" "exported:$WORK/exported"; do
  name=${pair%%:*}
  model=${pair#*:}
  echo "== testbed $name: convert_hf_to_gguf.py (f32), llama.cpp, transformers"
  "$PY" "$HELPER" convert "$VENDOR" "$model" "$WORK/$name.gguf" > "$WORK/$name.convert.log" 2>&1 \
    || { tail -5 "$WORK/$name.convert.log"; exit 1; }
  grep -q "expert score gating function = sigmoid" "$WORK/$name.convert.log" \
    || { echo "testbed $name: the GGUF does not say sigmoid gating: FAIL"; status=1; }
  "$VENV/bin/python" "$HELPER" llama "$WORK/$name.gguf" "$WORK/prompts.json" "$WORK/$name.llama.npz"
  "$PY" "$HELPER" compare "$model" "$WORK/$name.llama.npz" "$WORK/prompts.json" "testbed $name" || status=1
done
# A tiny random Qwen3-MoE and a uniform prune of it: converted, run, compared.
for name in qwen3_moe qwen3_moe-uniform; do
  echo "== $name: convert_hf_to_gguf.py (f32), llama.cpp, transformers"
  "$PY" "$HELPER" convert "$VENDOR" "$WORK/$name" "$WORK/$name.gguf" > "$WORK/$name.convert.log" 2>&1 \
    || { tail -5 "$WORK/$name.convert.log"; exit 1; }
  "$VENV/bin/python" "$HELPER" llama "$WORK/$name.gguf" "$WORK/prompts.json" "$WORK/$name.llama.npz"
  "$PY" "$HELPER" compare "$WORK/$name" "$WORK/$name.llama.npz" "$WORK/prompts.json" || status=1
done
exit $status
