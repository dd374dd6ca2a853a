"""The README and the docs: code blocks marked ``<!-- runs in CI -->`` run as written in a fresh directory,
and the docs site builds with ``mkdocs build --strict``."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page.relative_to(ROOT).as_posix(), code)
    for page in PAGES
    for code in re.findall(r"<!-- runs in CI -->\n```python\n(.*?)```", page.read_text(), flags=re.S)
]


def test_the_pages_mark_their_runnable_blocks():
    assert {page for page, _ in BLOCKS} >= {"README.md", "docs/index.md", "docs/online.md", "docs/losses.md"}


def test_the_readme_is_a_guide_of_at_most_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page, code", BLOCKS, ids=[f"{p}:{c.splitlines()[0][:30]}" for p, c in BLOCKS])
def test_a_marked_block_runs_as_written(page, code, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{page}: " + done.stderr[-3000:]


def test_the_docs_build_strictly(tmp_path):
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.fail("mkdocs is not installed: it is in the test extra (pip install -e '.[test]')")
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").exists()
