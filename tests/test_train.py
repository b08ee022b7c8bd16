import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cxr import train as train_module
from cxr.data import device_augment
from cxr.data.cache import PreprocessSettings, build_cache, cache_rows
from cxr.data.catalog import load_catalog
from cxr.data.loader import ShardDataset, draw_warp
from cxr.data.split import patient_split
from cxr.data.synthetic import make_demo_dataset
from cxr.distributed import World
from cxr.model import CXRNet
from cxr.train import TrainConfig, load_checkpoint, predict, train, train_loader


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    root = make_demo_dataset(directory, n_patients=40, max_images_per_patient=3, size=48, progress=False)
    catalog, _ = load_catalog(root)
    cache = build_cache(
        catalog, PreprocessSettings(size=40), root=tmp_path_factory.mktemp("c"), progress=False
    )
    split = patient_split(catalog.meta["patient_id"].to_numpy(), catalog.labels, (0.6, 0.2, 0.2))
    return cache, cache_rows(cache, catalog.meta["image_id"], split)


CONFIG = dict(epochs=3, batch_size=16, crop=32, pretrained=False, workers=0, lr=3e-3, channels_last=False)


def test_training_records_history_and_checkpoints(tiny, tmp_path):
    cache, rows = tiny
    result = train(cache, rows["train"], rows["val"], TrainConfig(**CONFIG), tmp_path, progress=False)
    assert [h["epoch"] for h in result.history] == [0, 1, 2] and result.resumed_from_epoch is None
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_auroc == max(h["val_mean_auroc"] for h in result.history)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    model = CXRNet(pretrained=False).eval()  # the best epoch's validation probabilities come with it
    model.load_state_dict(result.best_state)
    val = ShardDataset(cache, rows["val"], crop=CONFIG["crop"])
    assert np.allclose(result.val_probabilities, predict(model, val), atol=1e-6)


@pytest.mark.parametrize("workers, killed_epoch", [(0, 1), (2, 2)])
def test_killed_run_resumes_bit_for_bit(tiny, tmp_path, monkeypatch, workers, killed_epoch):
    cache, rows = tiny
    config = TrainConfig(**{**CONFIG, "workers": workers})
    straight = train(cache, rows["train"], rows["val"], config, tmp_path / "a", progress=False)
    real_epoch = train_module._train_epoch

    def dies(*args, **kwargs):
        if args[8] == killed_epoch:  # the 0-based epoch argument
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_epoch", dies)
    with pytest.raises(KeyboardInterrupt):
        train(cache, rows["train"], rows["val"], config, tmp_path / "b", progress=False)
    monkeypatch.setattr(train_module, "_train_epoch", real_epoch)
    resumed = train(cache, rows["train"], rows["val"], config, tmp_path / "b", progress=False)
    assert resumed.resumed_from_epoch == killed_epoch
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    for key, value in straight.best_state.items():
        assert torch.equal(value, resumed.best_state[key]), key


def test_loader_workers_do_not_change_training(tiny, tmp_path):
    cache, rows = tiny

    def losses(workers):
        config = TrainConfig(**{**CONFIG, "workers": workers})
        run = train(cache, rows["train"], rows["val"], config, tmp_path / str(workers), progress=False)
        return [h["train_loss"] for h in run.history]

    assert losses(2) == pytest.approx(losses(0), rel=1e-6)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "epoch": 0, "rng": _Payload()}, tmp_path / "last.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        train_module.load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="unknown train settings"):
        TrainConfig.from_dict({"epochz": 3})


