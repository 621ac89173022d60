#!/usr/bin/env bash
# Create/update .venv with the package and its dev extras, then run every test tier.
# GPU tests skip by themselves where no CUDA device exists. Usage: bash tools/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
