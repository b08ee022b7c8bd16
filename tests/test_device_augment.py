"""The device data path against the CPU loader on real NIH images, shipped sizes (256² cache, 224 crops)."""

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler

from cxr.data import device_augment
from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.data.device_augment import DeviceCache, DeviceLoader, grid_thetas, warp_batch
from cxr.data.loader import (
    Augmentation,
    EpochSampler,
    ShardDataset,
    WarpDraw,
    draw_warp,
    make_loader,
    warp_matrices,
)

CROP, SEED = 224, 5
# Measured: OpenCV quantises sampling positions to 1/32 pixel, grid_sample does not; over 240 augmented
# images the per-image mean |difference| stayed under 0.0002 gray levels and no pixel differed by more than 1.
MEAN_TOLERANCE, PIXEL_TOLERANCE = 0.01, 1
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # the same code, on each device here


@pytest.fixture(scope="module")
def cache(nih_root, tmp_path_factory):
    catalog, _ = load_catalog(nih_root)
    root = tmp_path_factory.mktemp("cache")
    return build_cache(
        catalog, PreprocessSettings(size=256, shard_size=48), root=root, workers=1, progress=False
    )


@pytest.fixture(scope="module", params=DEVICES)
def resident(cache, request):
    return DeviceCache(cache, device=request.param)


def one_pass(loader):
    """One pass over a loader, its batches brought to the CPU."""
    return [(images.cpu(), labels.cpu()) for images, labels in loader]


def epochs(loader, dataset, count=2):
    """Every batch of `count` epochs, the way training iterates a loader."""
    out = []
    for epoch in range(count):
        dataset.set_epoch(epoch)
        out.append(one_pass(loader))
    return out


def cpu_epochs(cache, train, count=2, workers=2, batch_size=16):
    dataset = ShardDataset(cache, crop=CROP, train=train, seed=SEED)
    loader = make_loader(dataset, batch_size, shuffle=True, workers=workers, seed=SEED)
    return epochs(loader, dataset, count)


def device_epochs(cache, resident, train, count=2, batch_size=16, rows=None, shuffle=True):
    dataset = ShardDataset(cache, rows, crop=CROP, train=train, seed=SEED)
    return epochs(DeviceLoader(dataset, resident, batch_size, shuffle=shuffle, seed=SEED), dataset, count)


def per_image_differences(device, cpu):
    """(mean, max) |device - cpu| in gray levels per image over all epochs; labels agree batch by batch."""
    means, peaks = [], []
    for device_epoch, cpu_epoch in zip(device, cpu, strict=True):
        for (images, labels), (expected, expected_labels) in zip(device_epoch, cpu_epoch, strict=True):
            assert images.shape == expected.shape and images.dtype == torch.uint8
            assert torch.equal(labels, expected_labels)
            difference = (images.float() - expected.float()).abs().flatten(1)
            means.append(difference.mean(1))
            peaks.append(difference.amax(1))
    return torch.cat(means), torch.cat(peaks)


@pytest.fixture(scope="module")
def cpu_augmented(cache):
    return cpu_epochs(cache, train=True)


def test_draws_are_the_cpu_paths(cache, resident, monkeypatch):
    """The matrices the CPU path hands to OpenCV are the ones the device path builds, image by image."""
    handed = []

    def capture(image, matrix, size, **kwargs):
        handed.append(matrix)
        return np.zeros(size, np.uint8)

    monkeypatch.setattr(cv2, "warpAffine", capture)
    dataset = ShardDataset(cache, crop=CROP, train=True, seed=SEED)
    indices = [0, 7, 50, 119]
    for epoch in (0, 3):
        handed.clear()
        for index in indices:
            dataset[(epoch, index)]
        rows = dataset.rows[indices]
        draws = [draw_warp(256, CROP, Augmentation(), np.random.default_rng((SEED, epoch, r))) for r in rows]
        np.testing.assert_allclose(warp_matrices(draws, CROP), np.stack(handed), rtol=0, atol=1e-9)
        loader = DeviceLoader(dataset, resident, seed=SEED)
        thetas = loader.thetas(rows, np.full(len(rows), epoch))
        assert np.array_equal(thetas, grid_thetas(np.stack(handed), 256, CROP))


