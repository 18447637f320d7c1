#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct: a streamed chat answer, then the evaluation table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
shrinkrt generate "What is the capital of France?" --stats
shrinkrt eval --out build/eval.json
