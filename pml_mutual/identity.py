"""Fingerprints of what determines a run's numbers: data items, model architecture, loss settings, weights.

An online run's identity (``OnlineLearner.run_identity``) is built from these; a run directory holding
another identity is refused, so a rerun with another split, image size, loss or backbone never reports
the numbers of an earlier run.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import types
import warnings

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from .data.stages import dataset_labels


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def dataset_fingerprint(dataset) -> str:
    """A hash of the dataset's items in order: their labels, and where the dataset says what its items
    are (image paths and boxes, the transform's description, a tensor's bytes, a subset's indices), that too.
    A dataset may define ``fingerprint()`` to describe itself."""
    if hasattr(dataset, "fingerprint"):
        return _sha(type(dataset).__name__, dataset.fingerprint())
    if isinstance(dataset, Subset):
        return _sha(
            "Subset",
            dataset_fingerprint(dataset.dataset),
            np.asarray(dataset.indices, dtype=np.int64).tobytes(),
        )
    if isinstance(dataset, ConcatDataset):
        return _sha("Concat", *[dataset_fingerprint(d) for d in dataset.datasets])
    if isinstance(dataset, TensorDataset):
        return _sha("Tensors", *[t.detach().cpu().contiguous().numpy().tobytes() for t in dataset.tensors])
    parts = [type(dataset).__name__, len(dataset), dataset_labels(dataset).tobytes()]
    for attr in ("items", "paths", "samples", "imgs"):
        if hasattr(dataset, attr):
            parts.append(repr(getattr(dataset, attr)))
    boxes = getattr(getattr(dataset, "items", None), "boxes", None)
    if isinstance(boxes, np.ndarray) and boxes.size > 1000:
        # numpy's repr elides the middle of an array of over 1,000 values: a box changed there (a corrected
        # annotation file) must still change the identity, so large box arrays count by value too
        parts.append(np.ascontiguousarray(boxes, dtype=np.float64).tobytes())
    if getattr(dataset, "transform", None) is not None:
        parts.append(repr(dataset.transform))
    return _sha(*parts)


def image_files_fingerprint(items, what: str = "the dataset") -> str:
    """A hash of the image files' sizes in item order (:meth:`ImageItems.file_sizes`: one ``stat`` each,
    missing files named): what :func:`dataset_fingerprint`, which holds the paths, cannot see. Images
    replaced under the same paths (re-encoded, resized in place) almost always change size; unlike
    modification times, sizes survive a copy of the dataset."""
    return _sha("file sizes", items.file_sizes(what).tobytes())


def model_fingerprint(model: torch.nn.Module) -> str:
    """The architecture: class, and every parameter's and buffer's name, shape and dtype, in order."""
    entries = [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()]
    return _sha(type(model).__qualname__, *entries)


def factory_fingerprint(factory) -> str:
    """:func:`model_fingerprint` of one network from ``factory``, built on the meta device: names, shapes
    and dtypes need no weights, and a random initialisation costs 0.3 s (ResNet-50) to 1.3 s (ViT-B/16)
    of CPU per run, 0.04–0.08 s there. A factory that cannot build there (it reads a weight's value,
    say) is called on the CPU instead."""
    return model_fingerprint(build_for_fingerprint(factory))


def build_for_fingerprint(factory) -> torch.nn.Module:
    """One network from ``factory`` on the meta device (no weights), or on the CPU when it cannot build
    there."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            # weights loaded into meta tensors: a no-op, warned once per tensor
            warnings.simplefilter("ignore")
            return factory()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return factory()


def describe(obj) -> dict | None:
    """Class and simple settings (numbers, strings, flags) of a loss / miner and its PML parts."""
    if obj is None:
        return None
    out = {"class": type(obj).__qualname__}
    for k, v in sorted(vars(obj).items()):
        if k.startswith("_") or k in ("training",):
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif hasattr(v, "__dict__") and type(v).__module__.startswith(
            ("pytorch_metric_learning", "pml_mutual")
        ):
            out[k] = describe(v)
    for name, child in getattr(obj, "_modules", {}).items():
        out[name] = describe(child)
    return out


def state_dict_sha256(state_dict: dict | None) -> str | None:
    """SHA-256 of a state dict's tensors (names, shapes, bytes) in order, or None."""
    if state_dict is None:
        return None
    h = hashlib.sha256()
    for k, t in state_dict.items():
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _code_parts(code: types.CodeType):
    """A function's compiled code without its line numbers or file (moving code is not changing it)."""
    yield code.co_code
    yield repr(code.co_names)
    yield repr(code.co_varnames)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _code_parts(c)
        else:
            yield repr(c)


