import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_perf_identity_quick_writes_where_out_says(tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perf_identity.py"), "--images", "40", "--classes",
                           "4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["sampled_datasets"] == 3 and result["content_records_s"] > 0 and result["ratio"] > 0
