#!/usr/bin/env bash
# The measurements and checks that need a CUDA GPU (CI has none), in one device call, most important first,
# each under its own time limit and all under GPU_BUDGET seconds. Leaves two files in $OUT: summary.txt
# (each step's exit code, seconds and last lines) and gpu.tar.gz (every log and JSON).
#
#   bash benchmarks/gpu.sh [PROFILE]
#     session  (default) the performance targets, within a lent GPU's limits: 15 minutes of device time
#              in all, 10 minutes a command, few files back (GPU_BUDGET default 500 s)
#     checks   the test files that need CUDA (AMP, backbones, trainers, DDP, reproduction smoke runs), the
#              step time with the paper's backbones and a ResNet-50 smoke run of `ours`
#     full     every performance figure, the longer variants included (GPU_BUDGET default 3000 s)
#     quick    each session step's --quick variant on the CPU (what the tests run)
#
#   here, once:   bash scripts/gpu_wheels.sh          (PML and faiss-cpu wheels for the GPU machine's Python, into .whl/)
#   device run:   command "bash benchmarks/gpu.sh", carry [".whl"], timeout_s 600
set -uo pipefail
PROFILE=${1:-session}
case $PROFILE in
    session | checks | quick) BUDGET=${GPU_BUDGET:-500} ;;
    full) BUDGET=${GPU_BUDGET:-3000} ;;
    *) echo "unknown profile '$PROFILE': session, checks, full or quick" >&2; exit 2 ;;
esac
OUT=${OUT:-gpu_results}
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pml_mutual_gpu.XXXXXX")
LOGS=$WORK/gpu
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

TRAINING="python3 benchmarks/perf_training.py"
PIPELINE="python3 benchmarks/perf_pipeline.py"
RUN="python3 benchmarks/perf_run.py"
EVAL="python3 benchmarks/perf_eval.py"
if [[ $PROFILE == quick ]]; then
    DEV=cpu
    E2E=(--quick --num-workers 1 --rounds 1 --device cpu)
    EVAL_ARGS=(--sizes 2000 --dim 64 --variants ours@1248 torch@1248 raw_torch@1248 --device cpu)
    TIES=(--sizes 2000 --dim 64 --variants torch@1248 --ties --device cpu)
    STEP=(--quick --device cpu)
    DECODE=(--quick --device cpu)
    CHECKPOINT=(--quick --device cpu)
    LOSSES=(--batch-sizes 16 --repeats 3 --device cpu)
else
    DEV=cuda
    CUB=$WORK/CUB_200_2011  # written by the first stage measurement (100 classes × 80 JPEGs of 500×375), reused after
    E2E=(--device cuda --model resnet50 --num-workers 14 --rounds "$([[ $PROFILE == full ]] && echo 3 || echo 1)" --root "$CUB")
    EVAL_ARGS=(--sizes 88000 --dim 512 --variants ours@1248 torch@1248 raw_torch@1248 --device cuda)
    TIES=(--sizes 20000 --dim 128 --variants torch@1248 --ties --device cuda)
    STEP=(--model resnet50 --device cuda --batch-size 48 --classes-per-batch 16 --sync-audit)
    DECODE=(--device cuda --workers 14)
    CHECKPOINT=(--model resnet50 --device cuda)
    LOSSES=(--device cuda --batch-sizes 48 80)
fi

if [[ $PROFILE == checks ]]; then
    TAIL=25 step pytest 400 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/models tests/trainers \
        tests/test_distributed.py tests/test_reproduce.py
    TAIL=12 step step_resnet50 60 $TRAINING step "${STEP[@]}" --out "$LOGS/perf_training_step_resnet50.json"
    TAIL=12 step step_bninception 60 $TRAINING step --model bninception --device cuda --batch-size 80 \
        --classes-per-batch 16 --out "$LOGS/perf_training_step_bninception.json"
    TAIL=12 step cub200_smoke_resnet50 120 python3 benchmarks/cub200.py --smoke --backbone resnet50 --image-size 224 \
        --classes-per-batch 8 --images-per-class 3 --iterations 20 --device cuda --amp --methods ours \
        --out "$LOGS/cub200_smoke_resnet50.json"
else
    # 1. the stage end to end (target e2e_over_compute <= 1.3), drift and evaluation decoded by the workers, then on the GPU
    TAIL=9 step e2e_workers 150 $PIPELINE stage "${E2E[@]}" --out "$LOGS/perf_pipeline_stage_workers.json"
    if [[ $HAVE_TV == 1 ]]; then
        TAIL=9 step e2e_device_decode 120 $PIPELINE stage "${E2E[@]}" --embed-decode device \
            --out "$LOGS/perf_pipeline_stage_device.json"
    else
        echo "== e2e_device_decode: skipped, no torchvision" >> "$SUMMARY"
    fi
    # 2. evaluation at DeepFashion2's size against plain matmul + topk (target <= 1.5x), and the tie-heavy case (<= 2x)
    step eval 90 $EVAL "${EVAL_ARGS[@]}" --out "$LOGS/perf_eval.json"
    step eval_ties 60 $EVAL "${TIES[@]}" --out "$LOGS/perf_eval_ties.json"
    # 3. step times and the loss + virtual-feature share (targets < 3 % one-task, < 5 % at stage 5), host syncs
    TAIL=16 step step 100 $TRAINING step "${STEP[@]}" --out "$LOGS/perf_training_step.json"
    # 4. the checks that need a GPU (sync detector on a whole step, torch kNN = FAISS, nvJPEG's pixels, CUDA benchmarks)
    TAIL=6 step test_cuda 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -rs
    # what the decoding tests measured (upstream's stream hazard on this GPU; nvJPEG's pixels against Pillow's)
    grep -h "corrupted reader\|nvJPEG + resize" "$LOGS/test_cuda.log" >> "$SUMMARY" 2> /dev/null
    # 5. what an epoch checkpoint blocks training for at ResNet-50 size; decoding: the loader's images/s, the
    #    embedding input decoded by the workers and on the device; the losses at the GPU step's batch
    TAIL=4 step checkpoint 45 $RUN checkpoint "${CHECKPOINT[@]}" --out "$LOGS/perf_run_checkpoint.json"
    step decode 60 $PIPELINE decode "${DECODE[@]}" --out "$LOGS/perf_pipeline_decode.json"
    step losses 40 $TRAINING losses "${LOSSES[@]}" --out "$LOGS/perf_training_losses.json"
    if [[ $PROFILE == full ]]; then
        step extract 120 $PIPELINE extract --workers 14 --device cuda --model resnet50 --out "$LOGS/perf_pipeline_extract.json"
        step memory 300 $RUN memory --device cuda --out "$LOGS/perf_run_memory.json"
        step ops 60 $TRAINING ops --model resnet50 --out "$LOGS/perf_training_ops.json"
    fi
fi

echo "== total $((SECONDS - START)) s of a $BUDGET s budget, profile $PROFILE, on $DEV" >> "$SUMMARY"
cp "$SUMMARY" "$LOGS/"
tar -czf "$OUT/gpu.tar.gz" -C "$WORK" gpu
rm -rf "$WORK"
cat "$SUMMARY"
