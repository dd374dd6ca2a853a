"""What an online run checks before anything trains: the model factory, the metric loss against the labels
and the batch layout, the test set against the training classes, the initial weights, and that every input
the run will train on or embed is finite. Each refusal names the problem and what to pass instead."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from pytorch_metric_learning import losses as pml_losses
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import distributed
from .checks import nonfinite_tensors
from .data.images import ImageItems
from .data.loaders import base_indices
from .data.stages import check_stages, dataset_labels
from .data.views import check_views_differ
from .losses import BatchHardTripletLoss
from .losses.state import trainable_parameters


def _tensors_of(x, out: list) -> None:
    if torch.is_tensor(x):
        out.append(x)
    elif isinstance(x, np.ndarray) and x.dtype.kind == "f":
        out.append(torch.from_numpy(x))
    elif isinstance(x, float):
        out.append(torch.tensor(x))
    elif isinstance(x, (list, tuple)):
        for v in x:
            _tensors_of(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _tensors_of(v, out)


def _finite_flags(items: list) -> list[bool]:
    """Collate function of the finite-input check: whether each item's floating-point values are finite."""
    flags = []
    for item in items:
        parts: list = []
        _tensors_of(item, parts)
        flags.append(all(bool(torch.isfinite(p).all()) for p in parts if p.is_floating_point()))
    return flags


def check_model_factory(model_factory) -> None:
    """A factory, not a network: the run builds several networks (F_p, F_s, the teacher, old checkpoints)."""
    if isinstance(model_factory, torch.nn.Module):
        raise TypeError(
            f"model_factory must build a new network on each call, got a {type(model_factory).__name__} "
            "instance: pass its class or a function, e.g. model_factory=lambda: MyNet(...)"
        )
    if not callable(model_factory):
        raise TypeError(
            f"model_factory must be callable (a class or a function returning a torch.nn.Module), "
            f"got {type(model_factory).__name__}"
        )


