"""The README's code blocks marked ``<!-- runs in CI -->`` run as written, in a fresh directory."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"<!-- runs in CI -->\n```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_marks_its_runnable_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_a_readme_block_runs_as_written(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(README.parent))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
