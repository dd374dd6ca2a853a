"""The benchmark scripts run end to end in their quick, CI-sized variants (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


def run(script, *args):
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args], check=True, capture_output=True, text=True, timeout=600
    )
    return out.stdout


def test_perf_losses(tmp_path):
    out = run(
        "perf_training.py",
        "losses",
        "--batch-sizes",
        "16",
        "--dim",
        "32",
        "--repeats",
        "3",
        "--out",
        str(tmp_path / "l.json"),
    )
    assert "ratio:" in out
    rows = json.loads((tmp_path / "l.json").read_text())["rows"]
    assert rows[0]["batch_size"] == 16 and rows[0]["distill_ms"] > 0


def test_perf_eval_quick(tmp_path):
    out = run("perf_eval.py", "--quick", "--sizes", "300", "--dim", "16", "--out", str(tmp_path / "e.json"))
    lines = [line for line in out.splitlines() if line.startswith("ratio:")]
    assert len(lines) == 4
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    by = {r["variant"]: r for r in rows}
    # The evaluator and the raw search agree on this data (no duplicates: self is always first).
    assert by["ours@1"]["recall@1"] == pytest.approx(by["faiss@1"]["recall@1"])
    assert all(r["peak_rss_mb"] > 0 for r in rows)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs dataset-fashion-mnist (scripts/install_data.sh)")
@pytest.mark.parametrize("setting", ["one-task", "multi-task"])
def test_cpu_realdata_quick_fashion_mnist(tmp_path, setting):
    out = run(
        "cpu_realdata.py",
        "--dataset",
        "fashion-mnist",
        "--setting",
        setting,
        "--quick",
        "--methods",
        "finetune",
        "ours",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "r.json"),
    )
    assert ("Table 2 layout" in out) == (setting == "one-task")
    assert ("Table 5 layout" in out) == (setting == "multi-task")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {r["method"] for r in doc["results"]} == {"initial", "finetune", "ours"}
    for r in doc["results"]:
        assert 0 < r["recall@1"]["all"] <= 100 and r["seconds"] > 0
        assert len(r["recall@1"]["per_stage"]) == (2 if setting == "one-task" else 5)


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/fonts/truetype/dejavu").is_dir(), reason="needs the fonts (scripts/install_data.sh)"
)
def test_cpu_realdata_quick_glyphs(tmp_path):
    out = run(
        "cpu_realdata.py",
        "--dataset",
        "glyphs",
        "--setting",
        "multi-task",
        "--quick",
        "--drift-mode",
        "learned",
        "--drift-views",
        "1",
        "--methods",
        "ours_no_drift",
        "ours",
        "--fidelity",
        "--gallery",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "r.json"),
    )
    assert "Table 3 layout" in out and "no drift estimate" in out
    assert "Fidelity of the virtual features" in out and "Gallery without re-embedding" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {r["method"] for r in doc["results"]} == {"initial", "ours_no_drift", "ours"}
    assert len(doc["fidelity"]) == 1 + 2 + 3 + 4  # (after stage i, earlier stage b) pairs of 5 stages
    assert {r["method"] for r in doc["gallery"]} == {"ours_no_drift", "ours"}
    assert len(doc["results"][0]["recall@1"]["per_stage"]) == 5
    assert doc["config"]["hyper_parameters"]["lambda_corr"] > 0
    assert doc["config"]["hyper_parameters"]["drift_views"] == 1 and not doc["config"]["augment"]
    assert (tmp_path / "runs" / "glyphs_multi-task_quick_views1" / "seed0" / "ours").is_dir()


def test_perf_step_quick(tmp_path):
    out = run("perf_training.py", "step", "--quick", "--model", "mlp", "--out", str(tmp_path / "s.json"))
    assert "ratio: ours/compute_limit" in out and "loss_share_ours_stage5" in out
    doc = json.loads((tmp_path / "s.json").read_text())
    assert set(doc["steps_ms"]) == {"finetune", "fecd", "ours", "ours_stage5"}
    assert doc["compute_limit_ratio"] > 1


def test_perf_memory_quick(tmp_path):
    out = run("perf_run.py", "memory", "--quick", "--out", str(tmp_path / "m.json"))
    assert "ratio: stage3/stage2" in out
    assert len(json.loads((tmp_path / "m.json").read_text())["peak_rss_mb"]) == 4


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs dataset-fashion-mnist (scripts/install_data.sh)")
def test_obdsd_quick(tmp_path):
    out = run("obdsd.py", "--dataset", "fashion-mnist", "--quick", "--out", str(tmp_path / "o.json"))
    assert "OBD-SD on fashion-mnist" in out
    rows = json.loads((tmp_path / "o.json").read_text())["results"]
    assert {r["variant"] for r in rows} == {"base", "psd", "obdsd"}


@pytest.mark.parametrize("dataset", ["cub200", "cars196"])
def test_obdsd_paper_datasets_smoke(tmp_path, dataset):
    out = run("obdsd.py", "--dataset", dataset, "--smoke", "--out", str(tmp_path / "o.json"))
    assert f"OBD-SD on {dataset}" in out
    doc = json.loads((tmp_path / "o.json").read_text())
    assert {r["variant"] for r in doc["results"]} == {"base", "psd", "obdsd"}
    expected_alpha = {"cub200": 0.3, "cars196": 0.99}[dataset]  # the released per-dataset defaults
    assert doc["config"]["alpha"] == expected_alpha and doc["config"]["batch_size"] == 8


def test_perf_step_with_a_paper_backbone(tmp_path):
    out = run(
        "perf_training.py",
        "step",
        "--model",
        "bninception",
        "--image-size",
        "64",
        "--quick",
        "--out",
        str(tmp_path / "p.json"),
    )
    assert "ours_step_ms" in out and json.loads((tmp_path / "p.json").read_text())["model"] == "bninception"


def test_perf_e2e_quick(tmp_path):
    out = run(
        "perf_pipeline.py",
        "stage",
        "--quick",
        "--num-workers",
        "0",
        "--rounds",
        "3",
        "--out",
        str(tmp_path / "e2e.json"),
    )
    assert "e2e_over_compute:" in out and "bound by" in out and out.count("round ") == 3
    res = json.loads((tmp_path / "e2e.json").read_text())
    rounds = res["rounds"]
    assert len(rounds) == 3
    for r in rounds:
        # each round's phases add up to its end-to-end time, and compute is what its pure measurements give
        assert sum(r["phases_s"].values()) == pytest.approx(r["e2e_s"], rel=1e-6)
        assert r["compute_s"] == pytest.approx(res["iterations"] * r["step_s"] + r["extraction_s"], rel=1e-9)
        assert r["e2e_over_compute"] == pytest.approx(r["e2e_s"] / r["compute_s"], rel=1e-9)
        # the stage's own steps are part of its training phase
        assert 0 < r["steps_in_stage_s"] < r["phases_s"]["train"]
        assert r["first_step_in_stage_s"] <= r["steps_in_stage_s"]
        assert r["e2e_over_steps_in_stage"] == pytest.approx(
            r["e2e_s"] / (r["steps_in_stage_s"] + r["extraction_s"]), rel=1e-9
        )
        # the training phase split: around the trainer's loop + in it; waits and checkpoints are parts of the
        # loop
        tb = r["train_breakdown_s"]
        assert tb["around_trainer"] + tb["trainer"] == pytest.approx(r["phases_s"]["train"], rel=1e-9)
        assert (
            0 < tb["first_batch_wait"] <= tb["batch_waits"] < tb["trainer"]
            and 0 < tb["epoch_ends"] < tb["trainer"]
        )
        assert tb["around_trainer"] > 0
    # the reported figures are those of the round with the median ratio
    # the embedding input's rate and the model's, and which of them bounds drift and evaluation
    assert res["embed_decode"] == "workers" and res["embed_loader_images_per_s"] > 0
    assert res["model_embed_images_per_s"] > 0 and "drift and evaluation bound by" in out
    median = sorted(r["e2e_over_compute"] for r in rounds)[1]
    assert res["e2e_over_compute"] == median
    assert next(r for r in rounds if r["e2e_over_compute"] == median)["e2e_s"] == res["e2e_s"]


def test_perf_e2e_refuses_zero_rounds(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "perf_pipeline.py"),
            "stage",
            "--quick",
            "--rounds",
            "0",
            "--out",
            str(tmp_path / "e.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "--rounds must be at least 1" in proc.stderr
    assert not (tmp_path / "e.json").exists()


def test_perf_checkpoint_quick(tmp_path):
    out = run("perf_run.py", "checkpoint", "--quick", "--out", str(tmp_path / "c.json"))
    assert "ratio: last-epoch / mid-stage checkpoint" in out
    res = json.loads((tmp_path / "c.json").read_text())
    # mid-stage: two networks and their Adam moments (two per weight); after the last epoch the networks only
    assert 2.9 < res["mid_stage"]["bytes"] / res["last_epoch"]["bytes"] < 3.1
    assert res["ratio_last_over_mid"]["bytes"] == pytest.approx(
        res["last_epoch"]["bytes"] / res["mid_stage"]["bytes"]
    )


def test_perf_extract_quick(tmp_path):
    out = run("perf_pipeline.py", "extract", "--quick", "--out", str(tmp_path / "x.json"))
    assert "ratio: tasks/whole-batch pass time" in out
    res = json.loads((tmp_path / "x.json").read_text())
    # the same pass cut finer: more worker tasks than model batches, the old way one task per model batch
    assert res["tasks_per_pass"]["whole_batch"] == -(-res["images"] // res["batch"])
    assert res["tasks_per_pass"]["tasks"] > res["tasks_per_pass"]["whole_batch"]
    assert res["ratio_tasks_over_whole_batch"] == pytest.approx(
        res["tasks"]["pass_s"] / res["whole_batch"]["pass_s"]
    )


def test_perf_decode_quick(tmp_path):
    out = run("perf_pipeline.py", "decode", "--quick", "--out", str(tmp_path / "d.json"))
    assert out.count("ratio: resized/original") == 2
    res = json.loads((tmp_path / "d.json").read_text())
    rates = res["images_per_s"]
    assert set(rates) == {"train_original", "train_resized", "test_original", "test_resized"}
    for t in ("train", "test"):
        assert res["ratio_resized_over_original"][t] == pytest.approx(
            rates[f"{t}_resized"] / rates[f"{t}_original"]
        )
    embed = res["embed_images_per_s"]
    assert embed["workers"] > 0
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert "device" not in embed and "device decoding not measured" in out
    else:
        assert res["ratio_device_over_workers_embedding"] == pytest.approx(embed["device"] / embed["workers"])
        assert "ratio: device/workers embedding decode" in out


def test_perf_e2e_quick_decoding_on_the_device(tmp_path):
    pytest.importorskip("torchvision")
    out = run(
        "perf_pipeline.py",
        "stage",
        "--quick",
        "--num-workers",
        "1",
        "--embed-decode",
        "device",
        "--out",
        str(tmp_path / "e.json"),
    )
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["embed_decode"] == "device" and "decoded by the device" in out


def test_gpu_script_runs_every_session_step_quick_on_the_cpu(tmp_path):
    """The one-call GPU script's quick profile (each session step's --quick variant): every step's flags
    still parse and run, and
    what comes back is the two files the device tool can return."""
    import os
    import tarfile

    env = dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu.sh"), "quick"], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu.tar.gz", "summary.txt"]
    steps = [
        "versions",
        "e2e_workers",
        "eval",
        "eval_ties",
        "step",
        "test_cuda",
        "checkpoint",
        "decode",
        "losses",
    ]
    for name in steps:
        assert f"== {name}: rc 0 in" in summary, summary
    try:
        import torchvision  # noqa: F401

        assert "== e2e_device_decode: rc 0 in" in summary
    except ImportError:
        assert "== e2e_device_decode: skipped, no torchvision" in summary
    with tarfile.open(tmp_path / "out" / "gpu.tar.gz") as tar:
        names = set(tar.getnames())
    for json_file in (
        "perf_pipeline_stage_workers",
        "perf_eval",
        "perf_eval_ties",
        "perf_training_step",
        "perf_run_checkpoint",
        "perf_pipeline_decode",
        "perf_training_losses",
    ):
        assert f"gpu/{json_file}.json" in names
    assert {f"gpu/{n}.log" for n in steps} <= names


def test_perf_training_ops_counts_more_for_the_methods_that_do_more(tmp_path):
    out = run("perf_training.py", "ops", "--out", str(tmp_path / "o.json"))
    steps = json.loads((tmp_path / "o.json").read_text())["steps"]
    # a teacher's Gram loss, then a second student and L_mutual, then virtual teachers: each adds ops
    assert (
        steps["finetune"]["total"]
        < steps["fecd"]["total"]
        < steps["ours"]["total"]
        < steps["ours_stage5"]["total"]
    )
    assert "ratio: ours/finetune ops" in out


def test_perf_run_identity_writes_where_out_says(tmp_path):
    run("perf_run.py", "identity", "--images", "40", "--classes", "4", "--out", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["sampled_datasets"] == 3 and result["content_records_s"] > 0 and result["ratio"] > 0


def test_gpu_script_refuses_an_unknown_profile():
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown profile 'fast'" in proc.stderr


def test_no_benchmark_or_example_reaches_into_a_private_member():
    import re

    root = BENCH.parent
    pattern = re.compile(r"(?:pml_mutual[\w.]*\.|learner\.|trainer\.|ctx\.)_[a-z]")
    hits = [
        f"{p.name}: {m.group(0)}"
        for d in ("benchmarks", "examples")
        for p in (root / d).glob("*.py")
        for m in pattern.finditer(p.read_text())
    ]
    assert not hits, hits


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/fonts/truetype/dejavu").is_dir(), reason="needs the fonts (scripts/install_data.sh)"
)
def test_gallery_maps_quick(tmp_path):
    out = run(
        "gallery_maps.py",
        "--dataset",
        "glyphs",
        "--setting",
        "multi-task",
        "--quick",
        "--validation",
        "--augment",
        "--drift-views",
        "1",
        "--shrinks",
        "0.3",
        "--clusters",
        "4",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "m.json"),
    )
    assert "class-local λ0.3" in out and "cluster-local k4 λ0.3" in out
    maps = json.loads((tmp_path / "m.json").read_text())["rows"][0]["maps"]
    assert maps["stored"]["share"] == 0 and maps["reembedded"]["share"] == pytest.approx(1)
    assert 0 < maps["global"]["all"] <= 1 and len(maps["global"]["share_by_stage"]) == 4
