"""Text tables of results over seeds: the paper's layouts (Tables 2, 3, 5), the fidelity report and the
gallery report. One formatter per table, shared by the demo-scale benchmarks and the reproduction scripts.

Rows are plain dicts as the scripts write them to JSON: a results row has ``method`` and ``recall@1``
(``old``, ``new``, ``all``, ``per_stage``; percentages) and optionally ``published`` (the paper's values
in the same column order); a gallery row is one of :func:`pml_mutual.experiment.measure_gallery_update`'s
(fractions) with ``method``; a fidelity row one of :func:`pml_mutual.experiment.measure_fidelity`'s.
"""

from __future__ import annotations

import warnings

import numpy as np

from .evaluation import gap_closed
from .evaluation.results import recall_at
from .gallery import GALLERIES

ONE_TASK_COLUMNS = ("old", "new", "all")


def mean_std(rows) -> tuple[np.ndarray, np.ndarray]:
    """Column means and sample standard deviations (ddof = 1; zeros for one row) of equally long rows."""
    v = np.asarray(rows, dtype=float)
    return v.mean(0), (v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1:]))


def mean_std_cell(mean: float, std: float) -> str:
    return f"{mean:6.2f} ± {std:4.2f}"


def _by_method(rows: list[dict], methods=None) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for r in rows:
        grouped.setdefault(r["method"], []).append(r)
    order = list(methods) if methods is not None else list(grouped)
    return {m: grouped[m] for m in order if m in grouped}


def measured_columns(row: dict, setting: str) -> list[float]:
    """Recall@1 (%) in the paper's column order: old / new / all (one-task), each stage then all
    (multi-task)."""
    r = row["recall@1"]
    return [r[k] for k in ONE_TASK_COLUMNS] if setting == "one-task" else [*r["per_stage"], r["all"]]


def format_recall_table(rows: list[dict], setting: str, title: str, methods=None) -> str:
    """Recall@1 (%) of the final model, mean ± std over seeds: a line per method (one-task) or per stage's
    classes (multi-task). Rows with ``published`` add the paper's value and measured − published."""
    by_method = _by_method(rows, methods)
    if not by_method:
        return f"\n{title}: no rows"
    n = len(measured_columns(next(iter(by_method.values()))[0], setting))
    with_published = any(r.get("published") is not None for r in rows)
    width = 32 if with_published else 15

    def cell(values: list[dict], j: int) -> str:
        mean, std = mean_std([measured_columns(v, setting) for v in values])
        text = mean_std_cell(mean[j], std[j])
        if not with_published:
            return text
        pub = values[0].get("published")
        p = pub[j] if pub is not None and j < len(pub) else None
        return f"{text} | " + ("   –  |    –  " if p is None else f"{p:6.2f} | {mean[j] - p:+6.2f}")

    lines = [f"\n{title}"]
    if setting == "one-task":
        lines.append(f"{'method':<12} " + " ".join(f"{c:>{width}}" for c in ONE_TASK_COLUMNS))
        lines += [
            f"{m:<12} " + " ".join(f"{cell(v, j):>{width}}" for j in range(n)) for m, v in by_method.items()
        ]
    else:
        lines.append(f"{'classes':<10} " + " ".join(f"{m:>{width}}" for m in by_method))
        for j in range(n):
            label = f"stage {j}" if j < n - 1 else "all"
            lines.append(f"{label:<10} " + " ".join(f"{cell(v, j):>{width}}" for v in by_method.values()))
    return "\n".join(lines)


