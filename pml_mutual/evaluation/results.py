"""One JSON schema for the results of an online run, and its Markdown rendering.

Schema ``pml-mutual/results/v1``::

    {
      "schema": "pml-mutual/results/v1",
      "method": str, "ks": [1, 2, 4, 8],
      "stages": [                              # one entry per stage, in order
        {"stage": i,
         "old": {"1": r, "2": r, ...} | null,  # Recall@K on earlier stages' classes (null at stage 0)
         "new": {...}, "all": {...},           # this stage's classes; every class seen so far
         "per_stage": [{...}, ...],            # Recall@K on stage j's classes, j = 0..i
         "gallery": {                          # only with OnlineConfig(gallery_report=True)
           "stored" | "translation" | "learned" | "reembedded":
               {"old", "new", "all", "per_stage"},   # the latest model's queries against that gallery
           "seconds": {"translation", "learned", "reembed"}}}
      ],
      "accuracy_matrix": [[R00, null, ...], [R10, R11, ...], ...],   # Recall@1, row = after stage i
      "average_forgetting": float, "backward_transfer": float, "final_all_recall@1": float
    }

Recall values are fractions in [0, 1]; JSON object keys are strings, so K is written as "1", "2", ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .metrics import accuracy_matrix, average_forgetting, backward_transfer

SCHEMA = "pml-mutual/results/v1"


def _keys_to_str(rec):
    return None if rec is None else {str(k): float(v) for k, v in rec.items()}


def _keys_to_int(rec):
    return None if rec is None else {int(k): float(v) for k, v in rec.items()}


def map_recalls(res: dict, fn) -> dict:
    """A stage result (:func:`stage_recalls`' layout, with its gallery report if any) with ``fn`` applied
    to every Recall@K record (``None`` included)."""
    out = {
        "stage": res["stage"],
        "old": fn(res["old"]),
        "new": fn(res["new"]),
        "all": fn(res["all"]),
        "per_stage": [fn(r) for r in res["per_stage"]],
    }
    if "gallery" in res:
        gallery = res["gallery"]
        out["gallery"] = {
            name: (dict(v) if name == "seconds" else map_recalls(v, fn)) for name, v in gallery.items()
        }
    return out


def stage_result_to_json(res: dict) -> dict:
    """One stage's :func:`stage_recalls` output (and its gallery report, if any) with string K keys."""
    return map_recalls(res, _keys_to_str)


def stage_result_from_json(doc: dict) -> dict:
    """Inverse of :func:`stage_result_to_json` (integer K keys)."""
    return map_recalls(doc, _keys_to_int)


def summarize_run(stage_results: Sequence[dict], method: str = "", ks: Sequence[int] = (1, 2, 4, 8)) -> dict:
    """Build the results document from the outputs of :func:`stage_recalls`, one per stage."""
    if not stage_results:
        raise ValueError("no stage results to summarise")
    R = accuracy_matrix(stage_results, k=1)
    return {
        "schema": SCHEMA,
        "method": method,
        "ks": list(ks),
        "stages": [stage_result_to_json(res) for res in stage_results],
        "accuracy_matrix": R,
        "average_forgetting": average_forgetting(R),
        "backward_transfer": backward_transfer(R),
        "final_all_recall@1": float(stage_results[-1]["all"][1]),
    }


def with_int_keys(summary: dict) -> dict:
    """The results document as the Python API returns it: every Recall@K record keyed by integer K (JSON
    files hold strings)."""
    out = dict(summary)
    out["stages"] = [map_recalls(s, _keys_to_int) for s in summary["stages"]]
    return out


def stage_results_from_summary(summary: dict) -> list[dict]:
    """The per-stage results back with integer K keys (inverse of :func:`summarize_run`)."""
    return [stage_result_from_json(s) for s in summary["stages"]]


def save_json(summary: dict, path: str | os.PathLike) -> None:
    """Write atomically (a temp file of the project's own pattern + rename) so a killed run never leaves
    half a file, and no file of the user's is overwritten on the way."""
    from ..run_dir import write_atomic

    write_atomic(json.dumps(summary, indent=2).encode(), Path(path))


def load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    summary = json.loads(path.read_text())
    if summary.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} document (schema={summary.get('schema')!r})")
    return summary


def _pct(rec, k=1):
    return "–" if rec is None else f"{100 * recall_at(rec, k):.2f}"


def recall_at(rec: dict, k: int) -> float:
    """Recall@k of a record keyed by integer K (Python) or by string K (JSON)."""
    return rec[k] if k in rec else rec[str(k)]


def to_markdown(summary: dict, k: int = 1) -> str:
    """Two tables: Recall@k old/new/all after each stage, and the final model on each stage's classes."""
    lines = [
        f"Recall@{k} (%){' — ' + summary['method'] if summary.get('method') else ''}",
        "",
        "| after stage | old | new | all |",
        "|---|---|---|---|",
    ]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {_pct(s['old'], k)} | {_pct(s['new'], k)} | {_pct(s['all'], k)} |")
    final = summary["stages"][-1]
    header = " | ".join(f"stage {j}" for j in range(len(final["per_stage"])))
    lines += [
        "",
        f"| final model | {header} | all |",
        "|---" * (len(final["per_stage"]) + 2) + "|",
        "| Recall@%d | " % k
        + " | ".join(_pct(r, k) for r in final["per_stage"])
        + f" | {_pct(final['all'], k)} |",
        "",
        f"average forgetting: {100 * summary['average_forgetting']:.2f} pp · "
        f"backward transfer: {100 * summary['backward_transfer']:+.2f} pp (Recall@1, percentage points)",
    ]
    if any("gallery" in s for s in summary["stages"]):
        lines += ["", *gallery_markdown(summary, k)]
    return "\n".join(lines)


GALLERY_COLUMNS = (
    ("stored", "(a) stored"),
    ("translation", "(b) translation"),
    ("learned", "(c) learned map"),
    ("reembedded", "(d) re-embedded"),
)


def gallery_markdown(summary: dict, k: int = 1) -> list[str]:
    """The gallery report's table: all-class Recall@k of the latest model's queries against the gallery
    (a) as stored, (b)/(c) moved, (d) re-embedded, after each stage; the gap to (d) that (c) recovers;
    the seconds of the learned update against those of re-embedding."""
    lines = [
        f"Gallery without re-embedding: Recall@{k} (%), all classes, latest model's queries",
        "",
        "| after stage | "
        + " | ".join(title for _, title in GALLERY_COLUMNS)
        + " | (c) recovers | (c) s / (d) s |",
        "|---" * (len(GALLERY_COLUMNS) + 3) + "|",
    ]
    for s in summary["stages"]:
        g = s.get("gallery")
        if g is None:
            continue
        cells = [_pct(g[name]["all"], k) for name, _ in GALLERY_COLUMNS]
        gap = recall_at(g["reembedded"]["all"], k) - recall_at(g["stored"]["all"], k)
        recovered = (
            "–"
            if abs(gap) < 1e-12
            else f"{100 * (recall_at(g['learned']['all'], k) - recall_at(g['stored']['all'], k)) / gap:.0f} %"
        )
        sec = g["seconds"]
        ratio = (
            f"{sec['learned']:.3g} / {sec['reembed']:.3g}"
            if "reembed" in sec
            else f"{sec['learned']:.3g} / –"
        )
        lines.append(f"| {s['stage']} | " + " | ".join(cells) + f" | {recovered} | {ratio} |")
    return lines
