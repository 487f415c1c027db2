#!/usr/bin/env bash
# Create ./.venv (if missing) and install agd into it, CPU torch pinned (no CUDA download).
# Usage: source scripts/setup-env.sh [EXTRAS]   e.g. EXTRAS="[test]"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# constraints-cpu.txt pins the CPU torch wheel; GPU users install with a plain `pip install .`
python -m pip install -q -c constraints-cpu.txt -e ".${1:-}"