def format_fidelity(rows: list[dict]) -> str:
    """Per stage i, the mean over earlier stages b (and seeds) of cos(virtual, real F_b) and the cross-model
    Recall@1 (real F_b queries against the virtual gallery); "gap closed" = share of teacher → real F_b
    closed; then the Gram-target KL of each estimate against the teacher's (what Eq. 6's targets change)."""
    modes = [m for m in ("teacher", "none", "direct", "learned", "real") if m in rows[0]]
    stages = sorted({r["after_stage"] for r in rows})
    lines = [
        "\nFidelity of the virtual features (the `ours` run's checkpoints): mean cos(virtual, real F_b) / "
        "cross-model Recall@1 (%), mean over earlier stages b and seeds",
        f"{'after':<7} "
        + " ".join(f"{'teacher (none)' if m == 'teacher' else m:>15}" for m in modes)
        + f" {'gap closed: direct':>20} {'learned':>9}",
    ]
    for i in stages:
        rs = [r for r in rows if r["after_stage"] == i]
        cells = [
            f"{np.mean([r[m]['cosine'] for r in rs]):.3f} / "
            f"{100 * np.mean([r[m]['recall@1'] for r in rs]):5.1f}"
            for m in modes
        ]
        gaps = [
            np.nanmean([gap_closed(r, m) for r in rs]) if m in rs[0] else float("nan")
            for m in ("direct", "learned")
        ]
        lines.append(
            f"stage {i:<2} " + " ".join(f"{c:>15}" for c in cells) + f" {gaps[0]:>20.2f} {gaps[1]:>9.2f}"
        )
    lines += [
        "\nWhat the estimates change in Eq. 6: mean KL(σ_T(G_estimate) ‖ σ_T(G_teacher))·T² over batches of "
        "80 held-out images (the real F_b: what a perfect estimate would add; teacher = 0)",
        f"{'after':<7} " + " ".join(f"{m:>12}" for m in modes if m != "teacher"),
    ]
    for i in stages:
        rs = [r for r in rows if r["after_stage"] == i]
        lines.append(
            f"stage {i:<2} "
            + " ".join(f"{np.mean([r[m]['gram_kl'] for r in rs]):>12.2e}" for m in modes if m != "teacher")
        )
    return "\n".join(lines)


def format_gallery(rows: list[dict]) -> str:
    """After the last stage: all-class Recall@1 (%) of the final model's queries against each gallery
    (stored, moved by translation, moved by the learned maps, re-embedded), mean ± std over seeds, the
    share of the stored → re-embedded gap each update recovers, and the learned update's time against
    re-embedding (where the rows have the seconds)."""
    last = max(r.get("after_stage", 0) for r in rows)
    lines = [
        "\nGallery without re-embedding, after the last stage: Recall@1 (%) of the final model's queries "
        "against (a) the stored gallery, (b) moved by translation, (c) moved by the learned maps, (d) "
        "re-embedded",
        f"{'method':<14} {'(a) stored':>15} {'(b) translation':>15} {'(c) learned':>15} "
        f"{'(d) re-embedded':>15} {'gap (b)':>8} {'gap (c)':>8} {'time (c)/(d)':>13}",
    ]
    by_origin = []  # (method, the full reports of its seeds): the recovery by stage of origin, below
    for m, values in _by_method([r for r in rows if r.get("after_stage", 0) == last]).items():
        by_origin.append((m, [r["report"] for r in values if "report" in r]))
        cells = [mean_std_cell(*[v[0] for v in mean_std([[100 * r[k]] for r in values])]) for k in GALLERIES]

        def gap(k):
            return np.mean([(r[k] - r["stored"]) / max(r["reembedded"] - r["stored"], 1e-12) for r in values])

        timed = all("learned_seconds" in r and "reembed_seconds" in r for r in values)
        ratio = (
            np.mean([r["learned_seconds"] / max(r["reembed_seconds"], 1e-12) for r in values])
            if timed
            else float("nan")
        )
        lines.append(
            f"{m:<14} "
            + " ".join(f"{c:>15}" for c in cells)
            + f" {gap('translation'):>8.2f} {gap('learned'):>8.2f} {ratio:>13.4f}"
        )
    if any(reports for _, reports in by_origin):
        lines.append(
            "share of the gap (a) → (d) that (c) recovers, by the stage whose classes the queries are of:"
        )
        for m, reports in by_origin:
            if reports:
                with warnings.catch_warnings():  # the latest stage's column is NaN in every seed
                    warnings.simplefilter("ignore", RuntimeWarning)
                    gaps = np.nanmean([gap_by_stage(rep, "learned") for rep in reports], axis=0)
                cells = [f"stage {j}: " + ("–" if np.isnan(g) else f"{g:.2f}") for j, g in enumerate(gaps)]
                lines.append(f"{m:<14} " + " ".join(cells))
    return "\n".join(lines)


def gap_by_stage(report: dict, update: str) -> list[float]:
    """Per stage j of a gallery report, (update_j − stored_j) / (re-embedded_j − stored_j) of Recall@1 (NaN
    where re-embedding gains less than half a point)."""

    def r1(name, j):
        return recall_at(report[name]["per_stage"][j], 1)

    gaps = []
    for j in range(len(report["stored"]["per_stage"])):
        gap = r1("reembedded", j) - r1("stored", j)
        # under half a point of Recall@1 to recover (the latest stage's items): no share to speak of
        gaps.append((r1(update, j) - r1("stored", j)) / gap if gap >= 0.005 else float("nan"))
    return gaps
