#!/usr/bin/env bash
# The speed figures of a GPU machine, in one go (CI has none): perf_step (+ host-sync audit), perf_losses
# (the Gram losses stacked vs called, at the GPU step's batch), perf_eval
# (torch-GPU kNN at DeepFashion2's size, tie-heavy case), perf_checkpoint (epoch checkpoints at ResNet-50 size),
# perf_extract (an embedding pass: small worker tasks vs one model batch per task), perf_e2e (one `ours` stage at CUB size,
# decoded by the workers and on the GPU), perf_decode. For a lent GPU with a time limit: gpu_session.sh.
# Logs and JSON go to ${OUT:-gpu_results}.     bash benchmarks/gpu_perf.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CUB=${CUB:-/tmp/pml_mutual_cub_500x375/CUB_200_2011}
python3 benchmarks/perf_step.py --model resnet50 --device cuda --batch-size 48 --classes-per-batch 16 --sync-audit \
    --out "$OUT/perf_step_resnet50.json" 2>&1 | tee "$OUT/perf_step_resnet50.log" | grep -v "^ratio: compute"
python3 benchmarks/perf_losses.py --device cuda --batch-sizes 48 80 --out "$OUT/perf_losses.json" 2>&1 | tee "$OUT/perf_losses.log"
python3 benchmarks/perf_eval.py --sizes 88000 --dim 512 --variants ours@1248 torch@1248 raw_torch@1248 --device cuda \
    --out "$OUT/perf_eval_88k.json" 2>&1 | tee "$OUT/perf_eval_88k.log" | grep "ratio\|  "
python3 benchmarks/perf_eval.py --sizes 20000 --dim 128 --variants torch@1248 --ties --device cuda \
    --out "$OUT/perf_eval_ties.json" 2>&1 | tee "$OUT/perf_eval_ties.log" | grep "ratio\|  "
python3 benchmarks/perf_checkpoint.py --model resnet50 --device cuda --out "$OUT/perf_checkpoint_resnet50.json" 2>&1 \
    | tee "$OUT/perf_checkpoint_resnet50.log"
python3 benchmarks/perf_extract.py --workers 14 --device cuda --model resnet50 --out "$OUT/perf_extract_resnet50.json" 2>&1 \
    | tee "$OUT/perf_extract_resnet50.log"
python3 benchmarks/perf_e2e.py --device cuda --model resnet50 --num-workers 14 --root "$CUB" --rounds 3 \
    --out "$OUT/perf_e2e_resnet50.json" 2>&1 | tee "$OUT/perf_e2e_resnet50.log" | tail -9
# the same stage with drift and evaluation decoded on the GPU (embed_decode="device", needs torchvision), and the decoding rates
python3 benchmarks/perf_e2e.py --device cuda --model resnet50 --num-workers 14 --root "$CUB" --rounds 3 --embed-decode device \
    --out "$OUT/perf_e2e_resnet50_device_decode.json" 2>&1 | tee "$OUT/perf_e2e_resnet50_device_decode.log" | tail -10
python3 benchmarks/perf_decode.py --device cuda --workers 14 --out "$OUT/perf_decode.json" 2>&1 | tee "$OUT/perf_decode.log"
