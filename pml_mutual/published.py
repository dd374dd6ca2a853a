"""The paper's published Recall@1 (%) — Tables 2–6 — to print beside measured numbers.

Keys: (dataset, backbone, setting) → method → values. One-task rows are (old, new, all); multi-task
rows are the final model on each stage's classes, then all classes. ``None`` = not reported. Methods
the package does not implement (LwF, EWC, FGIR) are left out.
"""

from __future__ import annotations

ONE_TASK = ("old", "new", "all")

PUBLISHED: dict[tuple[str, str, str], dict[str, list[float | None]]] = {
    # Table 2: one-task, BN-Inception
    ("cub200", "bninception", "one-task"): {
        "initial": [79.79, 55.55, 62.76],
        "finetune": [68.81, 79.92, 69.01],
        "joint": [77.67, 79.66, 76.75],
        "fecd": [77.20, 76.09, 72.43],
        "ours": [77.29, 78.07, 73.73],
    },
    ("cars196", "bninception", "one-task"): {
        "initial": [82.23, 63.58, None],
        "finetune": [67.77, 90.00, None],
        "joint": [82.26, 92.28, 85.15],
        "fecd": [80.82, 91.21, 82.36],
        "ours": [81.06, 92.40, 83.49],
    },
    ("deepfashion2", "bninception", "one-task"): {
        "initial": [55.79, 55.04, None],
        "finetune": [54.81, 54.97, None],
        "joint": [56.02, 56.21, 49.66],
        "fecd": [56.26, 56.49, 50.18],
        "ours": [56.33, 56.65, 50.35],
    },
    # Tables 3 and 5: multi-task, BN-Inception (Table 5 adds mutual_only and fecd_mutual on CUB)
    ("cub200", "bninception", "multi-task"): {
        "joint": [77.67, 82.14, 77.83, 88.44, 87.90, 76.75],
        "fecd": [73.64, 77.21, 73.00, 81.07, 87.23, 67.95],
        "ours": [73.90, 77.21, 75.33, 83.75, 88.40, 67.91],
        "mutual_only": [71.57, 75.68, 70.50, 81.24, 87.56, 66.12],
        "fecd_mutual": [73.98, 76.19, 73.17, 82.08, 88.07, 67.76],
    },
    ("cars196", "bninception", "multi-task"): {
        "joint": [82.26, 97.13, 98.19, 97.38, 94.52, 85.15],
        "fecd": [73.76, 94.86, 96.38, 97.26, 95.54, 75.00],
        "ours": [75.54, 96.42, 96.86, 98.45, 96.56, 76.42],
    },
    ("deepfashion2", "bninception", "multi-task"): {
        "joint": [56.02, 67.30, 67.62, 68.42, 66.22, 49.66],
        "fecd": [55.16, 66.94, 67.56, 68.22, 67.41, 49.78],
        "ours": [56.04, 67.08, 68.33, 69.01, 67.76, 50.58],
    },
    # Table 4: one-task, ResNet-50 and ViT
    ("cub200", "resnet50", "one-task"): {
        "initial": [79.53, 33.53, 50.42],
        "finetune": [51.10, 79.62, 57.81],
        "joint": [79.07, 78.49, 76.50],
        "fecd": [75.59, 75.08, 70.44],
        "ours": [76.69, 75.34, 70.55],
    },
    ("cub200", "vit_b16", "one-task"): {
        "initial": [83.81, 65.00, 71.12],
        "finetune": [77.25, 80.59, 75.46],
        "joint": [82.97, 81.97, 80.57],
        "fecd": [82.25, 79.03, 78.08],
        "ours": [82.16, 80.17, 78.59],
    },
    ("cars196", "resnet50", "one-task"): {
        "initial": [85.21, 41.81, 57.49],
        "finetune": [62.49, 94.44, 71.16],
        "joint": [84.99, 93.86, 88.24],
        "fecd": [83.36, 92.13, 83.24],
        "ours": [82.81, 93.58, 83.78],
    },
    ("cars196", "vit_b16", "one-task"): {
        "initial": [80.63, 52.87, 60.68],
        "finetune": [57.58, 87.81, 65.66],
        "joint": [77.56, 86.01, 78.45],
        "fecd": [77.53, 83.98, 75.82],
        "ours": [76.40, 85.89, 75.93],
    },
    ("deepfashion2", "resnet50", "one-task"): {
        "initial": [53.06, 50.87, 45.65],
        "finetune": [52.70, 53.30, 46.57],
        "joint": [54.03, 53.99, 47.66],
        "fecd": [54.47, 54.45, 47.94],
        "ours": [54.11, 54.88, 48.14],
    },
    ("deepfashion2", "vit_b16", "one-task"): {
        "initial": [58.40, 58.36, 52.51],
        "finetune": [58.37, 58.14, 52.34],
        "joint": [58.40, 58.46, 52.49],
        "fecd": [58.29, 58.35, 52.37],
        "ours": [58.44, 58.44, 52.47],
    },
    # Table 6: multi-task, ViT, CUB
    ("cub200", "vit_b16", "multi-task"): {
        "joint": [82.97, 85.54, 77.33, 87.60, 90.42, 80.57],
        "fecd": [80.51, 81.46, 78.17, 83.92, 88.91, 76.62],
        "ours": [81.40, 82.48, 78.50, 86.60, 88.40, 77.83],
    },
}

# Which table of the paper each (dataset, backbone, setting) row belongs to, and the methods it compares.
TABLES = {
    2: dict(
        backbone="bninception", setting="one-task", methods=["initial", "finetune", "joint", "fecd", "ours"]
    ),
    3: dict(backbone="bninception", setting="multi-task", methods=["joint", "fecd", "ours"]),
    4: dict(
        backbone=("resnet50", "vit_b16"),
        setting="one-task",
        methods=["initial", "finetune", "joint", "fecd", "ours"],
    ),
    5: dict(
        backbone="bninception",
        setting="multi-task",
        methods=["mutual_only", "fecd", "fecd_mutual", "ours"],
        datasets=["cub200"],
    ),
    6: dict(backbone="vit_b16", setting="multi-task", methods=["joint", "fecd", "ours"], datasets=["cub200"]),
}


def published(dataset: str, backbone: str, setting: str, method: str) -> list[float | None] | None:
    return PUBLISHED.get((dataset, backbone, setting), {}).get(method)
