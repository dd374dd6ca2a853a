"""The files of a run directory: written atomically under a temporary name of this project's own pattern
and the umask's mode, refused when non-finite, read back checked against a SHA-256 (recorded beside them,
or inside the file for the epoch checkpoint). :class:`~pml_mutual.run_dir.RunDirectory` lays them out."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from .checks import nonfinite_tensors

TMP_PREFIX = ".pml_mutual-"
TMP_SUFFIX = ".tmp"


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as it is: another run's identity, or a damaged file."""


def check_run_dir(path) -> Path:
    if path is None or str(path).strip() == "":
        raise ValueError("run_dir is empty: name a directory of its own for the run's checkpoints")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(
            f"run_dir {str(path)!r} is a file, not a directory: name a directory for the run's "
            "checkpoints (it is created if missing)"
        )
    resolved = p.resolve()
    if (
        resolved == Path.cwd().resolve()
        or resolved == Path(resolved.anchor)
        or resolved == Path.home().resolve()
    ):
        raise ValueError(
            f"run_dir {str(path)!r} is the working directory, a filesystem root or the home directory: "
            "name a directory of its own for the run's checkpoints"
        )
    return p


def _bytes_of(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once, at import: os.umask can only be read by setting it, which is not safe once threads write
FILE_MODE = 0o666 & ~_umask()


def write_atomic(data: bytes, path: Path) -> None:
    """``data`` to a temp file of this project's pattern beside ``path``, then renamed to ``path``; the file
    gets the mode a plain ``open()`` would give it (the umask's), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: Path) -> str:
    """torch.save ``obj`` atomically (refusing non-finite tensors); returns the file's SHA-256."""
    refuse_nonfinite(obj, path)
    return _save_checked(obj, Path(path))


def _save_checked(obj, path: Path) -> str:
    """:func:`atomic_save` of an ``obj`` already checked to be finite."""
    data = _bytes_of(obj)
    write_atomic(data, path)
    return hashlib.sha256(data).hexdigest()


def save_json(obj, path: Path) -> None:
    write_atomic((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), Path(path))


def refuse_nonfinite(obj, path) -> None:
    bad = nonfinite_tensors(obj)
    if bad:
        raise FloatingPointError(f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}")


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirectoryError(f"{path} cannot be read ({e})") from e
    except json.JSONDecodeError as e:
        raise RunDirectoryError(
            f"{path} is damaged (line {e.lineno}: {e.msg}); delete it (or its stage directory) to redo that "
            f"part"
        ) from e
    if not isinstance(doc, dict):
        raise RunDirectoryError(
            f"{path} is damaged (not a JSON object); delete it (or its stage directory) to redo that part"
        )
    return doc


def load_checked(path: Path, sha256: str | None = None, map_location=None):
    """torch.load(weights_only=True) with every failure naming the file; checks the recorded SHA-256
    and refuses non-finite tensors."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunDirectoryError(
            f"{path} cannot be read ({e}); delete its stage directory to retrain that stage"
        ) from e
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise RunDirectoryError(
            f"{path} does not match the SHA-256 recorded when it was written (damaged or replaced); "
            "delete its stage directory to retrain that stage"
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, empty, not a checkpoint, or a pickle weights_only refuses
        raise RunDirectoryError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); delete it to redo that part"
        ) from e
    bad = nonfinite_tensors(obj)
    if bad:
        raise RunDirectoryError(
            f"{path} holds non-finite values ({', '.join(bad[:5])}); delete it to redo that part"
        )
    return obj


CHECKED_FORMAT = "pml_mutual/checked/v1"


def _checked_bytes(obj) -> bytes:
    """``obj`` serialised, wrapped with the SHA-256 of its bytes: one file, written atomically, that tells
    a flipped byte from a checkpoint (the stage files record theirs in stage.json instead)."""
    payload = _bytes_of(obj)
    digest = hashlib.sha256(payload).hexdigest()
    return _bytes_of(
        {
            "format": CHECKED_FORMAT,
            "sha256": digest,
            "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        }
    )


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def free_name(path: Path) -> Path:
    """``<path>.old-N`` with the lowest N not taken: where a run's earlier files are moved aside."""
    n = 1
    while path.with_name(f"{path.name}.old-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.old-{n}")
