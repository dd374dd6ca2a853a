#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none). Writes logs and JSON to ${OUT:-gpu_results}.
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$OUT/versions.log"
import faiss, torch
try:
    import torchvision; tv = torchvision.__version__
except ImportError:
    tv = "absent"
print("torch", torch.__version__, "torchvision", tv, "faiss", faiss.__version__,
      "faiss GPUs", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0, "device", torch.cuda.get_device_name())
PY
# CUDA AMP, float32 losses under fp16 autocast, torchvision backbones, trainers, DDP (gloo), smoke runs on CUDA
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/models tests/trainers tests/test_distributed.py \
    tests/test_reproduce.py 2>&1 | tee "$OUT/pytest.log" | tail -25
# step time of each method with the paper's backbones at 224 px (AMP on CUDA), against finetune and the compute limit
python3 benchmarks/perf_step.py --model resnet50 --device cuda --batch-size 48 --classes-per-batch 16 \
    --out "$OUT/perf_step_resnet50.json" 2>&1 | tee "$OUT/perf_step_resnet50.log" | tail -12
python3 benchmarks/perf_step.py --model bninception --device cuda --batch-size 80 --classes-per-batch 16 \
    --out "$OUT/perf_step_bninception.json" 2>&1 | tail -12 | tee "$OUT/perf_step_bninception.log"
# one real epoch of ResNet-50 at 224 px on fixture-sized CUB-format data, every stage of `ours`, AMP
python3 benchmarks/cub200.py --smoke --backbone resnet50 --image-size 224 --classes-per-batch 8 --images-per-class 3 \
    --iterations 20 --device cuda --amp --methods ours --out "$OUT/cub200_smoke_resnet50.json" 2>&1 \
    | tee "$OUT/cub200_smoke_resnet50.log" | tail -12
