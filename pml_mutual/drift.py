"""Prototype drift and virtual features (paper Section 3.3, Eq. 3–6).

Pure functions on tensors, plus :class:`DriftCompensator`, the state a trainer keeps across stages.

Vocabulary (stage b < i−1 is an earlier stage, F_b its model; F_{i−1} is the teacher of stage i):

* ``prototypes``: μ^b_{b,k}, the mean F_b embedding of class k of stage b (end of stage b).
* ``prototype_drift``: Δμ^{b→i−1}_{b,k}, how far that prototype moved between F_b and F_{i−1} (Eq. 3),
  estimated from the drift of stage i−1's training features, weighted by their similarity to μ.
* ``feature_drift``: Δf^{i−1→b}_x, the estimated shift taking a teacher feature back to F_b (Eq. 4).
* ``virtual_features``: f̂^b_x = f^{i−1}_x + Δf^{i−1→b}_x, what F_b would have output for x — without
  loading F_b.

The similarity weight S: the paper uses the cosine, which can be negative and make Σ S ≈ 0 (the
ratio then explodes). ``"cosine_relu"`` (default) uses max(cos, 0) + eps, ``"cosine"`` is the paper's
raw weights and raises when a weight sum is ≈ 0, ``"gaussian"`` is SDC's exp(−‖f − μ‖² / 2σ²).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_embeddings
from .losses import GramCorrelationLoss, gram_distillation_losses

SIMILARITIES = ("cosine_relu", "cosine", "gaussian")
DRIFT_MODES = ("direct", "chained", "none", "learned", "learned_chained")
# modes whose virtual features are linear maps of the teacher feature (the others translate it)
LEARNED_MODES = ("learned", "learned_chained")
# Ridge strengths tried when fitting a learned map, relative to the mean eigenvalue of the source's scatter
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _check_same_dim(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{a_name} and {b_name} have different embedding sizes: {a.shape[1]} vs {b.shape[1]}"
        )


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means μ_k of ``embeddings`` (N, D) grouped by integer ``labels`` (N,).

    Returns ``(class_ids, means)``: sorted unique labels (K,) and their mean embeddings (K, D), float32.
    """
    check_embeddings(embeddings, "embeddings")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be a 1-D tensor with one entry per embedding ({embeddings.shape[0]}), "
            f"got {getattr(labels, 'shape', type(labels).__name__)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    class_ids, inverse = torch.unique(labels.to(embeddings.device), sorted=True, return_inverse=True)
    sums = torch.zeros(len(class_ids), embeddings.shape[1], dtype=torch.float32, device=embeddings.device)
    sums.index_add_(0, inverse, embeddings.float())
    counts = torch.bincount(inverse, minlength=len(class_ids)).to(sums)
    return class_ids, sums / counts[:, None]