def test_augmented_crops_match_the_cpu_loader(cache, resident, cpu_augmented):
    means, peaks = per_image_differences(device_epochs(cache, resident, train=True), cpu_augmented)
    assert len(means) == 2 * len(cache)
    assert means.max() <= MEAN_TOLERANCE and peaks.max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize(
    "mistake",
    [
        lambda d: d._replace(flip=-d.flip),
        lambda d: d._replace(angle=-d.angle),
        lambda d: d._replace(shift_x=-d.shift_x, shift_y=-d.shift_y),
        lambda d: d._replace(top=d.left, left=d.top),
        lambda d: d._replace(scale=1 / d.scale),
    ],
    ids=["flip", "angle sign", "shift sign", "crop corner", "inverse scale"],
)
def test_a_wrong_warp_fails_the_comparison(cache, resident, cpu_augmented, monkeypatch, mistake):
    """The tolerance tells a wrong warp apart: each mistake puts nearly every image far outside it
    (measured: median per-image mean differences of 8-34 gray levels)."""
    monkeypatch.setattr(device_augment, "draw_warp", lambda *args: mistake(draw_warp(*args)))
    means, _ = per_image_differences(device_epochs(cache, resident, train=True), cpu_augmented)
    assert (means > 50 * MEAN_TOLERANCE).float().mean() >= 0.9


def test_eval_batches_are_the_cpu_loaders_exactly(cache, resident):
    device = device_epochs(cache, resident, train=False)
    _, peaks = per_image_differences(device, cpu_epochs(cache, train=False, workers=0))
    assert peaks.max() == 0


def crops_by_row(batches, rows):
    """{cache row: its crop} over one epoch's batches, taken in the dataset's order `rows` (no shuffling)."""
    images = torch.cat([images for images, _ in batches])
    return {int(row): image for row, image in zip(rows, images, strict=True)}


def test_augmentation_does_not_depend_on_batch_composition(cache, resident):
    rows = np.arange(len(cache))
    whole = crops_by_row(device_epochs(cache, resident, True, 1, 16, shuffle=False)[0], rows)
    subset = rows[::-3]
    alone = crops_by_row(device_epochs(cache, resident, True, 1, 5, subset, shuffle=False)[0], subset)
    assert all(torch.equal(alone[row], whole[row]) for row in alone)
    again = crops_by_row(device_epochs(cache, resident, True, 1, 16, shuffle=False)[0], rows)
    assert all(torch.equal(again[row], whole[row]) for row in rows)
    later = device_epochs(cache, resident, True, 2, 16, shuffle=False)[1]
    assert not torch.equal(torch.cat([images for images, _ in later]), torch.stack(list(whole.values())))


def test_a_batch_sampler_sets_the_batches(cache, resident):
    """Two processes' shares of each batch (a batch sampler apiece) put together are the batch of one."""
    dataset = ShardDataset(cache, crop=CROP, train=True, seed=SEED)
    dataset.set_epoch(2)
    whole = one_pass(DeviceLoader(dataset, resident, 16, shuffle=True, seed=SEED))
    batches = [list(batch) for batch in BatchSampler(EpochSampler(dataset, True, SEED), 16, False)]
    assert {epoch for batch in batches for epoch, _, _ in batch} == {2}
    shares = [
        one_pass(DeviceLoader(dataset, resident, batch_sampler=[batch[rank::2] for batch in batches]))
        for rank in (0, 1)
    ]
    assert len(shares[0]) == len(whole) == 8
    for (images, labels), (even, even_labels), (odd, odd_labels) in zip(whole, *shares, strict=True):
        assert torch.equal(images[0::2], even) and torch.equal(images[1::2], odd)
        assert torch.equal(labels[0::2], even_labels) and torch.equal(labels[1::2], odd_labels)


def test_identity_and_flip_warps_are_exact(resident):
    """With no augmentation and the full image, the warp is the image itself, or its mirror when flipped."""
    images = resident.images[:4]
    for flip, expected in ((1.0, images), (-1.0, images.flip(-1))):
        draws = [WarpDraw(0, 0, 0.0, 1.0, 0.0, 0.0, flip)] * len(images)
        thetas = torch.from_numpy(grid_thetas(warp_matrices(draws, 256), 256, 256)).to(images.device)
        assert torch.equal(warp_batch(images, thetas, 256)[:, 0], expected)


def test_only_resident_rows_of_the_same_cache_are_served(cache):
    partial = DeviceCache(cache, rows=np.arange(10, 20))
    assert partial.images.shape == (10, 256, 256)
    assert torch.equal(partial.images[3], torch.from_numpy(np.array(cache.image(13))))
    with pytest.raises(ValueError, match="not resident"):
        DeviceLoader(ShardDataset(cache, np.arange(5, 15), crop=CROP), partial)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_batches_never_wait_for_the_gpu(cache):
    """CUDA's sync debug mode raises on any operation that makes the host wait for the device."""
    resident = DeviceCache(cache, device="cuda")
    for train in (True, False):
        dataset = ShardDataset(cache, crop=CROP, train=train, seed=SEED)
        loader = DeviceLoader(dataset, resident, 16, shuffle=True, seed=SEED)
        torch.cuda.set_sync_debug_mode("error")
        try:
            batches = list(loader)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(batches) == 8 and batches[0][0].is_cuda
