from .digits import load_digits_splits
from .stages import check_stages, class_to_stage_of, dataset_labels, split_by_stage, stage_assignment

__all__ = [
    "dataset_labels",
    "split_by_stage",
    "stage_assignment",
    "class_to_stage_of",
    "check_stages",
    "load_digits_splits",
]
