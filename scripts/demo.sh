#!/usr/bin/env bash
# Fresh-machine demo: install agd in ./.venv (CPU torch), then run the whole pipeline offline on
# the embedded default: collect -> train -> generate -> bench. The default preset is tiny-sd
# (random weights built from config) until the shipped MNIST teacher lands; DEMO_PRESET overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh
export HF_HUB_OFFLINE=1
WORK=${AGD_WORKDIR:-agd-runs}
PRESET=${DEMO_PRESET:-tiny-sd}

agd --workdir "$WORK" collect --preset "$PRESET"
agd --workdir "$WORK" train
agd --workdir "$WORK" generate "a red fox in the snow" "a lighthouse at dusk" -w 4 -n 2
agd --workdir "$WORK" bench --compare-cfg -n 4 --baselines cfg,cfg-cutoff,unguided
echo "samples: $WORK/$PRESET/samples/   report and grid: $WORK/$PRESET/bench/"