def _is_torch_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("torch", "builtins", "torchvision")


def class_code_fingerprint(cls: type) -> str:
    """The compiled code of every function a class and its non-torch bases define (``forward`` and helpers):
    an edited activation inside ``forward`` changes it. torch's own classes count by name only, so a torch
    upgrade does not change it; the Python version does (bytecode)."""
    parts = []
    for klass in inspect.getmro(cls):
        if klass is object or _is_torch_class(klass):
            continue
        parts.append(klass.__qualname__)
        for name, attr in sorted(vars(klass).items()):
            fn = getattr(attr, "__func__", attr)
            if isinstance(fn, types.FunctionType):
                parts += [name, *_code_parts(fn.__code__)]
    return _sha(*parts)


def model_code_fingerprint(model: torch.nn.Module, factory=None) -> str:
    """What :func:`model_fingerprint` cannot see: every submodule's type and settings (``extra_repr``: an
    activation swapped for another, a dropout rate) and the code of the non-torch module classes and of the
    ``factory`` function that built ``model`` (e.g. by :func:`build_for_fingerprint`)."""
    parts = []
    for name, module in model.named_modules():
        cls = type(module)
        parts += [name, f"{cls.__module__}.{cls.__qualname__}", module.extra_repr()]
    classes = {type(m) for m in model.modules() if not _is_torch_class(type(m))}
    parts += [
        class_code_fingerprint(c) for c in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}")
    ]
    # functools.partial: its function (its arguments show in the shapes)
    fn = getattr(factory, "func", factory)
    if isinstance(fn, types.FunctionType):
        parts.append(_sha(*_code_parts(fn.__code__)))
    return _sha(*parts)


def _value_bytes(x, out: list) -> None:
    if torch.is_tensor(x):
        x = x.detach().cpu().contiguous()
        out += [
            f"{x.dtype}{tuple(x.shape)}",
            x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"",
        ]
    elif isinstance(x, np.ndarray):
        out += [f"{x.dtype}{x.shape}", np.ascontiguousarray(x).tobytes()]
    elif isinstance(x, (list, tuple)):
        out.append(f"{type(x).__name__}{len(x)}")
        for v in x:
            _value_bytes(v, out)
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            out.append(str(k))
            _value_bytes(x[k], out)
    elif hasattr(x, "tobytes"):  # PIL images
        out += [f"{type(x).__name__}{getattr(x, 'size', '')}{getattr(x, 'mode', '')}", x.tobytes()]
    else:
        out.append(repr(x))


SAMPLE_ITEMS = 64


def item_sample_fingerprint(dataset, n: int = SAMPLE_ITEMS, seed: int = 0) -> str:
    """A hash of what ``dataset[i]`` returns for ``n`` items spread evenly over it (first and last included),
    read with Python's, NumPy's and torch's generators seeded: an edit of ``__getitem__``'s preprocessing
    changes it where the dataset's description (:func:`dataset_fingerprint`) does not. The generators'
    states are restored afterwards. A dataset whose items differ between two seeded reads (randomness
    from a source of its own) gets ``"nondeterministic"``: its content cannot be compared."""
    size = len(dataset)
    if size == 0:
        return _sha("empty")
    indices = sorted(set(np.linspace(0, size - 1, min(n, size)).round().astype(int).tolist()))

    def read() -> str:
        parts: list = []
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                for i in indices:
                    random.seed(seed + i)
                    np.random.seed(seed + i)
                    # the CPU generator only: CUDA's is untouched
                    torch.default_generator.manual_seed(seed + i)
                    parts.append(str(i))
                    _value_bytes(dataset[i], parts)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return _sha(*parts)

    first = read()
    return first if read() == first else "nondeterministic"


def describe_data_change(key: str) -> str:
    """What a changed record of a run's ``data_files.json`` means, for the refusal."""
    if key == "model_code":
        return (
            "the model's code differs (a submodule's type or settings, a module's forward, or the factory "
            "function)"
        )
    if key.startswith("items:"):
        return (
            f"the {key[6:]} dataset's items differ (a fixed sample read through __getitem__: its "
            "preprocessing changed?)"
        )
    return (
        f"the image files of the {key} dataset differ in size (same paths, so replaced, re-encoded or "
        "resized in place?)"
    )


def identity_differences(recorded, current, prefix: str = "") -> list[str]:
    """``"key.path: old != new"`` for every leaf where two JSON-like identities differ."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(recorded) | set(current)):
            out += identity_differences(recorded.get(k), current.get(k), f"{prefix}{k}.")
        return out
    return [] if recorded == current else [f"{prefix.rstrip('.')}: {_short(recorded)} != {_short(current)}"]


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."
