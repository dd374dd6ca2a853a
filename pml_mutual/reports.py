"""Figures of an online run (optional extra ``plots``: matplotlib).

* :func:`plot_accuracy_matrix`: heatmap of R[i][j] = Recall@1 on stage j's classes after stage i.
* :func:`plot_stage_curves`: Recall@1 of each stage's classes as later stages arrive.
* :func:`plot_methods`: several methods side by side: their final-model curves and their all-class Recall@1.
* :func:`plot_gallery`: the gallery report (``OnlineConfig(gallery_report=True)``): all-class Recall@1 of
  the latest model's queries against the gallery as stored, moved, and re-embedded, after each stage.

Each takes results documents (see :mod:`pml_mutual.evaluation.results`) and writes a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .evaluation.results import GALLERY_COLUMNS, recall_at


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'pml-mutual[plots]'") from e
    return plt


def _matrix(summary: dict) -> np.ndarray:
    return np.array([[np.nan if v is None else 100 * v for v in row] for row in summary["accuracy_matrix"]])


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_accuracy_matrix(summary: dict, path: str | os.PathLike, ax=None) -> Path:
    """Heatmap of the accuracy matrix, one cell per (after stage i, classes of stage j), in percent."""
    plt = _pyplot()
    R = _matrix(summary)
    fig, ax = plt.subplots(figsize=(1.2 * len(R) + 2.5, 1.0 * len(R) + 2)) if ax is None else (ax.figure, ax)
    # The colour scale starts just below the worst cell: forgetting of a few points stays visible.
    vmin = max(0.0, float(np.floor(np.nanmin(R) - 5)))
    im = ax.imshow(R, vmin=vmin, vmax=100, cmap="viridis")
    for i in range(len(R)):
        for j in range(i + 1):
            dark = R[i, j] < vmin + 0.6 * (100 - vmin)
            ax.text(
                j,
                i,
                f"{R[i, j]:.1f}",
                ha="center",
                va="center",
                color="white" if dark else "black",
                fontsize=8,
            )
    ax.set_xlabel("classes of stage j")
    ax.set_ylabel("after training stage i")
    ax.set_xticks(range(len(R)))
    ax.set_yticks(range(len(R)))
    ax.set_title(f"Recall@1 (%) {summary.get('method', '')}".strip())
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def plot_stage_curves(summary: dict, path: str | os.PathLike) -> Path:
    """One line per stage's classes: its Recall@1 after each later stage (forgetting shows as a fall)."""
    plt = _pyplot()
    R = _matrix(summary)
    fig, ax = plt.subplots(figsize=(6, 4))
    stages = np.arange(len(R))
    for j in range(len(R)):
        ax.plot(stages[j:], R[j:, j], marker="o", label=f"stage {j} classes")
    ax.plot(
        stages,
        [100 * recall_at(s["all"], 1) for s in summary["stages"]],
        "k--",
        marker="s",
        label="all seen classes",
    )
    ax.set_xlabel("after training stage")
    ax.set_ylabel("Recall@1 (%)")
    ax.set_xticks(stages)
    ax.set_title(f"Recall@1 per stage {summary.get('method', '')}".strip())
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_methods(summaries: Mapping[str, dict], path: str | os.PathLike) -> Path:
    """Methods side by side: left, final model's Recall@1 on each stage's classes; right, all classes after
    each stage."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, summary in summaries.items():
        final = summary["stages"][-1]["per_stage"]
        left.plot(range(len(final)), [100 * recall_at(r, 1) for r in final], marker="o", label=method)
        right.plot(
            range(len(summary["stages"])),
            [100 * recall_at(s["all"], 1) for s in summary["stages"]],
            marker="o",
            label=method,
        )
    left.set_xlabel("classes of stage")
    left.set_ylabel("Recall@1 (%) of the final model")
    right.set_xlabel("after training stage")
    right.set_ylabel("Recall@1 (%) on all seen classes")
    n_stages = max(len(s["stages"]) for s in summaries.values())
    for ax in (left, right):
        ax.set_xticks(range(n_stages))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


GALLERY_MARKERS = {"stored": "o", "translation": "^", "learned": "s", "reembedded": "D"}


def plot_gallery(summaries: Mapping[str, dict] | dict, path: str | os.PathLike) -> Path:
    """One panel per method (or one results document): all-class Recall@1 after each stage of the latest
    model's queries against the test gallery (a) as stored, (b) moved by translation, (c) moved by the
    learned map, (d) re-embedded."""
    if "stages" in summaries:  # one results document
        summaries = {summaries.get("method") or "run": summaries}
    missing = [m for m, s in summaries.items() if not any("gallery" in st for st in s["stages"])]
    if missing:
        raise ValueError(
            f"no gallery report in the results of {missing}: run with OnlineConfig(gallery_report=True)"
        )
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(summaries), figsize=(4.5 * len(summaries) + 0.5, 4), squeeze=False)
    for ax, (method, summary) in zip(axes[0], summaries.items()):
        stages = [s for s in summary["stages"] if "gallery" in s]
        for name, label in GALLERY_COLUMNS:
            ax.plot(
                [s["stage"] for s in stages],
                [100 * recall_at(s["gallery"][name]["all"], 1) for s in stages],
                marker=GALLERY_MARKERS[name],
                label=label,
            )
        ax.set_xlabel("after training stage")
        ax.set_ylabel("Recall@1 (%), all seen classes")
        ax.set_xticks([s["stage"] for s in stages])
        ax.set_title(f"gallery without re-embedding: {method}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
