#!/usr/bin/env bash
# The wheels the GPU machine lacks (it has torch, torchvision and numpy but no network): PML and faiss-cpu
# for its Python 3.12, into .whl/ (ignored by git; carried by the device call: carry [".whl"]).
# The versions are those this machine's venv has, so both machines run the same library code.
#   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
versions=$("$PY" - <<'PY'
from importlib.metadata import version
print(f"pytorch-metric-learning=={version('pytorch-metric-learning')} faiss-cpu=={version('faiss-cpu')}")
PY
)
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl $versions
ls -l .whl
