#!/usr/bin/env bash
# The GPU check: every figure the project reports about GPUs, from one script, into one JSON.
#
#   benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# On one H100/H200 it runs, within 8 minutes (each step has its share, the whole a deadline):
#   1. pytest -m gpu                      every stage's CUDA result against its CPU result
#   2. benchmarks/bench_fused_moe.py      Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 layer shapes,
#                                         1/4/16/64/256 tokens, 4-bit, 2-bit, a 2/3/4 mix and bf16
#   3. benchmarks/bench_realsize.py       `expertbits quantize --quantizer gptq --device cuda` on a
#                                         2-layer Mixtral-8x7B-shaped pair: each stage's time and GPU memory
#   4. the same with --quantizer rtn      (the whole-model RTN projection)
#   5. benchmarks/gpu_report.py           DIR/gpu_check.json: the device, each step's figures and
#                                         exit status, and the targets met or not (by how much)
#
# --dry-run does all of it on the CPU with CUDA hidden: tiny shapes (the fused kernel in the Triton
# interpreter, a tiny Mixtral-shaped pair for the flow), so a typo or a broken step shows before
# the first real run. Its figures mean nothing. tests/operate/test_gpu_check.py runs it.
set -uo pipefail

OUT=gpu-check
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/work"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
DEADLINE=$(( $(date +%s) + 470 ))  # 8 minutes, less the report's few seconds

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # everything but CUDA
    FUSED=(--smoke --tokens 1 4)
    MODEL=mixtral-smoke; WINDOWS=1; DEVICE=cpu
else
    FUSED=()
    MODEL=mixtral-8x7b; WINDOWS=4; DEVICE=cuda
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

# step NAME SHARE_SECONDS COMMAND...: run with at most its share (and never past the deadline)
step() {
    local name="$1" share="$2"; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    local limit=$(( share < left ? share : left ))
    local start rc
    start=$(date +%s)
    if [ "$limit" -le 0 ]; then
        rc=124
        echo "gpu_check: $name not started: the 8-minute deadline is spent" >&2
    else
        echo "gpu_check: $name (at most ${limit} s)" >&2
        timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
        rc=$?
        tail -n 25 "$OUT/$name.log" >&2
    fi
    printf '{"step": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" $(( $(date +%s) - start )) "$limit" >> "$STEPS"
}

step pytest 130 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest.xml" "$HERE/../tests"
step fused_moe 130 "$PY" "$HERE/bench_fused_moe.py" "${FUSED[@]}" --json "$OUT/fused_moe.json"
step gptq 150 "$PY" "$HERE/bench_realsize.py" --model "$MODEL" --layers 2 --windows "$WINDOWS" --quantizer gptq \
    --device "$DEVICE" --workdir "$WORK" --json "$OUT/gptq.json"
step rtn 60 "$PY" "$HERE/bench_realsize.py" --model "$MODEL" --layers 2 --windows "$WINDOWS" --quantizer rtn \
    --device "$DEVICE" --workdir "$WORK" --json "$OUT/rtn.json"
"$PY" "$HERE/gpu_report.py" "$OUT" $([ "$DRY" = 1 ] && echo --dry-run)
