"""What a PML user gets wrong, refused before training with what to pass instead; edits of their code or data
are seen by the run directory (issue: "A PML plug-in in practice")."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from pytorch_metric_learning import losses
from torch.utils.data import Dataset

from pml_mutual import OnlineConfig, OnlineLearner
from pml_mutual.data import load_digits_splits, stage_assignment
from pml_mutual.models import EmbeddingMLP
from pml_mutual.run_dir import RunDirectoryError

C2S = stage_assignment(range(10), 5)


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


def tiny(**kw):
    base = dict(
        method="finetune", epochs=1, iterations_per_epoch=2, batch_size=16, m_per_class=8, device="cpu"
    )
    base.update(kw)
    return OnlineConfig(**base)


def make(digits, run_dir, factory=EmbeddingMLP, c2s=C2S, train=None, test=None, **kw):
    tr, te = digits
    kw.setdefault("config", tiny())
    return OnlineLearner.from_class_assignment(
        factory,
        tr if train is None else train,
        te if test is None else test,
        c2s,
        run_dir=run_dir,
        quiet=True,
        **kw,
    )


class Scaled(Dataset):
    """A user's own dataset: digits through their own preprocessing, no attribute the package knows."""

    divisor = 16.0

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x * 16 / self.divisor, int(y)


class Dicts(Scaled):
    def __getitem__(self, i):
        x, y = self.base[i]
        return {"image": x, "label": int(y)}


def mlp(activation):
    return lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), activation(), nn.Linear(32, 16))


def test_a_model_code_edit_is_refused_naming_the_model(digits, tmp_path):
    make(digits, tmp_path, factory=mlp(nn.ReLU)).run()
    make(digits, tmp_path, factory=mlp(nn.ReLU)).run()  # the same code resumes (all stages done)
    # 0e3a6e5 printed the old numbers
    with pytest.raises(RunDirectoryError, match="the model's code differs"):
        make(digits, tmp_path, factory=mlp(nn.GELU)).run()


def test_a_datasets_preprocessing_edit_is_refused_naming_the_dataset(digits, tmp_path):
    tr, te = digits
    make(digits, tmp_path, train=Scaled(tr), test=Scaled(te)).run()
    make(digits, tmp_path, train=Scaled(tr), test=Scaled(te)).run()
    edited = type("Scaled", (Scaled,), {"divisor": 1.0})
    with pytest.raises(
        RunDirectoryError, match=r"the test dataset's items differ.*the training dataset's items differ"
    ):
        make(digits, tmp_path, train=edited(tr), test=edited(te)).run()


