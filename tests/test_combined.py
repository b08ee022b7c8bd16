"""Training on several datasets at once: the real NIH root (its metadata and 120 real images) beside a
CheXpert root in its published layout (real NIH images as JPEGs), combined into one catalog, cache and split,
and drawn per epoch by dataset weights on both data paths, for any number of workers and processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.data.cache import PreprocessSettings, build_cache, cache_key, cache_rows
from cxr.data.catalog import Catalog, load_catalog
from cxr.data.combined import combine_catalogs, split_combined
from cxr.data.datasets import LabelPolicy
from cxr.data.findings import FINDINGS
from cxr.data.loader import EpochSampler, GlobalBatchSampler, ShardDataset, make_loader
from cxr.data.sources import CombinedSource, DirectorySource, PrefixedSource
from cxr.distributed import World
from cxr.train import TrainConfig, load_checkpoint, train, train_loader
from tests.test_datasets_chexpert import MAPPED, write_chexpert

SETTINGS = PreprocessSettings(size=64, shard_size=32)
CROP = 48
SEED = 5
EVEN = {"nih": 1.0, "chexpert": 1.0}


@pytest.fixture(scope="module")
def roots(nih_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "nih": nih_root,
        "chexpert": write_chexpert(tmp_path_factory.mktemp("chexpert"), nih_root, "small"),
    }


def parts_of(roots: dict[str, Path], policy: LabelPolicy | None = None):
    """(name, catalog, root) of each dataset, NIH first."""
    return [
        ("nih", load_catalog(roots["nih"])[0], str(roots["nih"])),
        ("chexpert", load_catalog(roots["chexpert"], policy=policy)[0], str(roots["chexpert"])),
    ]


@pytest.fixture(scope="module")
def combined(roots, tmp_path_factory):
    """The parts, their combined catalog, its split and its shard cache (built by a process pool)."""
    parts = parts_of(roots)
    catalog = combine_catalogs([(name, part) for name, part, _ in parts])
    split, _ = split_combined(parts, {"seed": 0})
    cache = build_cache(catalog, SETTINGS, root=tmp_path_factory.mktemp("cache"), workers=2, progress=False)
    return parts, catalog, split, cache


@pytest.fixture(scope="module")
def train_rows(combined) -> np.ndarray:
    _, catalog, split, cache = combined
    return cache_rows(cache, catalog.meta["image_id"], split)["train"]


def test_combined_catalog_prefixes_ids_and_patients_and_keeps_labels_row_aligned(combined):
    parts, catalog, _, _ = combined
    (_, nih, _), (_, chexpert, _) = parts
    meta = catalog.meta
    assert len(catalog) == len(nih) + len(chexpert) and len(nih) == 120 and len(chexpert) == 5
    assert list(meta.columns) == ["image_id", "patient_id", "age", "sex", "view", "dataset"]
    assert meta["image_id"].is_unique
    assert meta["dataset"].tolist() == ["nih"] * len(nih) + ["chexpert"] * len(chexpert)
    assert meta["image_id"].tolist() == [f"nih/{i}" for i in nih.meta["image_id"]] + [
        f"chexpert/{i}" for i in chexpert.meta["image_id"]
    ]
    assert meta["patient_id"].tolist() == [f"nih:{p}" for p in nih.meta["patient_id"]] + [
        f"chexpert:{p}" for p in chexpert.meta["patient_id"]
    ]
    assert np.array_equal(catalog.labels, np.concatenate([nih.labels, chexpert.labels]), equal_nan=True)
    nih_rows, chexpert_rows = catalog.labels[: len(nih)], catalog.labels[len(nih) :]
    assert not np.isnan(nih_rows).any()
    unlabelled = [FINDINGS.index(f) for f in FINDINGS if f not in MAPPED]
    assert len(unlabelled) == 7 and np.isnan(chexpert_rows[:, unlabelled]).all()
    assert not np.isnan(chexpert_rows[:, [FINDINGS.index(f) for f in MAPPED]]).all(axis=0).any()
    assert catalog.source.uri == f"nih:{nih.source.uri} + chexpert:{chexpert.source.uri}"


def test_combined_source_reads_every_image_into_the_cache(combined, tmp_path):
    """Built by a process pool, the cache holds every image of both datasets, each the pixels its own
    dataset's cache holds, with the `dataset` column."""
    parts, catalog, _, cache = combined
    assert cache.failures == [] and len(cache) == len(catalog)
    assert sorted(cache.meta["image_id"]) == sorted(catalog.meta["image_id"])
    assert cache.meta.groupby("dataset").size().to_dict() == {"chexpert": 5, "nih": 120}
    assert cache.meta["patient_id"].str.match(r"^(nih|chexpert):").all()
    _, chexpert, _ = parts[1]
    alone = build_cache(chexpert, SETTINGS, root=tmp_path, workers=1, progress=False)
    for row, image_id in enumerate(alone.meta["image_id"]):
        (combined_row,) = cache.rows_for([f"chexpert/{image_id}"])
        assert np.array_equal(cache.image(combined_row), alone.image(row))
        assert np.array_equal(cache.labels[combined_row], alone.labels[row], equal_nan=True)


