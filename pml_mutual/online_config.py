"""What an online run is configured by: the methods (which parts of Eq. 1 / 6 they use) and
:class:`OnlineConfig`, the hyper-parameters, each checked when the config is built."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import distributed
from .drift import DRIFT_MODES, SIMILARITIES

EMBED_DECODES = ("workers", "device")  # where embedding passes decode JPEGs (OnlineConfig.embed_decode)


@dataclasses.dataclass(frozen=True)
class Method:
    """Which parts of Eq. 1 / 6 a method uses after the first stage."""

    train: bool = True  # False: keep F_0 (the "initial" reference)
    joint: bool = False  # train on every stage's data so far (replay: the upper bound)
    support: bool = False  # F_s and L_mutual
    teacher: bool = False  # F_{i-1} and L_corr
    virtual: bool = False  # virtual features of earlier stages in L_corr (Eq. 6)
    drift: bool = True  # estimate them with Eq. 3–4; False: f̂ = the teacher feature (an ablation)

    def measures_drift(self, drift_mode: str) -> bool:
        """Whether a run of this method with ``drift_mode`` measures drift after each stage (for its
        virtual features; the gallery report measures it for any method)."""
        return self.virtual and self.drift and drift_mode != "none"


METHODS: dict[str, Method] = {
    "initial": Method(train=False),
    "finetune": Method(),
    "joint": Method(joint=True),
    "fecd": Method(teacher=True),
    "mutual_only": Method(support=True),
    "fecd_mutual": Method(support=True, teacher=True),
    "ours": Method(support=True, teacher=True, virtual=True),
    # Eq. 6's one term per earlier stage, without the drift estimate: separates what the virtual
    # features add from the larger total distillation weight (i terms at stage i)
    "ours_no_drift": Method(support=True, teacher=True, virtual=True, drift=False),
}


@dataclasses.dataclass
class OnlineConfig:
    """Hyper-parameters of an online run; defaults are the paper's (Adam 1e-5, wd 5e-4, λ = 1/10/8, T = 4)."""

    method: str = "ours"
    epochs: int = 10
    initial_epochs: int | None = None  # stage 0 (None: same as ``epochs``)
    iterations_per_epoch: int = 100
    batch_size: int = 80
    m_per_class: int = 5
    min_images_per_class: int | None = None  # None: m_per_class
    lr: float = 1e-5
    weight_decay: float = 5e-4
    lambda_metric: float = 1.0
    lambda_corr: float = 10.0
    lambda_mutual: float = 8.0
    # Weight of a compatibility term (beyond the paper, any method): ‖P·F_p(x) − F_{i−1}(x)‖² through a
    # learnable linear P (pml_mutual.losses.ProjectedDistillationLoss), so that F_i stays a linear image of
    # F_{i−1} and a stored gallery's update by a linear map holds for old classes too. 0: off.
    lambda_compat: float = 0.0
    temperature: float = 4.0
    corr_direction: str = "forward"
    mutual_mode: str = "symmetric"
    # How the virtual features of earlier stages are estimated: "direct" (the paper, Eq. 3-4: prototype
    # drift measured with every earlier checkpoint), "chained" (SDC: from the previous model only),
    # "learned" (beyond the paper, LDC-style: per earlier stage a ridge-fitted linear map from the latest
    # model's space back to it, on the same images as "direct"; one D×D solve per earlier stage, O(stages·D²)
    # state; see measure_fidelity for how close each estimate comes), "learned_chained" (the same maps from
    # the previous model only, composed stage to stage) or "none" (zero drift)
    drift_mode: str = "direct"
    drift_similarity: str = "cosine_relu"
    # Extra views of each stage's training images, drawn through its training transform, added to the
    # images that measure drift and fit the learned maps (beyond the paper, LDC-style; prototypes stay the
    # prototype images' means). Needs a random training transform; 0: the prototype images only.
    drift_views: int = 0
    # "fresh": model_factory() (random, or pretrained trunk + new head); "teacher": F_{i-1}'s weights
    support_init: str = "fresh"
    # BatchNorm layers kept in eval mode while training: True (the paper: every trained network, right for
    # pretrained backbones), "inherited" (only networks that start from a trained model: F_p after the
    # first stage, F_s when support_init="teacher"; right for networks trained from scratch) or False.
    freeze_batchnorm: bool | str = True
    triplet_margin: float = 0.1
    ks: tuple[int, ...] = (1, 2, 4, 8)
    seed: int = 0
    device: str | None = None
    eval_batch_size: int = 256
    amp: bool = False  # autocast (bf16; fp16 + GradScaler on GPUs without bf16) for training and evaluation
    num_workers: int = 0  # DataLoader worker processes (image datasets decode JPEGs: use several)
    # Under torchrun: batch_size and m_per_class are per rank; "global" computes the losses on the batch of
    # all ranks (N ranks × B = one process with N·B), "local" on each rank's own batch.
    gram_scope: str = "global"
    # After every stage, also Recall@1 of a test gallery that is not re-embedded (pml_mutual.gallery): as
    # stored (each item embedded by the model of its class's stage), moved by translation, moved by the
    # learned maps, re-embedded. Costs direct-mode drift measurement (every earlier checkpoint embeds the
    # stage's images once) for every method, and the test set's embeddings once in the checkpoints.
    gallery_report: bool = False
    # Where embedding passes (drift measurement, evaluation) decode JPEGs: "workers" (Pillow in the
    # DataLoader workers, as training does) or "device" (the workers read files, torchvision decodes the
    # batch on the run's device, nvJPEG on CUDA, and resizes it there: pml_mutual.data.device_decode).
    # "device" moves pixels by up to a level of 255 per resize, so it is part of the run's identity.
    embed_decode: str = "workers"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.drift_mode not in DRIFT_MODES:
            raise ValueError(f"drift_mode must be one of {DRIFT_MODES}, got {self.drift_mode!r}")
        if self.drift_similarity not in SIMILARITIES:
            raise ValueError(f"drift_similarity must be one of {SIMILARITIES}, got {self.drift_similarity!r}")
        if self.freeze_batchnorm not in (True, False, "inherited"):
            raise ValueError(
                f"freeze_batchnorm must be True, False or 'inherited', got {self.freeze_batchnorm!r}"
            )
        distributed.check_gram_scope(self.gram_scope)
        if self.embed_decode not in EMBED_DECODES:
            raise ValueError(f"embed_decode must be one of {EMBED_DECODES}, got {self.embed_decode!r}")
        if self.support_init not in ("fresh", "teacher"):
            raise ValueError(f"support_init must be 'fresh' or 'teacher', got {self.support_init!r}")
        for name in (
            "epochs",
            "iterations_per_epoch",
            "batch_size",
            "m_per_class",
            "eval_batch_size",
            "num_workers",
            "seed",
            "initial_epochs",
            "min_images_per_class",
            "drift_views",
        ):
            value = getattr(self, name)
            if value is None and name in ("initial_epochs", "min_images_per_class"):
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))  # numpy integers accepted, kept as Python ints (JSON, identity)
        if self.seed < 0:
            raise ValueError(f"seed must be ≥ 0 (NumPy's SeedSequence takes no negatives), got {self.seed}")
        for name in ("epochs", "iterations_per_epoch", "batch_size", "m_per_class", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.initial_epochs is not None and (
            isinstance(self.initial_epochs, bool) or self.initial_epochs < 1
        ):
            raise ValueError(
                f"initial_epochs must be at least 1 (or None: same as epochs), got {self.initial_epochs!r}; "
                "to start from weights you have, pass OnlineLearner(..., initial_state_dict=...)"
            )
        for name in ("num_workers", "drift_views"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        for name in (
            "lr",
            "weight_decay",
            "lambda_metric",
            "lambda_corr",
            "lambda_mutual",
            "lambda_compat",
            "triplet_margin",
        ):
            value = getattr(self, name)
            if (
                isinstance(value, (bool, np.bool_))
                or not isinstance(value, (int, float, np.integer, np.floating))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
            setattr(self, name, float(value) if isinstance(value, (float, np.floating)) else int(value))
        from .losses.gram import check_temperature

        self.temperature = check_temperature(self.temperature)
        from .evaluation.recall import check_ks

        self.ks = check_ks(self.ks)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ks"] = list(self.ks)
        return d
