"""The reproduction scripts (benchmarks/cub200.py, cars196.py, deepfashion2.py) end to end on smoke data."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from pml_mutual.published import PUBLISHED, TABLES
from pml_mutual.reproduce import format_table, run

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "dataset, setting, methods, extra",
    [
        # 5 stages: virtual features of 3 earlier stages, from maps composed stage to stage; the gallery
        # report
        (
            "cub200",
            "multi-task",
            ["finetune", "ours"],
            ["--drift-mode", "learned_chained", "--gallery-report"],
        ),
        ("cars196", "one-task", ["fecd", "ours"], []),
        ("deepfashion2", "one-task", ["joint", "ours"], []),
    ],
)
def test_benchmark_script_smoke(tmp_path, monkeypatch, capsys, dataset, setting, methods, extra):
    out = tmp_path / "r.json"
    argv = [
        str(BENCHMARKS / f"{dataset}.py"),
        "--smoke",
        "--setting",
        setting,
        "--methods",
        *methods,
        "--out",
        str(out),
        *extra,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(argv[0], run_name="__main__")
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert [r["method"] for r in rows] == ["initial", *methods]
    n_columns = 3 if setting == "one-task" else 6
    for r in rows:
        assert len(r["measured_columns"]) == n_columns
        assert all(0.0 <= v <= 100.0 for v in r["measured_columns"])
        expected = PUBLISHED[(dataset, "bninception", setting)].get(r["method"])
        assert r["published"] == expected
    assert rows[-1]["published"] is not None  # "ours" is in every table
    if "--gallery-report" in extra:
        assert "Gallery without re-embedding" in capsys.readouterr().out
        for r in rows:
            assert all(
                0.0 <= r["gallery"][n] <= 100.0 for n in ("stored", "translation", "learned", "reembedded")
            )


def test_table_formatting_shows_published_and_delta():
    def row(old, new, all_):
        return {
            "method": "ours",
            "recall@1": {"old": old, "new": new, "all": all_, "per_stage": [old, new]},
            "published": [77.29, 78.07, 73.73],
        }

    rows = [row(70.0, 80.0, 75.0), row(72.0, 78.0, 73.0)]
    text = format_table(rows, "cub200", "bninception", "one-task")
    assert "71.00 ± 1.41 |  77.29 |  -6.29" in text and "74.00 ± 1.41 |  73.73 |  +0.27" in text


def test_cli_refuses_missing_paths_and_tables_without_the_dataset(tmp_path):
    with pytest.raises(SystemExit, match="--data-root is required"):
        run("cub200", [])
    with pytest.raises(SystemExit, match="--weights is required"):
        run("cub200", ["--data-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        run("cars196", ["--data-root", str(tmp_path), "--weights", str(tmp_path / "w.pth")])
    with pytest.raises(SystemExit, match="Table 5 of the paper has no cars196 rows"):
        run("cars196", ["--table", "5", "--smoke"])


def test_every_table_preset_has_published_rows():
    for number, table in TABLES.items():
        backbones = table["backbone"] if isinstance(table["backbone"], tuple) else (table["backbone"],)
        for dataset in table.get("datasets", ["cub200", "cars196", "deepfashion2"]):
            for backbone in backbones:
                rows = PUBLISHED[(dataset, backbone, table["setting"])]
                assert any(m in rows for m in table["methods"]), (number, dataset, backbone)


def test_benchmark_script_under_torchrun_two_ranks(tmp_path):
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(BENCHMARKS.parent)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(port),
        str(BENCHMARKS / "cub200.py"),
        "--smoke",
        "--methods",
        "ours",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("total time") == 1  # rank 0 alone prints and writes
    assert [r["method"] for r in json.loads(out.read_text())["results"]] == ["initial", "ours"]


def test_embed_decode_device_smoke_runs_in_a_run_directory_of_its_own(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    runs = tmp_path / "runs"
    for decode in ("workers", "device"):
        argv = [
            str(BENCHMARKS / "cars196.py"),
            "--smoke",
            "--crop",
            "--methods",
            "ours",
            "--runs",
            str(runs),
            "--embed-decode",
            decode,
            "--out",
            str(tmp_path / f"{decode}.json"),
        ]
        monkeypatch.setattr(sys, "argv", argv)
        # the device run is not refused by the workers run's directory
        runpy.run_path(argv[0], run_name="__main__")
    rows = json.loads((tmp_path / "device.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["initial", "ours"]
    # initial and ours, once per decode setting
    assert len({p.parent for p in runs.rglob("config.json")}) == 4


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from pml_mutual.checks import check_output_file

    (tmp_path / "file").write_text("")
    for bad, message in (
        (tmp_path, "is a directory"),
        (tmp_path / "file" / "x.json", "is a file, not a directory"),
    ):
        with pytest.raises(SystemExit, match=message):
            check_output_file(bad)
    assert check_output_file(tmp_path / "new" / "deeper" / "r.json") == tmp_path / "new" / "deeper" / "r.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_realdata.py"
    for extra, message in (
        (["--out", str(tmp_path)], "is a directory"),
        (["--methods", "finetune", "--fidelity"], "--fidelity measures the `ours` run"),
        (["--runs", str(tmp_path / "file")], "is a file"),
    ):
        done = subprocess.run(
            [
                sys.executable,
                str(script),
                "--dataset",
                "glyphs",
                "--setting",
                "multi-task",
                "--quick",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0 and message in done.stderr, done.stderr[-1000:]


def test_a_smoke_run_with_runs_resumes_when_rerun_and_huge_crops_are_refused(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    argv = [
        str(BENCHMARKS / "cub200.py"),
        "--smoke",
        "--methods",
        "finetune",
        "--device",
        "cpu",
        "--runs",
        str(runs),
    ]
    stamps = []
    for _ in range(2):  # on 0e3a6e5 the second was refused as another identity (a new temporary fixture)
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(argv[0], run_name="__main__")
        stamps.append({p: p.stat().st_mtime_ns for p in runs.rglob("model.pt")})
    assert stamps[0] and stamps[0] == stamps[1]  # the rerun resumed its completed run: nothing retrained
    monkeypatch.setattr(
        sys, "argv", argv[:-2] + ["--runs", str(tmp_path / "other"), "--image-size", "100000"]
    )
    with pytest.raises(SystemExit, match=r"--image-size 100000: a batch of .* GiB of inputs alone"):
        runpy.run_path(argv[0], run_name="__main__")
