#!/usr/bin/env bash
# The main job: set up, export the full-size pipeline to build/sam3.pt2 and verify it.
# Extra arguments go to `sam3-exportable export` (e.g. --checkpoint PATH instead of
# random weights, --force to rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
weights=(--random-weights)
for arg in "$@"; do
  if [[ "$arg" == "--checkpoint" ]]; then weights=(); fi
done
echo "NOTE: without --checkpoint the weights are random: the pipeline is real, the masks are meaningless."
sam3-exportable export --size full "${weights[@]}" --out build/sam3.pt2 --verify 1,2 "$@"
