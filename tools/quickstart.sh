#!/usr/bin/env bash
# Quickstart: install, make the small real dataset, train a ParameterNet with 2 Ray workers under
# DeepSpeed (data parallel, zero_stage 0) on this machine, and print where the checkpoints and TensorBoard logs are.
#
#   tools/quickstart.sh [key=value ...]      # e.g. tools/quickstart.sh train.max_steps=600
#
# Running it again continues from the newest checkpoint in runs/quickstart_vision/ckpt. Extra
# arguments are config overrides for jobs/quickstart_vision.yaml.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then   # before anything is installed
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
start=$SECONDS

# Install (again only when setup.cfg or pyproject.toml changed since the last install).
stamp=.venv/.pnet_dist_installed
if [[ ! -x .venv/bin/python ]]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
if [[ ! -f $stamp || setup.cfg -nt $stamp || pyproject.toml -nt $stamp ]]; then
    echo "== installing pnet_dist into .venv"
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -e '.[dev]'
    touch "$stamp"
fi

# DeepSpeed builds a few C++ ops on first use, with the `ninja` that pip put into .venv/bin; keep
# the builds with the repo so a re-run skips them.
export PATH="$repo/.venv/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ ! -f data/quickstart/images/train/index.json || ! -f data/quickstart/images/val/index.json ]]; then
    echo "== making the quickstart dataset in data/quickstart"
    .venv/bin/python tools/make_quickstart_data.py --out data/quickstart
fi

echo "== training (Ray + DeepSpeed data parallel, 2 workers)"
.venv/bin/python -m pnet_dist.launch jobs/quickstart_vision.yaml "$@"
echo "== quickstart done in $((SECONDS - start)) s"
