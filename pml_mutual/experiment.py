"""Several methods on one stage split, all starting from one shared initial model (as in the paper)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

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
            model_factory, train_dataset, test_dataset, class_to_stage, config=configs[name],
            run_dir=out_dir / name, initial_state_dict=initial, quiet=quiet, **learner_kwargs,
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
    return 100 * final["old"]["1"], 100 * final["new"]["1"], 100 * final["all"]["1"]


def per_stage_row(summary: dict) -> list[float]:
    """Final model's Recall@1 (%) on each stage's classes, then on all classes (the paper's Table 3 column)."""
    final = summary["stages"][-1]
    return [100 * r["1"] for r in final["per_stage"]] + [100 * final["all"]["1"]]


def mean_std(values: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=float)
    return v.mean(0), (v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1:]))


def measure_fidelity(learner: OnlineLearner, modes: Sequence[str] = ("none", "direct", "learned"),
                     batch_size: int = 256) -> list[dict]:
    """How close each drift mode's virtual features come to the real earlier models, on a finished run.

    For every stage i ≥ 1 of ``learner``'s run (its checkpoints), a :class:`~pml_mutual.DriftCompensator`
    per mode is brought up to F_i exactly as training would (prototypes and drift or maps from each
    stage's prototype images), and the virtual features it estimates from F_i's features of the held-out
    test images of the classes seen so far are compared with the real F_b features of the same images
    (:func:`pml_mutual.evaluation.fidelity_rows`). One model is loaded at a time; every mode sees the
    same models, so the modes differ only in their estimate. Returns one row per (i, b) with
    ``after_stage`` = i.
    """
    from torch.utils.data import Subset

    from .drift import DriftCompensator
    from .evaluation import extract_embeddings, fidelity_rows

    device, amp = learner.device, learner.config.amp

    def embed(stage, dataset):
        model = learner.load_stage_model(stage)
        emb, labels = extract_embeddings(model, dataset, batch_size=batch_size, device=device, amp=amp)
        return emb, labels

    comps = {m: DriftCompensator(mode=m, similarity=learner.config.drift_similarity) for m in modes}
    rows = []
    for i in range(len(learner.train_stages)):
        new, labels = embed(i, learner.prototype_stages[i])
        old = [embed(t, learner.prototype_stages[i])[0] for t in range(i)]
        for comp in comps.values():
            comp.add_stage(new, labels)
            for t in comp.stages_to_measure():
                comp.update_drift(old[t], new, stage=t)
        if i == 0:
            continue
        seen = np.flatnonzero([learner.class_to_stage[int(c)] <= i for c in learner.test_labels])
        held_out = Subset(learner.test_dataset, seen.tolist())
        teacher, test_labels = embed(i, held_out)
        real = [embed(b, held_out)[0] for b in range(i)]
        virtual = {m: c.virtual_feature_stack(teacher) for m, c in comps.items()}
        for row in fidelity_rows(teacher, virtual, real, test_labels.numpy()):
            rows.append(dict(row, after_stage=i))
    return rows
