#!/usr/bin/env bash
# Issue #15's GPU figures in one device call, most important first, inside a hard time budget.
#
# A task lent a GPU gets 15 minutes of device time in all (start-up included) and 10 minutes a command,
# and at most 8 files come back: gpu_checks.sh + gpu_perf.sh together do not fit. This script runs their
# target measurements in order of importance, each under its own time limit and all under
# GPU_SESSION_BUDGET seconds (default 500), and leaves two files in $OUT: summary.txt (each step's exit
# code, seconds and last lines) and gpu_session.tar.gz (every log and JSON).
#
#   here, once:   bash scripts/gpu_wheels.sh          (PML and faiss-cpu wheels for the GPU machine's Python, into .whl/)
#   device run:   command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 600
#   here (CPU):   GPU_SESSION_QUICK=1 bash benchmarks/gpu_session.sh   (each step's --quick variant; what the tests run)
set -uo pipefail
OUT=${OUT:-gpu_results}
BUDGET=${GPU_SESSION_BUDGET:-500}
QUICK=${GPU_SESSION_QUICK:-0}
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pml_mutual_gpu_session.XXXXXX")
LOGS=$WORK/gpu_session
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package from this checkout, not installed there
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

if compgen -G ".whl/*.whl" > /dev/null; then  # the GPU machine has no network: PML and faiss-cpu travel as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
        || { echo "installing the carried wheels failed" | tee -a "$SUMMARY"; exit 1; }
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME LIMIT_S COMMAND...: run it within LIMIT_S and what is left of the budget
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        echo "== $name: skipped, budget spent" >> "$SUMMARY"
        return
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    { echo "== $name: rc $rc in $((SECONDS - t0)) s (limit $limit s)$( ((rc == 124 || rc == 137)) && echo ', TIMED OUT')"
      tail -n "${TAIL:-10}" "$LOGS/$name.log"; } >> "$SUMMARY"
}

step versions 60 python3 -c "
import torch, faiss, pytorch_metric_learning as pml
try:
    import torchvision; tv = torchvision.__version__
except ImportError:
    tv = 'absent'
cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'torchvision', tv, 'pml', pml.__version__, 'faiss', faiss.__version__,
      'device', torch.cuda.get_device_name() if cuda else 'cpu', 'cpus', __import__('os').cpu_count())"
HAVE_TV=$(python3 -c "import torchvision" 2> /dev/null && echo 1 || echo 0)

if [[ $QUICK == 1 ]]; then
    DEV=cpu
    E2E=(--quick --num-workers 1 --rounds 1 --device cpu)
    EVAL=(--sizes 2000 --dim 64 --variants ours@1248 torch@1248 raw_torch@1248 --device cpu)
    TIES=(--sizes 2000 --dim 64 --variants torch@1248 --ties --device cpu)
    STEP=(--quick --device cpu)
    DECODE=(--quick --device cpu)
    CHECKPOINT=(--quick --device cpu)
    LOSSES=(--batch-sizes 16 --repeats 3 --device cpu)
else
    DEV=cuda
    CUB=$WORK/CUB_200_2011  # written by the first perf_e2e (100 classes × 80 JPEGs of 500×375), reused by the second
    E2E=(--device cuda --model resnet50 --num-workers 14 --rounds 1 --root "$CUB")
    EVAL=(--sizes 88000 --dim 512 --variants ours@1248 torch@1248 raw_torch@1248 --device cuda)
    TIES=(--sizes 20000 --dim 128 --variants torch@1248 --ties --device cuda)
    STEP=(--model resnet50 --device cuda --batch-size 48 --classes-per-batch 16 --sync-audit)
    DECODE=(--device cuda --workers 14)
    CHECKPOINT=(--model resnet50 --device cuda)
    LOSSES=(--device cuda --batch-sizes 48 80)
fi

# 1. the stage end to end (target e2e_over_compute <= 1.3), with drift and evaluation decoded by the workers, then on the GPU
TAIL=9 step e2e_workers 150 python3 benchmarks/perf_e2e.py "${E2E[@]}" --out "$LOGS/perf_e2e_workers.json"
if [[ $HAVE_TV == 1 ]]; then
    TAIL=9 step e2e_device_decode 120 python3 benchmarks/perf_e2e.py "${E2E[@]}" --embed-decode device --out "$LOGS/perf_e2e_device.json"
else
    echo "== e2e_device_decode: skipped, no torchvision" >> "$SUMMARY"
fi
# 2. evaluation at DeepFashion2's size against plain matmul + topk (target <= 1.5x), and the tie-heavy case (<= 2x)
step eval 90 python3 benchmarks/perf_eval.py "${EVAL[@]}" --out "$LOGS/perf_eval.json"
step eval_ties 60 python3 benchmarks/perf_eval.py "${TIES[@]}" --out "$LOGS/perf_eval_ties.json"
# 3. step times and the loss + virtual-feature share (targets < 3 % one-task, < 5 % at stage 5), host syncs
TAIL=16 step step 100 python3 benchmarks/perf_step.py "${STEP[@]}" --out "$LOGS/perf_step.json"
# 4. the checks that need a GPU (sync detector on a whole step, torch kNN = FAISS, nvJPEG's pixels, CUDA benchmarks)
TAIL=6 step test_cuda 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -rs
# what the decoding tests measured (upstream's stream hazard on this GPU; nvJPEG's pixels against Pillow's)
grep -h "corrupted reader\|nvJPEG + resize" "$LOGS/test_cuda.log" >> "$SUMMARY" 2> /dev/null
# 5. what an epoch checkpoint blocks training for at ResNet-50 size; decoding: the loader's images/s, the
#    embedding input decoded by the workers and on the device
TAIL=4 step checkpoint 45 python3 benchmarks/perf_checkpoint.py "${CHECKPOINT[@]}" --out "$LOGS/perf_checkpoint.json"
step decode 60 python3 benchmarks/perf_decode.py "${DECODE[@]}" --out "$LOGS/perf_decode.json"
step losses 40 python3 benchmarks/perf_losses.py "${LOSSES[@]}" --out "$LOGS/perf_losses.json"

echo "== total $((SECONDS - START)) s of a $BUDGET s budget, on $DEV" >> "$SUMMARY"
cp "$SUMMARY" "$LOGS/"
tar -czf "$OUT/gpu_session.tar.gz" -C "$WORK" gpu_session
rm -rf "$WORK"
cat "$SUMMARY"
