"""L_corr over every teacher and L_mutual of one batch in one computation (paper Eq. 1, 2 and 6).

On a GPU the Gram losses are bound by kernel launches, not arithmetic (B × B matrices, B ≈ 50):
called as modules, each normalises, multiplies and softmaxes each network's batch on its own and
PML's reducer runs per loss (141 computing ops forward and backward for one teacher, 317 for five).
In the default configuration (``fusable()`` losses: cosine Gram, ``MeanReducer``, one temperature,
symmetric mutual loss) this function stacks the two students and, apart, all teachers, and computes
one normalisation, one batched Gram and one log-softmax per stack (63 ops for one teacher, 64 for
five). Any other configuration gets the plain calls, with the same values.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .gram import check_pair, rescale_rows


def _teacher_stacks(teachers) -> list[torch.Tensor]:
    """``teachers`` as (T, B, D) stacks (a (B, D) tensor is a stack of one)."""
    if teachers is None:
        return []
    parts = [teachers] if torch.is_tensor(teachers) else list(teachers)
    for t in parts:
        if not torch.is_tensor(t):
            raise TypeError(f"teachers must be tensors (B, D) or stacks (T, B, D), got a {type(t).__name__}")
    return [t if t.ndim == 3 else t[None] for t in parts]


def gram_distillation_losses(
    student: torch.Tensor,
    support: torch.Tensor | None = None,
    teachers: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    correlation_loss=None,
    mutual_loss=None,
) -> dict[str, torch.Tensor]:
    """``{"correlation_loss": Σ_t correlation_loss(student, ref_emb=t), "mutual_loss":
    mutual_loss(student, ref_emb=support)}``, each present when its inputs are given.

    ``teachers``: the real teacher's and the virtual features (Eq. 6), as (B, D) tensors, (T, B, D)
    stacks, or a sequence mixing both; detached (they are targets). With ``correlation_loss`` and
    ``mutual_loss`` both ``fusable()`` and of one temperature, everything is one stacked computation:
    KL(t ‖ p) = Σ_j P_t (log P_t − log P_p) per row, and the symmetric mutual loss
    ½ [KL(p ‖ s) + KL(s ‖ p)] = ½ Σ_j (P_p − P_s)(log P_p − log P_s), each × T² / B (``batchmean``).
    The values equal the calls' up to float32 summation order.
    """
    teacher_stacks = _teacher_stacks(teachers)
    teacher_rows = [row for stack in teacher_stacks for row in stack.unbind(0)]
    if teachers is not None and not teacher_rows:
        raise ValueError("the correlation loss needs at least one teacher")
    if teacher_rows and correlation_loss is None:
        raise ValueError("teachers given without a correlation_loss")
    if support is not None and mutual_loss is None:
        raise ValueError("support given without a mutual_loss")
    used = [
        loss
        for loss, present in ((correlation_loss, teacher_rows), (mutual_loss, support is not None))
        if present
    ]
    fused = (
        bool(used)
        and all(getattr(loss, "fusable", lambda: False)() for loss in used)
        and (
            len({loss.temperature for loss in used}) == 1
            and len({tuple(t.shape) for t in teacher_rows} | {tuple(student.shape)}) == 1
            and (support is None or support.shape == student.shape)
        )
    )
    if not fused:
        out = {}
        if support is not None:
            out["mutual_loss"] = mutual_loss(student, ref_emb=support)
        if teacher_rows:
            out["correlation_loss"] = sum(correlation_loss(student, ref_emb=t.detach()) for t in teacher_rows)
        return out

    if support is not None:
        check_pair(student, support, mutual_loss.ref_name)
    for t in teacher_rows:
        check_pair(student, t, correlation_loss.ref_name)
    temperature = used[0].temperature
    scale = temperature**2 / student.shape[0]

    def log_probs(
        rows: list[torch.Tensor],
    ) -> torch.Tensor:  # log σ_T(G) of each (B, D) slice, one computation
        z = F.normalize(rescale_rows(rows[0] if len(rows) == 1 else torch.cat(rows)), dim=2)
        # G in float32, the softmax and KL in float64 (gram's module docstring: float32 cancels at large T)
        return F.log_softmax((z @ z.transpose(1, 2)).double() / temperature, dim=2)

    out = {}
    with torch.autocast(device_type=student.device.type, enabled=False):
        # the students' rows carry gradients; the teachers' are constants, computed without autograd so
        # that the backward pass touches only the students' B × B matrices
        log_students = log_probs(
            [student.float()[None]] + ([support.float()[None]] if support is not None else [])
        )
        # unbind, not indexing: its backward is one stack, where each index's would write a zero-filled copy
        (log_p, *log_s), (probs_p, *probs_s) = log_students.unbind(0), log_students.exp().unbind(0)
        if support is not None:
            kl_both = (probs_p - probs_s[0]) * (log_p - log_s[0])
            out["mutual_loss"] = (kl_both.sum() * (scale / 2)).float()
        if teacher_rows:
            with torch.no_grad():
                log_teachers = log_probs([t.float() for t in teacher_stacks if t.shape[0]])
            if correlation_loss.direction == "forward":
                terms = log_teachers.exp() * (log_teachers - log_p)
            else:
                terms = probs_p * (log_p - log_teachers)
            out["correlation_loss"] = (terms.sum() * scale).float()
    return out
