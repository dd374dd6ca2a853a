"""The drift state a run keeps across stages (paper Eq. 3–6): per-stage prototypes, their accumulated
drift or the learned maps between model spaces, the virtual features they give, and their serialisation.
The equations themselves are :mod:`pml_mutual.drift.equations`'s.

Modes (``DriftCompensator(mode=...)``), after stage b:

- ``mode="direct"`` (the paper, Eq. 3): for each earlier stage t in ``stages_to_measure()``,
  ``update_drift(F_t(τ_b), F_b(τ_b), stage=t)`` — each old checkpoint is loaded once, one at a time.
- ``mode="chained"`` (SDC): ``update_drift(F_{b−1}(τ_b), F_b(τ_b))`` composes the step drift of
  the previous model onto every earlier stage — only the previous model (stage b's teacher) is needed.
- ``mode="learned"`` (LDC-style, beyond the paper): for each earlier stage t, a linear map from the
  latest model's space back to F_t's, fitted on the same data as "direct" (:func:`fit_linear_map`);
  a virtual feature is the map applied to the teacher feature, and each prototype's drift is what
  the forward map (F_t → latest) does to it.
- ``mode="learned_chained"``: the learned maps for the chained setting — only the previous model is
  needed: the step maps F_b ⇄ F_{b−1} are fitted on stage b's images and composed with the maps
  already held (latest → F_t = (latest → F_{b−1}) ∘ (F_{b−1} → F_t), and forward alike); the
  intermediate features are not re-normalised, so errors of the steps compound.
- ``mode="none"``: nothing is measured, every drift stays zero and each virtual feature is the
  teacher feature itself — the ablation that keeps Eq. 6's one term per earlier stage (and so its
  total weight) but removes what Eq. 3–4 estimate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_embeddings
from .equations import (
    LEARNED_MODES,
    _check_same_dim,
    apply_maps,
    batched_virtual_features,
    fit_linear_map,
    pad_stages,
    prototype_drift,
    prototypes,
    translate_forward,
    virtual_features,
)
from .state import check_gallery_update, check_new_stage, check_settings, check_state


class DriftCompensator:
    """Per-stage prototypes and their accumulated drift: what stage i needs of stages < i−1.

    Lifecycle, with stages numbered 0, 1, ... in order of arrival:

    1. After stage b trains, ``add_stage(F_b(τ_b), labels)`` stores the prototypes μ^b_b.
    2. Still offline, the drift of every earlier stage is brought up to F_b with ``update_drift`` (how,
       and with which old models, depends on ``mode``: the module docstring).
    3. While stage b+1 trains, ``virtual_feature_stack(teacher_feats)`` gives f̂^t for every t < b (Eq. 4);
       Eq. 6 is ``GramCorrelationLoss().sum_over_teachers(student, [teacher, virtual stack])``.

    Memory is O(classes × D); ``state_dict()`` holds only tensors, lists, strings and numbers.
    """

    def __init__(
        self,
        mode: str = "direct",
        similarity: str = "cosine_relu",
        sigma: float = 0.2,
        eps: float = 1e-6,
        normalize: bool = True,
    ):
        self.sigma, self.eps = check_settings(mode, similarity, sigma, eps)
        self.mode, self.similarity, self.normalize = mode, similarity, normalize
        self.class_ids: list[torch.Tensor] = []
        self.stage_prototypes: list[torch.Tensor] = []  # μ^b_b, in F_b's space
        self.prototype_drifts: list[torch.Tensor] = []  # Δμ^{b→latest}
        # (device, ...): the earlier stages on the features' device — padded prototypes, drifts and mask,
        # or the stacked learned maps — rebuilt after any change
        self._device_cache = None
        # learned: (W, b) latest → F_t, per stage t
        self.maps: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.forward_maps: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # learned: F_t → latest

    @property
    def num_stages(self) -> int:
        return len(self.stage_prototypes)

    def _weight_kwargs(self) -> dict:
        return {"sigma": self.sigma, "eps": self.eps}

    def add_stage(self, embeddings: torch.Tensor, labels: torch.Tensor) -> int:
        """Store the prototypes of the stage that just finished (its own model's embeddings); returns its
        index."""
        class_ids, means = prototypes(embeddings.detach(), labels)
        check_new_stage(self.class_ids, self.stage_prototypes, class_ids, means)
        self.class_ids.append(class_ids.cpu())
        self.stage_prototypes.append(means)
        self.prototype_drifts.append(torch.zeros_like(means))
        self.maps.append(None)
        self.forward_maps.append(None)
        self._device_cache = None
        return self.num_stages - 1

    def stages_to_measure(self, after_adding: int = 0) -> list[int]:
        """Which earlier models' features ``update_drift`` needs after the latest ``add_stage``
        (``after_adding=1``: after the next one, to load its first old model before adding it)."""
        n = self.num_stages + after_adding
        if n < 2 or self.mode == "none":
            return []
        return list(range(n - 1)) if self.mode in ("direct", "learned") else [n - 2]

    def _set_learned_maps(self, stage: int, back: tuple, forward: tuple) -> None:
        self.maps[stage], self.forward_maps[stage] = back, forward
        protos = self.stage_prototypes[stage]
        self.prototype_drifts[stage] = protos @ forward[0].to(protos) + forward[1].to(protos) - protos

    def drifted_prototypes(self, stage: int) -> torch.Tensor:
        """μ^{latest}_{stage,k} = μ^{stage}_{stage,k} + Δμ^{stage→latest}_{stage,k}."""
        return self.stage_prototypes[stage] + self.prototype_drifts[stage]

    def update_drift(
        self, old_feats: torch.Tensor, new_feats: torch.Tensor, stage: int | None = None
    ) -> None:
        """Bring the drift of earlier stages up to the latest model (Eq. 3).

        ``new_feats``: the latest model on the latest stage's training images. ``old_feats``: the same
        images through F_stage (direct mode, ``stage`` required) or through the previous model
        (chained mode, ``stage`` omitted or equal to the previous stage).
        """
        allowed = self.stages_to_measure()
        self._device_cache = None
        if self.mode == "none":
            raise ValueError('mode="none" measures no drift: update_drift must not be called')
        if not allowed:
            raise ValueError("update_drift needs at least two stages added (there is no earlier stage)")
        if self.mode == "learned":
            if stage not in allowed:
                raise ValueError(f"learned mode: stage must be one of {allowed}, got {stage!r}")
            # latest → F_stage gives the virtual features, F_stage → latest moves its prototypes
            self._set_learned_maps(
                stage, fit_linear_map(new_feats, old_feats), fit_linear_map(old_feats, new_feats)
            )
            return
        if self.mode == "learned_chained":
            if stage not in (None, allowed[0]):
                raise ValueError(
                    f"learned_chained mode measures only the previous stage ({allowed[0]}), got "
                    f"stage={stage!r}"
                )
            (bw, bb), (fw, fb) = fit_linear_map(new_feats, old_feats), fit_linear_map(old_feats, new_feats)
            for t in range(self.num_stages - 2):  # x ↦ (x W₁ + b₁) W₂ + b₂ = x (W₁W₂) + (b₁W₂ + b₂)
                (w, b), (w_fwd, b_fwd) = self.maps[t], self.forward_maps[t]
                self._set_learned_maps(t, (bw @ w, bb @ w + b), (w_fwd @ fw, b_fwd @ fw + fb))
            self._set_learned_maps(allowed[0], (bw, bb), (fw, fb))
            return
        if self.mode == "direct":
            if stage not in allowed:
                raise ValueError(f"direct mode: stage must be one of {allowed}, got {stage!r}")
            self.prototype_drifts[stage] = prototype_drift(
                old_feats, new_feats, self.stage_prototypes[stage], self.similarity, **self._weight_kwargs()
            )
            return
        if stage not in (None, allowed[0]):
            raise ValueError(
                f"chained mode measures only the previous stage ({allowed[0]}), got stage={stage!r}"
            )
        # Step drift F_{latest-1} → F_latest, weighted by prototypes already carried into F_{latest-1}'s
        # space.
        for t in range(self.num_stages - 1):
            self.prototype_drifts[t] = self.prototype_drifts[t] + prototype_drift(
                old_feats, new_feats, self.drifted_prototypes(t), self.similarity, **self._weight_kwargs()
            )

    def virtual_features(self, teacher_feats: torch.Tensor) -> list[torch.Tensor]:
        """f̂^t for every stage t before the teacher's own (Eq. 4); constants, one (B, D) tensor per stage."""
        return list(self.virtual_feature_stack(teacher_feats).unbind(0))

    @torch.no_grad()
    def virtual_feature_stack(self, teacher_feats: torch.Tensor) -> torch.Tensor:
        """Eq. 4 for every earlier stage at once: (stages − 1, B, D), float32, constants.

        One batched computation whatever the number of stages (no per-stage Python loop on the training
        step): the stages' drifted prototypes and drifts are padded to a common class count and kept on
        the features' device until the next change, the padding masked out of the weights.
        """
        check_embeddings(teacher_feats, "teacher_feats")
        feats = teacher_feats.detach().float()
        earlier = self.num_stages - 1
        if earlier <= 0:
            return feats.new_zeros(0, *feats.shape)
        if self.mode == "none":  # zero drift: f̂^t = f^{i−1}, without computing weights that multiply zeros
            return (F.normalize(feats, dim=1) if self.normalize else feats).expand(earlier, *feats.shape)
        if self.mode in LEARNED_MODES:
            return apply_maps(feats, *self._stacked_maps(feats.device), normalize=self.normalize)
        if self.similarity == "cosine":  # the raw weights must be checked per stage (a sum ≈ 0 raises)
            return torch.stack(
                [
                    virtual_features(
                        feats,
                        self.drifted_prototypes(t).to(feats.device),
                        self.prototype_drifts[t].to(feats.device),
                        self.similarity,
                        normalize=self.normalize,
                        **self._weight_kwargs(),
                    )
                    for t in range(earlier)
                ]
            )
        protos, drifts, mask = self._padded_stages(feats.device)
        _check_same_dim(protos[0], feats, "prototypes", "teacher_feats")
        return batched_virtual_features(
            feats, protos, drifts, mask, self.similarity, normalize=self.normalize, **self._weight_kwargs()
        )

    def _stacked_maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device_cache is None or self._device_cache[0] != device:
            earlier = range(self.num_stages - 1)
            missing = [t for t in earlier if self.maps[t] is None]
            if missing:
                raise ValueError(
                    f"learned mode: no map fitted for stage(s) {missing}: call update_drift for each"
                )
            weights = torch.stack([self.maps[t][0] for t in earlier]).to(device)
            biases = torch.stack([self.maps[t][1] for t in earlier]).to(device)
            self._device_cache = (device, weights, biases)
        return self._device_cache[1:]

    def _padded_stages(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._device_cache is None or self._device_cache[0] != device:
            earlier = range(self.num_stages - 1)
            padded = pad_stages(
                [self.drifted_prototypes(t) for t in earlier], [self.prototype_drifts[t] for t in earlier]
            )
            self._device_cache = (device, *(x.to(device) for x in padded))
        return self._device_cache[1:]

    @torch.no_grad()
    def update_gallery(
        self, embeddings: torch.Tensor, stage: int, method: str = "translation"
    ) -> torch.Tensor:
        """Move embeddings that stage ``stage``'s model F_stage computed into the latest model's space,
        without the images or F_stage: ``"translation"`` (Eq. 4 forward with stage ``stage``'s prototypes
        and their drift, any mode that measures drift) or ``"learned"`` (the forward map F_stage → latest;
        learned mode). The latest stage's own embeddings are returned as they are. O(N·K·D) or O(N·D²),
        on the embeddings' device; float32, re-normalised when the compensator normalises."""
        stage = check_gallery_update(self, embeddings, stage, method)
        feats = embeddings.detach().float()
        if stage == self.num_stages - 1:
            return feats
        if method == "learned":
            w, b = (v.to(feats.device) for v in self.forward_maps[stage])
            moved = feats @ w + b
            return F.normalize(moved, dim=1) if self.normalize else moved
        return translate_forward(
            feats,
            self.stage_prototypes[stage].to(feats.device),
            self.prototype_drifts[stage].to(feats.device),
            self.similarity,
            normalize=self.normalize,
            **self._weight_kwargs(),
        )

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "similarity": self.similarity,
            "sigma": float(self.sigma),
            "eps": float(self.eps),
            "normalize": bool(self.normalize),
            "class_ids": [c.clone() for c in self.class_ids],
            "stage_prototypes": [p.detach().cpu().clone() for p in self.stage_prototypes],
            "prototype_drifts": [d.detach().cpu().clone() for d in self.prototype_drifts],
            "maps": _cpu_copies(self.maps),
            "forward_maps": _cpu_copies(self.forward_maps),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output, checked first (keys, settings, shapes, finiteness, disjoint
        classes): a bad state raises ValueError naming the entry and leaves this compensator unchanged."""
        all_maps = check_state(state, self.mode, self.similarity)
        self._device_cache = None
        self.maps, self.forward_maps = (
            [None if m is None else (m[0].clone().float(), m[1].clone().float()) for m in all_maps[key]]
            for key in ("maps", "forward_maps")
        )
        self.sigma, self.eps, self.normalize = (
            float(state["sigma"]),
            float(state["eps"]),
            bool(state["normalize"]),
        )
        self.class_ids = [c.clone() for c in state["class_ids"]]
        self.stage_prototypes = [p.clone().float() for p in state["stage_prototypes"]]
        self.prototype_drifts = [d.clone().float() for d in state["prototype_drifts"]]

    def __repr__(self) -> str:
        return (
            f"DriftCompensator(mode={self.mode!r}, similarity={self.similarity!r}, stages={self.num_stages})"
        )


def _cpu_copies(maps: list) -> list:
    """Learned maps as the state holds them: ``[W, b]`` CPU copies, None where a stage has none."""
    return [None if m is None else [m[0].cpu().clone(), m[1].cpu().clone()] for m in maps]
