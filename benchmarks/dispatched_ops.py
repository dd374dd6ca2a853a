"""The computing ops a function dispatches (forward and backward), seen on CPU through torch's dispatcher:
each would be at least one kernel launch on a GPU. Views and the CPU-only value checks of checks.py are
left out (a view launches nothing; the checks do not run on a GPU)."""
import collections
import traceback

from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"detach", "alias", "view", "_unsafe_view", "_reshape_alias", "expand", "t", "transpose", "permute",
         "unsqueeze", "squeeze", "select", "slice", "unbind", "split", "as_strided"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).removeprefix("aten.")
        if name not in VIEWS and not any(f.filename.endswith("checks.py") for f in traceback.extract_stack()):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def computing_ops(fn) -> collections.Counter:
    with _Count() as mode:
        fn()
    return mode.ops
