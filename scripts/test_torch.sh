#!/usr/bin/env bash
# Run the fast tier (or any pytest selection) against a given torch/torchvision pair in a
# venv of its own, so the main environment is left untouched.
#
#   bash scripts/test_torch.sh TORCH TORCHVISION [PYTEST_ARGS...]
#   bash scripts/test_torch.sh 2.15.0 0.29.2                 # the fast tier: -m "not full"
#   OMP_NUM_THREADS=1 bash scripts/test_torch.sh 2.15.0 0.29.2 tests/test_predict.py
#
# The venv is build/venv-torch-TORCH (override with SAM3X_TORCH_VENV); a second run reuses
# it. A local pip constraint that caps torch (as on some CI hosts) is lifted for the torch
# install only. Exit status: pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -lt 2 ]; then
    echo "usage: bash scripts/test_torch.sh TORCH_VERSION TORCHVISION_VERSION [PYTEST_ARGS...]" >&2
    exit 2
fi
torch_version="$1"; vision_version="$2"; shift 2
venv="${SAM3X_TORCH_VENV:-build/venv-torch-$torch_version}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
PIP_CONSTRAINT=/dev/null "${pip[@]}" "torch==$torch_version" "torchvision==$vision_version"
# The project's own dependencies must not move torch: constrain it to what was just installed.
constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$torch_version" "$vision_version" >"$constraint"
PIP_CONSTRAINT="$constraint" "${pip[@]}" -e ".[test]"
"$venv/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
if [ "$#" -eq 0 ]; then
    set -- -m "not full"
fi
# The venv's tools (lint-imports, ray) are found next to its python by the tests.
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
