#!/usr/bin/env bash
# Fresh-machine demo: install agd in ./.venv (CPU torch), then run the whole pipeline offline on
# the embedded default, the shipped MNIST teacher: collect -> train -> generate -> bench, ending
# with the quality table (accuracy / digit FID of unguided, CFG and agd) and PNG grids.
# DEMO_PRESET=NAME runs it on another preset (without the MNIST-only quality table).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
WORK=${AGD_WORKDIR:-agd-runs}
PRESET=${DEMO_PRESET:-mnist}

PHASES=""
phase() {  # run one stage and note its wall time, printed at the end
  local name=$1 start=$SECONDS
  shift
  "$@"
  PHASES="$PHASES $name $((SECONDS - start))s"
}

phase collect agd --workdir "$WORK" collect --preset "$PRESET"
phase train agd --workdir "$WORK" train
if [ "$PRESET" = mnist ]; then
  phase generate agd --workdir "$WORK" generate "a handwritten 7" "the digit three" "number five" -w 4 -n 4
  phase bench agd --workdir "$WORK" bench --compare-cfg --num-prompts 10 --quality --quality-samples 200
else
  phase generate agd --workdir "$WORK" generate "a red fox in the snow" "a lighthouse at dusk" -w 4 -n 2
  phase bench agd --workdir "$WORK" bench --compare-cfg --num-prompts 4 --baselines cfg,cfg-cutoff,unguided
fi
echo "samples: $WORK/$PRESET/samples/   report and grid: $WORK/$PRESET/bench/"
echo "time per phase:$PHASES (total ${SECONDS}s)"