def test_prefixed_source_maps_ids_both_ways(roots):
    inner = DirectorySource(roots["chexpert"], by_path=True)
    source = PrefixedSource("chexpert", inner)
    ids = source.list_images()
    assert ids == [f"chexpert/{i}" for i in inner.list_images()] and len(ids) == 9
    assert source.fingerprints([*ids[:2], "nih/x.png"]) == [
        *inner.fingerprints(inner.list_images()[:2]),
        "absent",
    ]
    assert source.shard_groups(ids[:3]) == [ids[:3]]
    read = {image_id: (data, reason) for image_id, data, reason in source.iter_bytes([ids[0], "nih/x.png"])}
    assert read[ids[0]] == (inner.path(inner.list_images()[0]).read_bytes(), None)
    assert read["nih/x.png"] == (None, "not in source")
    with pytest.raises(ValueError, match="without '/'"):
        PrefixedSource("a/b", inner)


class CountingSource(DirectorySource):
    """A directory source that counts the images it has handed out."""

    read = 0

    def iter_bytes(self, image_ids):
        for result in super().iter_bytes(image_ids):
            self.read += 1
            yield result


def test_combined_source_streams_a_shard_of_one_source(roots):
    """A shard's images come from one source and are handed on as they are read, not all held at once."""
    counting = CountingSource(roots["chexpert"], by_path=True)
    source = CombinedSource(
        [PrefixedSource("nih", DirectorySource(roots["nih"])), PrefixedSource("cx", counting)]
    )
    (shard,) = source.shard_groups([i for i in source.list_images() if i.startswith("cx/")])
    images = source.iter_bytes(shard)
    first = next(images)
    assert first[0] == shard[0] and first[1] is not None and counting.read == 1
    assert [i for i, _, _ in images] == shard[1:] and counting.read == len(shard) == 9


def test_split_keeps_each_dataset_patients_in_one_split_and_its_test_set(roots):
    """Each dataset is split on its own: no patient in two splits, and a published test set (here CheXpert's
    valid.csv images marked as test) is exactly that dataset's test rows."""
    parts = parts_of(roots)
    name, chexpert, root = parts[1]
    official = chexpert.meta["official_split"].replace({"val": "test"})
    parts[1] = (
        name,
        Catalog(chexpert.meta.assign(official_split=official), chexpert.labels, chexpert.source),
        root,
    )
    catalog = combine_catalogs([(n, c) for n, c, _ in parts])
    split, method = split_combined(parts, {"seed": 0})
    assert method.startswith("nih: stratified by patient; chexpert: the dataset's published split")
    rows = np.concatenate([rows for _, rows in split.items()])
    assert np.array_equal(np.sort(rows), np.arange(len(catalog)))
    patients = catalog.meta["patient_id"].to_numpy()
    sets = [set(patients[rows]) for _, rows in split.items()]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert all(len(rows) for _, rows in split.items())
    assert np.array_equal(split.test[split.test >= 120], 120 + np.flatnonzero(official == "test"))
    assert (official == "test").sum() == 2


def test_cache_key_follows_a_part_label_policy(roots):
    keys = {}
    for policy in (LabelPolicy(), LabelPolicy(uncertain="ones")):
        catalog = combine_catalogs([(n, c) for n, c, _ in parts_of(roots, policy)])
        keys[policy.uncertain] = cache_key(catalog, SETTINGS)
    assert keys["ignore"] != keys["ones"]
    assert cache_key(combine_catalogs([(n, c) for n, c, _ in parts_of(roots)]), SETTINGS) == keys["ignore"]


def test_combining_refuses_names_that_would_collide(roots):
    (_, nih, _), (_, chexpert, _) = parts_of(roots)
    for names in (("a", "a"), ("a/b", "c"), ("", "c"), ("a:b", "c")):
        with pytest.raises(ValueError, match="unique, non-empty"):
            combine_catalogs([(names[0], nih), (names[1], chexpert)])


