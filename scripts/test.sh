#!/usr/bin/env bash
# Sets up .venv and runs the test suite (tiny in-process models + the embedded model).
# pytest's exit code is kept: 5 ("no tests collected") fails like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -ra "$@"
