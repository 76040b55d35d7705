#!/usr/bin/env bash
# Install sam3-exportable and its dependencies into the current Python (idempotent).
# torch/torchvision are pinned to the releases this project is tested with; on machines
# whose pip carries a local wheel cache they come from disk.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
