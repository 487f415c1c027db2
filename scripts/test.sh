#!/usr/bin/env bash
# Fresh-machine test run: set up .venv with the test extra, lint, run the whole suite (offline, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh "[test]"
export HF_HUB_OFFLINE=1 AGD_NO_PROGRESS=1
ruff check agd_cli tests tools benchmarks
python -m pytest tests "$@"
