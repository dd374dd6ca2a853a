"""The run directory: what an online run keeps on disk, and the guarantees about it, in one place.

Layout::

    run_dir/config.json            the run's identity (see OnlineLearner.run_identity); written once
    run_dir/data_files.json        a digest of the image files' sizes per dataset; written once
    run_dir/in_progress.pt         the current stage's last finished epoch (models, optimizers, loss log)
    run_dir/stage_XXX/model.pt     F_p of stage XXX (the deployed model), support.pt (F_s), drift.pt
    run_dir/stage_XXX/stage.json   results, log and the SHA-256 of each file above; written last, it
                                   marks the stage complete
    run_dir/results.json, results.md

Guarantees:

- every file is written to a temporary name of this project's own pattern (``.pml_mutual-*.tmp``) in
  its final directory and renamed: a kill never leaves a partial file under a real name; temporaries of
  a killed run are removed only in the directories this class writes, only with that pattern, and only
  after the identity check accepted the directory;
- nothing holding a NaN or inf tensor is written, and nothing holding one is loaded;
- a stage's files are checked against the SHA-256 recorded in its ``stage.json`` when loaded; any file
  that cannot be read is an error naming it and saying what to do;
- a directory holding a run of another identity is refused, naming the fields that differ, and so is
  one whose image files changed size under the same paths (replaced, re-encoded, resized in place);
- the working directory, a filesystem root or the home directory are refused as run directories.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import torch

from . import distributed
from .checks import nonfinite_tensors
from .identity import describe_data_change, identity_differences
from .run_files import (  # noqa: F401 (public)
    CHECKED_FORMAT,
    FILE_MODE,
    TMP_PREFIX,
    TMP_SUFFIX,
    RunDirectoryError,
    _checked_bytes,
    _save_checked,
    _to_cpu,
    atomic_save,
    check_run_dir,
    free_name,
    load_checked,
    read_json,
    refuse_nonfinite,
    save_json,
    write_atomic,
)

_START_FRESH = (
    "use another run_dir, remove it, or start fresh (OnlineLearner(..., fresh=True), or --fresh of the "
    "reproduction scripts cub200.py / cars196.py / deepfashion2.py, moves its files aside)"
)


class RunDirectory:
    """One run's directory (see the module docstring). Under torchrun rank 0 writes, every rank reads."""

    LOCK = ".pml_mutual.lock"

    def __init__(self, path):
        self.path = check_run_dir(path)
        self._lock_fd: int | None = None
        self._writer: threading.Thread | None = None  # the last queued background write
        self._writer_error: BaseException | None = None
        self._stage_sums: dict[tuple[int, str], str] = {}  # (stage, file) written in the background → SHA-256

    # ------------------------------------------------------------------ the lock
    def lock(self) -> None:
        """Hold an advisory lock on the directory (``.pml_mutual.lock``, ``flock``) until :meth:`unlock`: a
        second live process on the same directory is refused, naming the holder. The kernel drops the
        lock when its process dies, so a killed run never blocks its resume. Rank 0 only; a no-op where
        ``fcntl`` is missing (Windows)."""
        if not distributed.is_main() or self._lock_fd is not None:
            return
        try:
            import fcntl
        except ImportError:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / self.LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirectoryError(
                f"{self.path} is in use by a running process ({holder}): two runs in one "
                "directory would mix their checkpoints; wait for it, stop it, or use another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ identity
    def check_identity(self, identity: dict, fresh: bool = False, data_files: dict | None = None) -> None:
        """Accept the directory for a run of ``identity``: a new one, or one holding the same identity.

        ``data_files`` (JSON-able, e.g. a digest of the image files' sizes per dataset) is what the
        identity cannot see: the files' contents under the same paths. A directory that recorded other
        data files is refused as one of another identity is; one that recorded none (written before
        they were recorded) records them now.

        ``fresh=True`` accepts a directory whose identity or data files differ only after moving it aside
        (``<dir>.old-N``); otherwise it is refused with what differs named. Afterwards, temporaries of a
        killed run are swept (this project's pattern, its directories).
        """
        path, files_path = self.path / "config.json", self.path / "data_files.json"
        identity = json.loads(json.dumps(identity))
        data_files = None if data_files is None else json.loads(json.dumps(data_files))
        if distributed.is_main() and path.exists():
            diffs = identity_differences(read_json(path), identity)
            changed = []
            if not diffs and data_files is not None and files_path.exists():
                recorded = read_json(files_path)
                # a kind of record added by a later version is recorded now, not counted as a change
                changed = [k for k in sorted(set(recorded) & set(data_files)) if recorded[k] != data_files[k]]
            if (diffs or changed) and fresh:
                self._move_run_aside(free_name(self.path))
            elif diffs:
                raise RunDirectoryError(
                    f"{self.path} holds a run with a different identity ({'; '.join(diffs[:8])}); "
                    f"{_START_FRESH}"
                )
            elif changed:
                raise RunDirectoryError(
                    f"{self.path} holds a run made with other data or code: "
                    f"{'; '.join(describe_data_change(k) for k in changed)} (recorded in {files_path.name}); "
                    f"its numbers are not this run's: {_START_FRESH}"
                )
        distributed.barrier()
        if distributed.is_main():
            if not path.exists():
                save_json(identity, path)
            if data_files is not None:
                recorded = read_json(files_path) if files_path.exists() else {}
                if any(k not in recorded for k in data_files):
                    save_json({**data_files, **recorded}, files_path)
            self._sweep_temporaries()
        distributed.barrier()

    # what a run writes in its directory; fresh=True moves these aside and leaves anything else where it is
    RUN_FILES = ("config.json", "data_files.json", "results.json", "results.md", "in_progress.pt")

    def _run_entries(self) -> list[Path]:
        named = [self.path / n for n in self.RUN_FILES if (self.path / n).exists()]
        stages = sorted(p for p in self.path.glob("stage_[0-9][0-9][0-9]") if p.is_dir())
        temporaries = sorted(self.path.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"))
        return named + stages + temporaries

    def _move_run_aside(self, aside: Path) -> None:
        """The earlier run's files (and only those) into ``aside``: files of the user's own in the directory
        (notes, logs, a dataset list) stay where they are."""
        aside.mkdir()
        for entry in self._run_entries():
            os.replace(entry, aside / entry.name)

    def _sweep_temporaries(self) -> None:
        dirs = [self.path] + sorted(self.path.glob("stage_[0-9][0-9][0-9]"))
        for d in dirs:
            for stale in d.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
                stale.unlink()

    # ------------------------------------------------------------------ stages
    def stage_dir(self, stage: int) -> Path:
        return self.path / f"stage_{stage:03d}"

    def completed_stages(self, limit: int) -> list[dict]:
        """The ``stage.json`` documents of the completed stages 0, 1, … (at most ``limit``)."""
        done = []
        while len(done) < limit and (self.stage_dir(len(done)) / "stage.json").exists():
            path = self.stage_dir(len(done)) / "stage.json"
            doc = read_json(path)
            if not {"results", "log", "files"} <= set(doc):
                raise RunDirectoryError(
                    f"{path} is damaged (missing {sorted({'results', 'log', 'files'} - set(doc))}); "
                    "delete its stage directory to retrain that stage"
                )
            done.append(doc)
        return done

    def save_stage_file_in_background(self, stage: int, name: str, obj) -> None:
        """One checkpoint of a stage, written ahead of :meth:`save_stage` by the background thread (after
        the writes queued before it) from a CPU snapshot taken now; :meth:`save_stage` waits for it and
        records its SHA-256. Rank 0 only."""
        if not distributed.is_main():
            return
        path = self.stage_dir(stage) / name
        snapshot = _to_cpu(obj)
        refuse_nonfinite(snapshot, path)

        def write():
            self._stage_sums[(stage, name)] = _save_checked(snapshot, path)

        self._in_background(write)

    def save_stage(self, stage: int, files: dict, record: dict) -> None:
        """Write a stage's checkpoints, then its ``stage.json`` (``record`` + the SHA-256 of these and of the
        ones written in the background) last."""
        self.wait()
        d = self.stage_dir(stage)
        if distributed.is_main():
            sums = {name: sha for (s, name), sha in self._stage_sums.items() if s == stage}
            self._stage_sums = {}
            sums.update({name: atomic_save(obj, d / name) for name, obj in files.items()})
            save_json(dict(record, files=sums), d / "stage.json")
            self.remove("in_progress.pt")
        distributed.barrier()  # no rank starts the next stage before this one is on disk

    def save(self, obj, name: str) -> None:
        """Atomic save of a checkpoint by rank 0 (non-finite tensors refused); every rank waits for it."""
        if distributed.is_main():
            atomic_save(obj, self.path / name)
        distributed.barrier()

    def load_stage_file(self, stage: int, name: str, map_location=None):
        record = self.completed_stages(stage + 1)
        sha = record[stage]["files"].get(name) if len(record) > stage else None
        path = self.stage_dir(stage) / name
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint of stage {stage} is missing: {path}; delete {self.stage_dir(stage)} to retrain "
                f"it"
            )
        return load_checked(path, sha, map_location)

    # ------------------------------------------------------------------ the epoch checkpoint
    def save_in_background(self, state: dict, name: str = "in_progress.pt") -> None:
        """Snapshot ``state`` to CPU now (training may go on changing it), check it is finite, and write it
        in a background thread; the previous write is waited for first. Rank 0 only (resume state)."""
        self.wait()
        if not distributed.is_main():
            return
        snapshot = _to_cpu(state)
        refuse_nonfinite(snapshot, self.path / name)
        self._in_background(lambda: write_atomic(_checked_bytes(snapshot), self.path / name))

    def _in_background(self, write) -> None:
        """Run ``write`` in a thread of its own once the write queued before it has finished (files land
        in the order they were queued); its error is re-raised by :meth:`wait`."""
        before = self._writer

        def run():
            if before is not None:
                before.join()
            try:
                write()
            except BaseException as e:  # re-raised by wait() in the training thread
                self._writer_error = self._writer_error or e

        self._writer = threading.Thread(target=run, name="pml_mutual-checkpoint", daemon=False)
        self._writer.start()

    def wait(self, raise_error: bool = True) -> None:
        """Block until the background write (if any) is on disk; re-raise its error (or keep it for the
        next call, with ``raise_error=False``: while another error is on its way up)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._writer_error is not None and raise_error:
            error, self._writer_error = self._writer_error, None
            raise error

    def load_in_progress(self, map_location=None) -> dict | None:
        """The epoch checkpoint, its SHA-256 checked (files of earlier versions carry none), or None."""
        path = self.path / "in_progress.pt"
        if not path.exists():
            return None
        doc = load_checked(path, map_location="cpu")
        if not (isinstance(doc, dict) and doc.get("format") == CHECKED_FORMAT):
            return load_checked(path, map_location=map_location)  # written before the digest was recorded
        payload = doc["payload"].numpy().tobytes()
        if hashlib.sha256(payload).hexdigest() != doc.get("sha256"):
            raise RunDirectoryError(
                f"{path} does not match the SHA-256 recorded in it (damaged); delete it to "
                "retrain the current stage from its start"
            )
        try:
            state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
        except Exception as e:
            raise RunDirectoryError(
                f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); delete it"
            ) from e
        bad = nonfinite_tensors(state)
        if bad:
            raise RunDirectoryError(f"{path} holds non-finite values ({', '.join(bad[:5])}); delete it")
        return state

    def remove(self, name: str) -> None:
        path = self.path / name
        if path.exists():
            path.unlink()
