#!/usr/bin/env bash
# GPU checks for a machine with one GPU (H100/H200 class), under 8 minutes, in five sections:
#   1. the gpu test tier (pytest -m gpu);
#   2. tools/bench_dynamic_conv.py --device cuda: bf16, channels_last, our dynamic-conv paths vs
#      timm CondConv2d vs static convs;
#   3. tools/bench_moe.py --gpu: tokens/s and MFU of llama_1b and pnet_llama_1b_up_e8, seq 2048
#      (goal: MFU >= 45% for the dense model);
#   4. tools/bench_loader.py --device cuda: the image pipeline on all the node's cores vs the GPU
#      path (nvJPEG decode + augmentation on the GPU), images/s per GPU;
#   5. a 200-step quickstart (jobs/quickstart_vision.yaml, 1 Ray worker on the GPU, bf16).
#
#   bash tools/gpu_check.sh [--dry-run] [--workdir DIR]
#
# --dry-run runs every section to its end on the CPU in a tiny form (the tools' own --dry-run
# flags, gpu tests collected and skipped, a 3-step quickstart), in about a minute: CI runs it so
# that the script cannot rot. Runs in the project's environment (python on PATH, or $PYTHON);
# installs nothing. Each section prints its output and a line "== section N ok|FAILED (S s)";
# the exit status is non-zero if any section failed.
set -uo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then   # before anything is installed or imported
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
dry_run=0
workdir=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --workdir) workdir=$2; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python=${PYTHON:-python}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"
if [[ -z $workdir ]]; then
    workdir=$(mktemp -d -t gpu_check.XXXXXX)
    trap 'rm -rf "$workdir"' EXIT
fi
mkdir -p "$workdir"

failed=()
section() {   # section N TITLE COMMAND...: run it, time it, record a failure, go on
    local number=$1 title=$2 started=$SECONDS
    shift 2
    echo "== section $number: $title"
    echo "\$ $*"
    if "$@"; then
        echo "== section $number ok ($((SECONDS - started)) s)"
    else
        echo "== section $number FAILED ($((SECONDS - started)) s)"
        failed+=("$number")
    fi
}

echo "gpu_check: $(date -u +%FT%TZ), $(nproc) CPU cores, load average $(cut -d' ' -f1 /proc/loadavg)," \
     "$([[ $dry_run == 1 ]] && echo 'DRY RUN on the CPU' || (nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'))"
started=$SECONDS

if [[ $dry_run == 1 ]]; then
    section 1 "gpu test tier (collected; skipped without a GPU)" \
        "$python" -m pytest -p no:cacheprovider -m gpu -q -rs tests
    section 2 "dynamic conv: ours vs CondConv2d vs static" \
        "$python" tools/bench_dynamic_conv.py --dry-run --channels-last
    section 3 "1B LLaMA dense and MoE-8: tokens/s and MFU" "$python" tools/bench_moe.py --gpu --dry-run
    section 4 "image pipeline: all cores vs the GPU path" "$python" tools/bench_loader.py --dry-run
    steps=3 quickstart_overrides=(scaling.use_gpu=false data.batch_size=8 optim.warmup_steps=1)
else
    section 1 "gpu test tier" "$python" -m pytest -p no:cacheprovider -m gpu -q -rs tests
    section 2 "dynamic conv: ours vs CondConv2d vs static" \
        "$python" tools/bench_dynamic_conv.py --device cuda --amp bf16 --channels-last --batch 128 --repeats 5
    section 3 "1B LLaMA dense and MoE-8: tokens/s and MFU" "$python" tools/bench_moe.py --gpu
    section 4 "image pipeline: all cores vs the GPU path" \
        "$python" tools/bench_loader.py --device cuda --workers "$(nproc)" --images 800 --epochs 2 --batch-size 128 --rounds 3
    steps=200 quickstart_overrides=(scaling.use_gpu=true deepspeed.precision=bf16)
fi

quickstart() {
    "$python" tools/make_quickstart_data.py --out "$workdir/data" 2>&1 | { grep -v '^\(images\|documents\):' || true; } &&
    "$python" -m pnet_dist.launch jobs/quickstart_vision.yaml run_name=gpu_check_quickstart \
        "data.train_uri=$workdir/data/images/train" "data.eval_uri=$workdir/data/images/val" \
        "checkpoint.uri=$workdir/runs" checkpoint.every_steps=100 train.log_every_steps=50 \
        "train.max_steps=$steps" scaling.num_workers=1 "${quickstart_overrides[@]}"
}
section 5 "quickstart, $steps steps" quickstart

echo "gpu_check: $((SECONDS - started)) s in all; sections failed: ${failed[*]:-none}"
[[ ${#failed[@]} == 0 ]]
