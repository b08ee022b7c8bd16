"""The shard cache resident on the training device, augmented there: the GPU never waits for a loader.

`DeviceCache` copies cache rows shard by shard (through pinned memory on CUDA) into one uint8
[n, size, size] tensor on the device, with their labels; NIH at 256² is 7.35 GB. `DeviceLoader` iterates
a `ShardDataset`'s items as batches of (uint8 [B, 1, crop, crop], float32 [B, 14]) on that device:

- the order is the CPU loader's: the dataset's `EpochSampler`, shuffled by (seed, epoch), in batches
  as `DataLoader` makes them, or those of any batch sampler of `(epoch, index, draw)` items;
- each image's crop, flip, rotation, scale and shift are drawn from the same generator
  `augmentation_rng(seed, epoch, row, draw)` as the CPU path's `augment`, in the same order, so both draw
  the same numbers whatever the device or batch composition; the draws become one affine matrix per image,
  applied to the batch by `F.affine_grid` + `F.grid_sample` (bilinear, reflection about the edge pixels'
  centres = OpenCV's BORDER_REFLECT_101), rounded back to uint8;
- evaluation batches are the exact central crops.

The host draws the matrices (about 30 µs an image, mostly seeding the generator) while the device works
on earlier batches; nothing waits for the device between batches: each batch's indices and matrices go
through pinned memory without blocking.
Outputs differ from the CPU path's OpenCV warp only by interpolation rounding (OpenCV quantises positions
to 1/32 pixel): tests/test_device_augment.py bounds the difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler

from cxr.data.cache import ShardCache
from cxr.data.loader import EpochSampler, ShardDataset, augmentation_rng, draw_warp, warp_matrices


def grid_thetas(matrices: np.ndarray, size: int, crop: int) -> np.ndarray:
    """float32 [B, 2, 3] for `F.affine_grid(..., align_corners=True)`: pixel matrices in normalised units.

    With align_corners=True, -1 and 1 are the centres of the edge pixels: x = (x̂ + 1)(crop - 1)/2 on the
    output side and û = 2u/(size - 1) - 1 on the input side.
    """
    linear, offset = matrices[:, :, :2], matrices[:, :, 2]
    theta = np.empty_like(matrices)
    theta[:, :, :2] = linear * (crop - 1) / (size - 1)
    theta[:, :, 2] = (linear.sum(-1) * (crop - 1) + 2 * offset) / (size - 1) - 1
    return theta.astype(np.float32)


def warp_batch(images: torch.Tensor, thetas: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 [B, H, W] images warped by normalised [B, 2, 3] matrices → uint8 [B, 1, crop, crop]."""
    source = images.unsqueeze(1).float()
    grid = F.affine_grid(thetas, [len(images), 1, crop, crop], align_corners=True)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    return warped.round_().clamp_(0, 255).to(torch.uint8)


