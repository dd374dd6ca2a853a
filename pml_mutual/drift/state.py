"""Validation for :class:`~pml_mutual.drift.compensator.DriftCompensator`: its settings, each new stage, a
gallery update's arguments, and a state before it is loaded."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..checks import check_embeddings
from .equations import DRIFT_MODES, LEARNED_MODES, SIMILARITIES, check_stage_index


def check_settings(mode: str, similarity: str, sigma, eps) -> tuple[float, float]:
    """``(sigma, eps)`` as floats once ``mode``, ``similarity`` and both numbers are valid (ValueError)."""
    if mode not in DRIFT_MODES:
        raise ValueError(f"mode must be one of {DRIFT_MODES}, got {mode!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    for name, value in (("sigma", sigma), ("eps", eps)):
        if (
            isinstance(value, (bool, np.bool_))
            or not isinstance(value, (int, float, np.integer, np.floating))
            or not (math.isfinite(value) and value > 0)
        ):
            raise ValueError(
                f"{name} must be a finite number > 0, got {value!r} (eps keeps the similarity weights' "
                "sums away from 0: eps=0 divides by zero when no prototype is similar)"
            )
    return float(sigma), float(eps)


def check_new_stage(
    class_ids: list, stage_prototypes: list, new_ids: torch.Tensor, means: torch.Tensor
) -> None:
    """A new stage's prototypes have the earlier stages' size and none of their classes (ValueError)."""
    if stage_prototypes and means.shape[1] != stage_prototypes[0].shape[1]:
        raise ValueError(
            f"embedding size {means.shape[1]} differs from the earlier stages' {stage_prototypes[0].shape[1]}"
        )
    for t, earlier in enumerate(class_ids):
        overlap = set(earlier.tolist()) & set(new_ids.tolist())
        if overlap:
            raise ValueError(
                f"classes {sorted(overlap)[:10]} already belong to stage {t}: stages must be disjoint"
            )


def check_gallery_update(compensator, embeddings: torch.Tensor, stage: int, method: str) -> int:
    """The stage index (negative ones counted from the end) once ``update_gallery``'s arguments can be
    served by ``compensator`` (ValueError naming what cannot)."""
    check_embeddings(embeddings, "embeddings")
    stage = check_stage_index(stage, compensator.num_stages)
    if method not in ("translation", "learned"):
        raise ValueError(f"method must be 'translation' or 'learned', got {method!r}")
    dim = compensator.stage_prototypes[0].shape[1]
    if embeddings.shape[1] != dim:
        raise ValueError(
            f"embeddings have {embeddings.shape[1]} columns, the compensator's stages {dim}: pass "
            "embeddings of the models it measured"
        )
    if method == "translation" and compensator.mode == "none":
        raise ValueError(
            "a compensator of mode='none' measures no drift: 'translation' would return the "
            "embeddings unchanged; use mode='direct' or 'chained' to move a gallery"
        )
    if method == "learned" and stage < compensator.num_stages - 1 and compensator.forward_maps[stage] is None:
        raise ValueError(
            f"no learned map of stage {stage}: gallery updates by map need a learned drift mode "
            f"{LEARNED_MODES}"
        )
    return stage


def check_state(state: dict, mode: str, similarity: str) -> dict:
    """Check :meth:`DriftCompensator.state_dict`'s output against a compensator of ``mode`` and ``similarity``
    (keys, settings, shapes, finiteness, disjoint classes): a bad state raises ValueError naming the entry.
    Returns ``{"maps": ..., "forward_maps": ...}`` (one entry or None per stage; absent in states written
    before the learned mode)."""
    # "maps" and "forward_maps" are optional: states written before the learned modes lack them
    keys = (
        "mode",
        "similarity",
        "sigma",
        "eps",
        "normalize",
        "class_ids",
        "stage_prototypes",
        "prototype_drifts",
    )
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
        raise ValueError(
            "state_dict is inconsistent: class_ids, stage_prototypes and prototype_drifts differ in length"
        )
    dim, seen = None, set()
    for t, (ids, protos, drift) in enumerate(zip(*lists)):
        for name, x in ((f"stage_prototypes[{t}]", protos), (f"prototype_drifts[{t}]", drift)):
            if not torch.is_tensor(x) or x.ndim != 2 or not x.is_floating_point():
                raise ValueError(
                    f"state_dict {name} must be a 2-D float tensor, got "
                    f"{getattr(x, 'shape', type(x).__name__)}"
                )
            if not torch.isfinite(x).all():
                raise ValueError(f"state_dict {name} contains NaN or inf")
        dim = protos.shape[1] if dim is None else dim
        if protos.shape[1] != dim:
            raise ValueError(
                f"state_dict stage_prototypes[{t}] has shape {tuple(protos.shape)}: embedding size {dim} "
                f"expected"
            )
        if drift.shape != protos.shape:
            raise ValueError(
                f"state_dict prototype_drifts[{t}] has shape {tuple(drift.shape)}, its prototypes "
                f"{tuple(protos.shape)}"
            )
        if (
            not torch.is_tensor(ids)
            or ids.ndim != 1
            or ids.is_floating_point()
            or len(ids) != protos.shape[0]
        ):
            raise ValueError(
                f"state_dict class_ids[{t}] must list the {protos.shape[0]} classes of its prototypes as "
                f"integers"
            )
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
            if (
                not isinstance(m, (list, tuple))
                or len(m) != 2
                or not all(torch.is_tensor(v) for v in m)
                or tuple(m[0].shape) != (dim, dim)
                or tuple(m[1].shape) != (dim,)
            ):
                raise ValueError(f"state_dict {key}[{t}] must be a ({dim}, {dim}) matrix and a ({dim},) bias")
            if not (torch.isfinite(m[0]).all() and torch.isfinite(m[1]).all()):
                raise ValueError(f"state_dict {key}[{t}] contains NaN or inf")
        all_maps[key] = maps
    maps = all_maps["maps"]
    if mode in LEARNED_MODES and any(m is None for m in maps[: max(0, len(maps) - 1)]):
        raise ValueError("state_dict of a learned-mode compensator lacks the map of an earlier stage")
    return all_maps
