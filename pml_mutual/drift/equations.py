"""The equations of prototype drift and virtual features (paper Section 3.3, Eq. 3–4), as pure functions.

The state a run keeps across stages is :class:`~pml_mutual.drift.compensator.DriftCompensator`'s.

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

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import check_embeddings

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
    virtual = teacher_feats.float() + feature_drift(
        teacher_feats, prototypes, prototype_drift, similarity, **weight_kwargs
    )
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
    return virtual_features(
        feats, prototypes, -prototype_drift.float(), similarity, normalize, **weight_kwargs
    )


def fit_linear_map(
    source: torch.Tensor, target: torch.Tensor, ridges=RIDGES, holdout_every: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
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
        raise ValueError(
            f"source and target must embed the same images in one space size: {tuple(source.shape)} vs "
            f"{tuple(target.shape)}"
        )
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
        return (
            n,
            a[1] + dx * b[0] / n,
            a[2] + dy * b[0] / n,
            a[3] + b[3] + f * torch.outer(dx, dx),
            a[4] + b[4] + f * torch.outer(dx, dy),
        )

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
        raise ValueError(
            f"stage must be one of the {num_stages} stages added (0–{max(num_stages - 1, 0)}), got {stage!r}"
        )
    return int(stage)


def batched_virtual_features(
    feats: torch.Tensor,
    protos: torch.Tensor,
    drifts: torch.Tensor,
    mask: torch.Tensor,
    similarity: str,
    sigma: float = 0.2,
    eps: float = 1e-6,
    normalize: bool = True,
) -> torch.Tensor:
    """Eq. 4 for S earlier stages at once: ``feats`` (B, D) teacher features, ``protos`` / ``drifts`` (S, K,
    D)
    each stage's drifted prototypes and their drift, padded to K classes (``mask`` (S, K) marks the real
    ones); returns (S, B, D). ``"cosine_relu"`` or ``"gaussian"`` weights (the raw cosine's sums must be
    checked stage by stage: :func:`virtual_features`)."""
    earlier = protos.shape[0]
    if similarity == "cosine_relu":
        cos = F.normalize(feats, dim=1) @ F.normalize(protos, dim=2).transpose(1, 2)  # (S, B, K)
        weights = (cos.clamp(min=0) + eps) * mask[:, None, :]
        weights = weights / weights.sum(dim=2, keepdim=True)
    elif similarity == "gaussian":
        logits = -torch.cdist(feats.expand(earlier, *feats.shape), protos).pow(2) / (2 * sigma**2)
        weights = torch.softmax(logits.masked_fill(~mask[:, None, :].bool(), float("-inf")), dim=2)
    else:
        raise ValueError(
            f"batched virtual features take 'cosine_relu' or 'gaussian' weights, got {similarity!r}"
        )
    virtual = feats - weights @ drifts  # f + Δf, Δf = −Σ_k S Δμ_k / Σ_k S
    return F.normalize(virtual, dim=2) if normalize else virtual


def apply_maps(
    feats: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """The learned virtual features of S earlier stages: ``feats`` (B, D) through each stage's linear map
    (``weights`` (S, D, D), ``biases`` (S, D)), one batched matmul; (S, B, D)."""
    virtual = torch.baddbmm(biases[:, None, :], feats.expand(weights.shape[0], *feats.shape), weights)
    return F.normalize(virtual, dim=2) if normalize else virtual


def pad_stages(
    prototypes: list[torch.Tensor], drifts: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each stage's (K_t, D) prototypes and drifts padded to one (S, K, D) stack, with the (S, K) mask of real
    rows, for :func:`batched_virtual_features`. Padding rows get a unit prototype, so that normalising them
    divides by no zero; their weight is masked."""
    k_max, dim = max(p.shape[0] for p in prototypes), prototypes[0].shape[1]
    protos, drift, mask = (
        torch.zeros(len(prototypes), k_max, dim),
        torch.zeros(len(prototypes), k_max, dim),
        torch.zeros(len(prototypes), k_max),
    )
    for t, (p, d) in enumerate(zip(prototypes, drifts)):
        protos[t, : p.shape[0]] = p.float().cpu()
        drift[t, : p.shape[0]] = d.float().cpu()
        mask[t, : p.shape[0]] = 1
    protos[mask == 0] = 1.0
    return protos, drift, mask
