#!/usr/bin/env bash
# Create/update .venv with the package, its dev extras and the ffcv extra, then run every test
# tier. GPU tests skip by themselves where no CUDA device exists.
# Usage: bash tools/run_tests.sh [pytest args]      e.g. -m unit, or -m "dist or e2e"
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then   # before anything is installed
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
cd "$(dirname "$0")/.."

# ffcv compiles against libturbojpeg and OpenCV; install them where we can (root with apt).
ffcv_debs="libturbojpeg0-dev libopencv-dev pkg-config"
if ! dpkg -s $ffcv_debs >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "== installing $ffcv_debs (for the ffcv extra)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $ffcv_debs >/dev/null
fi
extras="dev"
dpkg -s $ffcv_debs >/dev/null 2>&1 && extras="dev,ffcv"

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
export PATH="$PWD/.venv/bin:$PATH"   # DeepSpeed JIT builds call the ninja that pip put there
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
