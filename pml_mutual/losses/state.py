"""What a checkpoint must hold of a PML loss or miner, and which of them need an optimizer.

A metric loss can carry trained state: parameters (ArcFace's ``W``, ProxyAnchor's proxies, SoftTriple's
centres) and memory (``CrossBatchMemory``'s queue, whose position and fill flag are plain attributes, not
buffers). A resumed run must get both back bit for bit, and each trained network needs its own copy.
"""

from __future__ import annotations

import copy

import torch

# CrossBatchMemory's queue position and fill flag are plain attributes beside its buffers
_QUEUE_ATTRIBUTES = ("queue_idx", "has_been_filled")


def trainable_parameters(module: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` (a loss or a miner) that gradients reach."""
    if module is None:
        return []
    return [p for p in module.parameters() if p.requires_grad]


def training_state(module: torch.nn.Module) -> dict:
    """``module``'s state dict plus the queue attributes of any ``CrossBatchMemory`` inside it; ``{}``
    when it holds nothing (a plain triplet loss)."""
    state = dict(module.state_dict())
    queues = {
        name: {a: getattr(m, a) for a in _QUEUE_ATTRIBUTES}
        for name, m in module.named_modules()
        if all(hasattr(m, a) for a in _QUEUE_ATTRIBUTES)
    }
    if queues:
        state["__queues__"] = {
            name: {"queue_idx": int(q["queue_idx"]), "has_been_filled": bool(q["has_been_filled"])}
            for name, q in queues.items()
        }
    return state


def load_training_state(module: torch.nn.Module, state: dict) -> None:
    """Inverse of :func:`training_state`."""
    state = dict(state)
    queues = state.pop("__queues__", {})
    module.load_state_dict(state)
    modules = dict(module.named_modules())
    for name, values in queues.items():
        for attr, value in values.items():
            setattr(modules[name], attr, value)


def own_copy(module: torch.nn.Module | None) -> torch.nn.Module | None:
    """A copy that shares nothing with ``module``: a second trained network must not update the first
    one's loss weights or fill its memory queue."""
    return None if module is None else copy.deepcopy(module)
