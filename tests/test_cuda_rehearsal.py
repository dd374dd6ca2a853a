"""tests/test_cuda.py rehearsed on the CPU: the GPU checks run only where a GPU is lent, and rarely; their
code must at least run everywhere, so that a GPU session is not spent on a typo."""

import os
import subprocess
import sys
from pathlib import Path


def test_the_cuda_tests_run_on_the_cpu_with_their_cuda_only_calls_left_out():
    cuda_tests = Path(__file__).with_name("test_cuda.py")
    env = {**os.environ, "PML_MUTUAL_CUDA_REHEARSAL": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cuda_tests), "-rs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
