from .cars196 import load_cars196, read_cars196
from .cub import load_cub, read_cub
from .deepfashion2 import load_deepfashion2, read_deepfashion2
from .digits import load_digits_splits
from .images import ImageItems, ImageListDataset, per_class_split, read_list_file, write_list_file
from .stages import (
    check_stages,
    class_to_stage_of,
    dataset_labels,
    scale_stage_ends,
    split_by_stage,
    stage_assignment,
    stages_from_ends,
)
from .transforms import ProtocolTransform

__all__ = [
    "dataset_labels",
    "split_by_stage",
    "stage_assignment",
    "stages_from_ends",
    "scale_stage_ends",
    "class_to_stage_of",
    "check_stages",
    "load_digits_splits",
    "ImageItems",
    "ImageListDataset",
    "read_list_file",
    "write_list_file",
    "per_class_split",
    "ProtocolTransform",
    "read_cub",
    "load_cub",
    "read_cars196",
    "load_cars196",
    "read_deepfashion2",
    "load_deepfashion2",
]
