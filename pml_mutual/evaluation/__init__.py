from . import knn
from .fidelity import fidelity_rows, gap_closed
from .metrics import accuracy_matrix, average_forgetting, backward_transfer
from .recall import cross_recall_at_k, nearest_neighbours, recall_at_k
from .results import load_json, save_json, summarize_run, to_markdown
from .stages import cross_stage_recalls, extract_embeddings, stage_recalls

__all__ = [
    "knn",
    "recall_at_k",
    "cross_recall_at_k",
    "fidelity_rows",
    "gap_closed",
    "nearest_neighbours",
    "extract_embeddings",
    "stage_recalls",
    "cross_stage_recalls",
    "accuracy_matrix",
    "average_forgetting",
    "backward_transfer",
    "summarize_run",
    "save_json",
    "load_json",
    "to_markdown",
]