def classifier_classes(metric_loss) -> int | None:
    """The number of classes a classification-style loss holds weights for, or None for pair/triplet losses.
    PML's ``num_classes`` attribute where it is set (ProxyNCA and NormalizedSoftmax leave it 0: there the
    width of ``W`` or the rows of ``proxies``)."""
    num_classes = getattr(metric_loss, "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0:
        return num_classes
    params = (
        dict(metric_loss.named_parameters(recurse=False)) if isinstance(metric_loss, torch.nn.Module) else {}
    )
    if isinstance(num_classes, int) and params.get("W") is not None and params["W"].ndim == 2:
        return int(params["W"].shape[1])
    if isinstance(num_classes, int) and params.get("proxies") is not None and params["proxies"].ndim == 2:
        return int(params["proxies"].shape[0])
    return None


def check_label_range(metric_loss, class_to_stage) -> None:
    """Classification-style losses (ArcFace, CosFace, ProxyAnchor, SoftTriple, NormalizedSoftmax, ...) hold
    one weight row per class, indexed by label: every label must lie in [0, num_classes)."""
    num_classes = classifier_classes(metric_loss)
    if num_classes is None:
        return
    labels = sorted(class_to_stage)
    out = [c for c in labels if not 0 <= c < num_classes]
    if out:
        raise ValueError(
            f"{type(metric_loss).__name__}(num_classes={num_classes}) indexes its weights by label, but "
            f"labels {out[:10]} lie outside [0, {num_classes}): build it with num_classes={labels[-1] + 1} "
            "or map the labels to 0…C−1"
        )


def check_batch_layout(metric_loss, miner, batch_size: int, m_per_class: int) -> None:
    """A pair or triplet loss needs a positive and a negative in every batch: MPerClassSampler's batch holds
    batch_size / m_per_class classes of m_per_class items each. Classification-style losses (a ``num_classes``
    attribute: ArcFace, ProxyAnchor, ...) compare rows with class weights and need neither."""
    if classifier_classes(metric_loss) is not None:
        return
    what = type(metric_loss).__name__ + (f" with {type(miner).__name__}" if miner is not None else "")
    if m_per_class < 2:
        raise ValueError(
            f"m_per_class={m_per_class}: a batch holds one item per class, so {what} sees no positive "
            "pair and trains nothing; use m_per_class ≥ 2"
        )
    if batch_size // m_per_class < 2:
        raise ValueError(
            f"batch_size={batch_size} with m_per_class={m_per_class}: a batch holds one class, so {what} "
            f"sees no negative and trains nothing; use batch_size ≥ {2 * m_per_class}"
        )


def metric_loss_and_miner(metric_loss, miner, triplet_margin: float):
    """The run's metric loss and miner: as given (no miner added to a loss given without one, PML's
    semantics), or the default :class:`~pml_mutual.losses.BatchHardTripletLoss`."""
    if metric_loss is None and miner is None:
        # PML's TripletMarginLoss on BatchHardMiner's triplets, computed densely: no host sync per step
        metric_loss = BatchHardTripletLoss(margin=triplet_margin)
    elif metric_loss is None:
        metric_loss = pml_losses.TripletMarginLoss(margin=triplet_margin)
    if isinstance(metric_loss, BatchHardTripletLoss) and miner is not None:
        raise ValueError("BatchHardTripletLoss mines its own triplets: pass miner=None with it")
    if trainable_parameters(miner):
        raise ValueError(
            f"the miner ({type(miner).__name__}) has trainable parameters; the stage loop trains "
            "networks and the metric loss only: pass a miner without parameters"
        )
    return metric_loss, miner


def check_initial_state_dict(state_dict) -> None:
    if state_dict is None:
        return
    if not (isinstance(state_dict, Mapping) and all(torch.is_tensor(v) for v in state_dict.values())):
        raise TypeError(
            f"initial_state_dict must be a state dict (name → tensor, e.g. model.state_dict() or "
            f"torch.load(path, weights_only=True)), got a {type(state_dict).__name__}"
        )
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise ValueError(f"initial_state_dict holds NaN or inf values in {', '.join(bad[:5])}")


def check_test_classes(class_to_stage: Mapping[int, int], test_labels: np.ndarray, num_stages: int) -> None:
    """Every test class belongs to a stage, every stage and every training class has test items."""
    test_classes = set(np.unique(test_labels).tolist())
    unknown = sorted(test_classes - set(class_to_stage))
    if unknown:
        raise ValueError(f"test classes {unknown[:10]} belong to no training stage")
    missing = sorted(set(range(num_stages)) - {class_to_stage[c] for c in test_classes})
    if missing:
        raise ValueError(f"the test set has no item of stage(s) {missing}: every stage must be evaluated")
    unseen = sorted(set(class_to_stage) - test_classes)
    if unseen:
        raise ValueError(
            f"training classes {unseen[:10]}{' …' if len(unseen) > 10 else ''} have no item in the test "
            "set: they would be trained on and never evaluated; add their test items, or leave them "
            "out of the training stages (of the class assignment)"
        )


def named_bases(*groups: tuple[str, Sequence[Dataset]]):
    """(name, base dataset) of each group's stage datasets, each base once per group."""
    for name, datasets in groups:
        seen = set()
        for d in datasets:
            base, _ = base_indices(d)
            if id(base) not in seen:
                seen.add(id(base))
                yield name, base


def check_inputs_finite(bases, num_workers: int = 0) -> None:
    """Every item of the ``(name, base dataset)`` pairs has finite inputs. A ``TensorDataset`` is checked
    whole at once; an image list decodes pixels, finite by construction; any other dataset is read once
    through ``__getitem__`` (in ``num_workers`` processes: one pass of its items, as one evaluation
    decodes them)."""
    checked: set[int] = set()
    for name, base in bases:
        if id(base) in checked or isinstance(getattr(base, "items", None), ImageItems):
            continue
        checked.add(id(base))
        if isinstance(base, TensorDataset):
            for t in base.tensors:
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int(torch.nonzero(~torch.isfinite(t.reshape(len(t), -1)).all(1))[0, 0])
                    raise ValueError(
                        f"the {name} dataset holds NaN or inf inputs (item {bad} first): nothing "
                        "non-finite is trained on or embedded; clean or drop those items"
                    )
            continue
        start = 0
        for flags in DataLoader(base, batch_size=64, num_workers=num_workers, collate_fn=_finite_flags):
            if not all(flags):
                raise ValueError(
                    f"the {name} dataset ({type(base).__name__}) yields NaN or inf at item "
                    f"{start + flags.index(False)}: nothing non-finite is trained on or embedded; "
                    "clean or drop those items"
                )
            start += len(flags)


def check_decodable_on_device(bases) -> None:
    """embed_decode="device": torchvision present and every embedded dataset made of image files read
    through the test transform, or an error now, before any training."""
    from .data.device_decode import decodable_on_device, require_torchvision_decoder

    for name, base in bases:
        if not decodable_on_device(base):
            raise ValueError(
                f"embed_decode='device' needs the {name} dataset to be an ImageListDataset with a test "
                f"ProtocolTransform (train=False); got {type(base).__name__} with transform "
                f"{getattr(base, 'transform', None)!r}. Use embed_decode='workers' for it"
            )
    require_torchvision_decoder()


def checked_labels(cfg, train_stages, test_dataset, metric_loss, miner):
    """(labels of each stage, class → stage, test labels) once every check on them passes: classes
    disjoint across stages with enough images per class, every trained class in the test set, labels the
    loss can take, batches that can form the loss's tuples."""
    stage_labels = [dataset_labels(d) for d in train_stages]
    # under torchrun a step draws world_size × batch_size images
    class_to_stage = check_stages(
        stage_labels, cfg.batch_size * distributed.world_size(), cfg.m_per_class, cfg.min_images_per_class
    )
    test_labels = dataset_labels(test_dataset)
    check_test_classes(class_to_stage, test_labels, len(train_stages))
    check_label_range(metric_loss, class_to_stage)
    # under torchrun with gram_scope="global" every loss sees the batch of all ranks
    seen_rows = cfg.batch_size * (distributed.world_size() if cfg.gram_scope == "global" else 1)
    check_batch_layout(metric_loss, miner, seen_rows, cfg.m_per_class)
    return stage_labels, class_to_stage, test_labels


def stages_like(train_stages: list, stages, name: str) -> list:
    """``stages`` (one dataset per training stage) as a list, or ``train_stages`` itself when None."""
    if stages is None:
        return train_stages
    if len(stages) != len(train_stages):
        raise ValueError(
            f"{name} must have one dataset per training stage ({len(train_stages)}), got {len(stages)}"
        )
    return list(stages)


def check_drift_views(cfg, method, view_stages) -> None:
    """``drift_views`` must change something: a drift measurement that uses it (a method with estimated
    virtual features, or the gallery report) and view datasets (default: the training stages) after the
    first with a random transform."""
    if not cfg.drift_views:
        return
    if not (method.measures_drift(cfg.drift_mode) or cfg.gallery_report):
        raise ValueError(
            f"drift_views={cfg.drift_views} has no effect: method {cfg.method!r} with drift_mode="
            f"{cfg.drift_mode!r} measures no drift and gallery_report is off; set drift_views=0"
        )
    for stage, dataset in enumerate(view_stages[1:], start=1):
        check_views_differ(dataset, f"the view dataset of stage {stage} (view_stages, default train_stages)")