def similarity_weights(
    feats: torch.Tensor,
    prototypes: torch.Tensor,
    similarity: str = "cosine_relu",
    dim: int = 0,
    sigma: float = 0.2,
    eps: float = 1e-6,
) -> torch.Tensor:
    """S(f_x, μ_k) for every feature and prototype, normalised to sum to 1 along ``dim``; (N, K).

    ``dim=0`` normalises over features (Eq. 3), ``dim=1`` over prototypes (Eq. 4).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    feats, prototypes = feats.float(), prototypes.float()
    if similarity == "gaussian":
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        # The softmax of the log-weights is the normalised Gaussian weight without underflow to 0/0.
        return torch.softmax(-torch.cdist(feats, prototypes).pow(2) / (2 * sigma**2), dim=dim)
    cos = F.normalize(feats, dim=1) @ F.normalize(prototypes, dim=1).T
    if similarity == "cosine_relu":
        weights = cos.clamp(min=0) + eps
    else:
        weights = cos
    total = weights.sum(dim=dim, keepdim=True)
    if similarity == "cosine" and bool((total.abs() < eps).any()):
        raise ValueError(
            "a sum of raw cosine weights is ~0, so the weighted drift is undefined (Eq. 3/4 divide by it); "
            "use similarity='cosine_relu' or 'gaussian'"
        )
    return weights / total


def prototype_drift(
    old_feats: torch.Tensor,
    new_feats: torch.Tensor,
    prototypes: torch.Tensor,
    similarity: str = "cosine_relu",
    **weight_kwargs,
) -> torch.Tensor:
    """Eq. 3: Δμ_k = Σ_x S(f^old_x, μ_k) (f^new_x − f^old_x) / Σ_x S(f^old_x, μ_k); shape (K, D).

    ``old_feats`` and ``new_feats`` are the same images embedded by the old and the new model;
    ``prototypes`` live in the old model's space.
    """
    check_embeddings(old_feats, "old_feats")
    check_embeddings(new_feats, "new_feats")
    check_embeddings(prototypes, "prototypes")
    if old_feats.shape != new_feats.shape:
        raise ValueError(
            f"old_feats and new_feats must embed the same images: shapes {tuple(old_feats.shape)} "
            f"and {tuple(new_feats.shape)}"
        )
    _check_same_dim(prototypes, old_feats, "prototypes", "old_feats")
    weights = similarity_weights(old_feats, prototypes, similarity, dim=0, **weight_kwargs)
    return weights.T @ (new_feats.float() - old_feats.float())


def feature_drift(
    feats: torch.Tensor,
    prototypes: torch.Tensor,
    prototype_drift: torch.Tensor,
    similarity: str = "cosine_relu",
    **weight_kwargs,
) -> torch.Tensor:
    """Eq. 4: Δf_x = − Σ_k S(f_x, μ_k) Δμ_k / Σ_k S(f_x, μ_k); shape (B, D).

    ``feats`` are teacher (F_{i−1}) features, ``prototypes`` the drifted prototypes μ^{i−1}_{b,k} in
    the teacher's space, ``prototype_drift`` their drift Δμ^{b→i−1}_{b,k}. The result takes the
    teacher features back toward stage b's space.
    """
    check_embeddings(feats, "feats")
    check_embeddings(prototypes, "prototypes")
    check_embeddings(prototype_drift, "prototype_drift")
    _check_same_dim(prototypes, feats, "prototypes", "feats")
    if prototype_drift.shape != prototypes.shape:
        raise ValueError(
            f"prototype_drift must have the prototypes' shape {tuple(prototypes.shape)}, "
            f"got {tuple(prototype_drift.shape)}"
        )
    weights = similarity_weights(feats, prototypes, similarity, dim=1, **weight_kwargs)
    return -(weights @ prototype_drift.float())


@torch.no_grad()
def virtual_features(
    teacher_feats: torch.Tensor,
    prototypes: torch.Tensor,
    prototype_drift: torch.Tensor,
    similarity: str = "cosine_relu",
    normalize: bool = True,
    **weight_kwargs,
) -> torch.Tensor:
    """f̂^b = f^{i−1} + Δf^{i−1→b} (Eq. 4), a constant (no gradient), float32.

    ``normalize`` re-projects onto the unit sphere: the Gram loss normalises rows anyway, and the
    models output L2-normalised embeddings, so drift is measured and undone in that space.
    """
    virtual = teacher_feats.float() + feature_drift(teacher_feats, prototypes, prototype_drift, similarity, **weight_kwargs)
    return F.normalize(virtual, dim=1) if normalize else virtual


def translate_forward(
    feats: torch.Tensor,
    prototypes: torch.Tensor,
    prototype_drift: torch.Tensor,
    similarity: str = "cosine_relu",
    normalize: bool = True,
    **weight_kwargs,
) -> torch.Tensor:
    """Eq. 4 run forward: f + Σ_k S(f, μ_k) Δμ_k / Σ_k S(f, μ_k), moving features of an earlier model
    (``feats``, in the space of its ``prototypes`` μ) by their prototypes' drift Δμ toward a later model's
    space — SDC's update of stored embeddings, with no image and no model. It is :func:`virtual_features`
    with the drift reversed. Float32, (N, D)."""
    return virtual_features(feats, prototypes, -prototype_drift.float(), similarity, normalize, **weight_kwargs)


def fit_linear_map(source: torch.Tensor, target: torch.Tensor, ridges=RIDGES, holdout_every: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) with ``target ≈ source @ W + b``: ridge regression toward the identity, in float64.

    W = (XᵀX + λI)⁻¹ (XᵀY + λI) on centred X (source) and Y (target); b = ȳ − x̄W. Shrinking toward I (not
    0) means an unchanged model maps to exactly the identity and little data means little change. λ is
    ``ridges`` × the mean eigenvalue of XᵀX, chosen by the squared error on every ``holdout_every``-th row
    (held out), then refitted on all rows. Finite for any number of rows ≥ 1, fewer than D included.
    The learned-drift map of LDC (Gomez-Villa et al., ECCV 2024), fitted in closed form.
    """
    check_embeddings(source, "source")
    check_embeddings(target, "target")
    if source.shape != target.shape:
        raise ValueError(f"source and target must embed the same images in one space size: {tuple(source.shape)} vs {tuple(target.shape)}")
    x, y = source.detach().double().cpu(), target.detach().double().cpu()
    eye = torch.eye(x.shape[1], dtype=torch.float64)

    def moments(xs, ys):  # the only O(n·D²) work: once per part of the rows, not once per ridge
        mx, my = xs.mean(0), ys.mean(0)
        xc = xs - mx
        return len(xs), mx, my, xc.T @ xc, xc.T @ (ys - my)

    def combined(a, b):  # moments of the union of two parts (the parallel-variance formula)
        n = a[0] + b[0]
        dx, dy = b[1] - a[1], b[2] - a[2]
        f = a[0] * b[0] / n
        return (n, a[1] + dx * b[0] / n, a[2] + dy * b[0] / n,
                a[3] + b[3] + f * torch.outer(dx, dx), a[4] + b[4] + f * torch.outer(dx, dy))

    def solve(stats, ridge):
        _, mx, my, scatter, cross = stats
        lam = ridge * max(float(torch.trace(scatter)) / x.shape[1], 1e-12)
        w = torch.linalg.solve(scatter + lam * eye, cross + lam * eye)
        return w, my - mx @ w

    held = torch.arange(len(x)) % holdout_every == holdout_every - 1
    best, everything = ridges[0], None
    if int(held.sum()) >= 1 and int((~held).sum()) >= 2 and len(ridges) > 1:
        fit_part = moments(x[~held], y[~held])
        everything = combined(fit_part, moments(x[held], y[held]))
        x_held, y_held = x[held], y[held]
        errors = []
        for ridge in ridges:
            w, b = solve(fit_part, ridge)
            errors.append(float(((x_held @ w + b - y_held) ** 2).sum()))
        best = ridges[min(range(len(ridges)), key=errors.__getitem__)]
    w, b = solve(everything if everything is not None else moments(x, y), best)
    return w.float(), b.float()


