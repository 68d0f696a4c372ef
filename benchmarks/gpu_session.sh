#!/usr/bin/env bash
# Everything fastadv checks on a GPU, batched for a lent GPU machine (30 minutes of device
# time a session, 10 minutes a command, 8 files back).
#
# 1. Here, once per checkout (downloads the two pure-Python packages the GPU image lacks):
#        bash benchmarks/gpu_session.sh prepare
# 2. On the GPU machine, in calls that each fit in 10 minutes (a machine stays warm only
#    30 s after a call, so every call starts bare: `build` first in each, once):
#        run(command="STAGES='build doctor tests' bash benchmarks/gpu_session.sh", carry=[".whl"])
#        run(command="STAGES='build ops attacks' bash benchmarks/gpu_session.sh", carry=[".whl"])
#        run(command="STAGES='build autoattack' bash benchmarks/gpu_session.sh", carry=[".whl"])
#        run(command="STAGES='build train' bash benchmarks/gpu_session.sh", carry=[".whl"])
#    `build` before `doctor`: doctor would otherwise JIT-compile the same sources once more.
#    Each stage's output goes to $OUT/session.log (and is echoed), benchmark rows to
#    $OUT/<stage>.json. Record the figures, with device and date, in benchmarks/RESULTS.md.
#    Each stage is bounded by STAGE_TIMEOUT (default: per stage, below) and by what is left
#    of CALL_BUDGET (default 585 s from the script's start), so a call always ends inside the
#    600 s limit with its log written; a stage with under 20 s left is skipped and says so.
#
# Stages: doctor, build (CUDA extension for the visible GPU), tests (pytest -m gpu: native,
# triton, the attack engine's CUDA graph / amp cases), ops (fused ops vs eager, bandwidth),
# attacks (PGD vs torchattacks, floor ratios), autoattack (vs the reference, >= 5x target),
# train (each method's epoch time / standard, PreAct ResNet-18, CIFAR-shaped).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    # .whl/ is git-ignored (.gitignore), as the device tool's carry requires
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
        torchattacks==3.5.1 mlxtend && ls -l .whl
    exit $?
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 FASTADV_CACHE=${FASTADV_CACHE:-/tmp/fastadv-ext} \
       FASTADV_TEST_CACHE=${FASTADV_TEST_CACHE:-/tmp/fastadv-tests}
export PYTHONPATH="$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi

T0=$(date +%s)
declare -A LIMIT=([doctor]=60 [build]=240 [tests]=330 [ops]=300 [attacks]=330 [autoattack]=560 [train]=560)

stage() {  # stage NAME COMMAND...: run it under a time limit, its output into the log
    local name=$1 start rc limit left
    shift
    start=$(date +%s)
    limit=${STAGE_TIMEOUT:-${LIMIT[$name]}}
    left=$(( ${CALL_BUDGET:-585} - (start - T0) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "===== $name: skipped, ${left} s left of this call's budget" | tee -a "$LOG"
        return
    fi
    echo "===== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "===== $name: rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$LOG"
}

for s in ${STAGES:-build doctor tests}; do
    case $s in
        doctor) stage doctor bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -m fastadv doctor' ;;
        build) stage build python3 -m fastadv build ;;
        tests) stage tests python3 -m pytest -q -m gpu -p no:cacheprovider \
                   tests/test_native.py tests/test_triton.py tests/test_attacks_engine.py ;;
        ops) stage ops python3 -m fastadv bench ops --device cuda --json "$OUT/ops.json" ;;
        attacks) stage attacks python3 -m fastadv bench attacks --device cuda --json "$OUT/attacks.json" ;;
        autoattack) stage autoattack python3 benchmarks/bench_autoattack.py --device cuda \
                        --n "${AA_POINTS:-1000}" --json "$OUT/autoattack.json" ;;
        train) stage train python3 benchmarks/bench_train.py --cost --device cuda \
                   --model preact_resnet18 --amp bf16 ;;
        *) echo "unknown stage $s (doctor build tests ops attacks autoattack train)" | tee -a "$LOG" ;;
    esac
done
