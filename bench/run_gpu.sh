#!/usr/bin/env bash
# GPU figures of issue 10 in one go (about 4-5 minutes on an H100; per-step time limits add up to 7.2 min):
#   train_throughput (bf16 and fp32), memory_scaling (bf16), graph_build, scaling estimate.
# Every table goes to $OUT as Markdown (default ./bench_out), plus run_gpu.log; docs/PERFORMANCE.md is
# not touched here (paste the tables into it).
#
#   OUT=/some/dir bash bench/run_gpu.sh                 # on a machine with CUDA
#   BENCH_DEVICE=cpu OUT=/tmp/bo bash bench/run_gpu.sh  # tiny CPU smoke check of this script
#
# PYTHON picks the interpreter (default: python, else python3). The repository root goes on PYTHONPATH,
# so twinbrain need not be installed; torch, torch-geometric, numpy and pyyaml must be (threadpoolctl
# optional). A GPU job only ever writes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench_out}
PY=${PYTHON:-$(command -v python || command -v python3)}
DEVICE=${BENCH_DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, torch_geometric" 2>/dev/null; then
    echo "run_gpu.sh: $PY cannot import torch and torch_geometric; point PYTHON at an interpreter that can."
    exit 2
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: torch sees no CUDA device ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1))."
    echo "Run it on a GPU machine, or smoke-check it on CPU with tiny sizes: BENCH_DEVICE=cpu bash bench/run_gpu.sh"
    exit 2
fi
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run_gpu.log") 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true

if [ "$DEVICE" = cuda ]; then
    BATCH="1 2 4 8 16 32 64"
    SHAPES=""                                   # defaults: 200 regions x 50 TRs, 63 channels, H 128, 4 blocks
    TT="--full-repeats 3"
    MEM="--t-list 25 50 100 200 400 --n-list 100 200 500 1000"
    GRAPH="--nodes 200 500 1000"
    EST="--device cuda"
    THREADS="--threads 0"                       # torch's default CPU threads (loader, graph build on the host)
else                                            # smoke check: seconds, not figures
    BATCH="1 2"
    SHAPES="--n-fmri 20 --n-eeg 8 --t-f 6 --hidden 16 --blocks 2"
    TT="--full-repeats 1"
    MEM="--t-list 4 8 16 --n-list 10 20 40 --repeats 1"
    GRAPH="--nodes 50 100 --t 200 --repeats 1"
    EST="--device cpu --step-time-s 0.1 --step-time-note smoke-check"
    THREADS=""
fi

failed=""
step() {  # step NAME HARD_LIMIT_S COMMAND...: run, time out, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%H:%M:%S) UTC, limit ${limit}s)"
    local rc
    set -x
    timeout "$limit" "$@"
    { rc=$?; set +x; } 2>/dev/null
    [ $rc -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; failed="$failed $name"; }
}

step throughput_bf16 140 "$PY" bench/train_throughput.py --device "$DEVICE" $THREADS --dtype bf16 --batch $BATCH \
    $TT $SHAPES --max-seconds 45 --out-md "$OUT/train_throughput_bf16.md"
step throughput_fp32 110 "$PY" bench/train_throughput.py --device "$DEVICE" $THREADS --dtype fp32 --batch $BATCH \
    $TT $SHAPES --max-seconds 30 --out-md "$OUT/train_throughput_fp32.md"
step memory_scaling 100 "$PY" bench/memory_scaling.py --device "$DEVICE" $THREADS --dtype bf16 $MEM $SHAPES \
    --max-seconds 35 --out-md "$OUT/memory_scaling_bf16.md"
step graph_build 40 "$PY" bench/graph_build.py --device "$DEVICE" $THREADS $GRAPH --out-md "$OUT/graph_build.md"
step scaling_estimate 40 "$PY" bench/scaling.py --estimate-only $EST $THREADS --out-md "$OUT/scaling_estimate.md"

ls -l "$OUT"
if [ -n "$failed" ]; then echo "run_gpu.sh: failed:$failed"; exit 1; fi
echo "run_gpu.sh: all done; tables in $OUT"
