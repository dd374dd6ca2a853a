"""A retrieval gallery that is not re-embedded after every stage (beyond the paper: BCT / FCT-style
compatibility, updated with this method's own drift estimates).

A deployed system stores each item's embedding as the model of its day computed it; re-embedding
("backfilling") the whole gallery with every new model is the expensive part of shipping it.
:class:`StoredGallery` holds, for the test items of every stage so far, the embedding by the model of
the stage their class arrived in, and two :class:`~pml_mutual.DriftCompensator` fed the same drift
measurements as training's (``"direct"``: Eq. 3's prototype drift, applied forward as a translation;
``"learned"``: the ridge-fitted forward maps F_b → latest). :meth:`StoredGallery.report` gives the
latest model's queries against (a) the stored gallery, (b) it moved by translation, (c) moved by the
learned maps, (d) the gallery re-embedded by the latest model (what the paper evaluates), old / new /
all classes, with the seconds each update took. Updates need no image and no old model.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np
import torch

from .checks import check_embeddings
from .drift import DriftCompensator
from .evaluation import cross_stage_recalls
from .evaluation.results import GALLERY_COLUMNS

# gallery name → (the compensator's drift mode, the update_gallery method that moves it)
UPDATES = {"translation": ("direct", "translation"), "learned": ("learned", "learned")}
GALLERIES = tuple(name for name, _ in GALLERY_COLUMNS)  # stored, translation, learned, reembedded


class StoredGallery:
    """The test gallery as a deployed system holds it, and what moving it without images recovers.

    Lifecycle per stage i, driven by the stage loop alongside the training compensator:
    ``add_stage(F_i(τ_i), labels)`` and ``update_drift(F_t(τ_i), F_i(τ_i), stage=t)`` for every t in
    ``stages_to_measure()`` (the same calls and the same features as a direct-mode
    :class:`~pml_mutual.DriftCompensator`), then ``store(F_i(test items of stage i), their positions)``
    and ``report(...)``. Memory: the test set's embeddings once (each item stored once) and
    O(stages · D²) maps.
    """

    def __init__(self, similarity: str = "cosine_relu"):
        self.compensators = {
            mode: DriftCompensator(mode=mode, similarity=similarity) for mode, _ in UPDATES.values()
        }
        self.embeddings: list[
            torch.Tensor
        ] = []  # per stage b: F_b's features of the test items of b's classes
        self.positions: list[np.ndarray] = []  # their positions in the test set

    # ------------------------------------------------------------- drift measurement (DriftCompensator's
    # calls)
    @property
    def num_stages(self) -> int:
        return self.compensators["direct"].num_stages

    def stages_to_measure(self, after_adding: int = 0) -> list[int]:
        return self.compensators["direct"].stages_to_measure(after_adding)

    def add_stage(self, embeddings: torch.Tensor, labels: torch.Tensor) -> int:
        for comp in self.compensators.values():
            comp.add_stage(embeddings, labels)
        return self.num_stages - 1

    def update_drift(self, old_feats: torch.Tensor, new_feats: torch.Tensor, stage: int) -> None:
        for comp in self.compensators.values():
            comp.update_drift(old_feats, new_feats, stage=stage)

    # ------------------------------------------------------------- the gallery
    def store(self, embeddings: torch.Tensor, positions: Sequence[int]) -> None:
        """Add the latest stage's test items as its model embedded them (the only embedding of an item
        the gallery ever holds). Once per stage, after that stage's ``add_stage``."""
        if len(self.embeddings) != self.num_stages - 1:
            raise ValueError(
                f"store() follows each stage's add_stage once: {len(self.embeddings)} stages stored, "
                f"{self.num_stages} added"
            )
        check_embeddings(embeddings, "gallery embeddings")
        positions = np.asarray(positions, dtype=np.int64)
        if positions.shape != (len(embeddings),):
            raise ValueError(
                f"one position per embedding expected: {positions.shape} for {len(embeddings)} rows"
            )
        self.embeddings.append(embeddings.detach().float().cpu())
        self.positions.append(positions)

    def galleries(
        self, positions: Sequence[int], device=None
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The stored gallery of the items at ``positions`` (each as stored) and each update of it, in that
        order of rows, on ``device``; with the seconds each update took (all earlier stages' items)."""
        positions = np.asarray(positions, dtype=np.int64)
        where = {int(p): (b, r) for b, pos in enumerate(self.positions) for r, p in enumerate(pos.tolist())}
        missing = [int(p) for p in positions if int(p) not in where]
        if missing:
            raise ValueError(
                f"test items {missing[:10]} were never stored (positions of stages "
                f"0..{len(self.positions) - 1})"
            )
        device = torch.device(device) if device is not None else self.embeddings[0].device
        stage_of = np.array([where[int(p)][0] for p in positions], dtype=np.int64)
        row_of = np.array([where[int(p)][1] for p in positions], dtype=np.int64)
        stored = torch.empty(len(positions), self.embeddings[0].shape[1], device=device)
        blocks = {}
        for b in np.unique(stage_of).tolist():
            rows = np.flatnonzero(stage_of == b)
            blocks[b] = torch.as_tensor(rows, device=device)
            stored[blocks[b]] = self.embeddings[b][row_of[rows]].to(device)
        out, seconds = {"stored": stored}, {}
        latest = self.num_stages - 1
        for name, (mode, method) in UPDATES.items():
            t0 = time.perf_counter()
            moved = stored.clone()
            for b, rows in blocks.items():
                if b != latest:
                    moved[rows] = self.compensators[mode].update_gallery(stored[rows], b, method)
            if moved.device.type == "cuda":
                torch.cuda.synchronize(moved.device)  # the time of the update, not of its launch
            seconds[name] = time.perf_counter() - t0
            out[name] = moved
        return out, seconds

    def report(
        self,
        latest: torch.Tensor,
        positions: Sequence[int],
        labels,
        class_to_stage: Mapping[int, int],
        stage: int,
        ks: Sequence[int] = (1,),
        reembed_seconds: float | None = None,
        device=None,
        reembedded: dict | None = None,
    ) -> dict:
        """Recall@K of ``latest`` (the latest model's features of the test items at ``positions``, every
        one stored) as queries against each gallery: ``{"stored" | "translation" | "learned" |
        "reembedded": cross_stage_recalls(...), "seconds": {update: s, "reembed": s}}``.

        Every column is searched by the same kernel (:func:`~pml_mutual.evaluation.cross_recall_at_k`), so
        galleries holding the same vectors score the same (a model that does not change reports stored =
        re-embedded), also where near-collapsed embeddings tie to float32 resolution and two search
        backends would order the ties differently. ``reembedded`` is accepted for compatibility and not
        used: the run's own evaluation may search with FAISS."""
        galleries, seconds = self.galleries(positions, device=device)
        if reembed_seconds is not None:
            seconds["reembed"] = float(reembed_seconds)
        galleries["reembedded"] = latest
        report = {
            name: cross_stage_recalls(latest, galleries[name], labels, class_to_stage, stage, ks)
            for name in GALLERIES
        }
        report["seconds"] = seconds
        return report

    # ------------------------------------------------------------- checkpoints
    def stage_state(self, stage: int) -> dict:
        """What a checkpoint of ``stage`` keeps: the compensators as they are now, and that stage's items
        only (each item is written once over the whole run)."""
        return {
            "compensators": {mode: c.state_dict() for mode, c in self.compensators.items()},
            "embeddings": self.embeddings[stage].clone(),
            "positions": torch.as_tensor(self.positions[stage]),
        }

    def load_stage_states(self, states: Sequence[dict]) -> None:
        """Restore from the :meth:`stage_state` of every stage so far, in order (checked; a bad state raises
        ValueError and leaves this gallery unchanged)."""
        if not states:
            return
        fresh = StoredGallery(self.compensators["direct"].similarity)
        for mode, comp in fresh.compensators.items():
            comp.load_state_dict(states[-1]["compensators"][mode])
        if fresh.num_stages != len(states):
            raise ValueError(
                f"gallery state of {len(states)} stages holds compensators of {fresh.num_stages}"
            )
        for b, state in enumerate(states):
            try:
                check_embeddings(state["embeddings"], f"gallery embeddings of stage {b}")
                positions = state["positions"]
                if not torch.is_tensor(positions) or positions.shape != (len(state["embeddings"]),):
                    raise ValueError(f"gallery positions of stage {b} must be one integer per embedding")
            except KeyError as e:
                raise ValueError(f"gallery state of stage {b} lacks {e}") from e
            fresh.embeddings.append(state["embeddings"].float().clone())
            fresh.positions.append(positions.numpy().astype(np.int64))
        self.compensators, self.embeddings, self.positions = (
            fresh.compensators,
            fresh.embeddings,
            fresh.positions,
        )
