"""The evaluation step: Recall@K of F_i on every class seen so far, old / new / all and per stage (Sec. 4),
and with ``gallery_report`` the stored gallery's columns."""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import distributed
from ..callbacks import StageContext
from ..evaluation import stage_recalls
from .drift import extract


class EvalStep:
    """Embeds the seen test items with ``ctx.student`` and sets ``ctx.results`` (the same on every rank)."""

    name = "eval"

    def run(self, learner, ctx: StageContext) -> None:
        stage = ctx.stage
        seen = learner.seen_test_positions(stage)
        t0 = time.perf_counter()
        emb, labels = extract(learner, ctx.student, learner.loaders.embed(learner.test_dataset), seen)
        embed_seconds = time.perf_counter() - t0
        gallery = learner.gallery
        if gallery is not None:  # every rank keeps the stored gallery; rank 0 reports
            new = np.array([learner.class_to_stage[int(c)] == stage for c in labels])
            gallery.store(emb[torch.from_numpy(new)], seen[new])
        results = None
        if distributed.is_main():  # one search, its result sent to every rank
            results = stage_recalls(emb, labels, learner.class_to_stage, stage, learner.config.ks)
            if gallery is not None:
                # every column, (d) included, by one kernel: the run's own search above may be FAISS's
                results["gallery"] = gallery.report(
                    emb,
                    seen,
                    labels,
                    learner.class_to_stage,
                    stage,
                    ks=(1,),
                    reembed_seconds=embed_seconds,
                    device=learner.device,
                )
        ctx.results = distributed.broadcast_object(results)
