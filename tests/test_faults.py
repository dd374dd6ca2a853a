"""Faults a careful user runs into, each run for real: stale results, foreign files, NaN, late or nameless
errors."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from pml_mutual import OnlineConfig, OnlineLearner
from pml_mutual.data import stage_assignment
from pml_mutual.evaluation import recall_at_k
from pml_mutual.models import EmbeddingMLP
from pml_mutual.run_dir import RunDirectoryError
from pml_mutual.trainers.incremental_trainer import NonFiniteLossError


def tiny(**kw):
    base = dict(
        method="finetune",
        epochs=1,
        iterations_per_epoch=2,
        batch_size=4,
        m_per_class=2,
        device="cpu",
        lr=1e-3,
    )
    base.update(kw)
    return OnlineConfig(**base)


def data(n_classes=4, per_class=6, seed=0, nan_class=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_classes * per_class, 64, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    if nan_class is not None:
        x[y == nan_class] = float("nan")
    return TensorDataset(x, y)


def learner(run_dir, train=None, test=None, config=None, factory=EmbeddingMLP, **kw):
    train = train if train is not None else data()
    test = test if test is not None else data(seed=1)
    return OnlineLearner.from_class_assignment(
        factory,
        train,
        test,
        stage_assignment(range(4), 2),
        config=config or tiny(),
        run_dir=run_dir,
        quiet=True,
        **kw,
    )


def test_a_different_split_of_equal_size_is_refused_naming_the_data(tmp_path):
    learner(tmp_path / "r").run()
    other = data(seed=5)  # same sizes and labels, other items
    with pytest.raises(ValueError, match="different identity.*data.train"):
        learner(tmp_path / "r", train=other).run()


def test_another_architecture_metric_loss_or_tag_is_refused(tmp_path):
    from pytorch_metric_learning import losses

    learner(tmp_path / "r").run()
    with pytest.raises(ValueError, match="model"):
        learner(tmp_path / "r", factory=lambda: EmbeddingMLP(hidden=32)).run()
    with pytest.raises(ValueError, match="metric_loss.margin"):
        learner(tmp_path / "r", metric_loss=losses.TripletMarginLoss(margin=0.3)).run()
    with pytest.raises(ValueError, match="tags.image_size"):
        learner(tmp_path / "r", identity_tags={"image_size": 112}).run()


def test_fresh_moves_the_other_run_aside(tmp_path):
    learner(tmp_path / "r").run()
    learner(tmp_path / "r", config=tiny(lr=2e-3), fresh=True).run()
    assert (tmp_path / "r.old-1" / "config.json").exists()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["lr"] == 2e-3


def test_only_own_temporaries_are_removed_and_only_after_the_identity_check(tmp_path):
    run = tmp_path / "r"
    learner(run).run()
    mine = run / "stage_000" / ".pml_mutual-model.pt.x1.tmp"
    users = [run / "notes.tmp", run / "deep" / "a" / "b.tmp", run / "stage_000" / "mine.tmp"]
    for f in [mine, *users]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    with pytest.raises(ValueError, match="different identity"):
        learner(run, config=tiny(lr=5e-3)).run()
    assert mine.exists()  # a refused launch touches nothing
    learner(run).run()
    assert not mine.exists() and all(f.exists() for f in users)


@pytest.mark.parametrize("bad", ["", ".", "./"])
def test_the_working_directory_is_refused_as_run_dir(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="run_dir"):
        learner(bad)


class NaNAfterFirstStep(torch.nn.Module):
    """A network whose outputs turn NaN from its second forward in training mode (a diverging run)."""

    def __init__(self):
        super().__init__()
        self.net = EmbeddingMLP()
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls > 1:
                out = out * float("nan")
        return out


def test_nan_data_is_refused_before_training_and_a_nan_loss_stops_training_naming_where_and_writing_nothing(
    tmp_path,
):
    run = tmp_path / "r"
    with pytest.raises(ValueError, match=r"the training dataset holds NaN or inf inputs \(item 6 first\)"):
        learner(run, train=data(nan_class=1)).run()
    assert not (run / "in_progress.pt").exists() and not list(run.glob("stage_*/*.pt"))
    with pytest.raises(
        NonFiniteLossError, match=r"stage 0, epoch 1, iteration \d+: non-finite loss \(.*metric_loss"
    ):
        learner(tmp_path / "diverging", factory=NaNAfterFirstStep).run()
    assert not (tmp_path / "diverging" / "in_progress.pt").exists()
    assert not list((tmp_path / "diverging").glob("stage_*/*.pt"))
    with pytest.raises(ValueError, match="different identity.*data.train"):
        learner(run, train=data()).run()  # fixed data is other data: never mixed with the old run
    learner(run, train=data(), fresh=True).run()
    assert (run / "stage_001" / "stage.json").exists()


def test_non_finite_initial_weights_are_refused_before_a_checkpoint(tmp_path):
    sd = EmbeddingMLP().state_dict()
    next(iter(sd.values())).fill_(float("nan"))
    with pytest.raises(ValueError, match="initial_state_dict holds NaN"):
        learner(tmp_path / "r", initial_state_dict=sd)
    assert not list((tmp_path / "r").glob("stage_*/*.pt"))


def test_a_damaged_checkpoint_is_named_and_not_loaded(tmp_path):
    run = tmp_path / "r"
    learner(run, config=tiny(method="fecd")).run()
    (run / "stage_001" / "stage.json").unlink()  # stage 1 retrains from stage 0's checkpoint
    model = run / "stage_000" / "model.pt"
    raw = bytearray(model.read_bytes())
    raw[-200] ^= 0xFF  # a flipped byte that torch.load would accept
    model.write_bytes(bytes(raw))
    with pytest.raises(RunDirectoryError, match=r"stage_000/model.pt does not match the SHA-256.*delete"):
        learner(run, config=tiny(method="fecd")).run()


def test_a_damaged_stage_json_is_named(tmp_path):
    run = tmp_path / "r"
    learner(run).run()
    (run / "stage_000" / "stage.json").write_text('{"results": ')
    with pytest.raises(RunDirectoryError, match=r"stage_000/stage.json is damaged \(line 1"):
        learner(run).run()


def test_a_test_set_missing_a_stage_is_refused_before_training(tmp_path):
    test = Subset(data(seed=1), list(range(12)))  # classes 0, 1 only: stage 1 has no test item
    with pytest.raises(ValueError, match=r"no item of stage\(s\) \[1\]"):
        learner(tmp_path / "r", test=test)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", float("inf")),
        ("temperature", 0.0),
        ("temperature", 5e3),
        ("lambda_corr", float("nan")),
        ("lr", -1.0),
        ("eval_batch_size", 0),
        ("ks", 4),
    ],
)
def test_invalid_config_values_are_refused_at_construction(field, value):
    with pytest.raises((ValueError, TypeError), match=field if field != "ks" else "ks"):
        tiny(**{field: value})


def test_recall_chunk_size_is_checked():
    with pytest.raises(ValueError, match="chunk_size"):
        recall_at_k(np.eye(4, dtype=np.float32), np.array([0, 0, 1, 1]), chunk_size=-1)


# ----------------------------------------------------------------- image datasets on disk
def _cub(tmp_path, counts=(4, 4, 4, 4)):
    from pml_mutual.data.fixtures import write_cub_fixture

    return write_cub_fixture(tmp_path / "CUB_200_2011", list(counts))


@pytest.mark.parametrize("bad_path", ["../../outside.jpg", "/etc/hostname", "001.Class_1/../../../x.jpg"])
def test_annotation_paths_leaving_the_dataset_are_refused_unless_allowed(tmp_path, bad_path):
    from pml_mutual.data import cub
    from pml_mutual.data.images import read_list_file

    root = _cub(tmp_path)
    lines = (root / "images.txt").read_text().splitlines()
    lines[2] = f"3 {bad_path}"
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"images\.txt.*outside the dataset root"):
        cub.load_cub(root)
    items, _ = cub.read_cub(root, allow_outside_root=True)  # the explicit opt-out reads it as written
    assert items.paths[2] == bad_path
    listing = tmp_path / "list.txt"
    listing.write_text(f"a/b.jpg 0\n{bad_path} 1\n")
    with pytest.raises(ValueError, match=r"list\.txt.*item 2.*outside"):
        read_list_file(listing)


def test_a_missing_image_file_is_refused_before_training(tmp_path):
    from pml_mutual.data import ImageListDataset, load_cub, stages_from_ends
    from pml_mutual.data.transforms import ProtocolTransform

    root = _cub(tmp_path, (6, 6, 6, 6))
    train_items, test_items = load_cub(root)
    (train_items.root / train_items.paths[3]).unlink()
    transform = ProtocolTransform(False, "imagenet", 16)
    trained = []

    class Spy(EmbeddingMLP):
        def forward(self, x):
            trained.append(1)
            return super().forward(x.flatten(1)[:, :64])

    with pytest.raises(
        FileNotFoundError,
        match=r"1 of the \d+ image files of the training dataset do not exist.*" + train_items.paths[3],
    ):
        OnlineLearner.from_class_assignment(
            Spy,
            ImageListDataset(train_items, transform),
            ImageListDataset(test_items, transform),
            stages_from_ends(np.unique(train_items.labels), [2]),
            config=tiny(),
            run_dir=tmp_path / "r",
            quiet=True,
        )
    assert not trained and not (tmp_path / "r" / "config.json").exists()


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from pml_mutual.data.images import open_image

    grey = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)  # 0 … 64491
    Image.fromarray(grey).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # Pillow reads it as 16-bit grey
    rgb = np.asarray(open_image(tmp_path / "deep.png"))
    assert rgb.shape == (48, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.round(grey / 257.0).astype(np.uint8))
    assert rgb.min() == 0 and 245 <= rgb.max() <= 251  # the full range, not a white image


def test_unsupported_backbone_image_sizes_are_named_before_training():
    from pml_mutual.models.backbones import check_image_size, supported_image_sizes

    assert supported_image_sizes("bninception", [224, 48]) == [224]
    with pytest.raises(
        ValueError, match=r"bninception backbone cannot take 80×80 images; sizes that work near it: \[.*\]"
    ):
        check_image_size("bninception", 80)
    check_image_size("bninception", 224)


def test_the_cli_checks_image_size_and_files_before_training(tmp_path, capsys):
    from pml_mutual.reproduce import run

    with pytest.raises(ValueError, match="cannot take 48×48"):
        run(
            "cub200",
            [
                "--smoke",
                "--backbone",
                "bninception",
                "--image-size",
                "48",
                "--methods",
                "finetune",
                "--runs",
                str(tmp_path / "runs"),
            ],
        )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_image_is_named(tmp_path, damage):
    from pml_mutual.data.images import open_image

    root = _cub(tmp_path, (2, 2))
    path = next((root / "images").rglob("*.jpg"))
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"not a jpeg" * 10, "empty": b""}[damage]
    )
    with pytest.raises(OSError, match=f"cannot decode image {path}"):
        open_image(path)
