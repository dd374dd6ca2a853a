"""Prototype drift and virtual features (paper Section 3.3, Eq. 3–6): the equations as pure functions
(:mod:`.equations`) and the state a run keeps across stages (:mod:`.compensator`)."""

from .compensator import DriftCompensator
from .equations import (
    DRIFT_MODES,
    LEARNED_MODES,
    RIDGES,
    SIMILARITIES,
    apply_maps,
    batched_virtual_features,
    check_stage_index,
    feature_drift,
    fit_linear_map,
    prototype_drift,
    prototypes,
    similarity_weights,
    translate_forward,
    virtual_features,
)
from .state import check_state

__all__ = [
    "DriftCompensator",
    "DRIFT_MODES",
    "LEARNED_MODES",
    "RIDGES",
    "SIMILARITIES",
    "apply_maps",
    "batched_virtual_features",
    "check_stage_index",
    "check_state",
    "feature_drift",
    "fit_linear_map",
    "prototype_drift",
    "prototypes",
    "similarity_weights",
    "translate_forward",
    "virtual_features",
]
