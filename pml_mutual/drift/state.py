"""Validation of a :class:`~pml_mutual.drift.compensator.DriftCompensator` state before it is loaded."""
from __future__ import annotations

import math

import torch

from .equations import LEARNED_MODES


def check_state(state: dict, mode: str, similarity: str) -> dict:
    """Check :meth:`DriftCompensator.state_dict`'s output against a compensator of ``mode`` and ``similarity``
    (keys, settings, shapes, finiteness, disjoint classes): a bad state raises ValueError naming the entry.
    Returns ``{"maps": ..., "forward_maps": ...}`` (one entry or None per stage; absent in states written
    before the learned mode)."""
    keys = ("mode", "similarity", "sigma", "eps", "normalize", "class_ids", "stage_prototypes", "prototype_drifts")  # + "maps"
    if not isinstance(state, dict):
        raise ValueError(f"state_dict must be a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"state_dict is missing key {missing[0]!r} (has {sorted(state)})")
    for key, own in (("mode", mode), ("similarity", similarity)):
        if state[key] != own:
            raise ValueError(f"state_dict was saved with {key}={state[key]!r}, this compensator has {own!r}")
    for key in ("sigma", "eps"):
        if not isinstance(state[key], (int, float)) or not math.isfinite(state[key]) or state[key] <= 0:
            raise ValueError(f"state_dict {key} must be a finite positive number, got {state[key]!r}")
    lists = [state[k] for k in ("class_ids", "stage_prototypes", "prototype_drifts")]
    if not all(isinstance(v, (list, tuple)) for v in lists) or len({len(v) for v in lists}) != 1:
        raise ValueError("state_dict is inconsistent: class_ids, stage_prototypes and prototype_drifts differ in length")
    dim, seen = None, set()
    for t, (ids, protos, drift) in enumerate(zip(*lists)):
        for name, x in ((f"stage_prototypes[{t}]", protos), (f"prototype_drifts[{t}]", drift)):
            if not torch.is_tensor(x) or x.ndim != 2 or not x.is_floating_point():
                raise ValueError(f"state_dict {name} must be a 2-D float tensor, got {getattr(x, 'shape', type(x).__name__)}")
            if not torch.isfinite(x).all():
                raise ValueError(f"state_dict {name} contains NaN or inf")
        dim = protos.shape[1] if dim is None else dim
        if protos.shape[1] != dim:
            raise ValueError(f"state_dict stage_prototypes[{t}] has shape {tuple(protos.shape)}: embedding size {dim} expected")
        if drift.shape != protos.shape:
            raise ValueError(f"state_dict prototype_drifts[{t}] has shape {tuple(drift.shape)}, its prototypes {tuple(protos.shape)}")
        if not torch.is_tensor(ids) or ids.ndim != 1 or ids.is_floating_point() or len(ids) != protos.shape[0]:
            raise ValueError(f"state_dict class_ids[{t}] must list the {protos.shape[0]} classes of its prototypes as integers")
        if seen & set(ids.tolist()):
            raise ValueError(f"state_dict class_ids[{t}] repeats classes of an earlier stage")
        seen |= set(ids.tolist())
    all_maps = {}
    for key in ("maps", "forward_maps"):
        maps = state.get(key, [None] * len(lists[0]))  # absent in states written before the learned mode
        if not isinstance(maps, (list, tuple)) or len(maps) != len(lists[0]):
            raise ValueError(f"state_dict {key} must hold one entry (or None) per stage")
        for t, m in enumerate(maps):
            if m is None:
                continue
            if (not isinstance(m, (list, tuple)) or len(m) != 2 or not all(torch.is_tensor(v) for v in m)
                    or tuple(m[0].shape) != (dim, dim) or tuple(m[1].shape) != (dim,)):
                raise ValueError(f"state_dict {key}[{t}] must be a ({dim}, {dim}) matrix and a ({dim},) bias")
            if not (torch.isfinite(m[0]).all() and torch.isfinite(m[1]).all()):
                raise ValueError(f"state_dict {key}[{t}] contains NaN or inf")
        all_maps[key] = maps
    maps = all_maps["maps"]
    if mode in LEARNED_MODES and any(m is None for m in maps[: max(0, len(maps) - 1)]):
        raise ValueError("state_dict of a learned-mode compensator lacks the map of an earlier stage")
    return all_maps