def check_stage_index(stage, num_stages: int) -> int:
    """``stage`` as an index of one of ``num_stages`` stages (numpy integers accepted), or a ValueError."""
    if isinstance(stage, (bool, np.bool_)) or not isinstance(stage, (int, np.integer)):
        raise ValueError(f"stage must be an integer index of the {num_stages} stages added, got {stage!r}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be one of the {num_stages} stages added (0–{max(num_stages - 1, 0)}), got {stage!r}")
    return int(stage)


class DriftCompensator:
    """Per-stage prototypes and their accumulated drift: what stage i needs of stages < i−1.

    Lifecycle, with stages numbered 0, 1, ... in order of arrival:

    1. After stage b trains, ``add_stage(F_b(τ_b), labels)`` stores the prototypes μ^b_b.
    2. Still offline, the drift of every earlier stage is brought up to F_b:
       ``mode="direct"`` (the paper, Eq. 3): for each earlier stage t in ``stages_to_measure()``,
       ``update_drift(F_t(τ_b), F_b(τ_b), stage=t)`` — each old checkpoint is loaded once, one at a time.
       ``mode="chained"`` (SDC): ``update_drift(F_{b−1}(τ_b), F_b(τ_b))`` composes the step drift of
       the previous model onto every earlier stage — only the previous model (stage b's teacher) is needed.
       ``mode="learned"`` (LDC-style, beyond the paper): for each earlier stage t, a linear map from the
       latest model's space back to F_t's, fitted on the same data as "direct" (:func:`fit_linear_map`);
       a virtual feature is the map applied to the teacher feature, and each prototype's drift is what
       the forward map (F_t → latest) does to it.
       ``mode="learned_chained"``: the learned maps for the chained setting — only the previous model is
       needed: the step maps F_b ⇄ F_{b−1} are fitted on stage b's images and composed with the maps
       already held (latest → F_t = (latest → F_{b−1}) ∘ (F_{b−1} → F_t), and forward alike); the
       intermediate features are not re-normalised, so errors of the steps compound.
       ``mode="none"``: nothing is measured, every drift stays zero and each virtual feature is the
       teacher feature itself — the ablation that keeps Eq. 6's one term per earlier stage (and so its
       total weight) but removes what Eq. 3–4 estimate.
    3. While stage b+1 trains, ``virtual_features(teacher_feats)`` gives f̂^t for every t < b (Eq. 4),
       and ``correlation_loss(student, teacher)`` the summed Eq. 6 loss over the real teacher (t = b)
       and the virtual ones.

    Memory is O(classes × D); ``state_dict()`` holds only tensors, lists, strings and numbers.
    """

    def __init__(
        self,
        mode: str = "direct",
        similarity: str = "cosine_relu",
        sigma: float = 0.2,
        eps: float = 1e-6,
        normalize: bool = True,
        loss_fn: torch.nn.Module | None = None,
    ):
        if mode not in DRIFT_MODES:
            raise ValueError(f"mode must be one of {DRIFT_MODES}, got {mode!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        for name, value in (("sigma", sigma), ("eps", eps)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r} (eps keeps the similarity weights' "
                                 "sums away from 0: eps=0 divides by zero when no prototype is similar)")
        sigma, eps = float(sigma), float(eps)
        self.mode, self.similarity, self.sigma, self.eps, self.normalize = mode, similarity, sigma, eps, normalize
        self.loss_fn = GramCorrelationLoss() if loss_fn is None else loss_fn
        self.class_ids: list[torch.Tensor] = []
        self.stage_prototypes: list[torch.Tensor] = []  # μ^b_b, in F_b's space
        self.prototype_drifts: list[torch.Tensor] = []  # Δμ^{b→latest}
        # (device, ...): the earlier stages on the features' device — padded prototypes, drifts and mask,
        # or the stacked learned maps — rebuilt after any change
        self._device_cache = None
        self.maps: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # learned: (W, b) latest → F_t, per stage t
        self.forward_maps: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # learned: F_t → latest

    @property
    def num_stages(self) -> int:
        return len(self.stage_prototypes)

    def _weight_kwargs(self) -> dict:
        return {"sigma": self.sigma, "eps": self.eps}

    def add_stage(self, embeddings: torch.Tensor, labels: torch.Tensor) -> int:
        """Store the prototypes of the stage that just finished (its own model's embeddings); returns its index."""
        class_ids, means = prototypes(embeddings.detach(), labels)
        if self.stage_prototypes and means.shape[1] != self.stage_prototypes[0].shape[1]:
            raise ValueError(
                f"embedding size {means.shape[1]} differs from the earlier stages' {self.stage_prototypes[0].shape[1]}"
            )
        for t, earlier in enumerate(self.class_ids):
            overlap = set(earlier.tolist()) & set(class_ids.tolist())
            if overlap:
                raise ValueError(f"classes {sorted(overlap)[:10]} already belong to stage {t}: stages must be disjoint")
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

    def update_drift(self, old_feats: torch.Tensor, new_feats: torch.Tensor, stage: int | None = None) -> None:
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
            self._set_learned_maps(stage, fit_linear_map(new_feats, old_feats), fit_linear_map(old_feats, new_feats))
            return
        if self.mode == "learned_chained":
            if stage not in (None, allowed[0]):
                raise ValueError(f"learned_chained mode measures only the previous stage ({allowed[0]}), got stage={stage!r}")
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
            raise ValueError(f"chained mode measures only the previous stage ({allowed[0]}), got stage={stage!r}")
        # Step drift F_{latest-1} → F_latest, weighted by prototypes already carried into F_{latest-1}'s space.
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
            weights, biases = self._stacked_maps(feats.device)
            virtual = torch.baddbmm(biases[:, None, :], feats.expand(earlier, *feats.shape), weights)
            return F.normalize(virtual, dim=2) if self.normalize else virtual
        if self.similarity == "cosine":  # the raw weights must be checked per stage (a sum ≈ 0 raises)
            return torch.stack([
                virtual_features(feats, self.drifted_prototypes(t).to(feats.device), self.prototype_drifts[t].to(feats.device),
                                 self.similarity, normalize=self.normalize, **self._weight_kwargs())
                for t in range(earlier)
            ])
        protos, drifts, mask = self._padded_stages(feats.device)
        _check_same_dim(protos[0], feats, "prototypes", "teacher_feats")
        if self.similarity == "cosine_relu":
            cos = F.normalize(feats, dim=1) @ F.normalize(protos, dim=2).transpose(1, 2)  # (S, B, K)
            weights = (cos.clamp(min=0) + self.eps) * mask[:, None, :]
            weights = weights / weights.sum(dim=2, keepdim=True)
        else:  # gaussian
            logits = -torch.cdist(feats.expand(earlier, *feats.shape), protos).pow(2) / (2 * self.sigma**2)
            weights = torch.softmax(logits.masked_fill(~mask[:, None, :].bool(), float("-inf")), dim=2)
        virtual = feats - weights @ drifts  # f + Δf, Δf = −Σ_k S Δμ_k / Σ_k S
        return F.normalize(virtual, dim=2) if self.normalize else virtual

    def _stacked_maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device_cache is None or self._device_cache[0] != device:
            earlier = range(self.num_stages - 1)
            missing = [t for t in earlier if self.maps[t] is None]
            if missing:
                raise ValueError(f"learned mode: no map fitted for stage(s) {missing}: call update_drift for each")
            weights = torch.stack([self.maps[t][0] for t in earlier]).to(device)
            biases = torch.stack([self.maps[t][1] for t in earlier]).to(device)
            self._device_cache = (device, weights, biases)
        return self._device_cache[1:]

    def _padded_stages(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._device_cache is None or self._device_cache[0] != device:
            earlier = range(self.num_stages - 1)
            k_max = max(self.stage_prototypes[t].shape[0] for t in earlier)
            dim = self.stage_prototypes[0].shape[1]
            protos = torch.zeros(len(earlier), k_max, dim)
            drifts = torch.zeros(len(earlier), k_max, dim)
            mask = torch.zeros(len(earlier), k_max)
            for t in earlier:
                k = self.stage_prototypes[t].shape[0]
                protos[t, :k] = self.drifted_prototypes(t).float().cpu()
                drifts[t, :k] = self.prototype_drifts[t].float().cpu()
                mask[t, :k] = 1
            # padding rows get a unit prototype so normalising them divides by no zero; their weight is masked
            protos[mask == 0] = 1.0
            self._device_cache = (device, protos.to(device), drifts.to(device), mask.to(device))
        return self._device_cache[1:]

    @torch.no_grad()
    def update_gallery(self, embeddings: torch.Tensor, stage: int, method: str = "translation") -> torch.Tensor:
        """Move embeddings that stage ``stage``'s model F_stage computed into the latest model's space,
        without the images or F_stage: ``"translation"`` (Eq. 4 forward with stage ``stage``'s prototypes
        and their drift, any mode that measures drift) or ``"learned"`` (the forward map F_stage → latest;
        learned mode). The latest stage's own embeddings are returned as they are. O(N·K·D) or O(N·D²),
        on the embeddings' device; float32, re-normalised when the compensator normalises."""
        check_embeddings(embeddings, "embeddings")
        stage = check_stage_index(stage, self.num_stages)
        if method not in ("translation", "learned"):
            raise ValueError(f"method must be 'translation' or 'learned', got {method!r}")
        if embeddings.shape[1] != self.stage_prototypes[0].shape[1]:
            raise ValueError(f"embeddings have {embeddings.shape[1]} columns, the compensator's stages "
                             f"{self.stage_prototypes[0].shape[1]}: pass embeddings of the models it measured")
        if method == "translation" and self.mode == "none":
            raise ValueError("a compensator of mode='none' measures no drift: 'translation' would return the "
                             "embeddings unchanged; use mode='direct' or 'chained' to move a gallery")
        feats = embeddings.detach().float()
        if stage == self.num_stages - 1:
            return feats
        if method == "learned":
            if self.forward_maps[stage] is None:
                raise ValueError(f"no learned map of stage {stage}: gallery updates by map need a learned drift mode {LEARNED_MODES}")
            w, b = (v.to(feats.device) for v in self.forward_maps[stage])
            moved = feats @ w + b
            return F.normalize(moved, dim=1) if self.normalize else moved
        if method != "translation":
            raise ValueError(f"method must be 'translation' or 'learned', got {method!r}")
        return translate_forward(feats, self.stage_prototypes[stage].to(feats.device),
                                 self.prototype_drifts[stage].to(feats.device), self.similarity,
                                 normalize=self.normalize, **self._weight_kwargs())

    def teacher_features(self, teacher_emb: torch.Tensor) -> list[torch.Tensor]:
        """The real teacher features followed by the virtual features of every earlier stage."""
        teacher_emb = teacher_emb.detach()
        return [teacher_emb] + self.virtual_features(teacher_emb)

    def correlation_loss(
        self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, loss_fn: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """Eq. 6: Σ_t L_corr^{t→i} over the real teacher and the virtual features of earlier stages.

        ``loss_fn`` defaults to the compensator's own (a ``GramCorrelationLoss`` unless given); the sum is
        :func:`~pml_mutual.losses.gram_distillation_losses`'s: one stacked computation when ``loss_fn`` is
        ``fusable()``, else one call per teacher.
        """
        loss_fn = self.loss_fn if loss_fn is None else loss_fn
        teacher_emb = teacher_emb.detach()
        teachers = [teacher_emb, self.virtual_feature_stack(teacher_emb)]
        return gram_distillation_losses(student_emb, teachers=teachers, correlation_loss=loss_fn)["correlation_loss"]

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
            "maps": [None if m is None else [m[0].cpu().clone(), m[1].cpu().clone()] for m in self.maps],
            "forward_maps": [None if m is None else [m[0].cpu().clone(), m[1].cpu().clone()] for m in self.forward_maps],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output, checked first (keys, settings, shapes, finiteness, disjoint
        classes): a bad state raises ValueError naming the entry and leaves this compensator unchanged."""
        keys = ("mode", "similarity", "sigma", "eps", "normalize", "class_ids", "stage_prototypes", "prototype_drifts")  # + "maps"
        if not isinstance(state, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state).__name__}")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"state_dict is missing key {missing[0]!r} (has {sorted(state)})")
        for key in ("mode", "similarity"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict was saved with {key}={state[key]!r}, this compensator has {getattr(self, key)!r}")
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
        if self.mode in LEARNED_MODES and any(m is None for m in maps[: max(0, len(maps) - 1)]):
            raise ValueError("state_dict of a learned-mode compensator lacks the map of an earlier stage")
        self._device_cache = None
        self.maps, self.forward_maps = (
            [None if m is None else (m[0].clone().float(), m[1].clone().float()) for m in all_maps[key]]
            for key in ("maps", "forward_maps")
        )
        self.sigma, self.eps, self.normalize = float(state["sigma"]), float(state["eps"]), bool(state["normalize"])
        self.class_ids = [c.clone() for c in state["class_ids"]]
        self.stage_prototypes = [p.clone().float() for p in state["stage_prototypes"]]
        self.prototype_drifts = [d.clone().float() for d in state["prototype_drifts"]]

    def __repr__(self) -> str:
        return f"DriftCompensator(mode={self.mode!r}, similarity={self.similarity!r}, stages={self.num_stages})"
