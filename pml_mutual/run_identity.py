"""What determines an online run's numbers, as recorded in its run directory: the identity
(``config.json``: settings, classes, data and model descriptions) and the content records
(``data_files.json``: image file sizes, the model's code, a seeded sample of each dataset's items)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from . import distributed, identity
from .data.images import ImageItems
from .losses.state import training_state
from .run_checks import named_bases


def run_identity(learner) -> dict:
    """The identity of ``learner``'s run; a run_dir holding another identity is refused."""
    ident = {
        "config": {
            k: v for k, v in learner.config.to_dict().items() if k not in not_identity(learner.config)
        },
        "class_to_stage": {str(k): v for k, v in sorted(learner.class_to_stage.items())},
        "data": {
            "train": [identity.dataset_fingerprint(d) for d in learner.train_stages],
            "prototype": [identity.dataset_fingerprint(d) for d in learner.prototype_stages],
            "test": identity.dataset_fingerprint(learner.test_dataset),
            # views of other datasets than the training ones (absent otherwise: earlier runs resume)
            **(
                {"view": [identity.dataset_fingerprint(d) for d in learner.view_stages]}
                if learner.view_stages is not learner.train_stages
                else {}
            ),
        },
        "model": identity.model_fingerprint(learner.fingerprint_model()),
        "metric_loss": identity.describe(learner.metric_loss),
        "miner": identity.describe(learner.miner),
        "initial_weights": identity.state_dict_sha256(learner.initial_state_dict),
        "tags": learner.identity_tags,
    }
    # added later, only where not the default: run directories of earlier versions stay resumable
    if learner.optimization is not None:
        ident["optimization"] = dict(learner.optimization, lr_scheduler_step=learner.lr_scheduler_step)
    initial_loss_state = training_state(learner.initial_metric_loss)
    if initial_loss_state:
        ident["metric_loss_state"] = identity.state_dict_sha256(
            {k: v for k, v in initial_loss_state.items() if torch.is_tensor(v)}
        )
    if distributed.world_size() > 1:
        ident["world_size"] = distributed.world_size()
    return ident


def not_identity(config) -> tuple[str, ...]:
    """Settings that do not change what is trained; gram_scope matters only with several ranks; and the
    defaults of settings added later (run directories of earlier versions, which had no such setting,
    stay resumable)."""
    skip = ("device", "eval_batch_size", "num_workers")
    skip += ("gram_scope",) if distributed.world_size() == 1 else ()
    skip += () if config.gallery_report else ("gallery_report",)
    skip += () if config.lambda_compat else ("lambda_compat",)
    skip += () if config.drift_views else ("drift_views",)
    return skip + (("embed_decode",) if config.embed_decode == "workers" else ())


def content_records(learner) -> dict:
    """What the identity's descriptions cannot see, compared with the run directory's records: the image
    files' sizes, the model's code, and a seeded sample of each dataset's items as ``__getitem__`` returns
    them (a ``TensorDataset`` is in the identity whole)."""
    records = dict(learner.image_file_sizes)
    records["model_code"] = identity.model_code_fingerprint(
        learner.fingerprint_model(), learner.model_factory
    )
    samples: dict[int, str] = {}  # training and prototype datasets may share a base
    for name, base in learner.named_bases():
        if isinstance(base, TensorDataset):
            continue
        if id(base) not in samples:
            samples[id(base)] = identity.item_sample_fingerprint(base)
        records.setdefault(f"items:{name}", []).append(samples[id(base)])
    return records


def image_file_sizes(bases) -> dict[str, list[str]]:
    """One stat per listed image of each image-list dataset, now: a missing file must not surface hours into
    training; the sizes tell a run directory whether its images were replaced under the same paths."""
    sizes: dict[str, list[str]] = {}
    digests: dict[int, str] = {}  # id(items) → digest: training and prototype datasets share their items
    for name, base in bases:
        items = getattr(base, "items", None)
        if isinstance(items, ImageItems):
            if id(items) not in digests:
                digests[id(items)] = identity.image_files_fingerprint(items, f"the {name} dataset")
            sizes.setdefault(name, []).append(digests[id(items)])
    return sizes


__all__ = ["run_identity", "content_records", "not_identity", "image_file_sizes", "named_bases"]
