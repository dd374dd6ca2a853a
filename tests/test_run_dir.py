"""RunDirectory's background writes: stage files queued behind the epoch checkpoint, recorded, checked."""

import json

import pytest
import torch

from pml_mutual import run_dir, run_files
from pml_mutual.run_dir import RunDirectory, RunDirectoryError


@pytest.fixture
def directory(tmp_path):
    d = RunDirectory(tmp_path / "run")
    d.path.mkdir()
    return d


def record():
    return {"results": {}, "log": {}}


def test_a_stage_file_written_in_the_background_is_the_snapshot_taken_at_the_call_and_is_recorded(directory):
    directory.save_in_background({"stage": 0, "epoch": 1, "models": {"trunk": {"w": torch.randn(500, 500)}}})
    support = {"w": torch.randn(500, 500)}
    expected = support["w"].clone()
    directory.save_stage_file_in_background(0, "support.pt", support)
    support["w"].add_(1.0)  # training's networks may change after the call: the file holds the snapshot
    directory.save_stage(0, {"model.pt": {"v": torch.zeros(3)}}, record())
    files = json.loads((directory.stage_dir(0) / "stage.json").read_text())["files"]
    assert set(files) == {"support.pt", "model.pt"}
    # loaded against its SHA-256
    assert torch.equal(directory.load_stage_file(0, "support.pt")["w"], expected)
    assert not (
        directory.path / "in_progress.pt"
    ).exists()  # the stage is complete: its epoch checkpoint goes

    (directory.stage_dir(0) / "support.pt").write_bytes(run_files._bytes_of({"w": expected + 1}))
    with pytest.raises(RunDirectoryError, match="support.pt does not match the SHA-256"):
        directory.load_stage_file(0, "support.pt")


def test_a_failed_background_write_surfaces_at_save_stage_and_the_stage_stays_incomplete(
    directory, monkeypatch
):
    write = run_dir.write_atomic

    def full_disk(data, path):
        if path.name == "support.pt":
            raise OSError(28, "No space left on device")
        write(data, path)

    monkeypatch.setattr(run_dir, "write_atomic", full_disk)
    monkeypatch.setattr(run_files, "write_atomic", full_disk)  # the stage files' writer
    directory.save_stage_file_in_background(0, "support.pt", {"w": torch.ones(3)})
    with pytest.raises(OSError, match="No space left"):
        directory.save_stage(0, {"model.pt": {"v": torch.zeros(3)}}, record())
    assert not (directory.stage_dir(0) / "stage.json").exists()


def test_a_non_finite_stage_file_is_refused_at_the_call_naming_it(directory):
    with pytest.raises(FloatingPointError, match=r"support\.pt.*non-finite"):
        directory.save_stage_file_in_background(0, "support.pt", {"w": torch.tensor([1.0, float("nan")])})
    assert not (directory.stage_dir(0) / "support.pt").exists()


def test_background_writes_land_in_the_order_queued(directory, monkeypatch):
    landed = []
    write = run_dir.write_atomic

    def logged(data, path):
        write(data, path)
        landed.append(path.name)

    monkeypatch.setattr(run_dir, "write_atomic", logged)
    monkeypatch.setattr(run_files, "write_atomic", logged)
    directory.save_in_background({"epoch": 1, "models": {"w": torch.randn(1000, 1000)}})  # the larger, first
    directory.save_stage_file_in_background(0, "support.pt", {"w": torch.ones(3)})
    directory.save_stage_file_in_background(0, "extra.pt", {"w": torch.ones(3)})
    directory.wait()
    assert landed == ["in_progress.pt", "support.pt", "extra.pt"]


def test_data_files_are_recorded_once_and_a_change_is_refused_naming_the_datasets(tmp_path):
    d = RunDirectory(tmp_path / "run")
    identity, files = {"config": {"lr": 1}}, {"training": ["a1"], "test": ["t1"]}
    d.check_identity(identity, data_files=files)
    assert json.loads((d.path / "data_files.json").read_text()) == files
    d.check_identity(identity, data_files=files)  # the same files: accepted
    with pytest.raises(RunDirectoryError, match=r"image files of the training dataset differ in size"):
        d.check_identity(identity, data_files={"training": ["a2"], "test": ["t1"]})
    # the identity is named first
    with pytest.raises(RunDirectoryError, match=r"different identity \(config.lr"):
        d.check_identity({"config": {"lr": 2}}, data_files={"training": ["a2"], "test": ["t1"]})
    d.check_identity(identity, data_files={"training": ["a2"], "test": ["t1"]}, fresh=True)  # moved aside
    assert json.loads((tmp_path / "run.old-1" / "data_files.json").read_text()) == files
    assert json.loads((d.path / "data_files.json").read_text())["training"] == ["a2"]


def test_a_directory_that_recorded_no_data_files_records_them_and_none_are_recorded_without_any(tmp_path):
    d = RunDirectory(tmp_path / "run")
    d.check_identity({"config": {}})  # a run without image files (or written before they were recorded)
    assert not (d.path / "data_files.json").exists()
    d.check_identity({"config": {}}, data_files={"test": ["t1"]})
    assert json.loads((d.path / "data_files.json").read_text()) == {"test": ["t1"]}
    with pytest.raises(RunDirectoryError, match="test dataset"):
        d.check_identity({"config": {}}, data_files={"test": ["t2"]})


def test_a_second_live_process_on_the_directory_is_refused_naming_the_holder_and_a_dead_ones_lock_is_gone(
    tmp_path,
):
    import os
    import subprocess
    import sys

    first = RunDirectory(tmp_path / "run")
    first.lock()
    with pytest.raises(RunDirectoryError, match=rf"in use by a running process \(pid {os.getpid()} on "):
        RunDirectory(
            tmp_path / "run"
        ).lock()  # another open file description: flock refuses it, in-process too
    first.unlock()
    second = RunDirectory(tmp_path / "run")
    second.lock()
    second.unlock()
    # a process killed while holding the lock leaves no lock behind
    code = (
        "import os, signal, sys; from pml_mutual.run_dir import RunDirectory; "
        "RunDirectory(sys.argv[1]).lock(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], timeout=120)
    RunDirectory(tmp_path / "run").lock()


def test_every_file_a_run_writes_gets_the_umasks_mode(tmp_path):
    import os
    import stat

    from pml_mutual.run_dir import FILE_MODE, save_json, write_atomic

    write_atomic(b"x", tmp_path / "a.pt")
    save_json({"a": 1}, tmp_path / "b.json")
    (tmp_path / "c.md").write_text("plain open()")
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in tmp_path.iterdir()}
    assert modes["a.pt"] == modes["b.json"] == modes["c.md"] == FILE_MODE  # 0e3a6e5: 0600 beside 0644