def center_crop_batch(images: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 [B, H, W] → the central crop×crop windows, uint8 [B, 1, crop, crop] (as `center_crop`)."""
    top, left = (images.shape[1] - crop) // 2, (images.shape[2] - crop) // 2
    return images[:, None, top : top + crop, left : left + crop].contiguous()


def resident_bytes(cache: ShardCache, rows: np.ndarray | None = None) -> int:
    """Device memory a `DeviceCache` of these rows takes (images and labels)."""
    count = len(cache) if rows is None else len(np.unique(rows))
    return count * (cache.size * cache.size + cache.labels.shape[1] * 4)


def fits_on_device(
    cache: ShardCache, rows: np.ndarray | None, device: torch.device, fraction: float = 0.5
) -> bool:
    """Whether the rows take at most `fraction` of the device's free memory now (CUDA only)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return resident_bytes(cache, rows) <= fraction * free


class DeviceCache:
    """Rows of a `ShardCache` held on one device: uint8 images [n, size, size] and float32 labels [n, 14]."""

    def __init__(self, cache: ShardCache, rows: np.ndarray | None = None, device: torch.device | str = "cpu"):
        self.cache, self.device, self.size = cache, torch.device(device), cache.size
        self.rows = np.arange(len(cache)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        self.images = torch.empty(
            (len(self.rows), self.size, self.size), dtype=torch.uint8, device=self.device
        )
        self.labels = torch.from_numpy(cache.labels[self.rows]).to(self.device)
        self._load()

    def slots(self, rows: np.ndarray) -> np.ndarray:
        """Positions of cache rows in `images`; every row must be resident."""
        rows = np.asarray(rows, dtype=np.int64)
        slots = np.searchsorted(self.rows, rows)
        if not np.array_equal(self.rows[np.minimum(slots, len(self.rows) - 1)], rows):
            raise ValueError("some rows are not resident on the device")
        return slots

    def _load(self) -> None:
        """Copy the rows in shard by shard (cache rows are ordered by shard, so each is one slot range).

        On CUDA each shard's rows go through pinned memory without blocking; PyTorch's pinned-memory pool
        reuses a buffer only once its copy is done, so reading the next shard overlaps the transfer.
        """
        shard_of = self.cache.meta["shard"].to_numpy()[self.rows]
        offset_of = self.cache.meta["offset"].to_numpy()[self.rows]
        starts = np.flatnonzero(np.diff(shard_of, prepend=-1))
        for start, stop in zip(starts, [*starts[1:], len(self.rows)], strict=True):
            pixels = torch.from_numpy(self.cache.shard(int(shard_of[start]))[offset_of[start:stop]])
            if self.device.type == "cuda":
                self.images[start:stop].copy_(pixels.pin_memory(), non_blocking=True)
            else:
                self.images[start:stop] = pixels
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class DeviceLoader:
    """Batches of a `ShardDataset` from a `DeviceCache`: the CPU loader's order, draws and crops, on device.

    Like a DataLoader: `batch_size`, `shuffle`, `seed` and `drop_last` batch `EpochSampler`'s order, or
    `batch_sampler` yields each batch's `(epoch, index, draw)` items itself (e.g. one process's share of every
    global batch); iterate once per epoch after `dataset.set_epoch(epoch)`.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        resident: DeviceCache,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        batch_sampler: Iterable[Sequence[tuple[int, int]]] | None = None,
    ):
        if dataset.cache.key != resident.cache.key:
            raise ValueError("the dataset and the resident rows come from different caches")
        self.dataset, self.resident = dataset, resident
        self.batch_sampler: Any = (
            BatchSampler(EpochSampler(dataset, shuffle, seed), batch_size, drop_last)
            if batch_sampler is None
            else batch_sampler
        )
        self.slots = resident.slots(dataset.rows)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for items in self.batch_sampler:
            epochs, indices, draws = np.asarray(items, dtype=np.int64).reshape(-1, 3).T
            where = self._to_device(self.slots[indices])
            images = self.resident.images.index_select(0, where)
            if self.dataset.train:
                thetas = self._to_device(self.thetas(self.dataset.rows[indices], epochs, draws))
                images = warp_batch(images, thetas, self.dataset.crop)
            else:
                images = center_crop_batch(images, self.dataset.crop)
            yield images, self.resident.labels.index_select(0, where)

    def thetas(self, rows: np.ndarray, epochs: np.ndarray, draws: np.ndarray | None = None) -> np.ndarray:
        """Normalised warp matrices of cache rows in their epochs (and draws of a weighted epoch): those of
        `ShardDataset.__getitem__`."""
        data, size = self.dataset, self.resident.size
        draws = np.zeros(len(rows), dtype=np.int64) if draws is None else draws
        warps = [
            draw_warp(size, data.crop, data.augmentation, augmentation_rng(data.seed, int(e), int(r), int(k)))
            for e, r, k in zip(epochs, rows, draws, strict=True)
        ]
        return grid_thetas(warp_matrices(warps, data.crop), size, data.crop)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the resident device, through pinned memory without waiting on CUDA."""
        tensor = torch.from_numpy(array)
        if self.resident.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.resident.device, non_blocking=True)