def test_sagemaker_entry_point(tiny, tmp_path):
    cache, rows = tiny
    (cache.directory / "split.json").write_text(json.dumps({k: v.tolist() for k, v in rows.items()}))
    env = {
        **os.environ,
        "SM_CHANNEL_TRAINING": str(cache.directory),
        "SM_MODEL_DIR": str(tmp_path / "model"),
        "CXR_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "SM_HPS": json.dumps({**{k: str(v) for k, v in CONFIG.items()}, "epochs": "1"}),
    }
    result = subprocess.run([sys.executable, "-m", "cxr.train"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "best_val_auroc=" in result.stdout
    summary = json.loads((tmp_path / "model" / "history.json").read_text())
    assert len(summary["history"]) == 1 and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert summary["data_path"] == "loader"  # auto, without CUDA
    state = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    assert state["head.3.weight"].shape == (14, 512) and np.isfinite(summary["best_val_auroc"])


@pytest.fixture(scope="module")
def nih_cache(nih_root, tmp_path_factory):
    """The real NIH films cached at the shipped 256² (crops of 224 train on them)."""
    catalog, _ = load_catalog(nih_root)
    root = tmp_path_factory.mktemp("nih_cache")
    return build_cache(catalog, PreprocessSettings(size=256), root=root, workers=1, progress=False)


NIH_TRAIN, NIH_VAL = np.arange(0, 48), np.arange(100, 116)
NIH_CONFIG = dict(
    epochs=1, batch_size=8, max_batches_per_epoch=4, crop=224, pretrained=False, workers=2, seed=3
)
# The two data paths' crops differ by at most one gray level in a few pixels (tests/test_device_augment.py).
# Under SGD the four steps' losses then differ by at most 5e-6 relative (measured), and a mirrored warp
# moves them by 2e-4 or more. AdamW's first steps scale each gradient by its own magnitude, so near-zero
# gradients of either sign move a weight by a whole learning rate: there the paths drift apart by up to
# 3e-3 within four steps, as much as a wrong warp does, and the comparison would tell nothing.
STEP_LOSS_TOLERANCE = 5e-5


def step_losses(cache, data_path, directory):
    """The per-step losses of one short SGD run on the NIH rows, and the data path it used."""
    config = TrainConfig(**NIH_CONFIG, optimizer="sgd", data_path=data_path)
    result = train(cache, NIH_TRAIN, NIH_VAL, config, directory, progress=False)
    return load_checkpoint(directory)["step_losses"][0], result.data_path


def test_device_data_path_trains_as_the_loader(nih_cache, tmp_path, monkeypatch):
    """On real NIH films at shipped sizes the device data path (here on the CPU) gives the loader path's
    per-step losses; `auto` keeps the loader off CUDA."""
    loader, used = step_losses(nih_cache, "loader", tmp_path / "loader")
    assert used == "loader" and len(loader) == NIH_CONFIG["max_batches_per_epoch"]
    device, used = step_losses(nih_cache, "device", tmp_path / "device")
    assert used == "device" and device == pytest.approx(loader, rel=STEP_LOSS_TOLERANCE)
    assert step_losses(nih_cache, "auto", tmp_path / "auto") == (loader, "loader")

    def mirrored(*args):
        draw = draw_warp(*args)
        return draw._replace(flip=-draw.flip)

    monkeypatch.setattr(device_augment, "draw_warp", mirrored)
    wrong, _ = step_losses(nih_cache, "device", tmp_path / "wrong")
    assert wrong != pytest.approx(loader, rel=STEP_LOSS_TOLERANCE)


def test_device_data_path_shares_global_batches_by_rank(nih_cache):
    """Each process's device batches are its share of the loader path's global batches, as DDP needs."""
    seed = NIH_CONFIG["seed"]
    loaders = {  # 48 images: five global batches of 9, one of 3
        (path, rank): train_loader(
            ShardDataset(nih_cache, NIH_TRAIN, crop=224, train=True, seed=seed),
            NIH_VAL,
            TrainConfig(**{**NIH_CONFIG, "batch_size": 9, "data_path": path}),
            torch.device("cpu"),
            World(rank, 2),
        )
        for path in ("loader", "device")
        for rank in (0, 1)
    }
    assert {key: made for key, (_, made) in loaders.items()} == {key: key[0] for key in loaders}
    for rank in (0, 1):
        device, loader = loaders["device", rank][0], loaders["loader", rank][0]
        assert device.batch_sampler.global_batch_sizes() == [9, 9, 9, 9, 9, 3]
        batches = list(zip(device, loader, strict=True))
        assert [len(images) for (images, _), _ in batches] == [5 - rank] * 5 + [2 - rank]
        for (images, labels), (expected, expected_labels) in batches:
            assert torch.equal(labels, expected_labels)
            assert (images.float() - expected.float()).abs().max() <= 1


def test_unknown_data_path_is_rejected(nih_cache):
    dataset = ShardDataset(nih_cache, NIH_TRAIN, crop=224, train=True)
    with pytest.raises(ValueError, match="unknown data_path 'gpu'"):
        train_loader(dataset, NIH_VAL, TrainConfig(data_path="gpu"), torch.device("cpu"), World())


def test_masked_loss_is_bce_on_the_labelled_entries():
    """Fully labelled: exactly BCEWithLogitsLoss (with pos_weight too). With NaN targets: the labelled
    entries' BCE over all entries of the batch, and no gradient reaches an unlabelled output."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 14, generator=generator, requires_grad=True)
    targets = (torch.rand(8, 14, generator=generator) < 0.3).float()
    weights = torch.linspace(1, 5, 14)
    for pos_weight in (None, weights):
        expected = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, targets)
        assert torch.allclose(train_module.MaskedBCEWithLogitsLoss(pos_weight)(logits, targets), expected)
    unlabelled = torch.rand(8, 14, generator=generator) < 0.4
    loss = train_module.MaskedBCEWithLogitsLoss()(logits, torch.where(unlabelled, torch.nan, targets))
    each = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.isfinite(loss) and torch.allclose(loss, each[~unlabelled].sum() / each.numel())
    loss.backward()
    assert (logits.grad[unlabelled] == 0).all() and (logits.grad[~unlabelled] != 0).all()


def test_training_learns_from_images_that_label_only_some_findings(tiny, tmp_path):
    """A cache whose images label only some findings (NaN elsewhere), as a dataset beside NIH gives:
    training with loader workers stays finite and validation scores the labelled findings only."""
    import shutil

    cache, rows = tiny
    partial = tmp_path / "cache"
    shutil.copytree(cache.directory, partial)
    labels = np.load(partial / "labels.npy")
    labels[::2, 7:] = np.nan  # every other image labels only the first 7 findings
    labels[:, 13] = np.nan  # and no image labels Hernia
    np.save(partial / "labels.npy", labels)
    from cxr.data.cache import ShardCache

    config = TrainConfig(**{**CONFIG, "workers": 2, "epochs": 2, "pos_weight": True})
    result = train(ShardCache(partial), rows["train"], rows["val"], config, tmp_path / "c", progress=False)
    assert all(
        np.isfinite([h["train_loss"], h["val_loss"], h["val_mean_auroc"]]).all() for h in result.history
    )
    val = labels[rows["val"]]
    assert (
        result.best_val_auroc == pytest.approx(train_module.mean_auroc(val, result.val_probabilities))
        and np.isfinite(result.val_probabilities).all()
    )
