#!/usr/bin/env bash
# Everything that needs a GPU, in one call (for a session lent a GPU machine, which has PyTorch with
# CUDA, nvcc and onnxruntime but no network): the GPU tests, then the kernel benchmarks.
# Results: build/gpu/pytest.txt and docs/results/kernels.{json,md,png}.
# The plugin enqueue tests (tests/gpu/test_plugins_gpu.py) also need TensorRT headers: put include/ of a
# NVIDIA/TensorRT checkout (search tool `fetch`) in build/trt_headers/include and carry that path.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/gpu
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/build/gpu/site${PYTHONPATH:+:$PYTHONPATH}"
# shrinkrt's stage folders map onto the package; expose them without installing (no network there)
mkdir -p build/gpu/site/shrinkrt
for d in calib export runtime evaluate plugins; do ln -sfn "$PWD/$d" "build/gpu/site/shrinkrt/$d"; done
for f in shrinkrt/*.py; do ln -sf "$PWD/$f" "build/gpu/site/shrinkrt/$(basename "$f")"; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee build/gpu/device.txt
$PY -m pytest -q -ra tests/gpu -p no:cacheprovider 2>&1 | tee build/gpu/pytest.txt
rc_tests=${PIPESTATUS[0]}
$PY benchmarks/gpu_kernels.py --out docs/results/kernels 2>&1 | tee build/gpu/bench.txt
rc_bench=${PIPESTATUS[0]}
echo "gpu.sh: tests rc=$rc_tests, benchmarks rc=$rc_bench"
exit $(( rc_tests || rc_bench ))