def dataset_share(cache, train_rows, order: list[tuple[int, int, int]], name: str) -> float:
    indices = np.array([index for _, index, _ in order])
    return float((cache.meta["dataset"].to_numpy()[train_rows[indices]] == name).mean())


def test_dataset_weights_draw_each_dataset_its_share(combined, train_rows):
    """A skewed combination (a few CheXpert images among about a hundred NIH ones) drawn half and half."""
    cache = combined[3]
    dataset = ShardDataset(cache, train_rows, crop=CROP, train=True, seed=SEED)
    natural = (cache.meta["dataset"].to_numpy()[train_rows] == "chexpert").mean()
    assert natural < 0.05
    sampler = EpochSampler(dataset, shuffle=True, seed=SEED, weights=EVEN)
    orders = []
    for epoch in range(10):
        dataset.set_epoch(epoch)
        orders.append(list(sampler))
        assert len(orders[-1]) == len(train_rows) and {e for e, _, _ in orders[-1]} == {epoch}
        assert 0.3 < dataset_share(cache, train_rows, orders[-1], "chexpert") < 0.7
    everything = [item for order in orders for item in order]
    assert dataset_share(cache, train_rows, everything, "chexpert") == pytest.approx(0.5, abs=0.05)
    dataset.set_epoch(3)
    assert list(sampler) == orders[3] != [(3, i, k) for _, i, k in orders[4]]
    skewed = EpochSampler(dataset, shuffle=True, seed=SEED, weights={"nih": 3.0, "chexpert": 1.0})
    assert dataset_share(cache, train_rows, list(skewed), "chexpert") == pytest.approx(0.25, abs=0.1)
    dropped = EpochSampler(dataset, shuffle=True, seed=SEED, weights={"nih": 1.0, "chexpert": 0.0})
    assert dataset_share(cache, train_rows, list(dropped), "chexpert") == 0.0


