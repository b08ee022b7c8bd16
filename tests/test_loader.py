import numpy as np
import pytest
import torch

from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.data.loader import NO_AUGMENTATION, Augmentation, ShardDataset, augment, make_loader


@pytest.fixture(scope="module")
def cache(nih_root, tmp_path_factory):
    catalog, _ = load_catalog(nih_root)
    root = tmp_path_factory.mktemp("cache")
    return build_cache(
        catalog, PreprocessSettings(size=80, shard_size=64), root=root, workers=1, progress=False
    )


def test_eval_items_are_center_crops_with_labels(cache):
    dataset = ShardDataset(cache, rows=np.array([5, 7]), crop=64)
    image, label = dataset[1]
    assert image.shape == (1, 64, 64) and image.dtype == torch.uint8
    assert np.array_equal(image[0].numpy(), cache.image(7)[8:72, 8:72])
    assert torch.equal(label, torch.from_numpy(cache.labels[7]))


def test_identity_and_flip_warps_are_exact(cache):
    image = np.asarray(cache.image(3))
    rng = np.random.default_rng(0)
    assert np.array_equal(augment(image, 80, NO_AUGMENTATION, rng), image)
    flip_only = Augmentation(flip=True, max_rotation_deg=0.0, scale=(1.0, 1.0), max_shift=0.0)
    outputs = {augment(image, 80, flip_only, np.random.default_rng(s)).tobytes() for s in range(8)}
    assert outputs == {image.tobytes(), np.ascontiguousarray(image[:, ::-1]).tobytes()}


def test_augmentation_is_deterministic_per_epoch_and_varies_across_epochs(cache):
    dataset = ShardDataset(cache, crop=64, train=True, seed=3)
    a = dataset[10][0]
    assert torch.equal(a, dataset[10][0])
    dataset.set_epoch(1)
    assert not torch.equal(a, dataset[10][0])
    assert a.float().std() > 10  # still an image, not a blank border


def epochs_of_batches(cache, workers, epochs=3, shuffle=True):
    """Every batch of `epochs` epochs through one loader, the way training iterates it."""
    dataset = ShardDataset(cache, crop=64, train=True)
    loader = make_loader(dataset, batch_size=16, shuffle=shuffle, workers=workers)
    out = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        out.append([x for x, _ in loader])
    return out


def test_worker_count_does_not_change_batches_in_any_epoch(cache):
    serial, parallel = epochs_of_batches(cache, 0), epochs_of_batches(cache, 2)
    for epoch_serial, epoch_parallel in zip(serial, parallel, strict=True):
        assert len(epoch_serial) == 8
        assert all(torch.equal(a, b) for a, b in zip(epoch_serial, epoch_parallel, strict=True))


def test_persistent_workers_draw_new_augmentation_and_order_each_epoch(cache):
    in_order = epochs_of_batches(cache, workers=2, shuffle=False)
    first, *later = (torch.cat(batches) for batches in in_order)
    for images in later:  # the same rows in the same order, augmented afresh
        assert all(not torch.equal(a, b) for a, b in zip(first, images, strict=True))
    shuffled = epochs_of_batches(cache, workers=2)
    assert not torch.equal(shuffled[0][0], shuffled[1][0])


def test_crop_larger_than_cache_is_rejected(cache):
    with pytest.raises(ValueError, match="larger than the cached"):
        ShardDataset(cache, crop=96)
