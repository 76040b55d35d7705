#!/usr/bin/env bash
# Set up, then run both test tiers (fast, then full-size). Prints pytest's summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest -p no:cacheprovider "$@"
