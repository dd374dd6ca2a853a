"""Which ops of a computation read a device value back to the host (a GPU synchronisation), seen on CPU
through torch's dispatcher: the ops whose output size or value depends on tensor contents."""

import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TORCH_DIR = os.path.dirname(torch.__file__)

SIZE_OR_VALUE_READS = {
    "aten.nonzero",
    "aten._local_scalar_dense",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            t is not None and torch.is_tensor(t) and t.dtype == torch.bool
            for t in (args[1] if len(args) > 1 else ())
        )
        if name in SIZE_OR_VALUE_READS or bool_index:
            callers = [f.filename for f in traceback.extract_stack() if not f.filename.startswith(TORCH_DIR)]
            self.ops.append((name, os.path.basename(callers[-2]) if len(callers) > 1 else "?"))
        return func(*args, **(kwargs or {}))


def host_reads(fn):
    """The host-reading ops that ``fn()`` (forward and backward) dispatches, in order, each as
    (op, file of the innermost caller outside torch)."""
    with HostReads() as mode:
        fn()
    return mode.ops
