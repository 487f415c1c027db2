#!/usr/bin/env bash
# Fresh-machine demo: install agd in ./.venv (CPU torch), then run the full pipeline on the
# embedded default (the shipped MNIST teacher), offline: collect -> train -> generate -> bench.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh
export HF_HUB_OFFLINE=1
WORK=${AGD_WORKDIR:-agd-runs}

agd --workdir "$WORK" collect --preset mnist
agd --workdir "$WORK" train
agd --workdir "$WORK" generate "the digit seven" "a handwritten 3" -w 4 -n 4
agd --workdir "$WORK" bench --compare-cfg --quality
echo "grid and report: $WORK/mnist/bench/"