def test_fresh_moves_aside_only_what_the_run_wrote(digits, tmp_path):
    run = tmp_path / "run"
    make(digits, run).run()
    (run / "notes.txt").write_text("mine")
    make(digits, run, config=tiny(seed=1), fresh=True).run()
    assert (run / "notes.txt").read_text() == "mine"  # 0e3a6e5 moved it into run.old-1
    assert not (tmp_path / "run.old-1" / "notes.txt").exists()
    assert (tmp_path / "run.old-1" / "stage_001" / "model.pt").exists() and (
        run / "stage_001" / "model.pt"
    ).exists()


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("list assignment", TypeError, r"class_to_stage must be a mapping class → stage"),
        ("model instance", TypeError, r"got a EmbeddingMLP instance: pass its class or a function"),
        ("dict items", TypeError, r"Dicts\[0\] is a dict, not an \(input, label\) pair"),
        (
            "labels beyond num_classes",
            ValueError,
            r"ArcFaceLoss\(num_classes=5\).*labels \[5, 6, 7, 8, 9\].*num_classes=10",
        ),
        (
            "labels beyond W's width",
            ValueError,
            r"NormalizedSoftmaxLoss\(num_classes=5\).*labels \[5, 6, 7, 8, 9\]",
        ),
        ("run_dir is a file", NotADirectoryError, r"is a file, not a directory"),
        ("untested classes", ValueError, r"training classes \[3\] have no item in the test set"),
        ("one class per batch", ValueError, r"a batch holds one class"),
        ("one item per class", ValueError, r"m_per_class=1: a batch holds one item per class"),
        ("no initial epochs", ValueError, r"initial_epochs must be at least 1"),
        ("config of another type", TypeError, r"config must be an OnlineConfig"),
        (
            "a tensor as initial weights",
            TypeError,
            r"initial_state_dict must be a state dict \(name → tensor",
        ),
    ],
)
def test_unhelpful_cases_fail_before_training_naming_the_fix(digits, tmp_path, case, error, message):
    tr, te = digits
    kw = {}
    if case == "list assignment":
        kw["c2s"] = [0] * 5 + [1] * 5
    elif case == "model instance":
        kw["factory"] = EmbeddingMLP()
    elif case == "dict items":
        kw["train"] = Dicts(tr)
    elif case == "labels beyond num_classes":
        kw["metric_loss"] = losses.ArcFaceLoss(num_classes=5, embedding_size=64)
    elif case == "labels beyond W's width":  # PML leaves its num_classes at 0: the weights' width counts
        kw["metric_loss"] = losses.NormalizedSoftmaxLoss(num_classes=5, embedding_size=64)
    elif case == "run_dir is a file":
        (tmp_path / "file").write_text("")
        tmp_path = tmp_path / "file"
    elif case == "untested classes":
        keep = np.flatnonzero(te.tensors[1].numpy() != 3)
        kw["test"] = torch.utils.data.TensorDataset(te.tensors[0][keep], te.tensors[1][keep])
    elif case == "one class per batch":
        kw["config"] = tiny(batch_size=8, m_per_class=8)
    elif case == "one item per class":
        kw["config"] = tiny(batch_size=4, m_per_class=1)
    elif case == "a tensor as initial weights":
        kw["initial_state_dict"] = torch.zeros(3)
    elif case == "config of another type":
        kw["config"] = {"method": "ours"}
    with pytest.raises(error, match=message):
        if case == "no initial epochs":
            tiny(initial_epochs=0)
        make(digits, tmp_path, **kw)
    assert not (tmp_path / "stage_000").exists() if tmp_path.is_dir() else True


def test_a_classification_loss_may_see_one_item_per_class(digits, tmp_path):
    # no positive pair needed: accepted
    make(
        digits,
        tmp_path,
        metric_loss=losses.ArcFaceLoss(num_classes=10, embedding_size=64),
        config=tiny(batch_size=4, m_per_class=1, method="finetune"),
    )


@pytest.mark.parametrize("where", ["test", "prototype", "untrained class", "custom test"])
def test_non_finite_inputs_anywhere_are_refused_before_the_first_stage_trains(digits, tmp_path, where):
    tr, te = digits
    x_tr, y_tr = tr.tensors[0].clone(), tr.tensors[1]
    x_te, y_te = te.tensors[0].clone(), te.tensors[1]
    kw = {}
    if where == "test":
        x_te[7, 3] = float("nan")
    elif where == "untrained class":  # stage 1's classes: no stage before the refusal trains
        x_tr[int(np.flatnonzero(y_tr.numpy() == 9)[0]), 0] = float("inf")
    elif where == "prototype":
        x_p = tr.tensors[0].clone()
        x_p[0, 0] = float("nan")
        kw["prototype_dataset"] = torch.utils.data.TensorDataset(x_p, y_tr)
    train = torch.utils.data.TensorDataset(x_tr, y_tr)
    test = torch.utils.data.TensorDataset(x_te, y_te)
    if where == "custom test":
        x_te[3, 3] = float("nan")
        test = Scaled(torch.utils.data.TensorDataset(x_te, y_te))
    name = {"untrained class": "training", "custom test": "test"}.get(where, where)
    with pytest.raises(ValueError, match=rf"the {name} dataset .*(NaN or inf)"):
        make(digits, tmp_path, train=train, test=test, **kw).run()
    assert not (tmp_path / "stage_000").exists()
