"""The drift step: after stage i trains, its prototypes and the drift of every earlier stage up to F_i
(paper Eq. 3), for the training compensator (virtual features, Eq. 4) and the gallery report alike."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import distributed
from ..callbacks import StageContext
from ..data.loaders import EmbeddingView
from ..data.views import AugmentedViews
from ..evaluation import extract_embeddings


class DriftStep:
    """Embeds the stage's prototype images with F_i and with each earlier model that a drift user needs,
    one old checkpoint at a time (two networks held at most). Takes ``ctx.teacher`` (F_{i−1}, if training
    held it) and releases it; fires nothing itself (the loop fires ``after_drift``)."""

    name = "drift"

    def run(self, learner, ctx: StageContext) -> None:
        kept, ctx.teacher = ctx.teacher, None  # F_{stage-1}, if training distilled from it
        users = drift_users(learner)
        if not users:
            return
        stage = ctx.stage
        loader = learner.loaders.embed(learner.prototype_stages[stage])  # its workers serve every model below
        views = view_dataset(learner, stage)
        earlier = sorted(set().union(*(u.stages_to_measure(after_adding=1) for u in users)))
        if stage - 1 not in earlier:
            kept = None
        # the new model and one old model embed each decoded batch together (one decoding pass fewer):
        # F_{stage-1} if it is still held, else the oldest; the others after it, one at a time
        first = stage - 1 if kept is not None else (earlier[0] if earlier else None)
        first_model = (
            kept if kept is not None else (learner.load_stage_model(first) if first is not None else None)
        )
        del kept
        models = [ctx.student] + ([first_model] if first_model is not None else [])
        (new_feats, *first_feats), labels = embed_rows(learner, models, loader, views)
        del first_model, models

        def old_features(t):
            if t == first:
                return first_feats.pop()
            old_model = learner.load_stage_model(t)
            (old,), _ = embed_rows(learner, [old_model], loader, views)
            return old  # the model is freed here, before the next one loads

        feed_drift(users, new_feats, labels, earlier, old_features)


def view_dataset(learner, stage: int):
    """Stage ``stage``'s training images through their random transform (``view_stages``, default the
    training datasets), ``drift_views`` times each
    (:class:`~pml_mutual.data.views.AugmentedViews`, seeded by the run's seed and the stage), or None."""
    views = learner.config.drift_views
    if not views or stage == 0:  # nothing is measured after the first stage
        return None
    return AugmentedViews(learner.view_stages[stage], views, seed=(learner.config.seed, stage))


def embed_rows(learner, models, loader: EmbeddingView, views=None):
    """What drift is measured on: each model's features of the prototype images, followed by those of the
    augmented ``views`` when there are any; the labels are the prototype images' only. Under torchrun
    every rank embeds all the views (not sharded: V × the stage's images, once per model)."""
    feats, labels = extract(learner, models, loader)
    if views is None:
        return feats, labels
    cfg = learner.config
    extra, _ = extract_embeddings(
        models,
        DataLoader(views, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers),
        device=learner.device,
        amp=cfg.amp,
    )
    return [torch.cat([f, e]) for f, e in zip(feats, extra)], labels


def feed_drift(users, new_feats, labels, earlier, old_features) -> None:
    """Eq. 3's bookkeeping after a stage, shared by the drift step and :mod:`pml_mutual.experiment`'s replays:
    ``add_stage(new_feats, labels)`` for every user, then for each earlier stage t of ``earlier`` (ascending)
    the old model's features ``old_features(t)`` (one call per stage, so one old model at a time) and
    ``update_drift`` for the users that measure t."""
    for user in users:  # rows after the labelled ones are augmented views: drift only, not prototypes
        user.add_stage(new_feats[: len(labels)], labels)
    for t in earlier:
        old = old_features(t)
        for user in users:
            if t in user.stages_to_measure():
                user.update_drift(old, new_feats, stage=t)


def drift_users(learner) -> list:
    """What measures drift after a stage: the training compensator (methods with virtual features) and
    the gallery report; both take the same calls, and each old model's features are extracted once."""
    users = [learner.compensator] if learner.method.virtual else []
    return users + ([learner.gallery] if learner.gallery is not None else [])


def extract(learner, model, loader: EmbeddingView, indices=None):
    """Embeddings of ``loader``'s items (``indices``, default all) in order by ``model`` (or a list of
    models, each batch decoded once); under torchrun each rank embeds a shard and all get the whole."""
    cfg, device = learner.config, learner.device
    if indices is None:
        indices = np.arange(len(loader.dataset))
    if not distributed.is_active():
        return extract_embeddings(model, loader(indices), cfg.eval_batch_size, device=device, amp=cfg.amp)
    n = len(indices)
    emb, labels = extract_embeddings(
        model,
        loader(np.asarray(indices)[distributed.shard(n)]),
        cfg.eval_batch_size,
        device=device,
        amp=cfg.amp,
    )
    comm = device if device.type == "cuda" else torch.device("cpu")  # NCCL moves CUDA tensors only
    gather = lambda x: distributed.gather_rows(x.to(comm), n).cpu()  # noqa: E731
    emb = gather(emb) if torch.is_tensor(emb) else [gather(e) for e in emb]
    return emb, gather(labels)
