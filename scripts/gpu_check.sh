#!/usr/bin/env bash
# A GPU check in one command, for a CUDA machine whose environment already has torch (a cluster node, a cloud image):
#
#   scripts/gpu_check.sh [--data-root DIR] [--out DIR] [--steps N] [--skip-install] [--dry-run | --cpu]
#   make gpu-check GPU_CHECK_ARGS="--data-root /scratch/data"
#
#   1. install    scripts/install_keep_torch.sh bench: the project and its deps at CI's versions, torch kept
#   2. fit        configs/mnist.yaml, bf16-mixed, --steps optimizer steps (300) on one GPU
#   3. fit-ddp    the same with --trainer.strategy ddp --trainer.devices -1 (every visible GPU)
#   4. bench      python -m benchmarks.bench --device cuda --precision bf16 --shapes cifar10 (ours vs diffusers and
#                 denoising-diffusion-pytorch, img/s, peak memory, % of the GPU's data-sheet bf16 peak)
#
# Each stage runs under `timeout` (GPU_CHECK_TIMEOUT_{INSTALL,FIT,DDP,BENCH} seconds: 120, 90, 120, 150, so the
# whole check ends within 8 minutes). Logs and summary.md go to --out (default lightning_logs/gpu_check/, which git
# ignores); summary.md has one row per stage: img/s, peak memory, % of bf16 peak and the ratio to diffusers.
# --data-root holds MNIST in torchvision's layout (default ../shared/data; nothing is downloaded).
# --dry-run checks the arguments and prints the commands without running any. --cpu runs every stage on the CPU
# instead (tiny U-Net, 3 steps, DDP over 2 processes, the bench's tiny shape), which the tests use so that this
# script cannot rot; it says nothing about a GPU.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
DATA=../shared/data OUT=lightning_logs/gpu_check STEPS="" MODE=gpu DRY_RUN=0 INSTALL=1

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "gpu_check: error: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --data-root) DATA=${2:?--data-root needs a directory}; shift 2 ;;
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --steps) STEPS=${2:?--steps needs a number}; shift 2 ;;
        --skip-install) INSTALL=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --cpu) MODE=cpu; shift ;;
        -h | --help) usage ;;
        *) echo "gpu_check: unknown argument '$1'" >&2; usage ;;
    esac
done
STEPS=${STEPS:-$([[ $MODE == cpu ]] && echo 3 || echo 300)}
[[ $STEPS =~ ^[1-9][0-9]*$ ]] || die "--steps must be a positive integer, got '$STEPS'"
[[ -d $DATA/MNIST/raw ]] || die "no MNIST under --data-root $DATA (expected $DATA/MNIST/raw/*-ubyte)"
DATA=$(cd "$DATA" && pwd)
OUT=$(realpath -m "$OUT")
[[ $DRY_RUN == 1 ]] || mkdir -p "$OUT"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # benchmarks/ is not installed; and this checkout's package first
export PYTHONUNBUFFERED=1

if [[ $MODE == gpu ]]; then
    DEVICE=(--trainer.accelerator gpu --trainer.devices 1)
    DDP=(--trainer.accelerator gpu --trainer.strategy ddp --trainer.devices -1)
    MODEL=()
    BENCH=(--device cuda --precision bf16 --shapes cifar10)
else
    DEVICE=(--trainer.accelerator cpu --trainer.devices 1)
    DDP=(--trainer.accelerator cpu --trainer.strategy ddp --trainer.devices 2)
    MODEL=(--model.base_channels 8 --model.channel_mults "[1, 2]" --model.num_res_blocks 1
        --model.attention_resolutions "[14]" --model.num_groups 4 --data.batch_size 16 --data.val_size 64)
    # bf16 only where the CPU computes in bf16 (avx512_bf16 / amx_bf16): elsewhere a bf16 matmul is converted to fp32
    # and the bench's 2048^2 limit measurement alone runs for minutes (ddpm_lightning/precision.py)
    CPU_BENCH_PRECISION=$("$PYTHON" -c 'from ddpm_lightning.precision import cpu_bf16_flags as f; print("bf16" if f() else "fp32")' \
        2>/dev/null || echo fp32)
    BENCH=(--device cpu --precision "$CPU_BENCH_PRECISION" --shapes tiny --impls ours --threads 1 --rounds 1
        --train-steps 1 --sample-steps 2)
fi
# the MNIST recipe, bf16, STEPS optimizer steps, a plain progress line every 50 steps (the recipe's last callback)
FIT=("$PYTHON" -m ddpm_lightning.cli fit --config "$REPO/configs/mnist.yaml" --data.root "$DATA"
    --data.download false --trainer.precision bf16-mixed --trainer.max_steps "$STEPS" --trainer.max_epochs -1
    --trainer.limit_val_batches 2 --trainer.callbacks.every_n_steps "$(( STEPS < 50 ? 1 : 50 ))" "${MODEL[@]}")

# stage NAME TIMEOUT_S DIR COMMAND...: run COMMAND in DIR under timeout, log to OUT/NAME.log, record its status
declare -A STATUS
stage() {
    local name=$1 limit=$2 dir=$3
    shift 3
    echo "gpu_check: [$name] (timeout ${limit}s, in $dir) $*"
    if [[ $DRY_RUN == 1 ]]; then STATUS[$name]=dry-run; return; fi
    mkdir -p "$dir"
    local start=$SECONDS rc=0
    (cd "$dir" && timeout --kill-after 10 "$limit" "$@") >"$OUT/$name.log" 2>&1 || rc=$?
    case $rc in
        0) STATUS[$name]=ok ;;
        124 | 137) STATUS[$name]="timed out" ;;
        *) STATUS[$name]="failed ($rc)" ;;
    esac
    echo "gpu_check: [$name] ${STATUS[$name]} after $((SECONDS - start))s; log $OUT/$name.log"
    [[ $rc == 0 ]] || tail -n 15 "$OUT/$name.log" >&2
}

if [[ $DRY_RUN == 0 && $MODE == gpu ]]; then
    "$PYTHON" -c 'import sys, torch; sys.exit(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()))' ||
        die "no CUDA GPU with bf16 visible to $PYTHON's torch (--cpu runs the CPU fallback)"
fi
if [[ $INSTALL == 1 ]]; then
    stage install "${GPU_CHECK_TIMEOUT_INSTALL:-120}" "$REPO" env PYTHON="$PYTHON" scripts/install_keep_torch.sh bench
fi
stage fit "${GPU_CHECK_TIMEOUT_FIT:-90}" "$OUT/fit" "${FIT[@]}" "${DEVICE[@]}"
stage fit-ddp "${GPU_CHECK_TIMEOUT_DDP:-120}" "$OUT/fit-ddp" "${FIT[@]}" "${DDP[@]}"
stage bench "${GPU_CHECK_TIMEOUT_BENCH:-150}" "$REPO" \
    "$PYTHON" -m benchmarks.bench "${BENCH[@]}" --output "$OUT/bench.md"
[[ $DRY_RUN == 1 ]] && exit 0

status_args=()
for name in "${!STATUS[@]}"; do status_args+=(--status "$name=${STATUS[$name]}"); done
"$PYTHON" "$REPO/scripts/gpu_check_summary.py" --out "$OUT" --mode "$MODE" --steps "$STEPS" "${status_args[@]}"
for name in "${!STATUS[@]}"; do [[ ${STATUS[$name]} == ok ]] || exit 1; done
