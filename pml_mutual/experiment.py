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
    **learner_kwargs,
) -> dict[str, dict]:
    """Train ``initial`` (stage 0 only) once, then every other method of ``configs`` from its F_0.

    ``configs`` maps method name → config; the ``initial`` entry (or the first config with
    ``method="initial"``) decides how F_0 is trained. Returns method → results document; each run
    lives (and resumes) in ``out_dir/<method>``.
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
    results = {"initial": base.run()}
    initial_weights = base.load_stage_model(0).state_dict()
    for name in configs:
        if name != "initial":
            results[name] = learner(name, initial_weights).run()
    return results


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
