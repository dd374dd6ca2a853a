"""Several methods on one stage split, all starting from one shared initial model (as in the paper)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .evaluation.results import recall_at
from .online import OnlineConfig, OnlineLearner


def run_methods(
    model_factory: Callable[[], torch.nn.Module],
    train_dataset: Dataset,
    test_dataset: Dataset,
    class_to_stage: Mapping[int, int],
    configs: Mapping[str, OnlineConfig],
    out_dir: str | os.PathLike,
    quiet: bool = True,
    return_learners: bool = False,
    **learner_kwargs,
):
    """Train ``initial`` (stage 0 only) once, then every other method of ``configs`` from its F_0.

    ``configs`` maps method name → config; the ``initial`` entry (or the first config with
    ``method="initial"``) decides how F_0 is trained. Returns method → results document; each run
    lives (and resumes) in ``out_dir/<method>``. ``return_learners``: also the finished learners, by method
    (e.g. for :func:`measure_fidelity`).
    """
    out_dir = Path(out_dir)
    if "initial" not in configs:
        raise ValueError("configs needs an 'initial' entry: it trains the shared first-stage model")

    def learner(name, initial=None):
        return OnlineLearner.from_class_assignment(
            model_factory,
            train_dataset,
            test_dataset,
            class_to_stage,
            config=configs[name],
            run_dir=out_dir / name,
            initial_state_dict=initial,
            quiet=quiet,
            **learner_kwargs,
        )

    base = learner("initial")
    results, learners = {"initial": base.run()}, {"initial": base}
    initial_weights = base.load_stage_model(0).state_dict()
    for name in configs:
        if name != "initial":
            learners[name] = learner(name, initial_weights)
            results[name] = learners[name].run()
    return (results, learners) if return_learners else results


def final_row(summary: dict) -> tuple[float, float, float]:
    """(old, new, all) Recall@1 of the final model in percent; old = every stage before the last."""
    final = summary["stages"][-1]
    return (
        100 * recall_at(final["old"], 1),
        100 * recall_at(final["new"], 1),
        100 * recall_at(final["all"], 1),
    )


def per_stage_row(summary: dict) -> list[float]:
    """Final model's Recall@1 (%) on each stage's classes, then on all classes (the paper's Table 3
    column)."""
    final = summary["stages"][-1]
    return [100 * recall_at(r, 1) for r in final["per_stage"]] + [100 * recall_at(final["all"], 1)]


def _embedder(learner: OnlineLearner, batch_size: int):
    from .evaluation import extract_embeddings

    def embed(stage, dataset, *more):  # one model loaded at a time, once for all the datasets given
        model = learner.load_stage_model(stage)
        out = [
            extract_embeddings(model, d, batch_size=batch_size, device=learner.device, amp=learner.config.amp)
            for d in (dataset, *more)
        ]
        return out if more else out[0]

    return embed


def _seen_test_items(learner: OnlineLearner, stage: int):
    from torch.utils.data import Subset

    seen = learner.seen_test_positions(stage)
    return seen, Subset(learner.test_dataset, seen.tolist())


def _replay_drift(learner: OnlineLearner, users: Sequence, embed):
    """The stage loop's drift measurement again, on a finished run's checkpoints: after each stage i, every
    user (a :class:`~pml_mutual.DriftCompensator` or :class:`~pml_mutual.gallery.StoredGallery`) gets
    ``add_stage`` and the ``update_drift`` calls it asks for; each earlier model that any of them needs
    embeds stage i's images once, one model loaded at a time. Yields i once its users are up to F_i."""
    from .steps.drift import feed_drift, view_dataset

    for i in range(len(learner.train_stages)):
        views = view_dataset(learner, i)

        def rows(t):  # the prototype images, then the augmented views (OnlineConfig.drift_views)
            if views is None:  # noqa: B023
                return embed(t, learner.prototype_stages[i])  # noqa: B023
            (feats, labels), (extra, _) = embed(t, learner.prototype_stages[i], views)  # noqa: B023
            return torch.cat([feats, extra]), labels

        new, labels = rows(i)
        earlier = sorted(set().union(*(user.stages_to_measure(after_adding=1) for user in users)))
        feed_drift(users, new, labels, earlier, lambda t: rows(t)[0])  # noqa: B023
        yield i


