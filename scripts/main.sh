#!/usr/bin/env bash
# The main job: set up, export the full-size pipeline to build/sam3.pt2 (verified against
# eager at B=1, P=2), then segment a sample image with two phrases and print where the
# overlay is. Extra arguments go to `sam3-exportable export` (e.g. --checkpoint PATH
# instead of random weights; --force to rebuild an existing build/sam3.pt2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
weights=(--random-weights)
force=0
for arg in "$@"; do
  [[ "$arg" == "--checkpoint" ]] && weights=()
  [[ "$arg" == "--force" ]] && force=1
done
if [[ -f build/sam3.pt2 && $force == 0 ]]; then
  echo "[export] reusing build/sam3.pt2 (pass --force to rebuild it)"
else
  [[ ${#weights[@]} -gt 0 ]] && echo "NOTE: random weights: the pipeline and its numbers are real, the masks are meaningless."
  sam3-exportable export --size full "${weights[@]}" --out build/sam3.pt2 --verify 1,2 "$@"
fi
image=$(python -c "import matplotlib.cbook as c; print(c.get_sample_data('grace_hopper.jpg', asfileobj=False))")
out="build/predict-$(date +%Y%m%d-%H%M%S)"
sam3-exportable predict --model build/sam3.pt2 --image "$image" \
  --prompt "a person" --prompt "a necktie" --out "$out"