def test_weighted_global_batches_are_the_same_for_any_world_size(combined, train_rows):
    dataset = ShardDataset(combined[3], train_rows, crop=CROP, train=True, seed=SEED)
    dataset.set_epoch(2)
    one = list(GlobalBatchSampler(dataset, 10, True, SEED, weights=EVEN))
    ranks = [list(GlobalBatchSampler(dataset, 10, True, SEED, rank, 2, EVEN)) for rank in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == one
    assert [item for batch in one for item in batch] == list(EpochSampler(dataset, True, SEED, EVEN))


def epoch_batches(cache, train_rows, config: TrainConfig, rank: int = 0, world_size: int = 1):
    """Epoch 1's batches of one process from `train_loader`, and the data path that made them."""
    dataset = ShardDataset(cache, train_rows, crop=CROP, train=True, seed=config.seed)
    loader, path = train_loader(
        dataset, np.array([], dtype=np.int64), config, torch.device("cpu"), World(rank, world_size)
    )
    dataset.set_epoch(1)
    return list(loader), path


def test_weighted_batches_are_the_same_for_any_workers_processes_and_data_path(combined, train_rows):
    """The loader with 0 or 2 workers, in one process or two, and the device path (on the CPU) yield the
    same weighted global batches: labels equal, images within the paths' one gray level."""
    cache = combined[3]
    config = {"batch_size": 10, "seed": SEED, "dataset_weights": EVEN, "data_path": "loader"}
    serial, _ = epoch_batches(cache, train_rows, TrainConfig(**config, workers=0))
    parallel, _ = epoch_batches(cache, train_rows, TrainConfig(**config, workers=2))
    device, path = epoch_batches(
        cache, train_rows, TrainConfig(**{**config, "data_path": "device"}, workers=0)
    )
    shares = [
        epoch_batches(cache, train_rows, TrainConfig(**config, workers=2), rank, 2)[0] for rank in (0, 1)
    ]
    assert path == "device" and len(serial) == len(parallel) == len(device) == len(shares[0]) == 9
    for (images, labels), *others in zip(serial, parallel, device, *shares, strict=True):
        (p_images, p_labels), (d_images, d_labels), (r0_images, r0_labels), (r1_images, r1_labels) = others
        assert torch.equal(images, p_images) and torch.equal(images, torch.cat([r0_images, r1_images]))
        assert (images.float() - d_images.float()).abs().max() <= 1
        for other in (p_labels, d_labels, torch.cat([r0_labels, r1_labels])):
            assert torch.allclose(labels, other, equal_nan=True)
    labels = torch.cat([labels for _, labels in serial])
    chexpert = torch.isnan(labels).any(dim=1).float().mean()  # CheXpert rows leave seven findings NaN
    assert 0.3 < chexpert < 0.7


def test_empty_weights_keep_the_unweighted_permutation(combined, train_rows):
    """No weights: each epoch is the (seed, epoch) permutation of the training rows, as before weights."""
    dataset = ShardDataset(combined[3], train_rows, crop=CROP, train=True, seed=SEED)
    assert TrainConfig().dataset_weights == {}
    for epoch in (0, 4):
        dataset.set_epoch(epoch)
        expected = [
            (epoch, int(i), 0) for i in np.random.default_rng((SEED, epoch)).permutation(len(train_rows))
        ]
        assert (
            list(EpochSampler(dataset, True, SEED, {})) == list(EpochSampler(dataset, True, SEED)) == expected
        )
        loader = make_loader(dataset, batch_size=len(train_rows), shuffle=True, seed=SEED)
        assert [item for batch in loader.batch_sampler for item in batch] == expected


def test_weights_must_name_exactly_the_training_datasets(combined, train_rows, roots, tmp_path):
    dataset = ShardDataset(combined[3], train_rows, crop=CROP, train=True, seed=SEED)
    with pytest.raises(ValueError, match=r"no weight for \['chexpert'\]"):
        EpochSampler(dataset, True, SEED, {"nih": 1.0})
    with pytest.raises(ValueError, match=r"no training image from \['mimic'\]"):
        EpochSampler(dataset, True, SEED, {**EVEN, "mimic": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        EpochSampler(dataset, True, SEED, {"nih": 0.0, "chexpert": 0.0})
    with pytest.raises(ValueError, match="need shuffle"):
        EpochSampler(dataset, False, SEED, EVEN)
    nih_only = ShardDataset(combined[3], train_rows[:5], crop=CROP)  # the NIH rows come first
    with pytest.raises(ValueError, match=r"no training image from \['chexpert'\]"):
        train_loader(
            nih_only, train_rows[:0], TrainConfig(dataset_weights=EVEN), torch.device("cpu"), World()
        )
    nih_cache = build_cache(load_catalog(roots["nih"])[0], SETTINGS, root=tmp_path, workers=1, progress=False)
    assert "dataset" not in nih_cache.meta.columns  # an NIH cache is one dataset, "nih"
    assert len(list(EpochSampler(ShardDataset(nih_cache, crop=CROP), True, SEED, {"nih": 1.0}))) == 120


def test_training_on_combined_datasets_with_weights(combined, train_rows, tmp_path):
    """A short run with loader workers on the weighted combination finishes with finite losses."""
    _, catalog, split, cache = combined
    val_rows = cache_rows(cache, catalog.meta["image_id"], split)["val"]
    config = TrainConfig(
        epochs=2,
        batch_size=16,
        crop=CROP,
        pretrained=False,
        workers=2,
        channels_last=False,
        seed=SEED,
        dataset_weights=EVEN,
    )
    result = train(cache, train_rows, val_rows, config, tmp_path / "checkpoints", progress=False)
    assert result is not None and len(result.history) == 2
    assert all(np.isfinite([h["train_loss"], h["val_loss"]]).all() for h in result.history)
    assert result.config["dataset_weights"] == EVEN
    assert load_checkpoint(tmp_path / "checkpoints")["config"]["dataset_weights"] == EVEN


def test_an_image_drawn_again_is_augmented_its_own_way(combined, train_rows):
    """In a weighted epoch an image drawn k times comes with draws 0..k-1, each its own augmentation, the
    same on the loader and the device path; an image's first draw is augmented as without weights."""
    from cxr.data.device_augment import DeviceCache, DeviceLoader
    from cxr.data.loader import occurrences

    assert occurrences(np.array([3, 1, 3, 3, 1, 0])).tolist() == [0, 0, 1, 2, 1, 0]
    cache = combined[3]
    dataset = ShardDataset(cache, train_rows, crop=CROP, train=True, seed=SEED)
    dataset.set_epoch(1)
    order = list(EpochSampler(dataset, True, SEED, EVEN))
    repeated = [item for item in order if item[2] > 0]
    assert len(repeated) > 10  # the few CheXpert images fill half the epoch
    index = repeated[0][1]
    copies = [item for item in order if item[1] == index]
    assert [k for _, _, k in copies] == list(range(len(copies)))
    images = [dataset[item][0] for item in copies]
    assert all(not torch.equal(images[0], other) for other in images[1:])
    assert torch.equal(dataset[(1, index, 0)][0], dataset[(1, index)][0])  # the first draw: as before
    device = DeviceLoader(dataset, DeviceCache(cache, train_rows), batch_sampler=[copies])
    ((warped, _),) = list(device)
    assert (warped.float() - torch.stack(images).float()).abs().max() <= 1