def _stagewise_features(learner: OnlineLearner, modes: Sequence[str], batch_size: int):
    """After each stage i ≥ 1 of a finished run: (i, {mode: compensator brought up to F_i}, F_i's features
    of the held-out test images of the classes seen so far, [F_b's features of them for b < i], their
    labels). One model is loaded at a time; every mode sees the same models."""
    from .drift import DriftCompensator

    embed = _embedder(learner, batch_size)
    comps = {m: DriftCompensator(mode=m, similarity=learner.config.drift_similarity) for m in modes}
    for i in _replay_drift(learner, list(comps.values()), embed):
        if i == 0:
            continue
        _, held_out = _seen_test_items(learner, i)
        latest, test_labels = embed(i, held_out)
        real = [embed(b, held_out)[0] for b in range(i)]
        yield i, comps, latest, real, test_labels.numpy()


def measure_fidelity(
    learner: OnlineLearner, modes: Sequence[str] = ("direct", "learned"), batch_size: int = 256
) -> list[dict]:
    """How close each drift mode's virtual features come to the real earlier models, on a finished run.

    For every stage i ≥ 1 of ``learner``'s run (its checkpoints), a :class:`~pml_mutual.DriftCompensator`
    per mode is brought up to F_i exactly as training would (prototypes and drift or maps from each
    stage's prototype images), and the virtual features it estimates from F_i's features of the held-out
    test images of the classes seen so far are compared with the real F_b features of the same images
    (:func:`pml_mutual.evaluation.fidelity_rows`; its "teacher" entry is what ``mode="none"`` distils
    from). Returns one row per (i, b) with ``after_stage`` = i.
    """
    from .evaluation import fidelity_rows

    rows = []
    for i, comps, latest, real, labels in _stagewise_features(learner, modes, batch_size):
        virtual = {m: c.virtual_feature_stack(latest) for m, c in comps.items()}
        rows.extend(
            dict(row, after_stage=i)
            for row in fidelity_rows(latest, virtual, real, labels, temperature=learner.config.temperature)
        )
    return rows


def measure_gallery_update(learner: OnlineLearner, batch_size: int = 256) -> list[dict]:
    """The gallery report of ``OnlineConfig(gallery_report=True)``
    (:class:`~pml_mutual.gallery.StoredGallery`),
    computed afterwards from a finished run's checkpoints (one model loaded at a time): after each stage
    i ≥ 1, the all-class Recall@1 of F_i's queries against the held-out gallery (a) as stored, each item
    embedded by the model of its class's stage, (b) moved by translation, (c) moved by the learned forward
    maps, (d) re-embedded by F_i; with the seconds the updates and the re-embedding took, and the whole
    report (old / new / all) under ``"report"``."""
    import time

    from .gallery import GALLERIES, StoredGallery

    embed = _embedder(learner, batch_size)
    gallery, rows = StoredGallery(learner.config.drift_similarity), []
    for i in _replay_drift(learner, [gallery], embed):
        seen, held_out = _seen_test_items(learner, i)
        t0 = time.perf_counter()
        latest, test_labels = embed(i, held_out)
        seconds = time.perf_counter() - t0
        is_new = np.array([learner.class_to_stage[int(c)] == i for c in test_labels])
        gallery.store(latest[torch.from_numpy(is_new)], seen[is_new])
        if i == 0:
            continue
        report = gallery.report(
            latest, seen, test_labels, learner.class_to_stage, i, ks=(1,), reembed_seconds=seconds
        )
        rows.append(
            {
                "after_stage": i,
                **{name: report[name]["all"][1] for name in GALLERIES},
                **{f"{k}_seconds": v for k, v in report["seconds"].items()},
                "report": report,
            }
        )
    return rows
