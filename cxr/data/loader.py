"""Training and evaluation loaders over a shard cache: no PNG is decoded per epoch.

Each item is a uint8 [1, crop, crop] tensor plus its float32 [14] label row. Training augmentation (random
crop, horizontal flip, small rotation/scale/shift) is composed into one affine matrix and applied with a
single OpenCV warp per image. Normalisation to float and the 3-channel expansion ImageNet backbones expect
happen on the training device (`cxr.model`), which keeps the loader's memory traffic at one byte a pixel.
Augmentation randomness comes from (seed, epoch, index), and the epoch travels with each index from the
sampler in the main process (`EpochSampler`), so persistent worker processes see every new epoch and the
batches do not depend on the number of workers.

Under data-parallel training each process reads its share of every global batch (`GlobalBatchSampler`):
the global batches, their order and each image's augmentation are the same whatever the number of processes.
Over several datasets (a cache with a `dataset` column), per-dataset weights make each epoch a seeded draw
with replacement in which each dataset takes its weight's share, as the same global batches everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cxr.data.cache import ShardCache

DATASET_COLUMN = "dataset"
SINGLE_DATASET = "nih"  # the dataset of a cache without a `dataset` column


@dataclass(frozen=True)
class Augmentation:
    """Random geometric augmentation applied on top of a random crop."""

    flip: bool = True
    max_rotation_deg: float = 7.0
    scale: tuple[float, float] = (0.95, 1.05)
    max_shift: float = 0.03  # fraction of the crop size


NO_AUGMENTATION = Augmentation(flip=False, max_rotation_deg=0.0, scale=(1.0, 1.0), max_shift=0.0)


class ShardDataset(Dataset):
    """Images of a `ShardCache` (optionally a subset of rows), cropped to `crop`×`crop`."""

    def __init__(
        self,
        cache: ShardCache,
        rows: np.ndarray | None = None,
        crop: int = 224,
        train: bool = False,
        augmentation: Augmentation = Augmentation(),
        seed: int = 0,
    ):
        if crop > cache.size:
            raise ValueError(f"crop {crop} is larger than the cached image size {cache.size}")
        self.cache = cache
        self.rows = np.arange(len(cache)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.crop, self.train, self.augmentation, self.seed = crop, train, augmentation, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream and shuffling order (call once per epoch, before iterating)."""
        self.epoch = epoch

    @property
    def labels(self) -> np.ndarray:
        """Label rows of this dataset, in item order."""
        return self.cache.labels[self.rows]

    def __getitem__(self, index: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item `index`, or `(epoch, index, draw)` as `EpochSampler` yields them (a worker's epoch may be
        stale; `draw` counts an item's earlier draws in a weighted epoch)."""
        epoch, index, draw = (*index, 0)[:3] if isinstance(index, tuple) else (self.epoch, index, 0)
        row = int(self.rows[index])
        image = self.cache.image(row)
        if self.train:
            pixels = augment(
                image, self.crop, self.augmentation, augmentation_rng(self.seed, epoch, row, draw)
            )
        else:
            pixels = center_crop(image, self.crop)
        return torch.from_numpy(pixels).unsqueeze(0), torch.from_numpy(self.cache.labels[row])


def augmentation_rng(seed: int, epoch: int, row: int, draw: int = 0) -> np.random.Generator:
    """The generator of one image's augmentation: by (seed, epoch, row), and the draw number for an image
    drawn again in a weighted epoch, so each draw is augmented its own way."""
    return np.random.default_rng((seed, epoch, row) if draw == 0 else (seed, epoch, row, draw))


def center_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """The central crop×crop window, copied out of the memory map."""
    top, left = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
    return np.ascontiguousarray(image[top : top + crop, left : left + crop])


class WarpDraw(NamedTuple):
    """One image's random augmentation: crop corner, rotation, scale, shift and horizontal flip."""

    top: int
    left: int
    angle: float  # radians
    scale: float
    shift_x: float  # pixels
    shift_y: float
    flip: float  # -1.0 mirrors the image horizontally, 1.0 keeps it


def draw_warp(size: int, crop: int, aug: Augmentation, rng: np.random.Generator) -> WarpDraw:
    """The augmentation of one size×size image cropped to crop×crop, drawn from `rng` in a fixed order."""
    top, left = rng.integers(0, size - crop + 1, size=2)
    angle = math.radians(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg))
    scale = rng.uniform(*aug.scale)
    shift = rng.uniform(-aug.max_shift, aug.max_shift, size=2) * crop
    flip = -1.0 if aug.flip and rng.random() < 0.5 else 1.0
    return WarpDraw(int(top), int(left), angle, float(scale), float(shift[0]), float(shift[1]), flip)


def warp_matrices(draws: list[WarpDraw], crop: int) -> np.ndarray:
    """float64 [B, 2, 3] mapping each output pixel (x, y) to its input pixel (cv2's WARP_INVERSE_MAP).

    input = centre_in + R·S⁻¹·F·(output - centre_out): rotation, scale and flip about the crop's centre,
    which sits at the crop corner plus half a crop, plus the shift.
    """
    top, left, angle, scale, shift_x, shift_y, flip = np.array(draws, dtype=np.float64).reshape(-1, 7).T
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    linear = np.stack([np.stack([c * flip, -s], -1), np.stack([s * flip, c], -1)], -2)  # [B, 2, 2]
    half = (crop - 1) / 2
    centre_in = np.stack([left + half + shift_x, top + half + shift_y], -1)
    offset = centre_in - linear @ np.array([half, half])
    return np.concatenate([linear, offset[:, :, None]], -1)


def augment(image: np.ndarray, crop: int, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Random crop + flip + rotation/scale/shift as one affine warp into a crop×crop output."""
    matrix = warp_matrices([draw_warp(image.shape[0], crop, aug, rng)], crop)[0]
    return cv2.warpAffine(
        np.asarray(image),
        matrix,
        (crop, crop),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


class EpochSampler(Sampler[tuple[int, int, int]]):
    """Yields `(epoch, index, draw)` for a dataset's current epoch, shuffled by (seed, epoch) when asked;
    `draw` is 0 but for an item drawn again.

    With `weights` (dataset name → weight) an epoch is instead a draw with replacement, by (seed, epoch), of
    as many items as the dataset has, each dataset's images together drawn `weights[d] / sum(weights)` of
    the time, evenly among them (`draw_probabilities`); an item's k-th draw of the epoch has `draw` k.

    It runs in the main process and reads `dataset.epoch` when an epoch's iteration starts, so the epoch
    reaches worker processes with every index, persistent workers included.
    """

    def __init__(
        self, dataset: ShardDataset, shuffle: bool, seed: int, weights: Mapping[str, float] | None = None
    ):
        if weights and not shuffle:
            raise ValueError("dataset weights draw a random epoch: they need shuffle")
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.probabilities = draw_probabilities(dataset_names(dataset), weights) if weights else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        epoch, n = self.dataset.epoch, len(self.dataset)
        rng = np.random.default_rng((self.seed, epoch))
        draws = np.zeros(n, dtype=np.int64)
        if self.probabilities is not None:
            order = rng.choice(n, size=n, p=self.probabilities)
            draws = occurrences(order)
        else:
            order = rng.permutation(n) if self.shuffle else np.arange(n)
        return ((epoch, int(i), int(k)) for i, k in zip(order, draws, strict=True))


def occurrences(order: np.ndarray) -> np.ndarray:
    """For each position, how often its item came earlier in `order` (0 at its first)."""
    sorter = np.argsort(order, kind="stable")
    ranked = order[sorter]
    starts = np.r_[0, np.flatnonzero(ranked[1:] != ranked[:-1]) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    counts = np.empty(len(order), dtype=np.int64)
    counts[sorter] = np.arange(len(order)) - first
    return counts


def dataset_names(dataset: ShardDataset) -> np.ndarray:
    """The dataset each item comes from: the cache's `dataset` column, or `nih` for a cache without one
    (an NIH catalog's)."""
    meta = dataset.cache.meta
    if DATASET_COLUMN not in meta.columns:
        return np.full(len(dataset), SINGLE_DATASET, dtype=object)
    return meta[DATASET_COLUMN].astype(str).to_numpy()[dataset.rows]


def draw_probabilities(names: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
    """Each item's probability of a draw, `weights[d] / sum(weights) / count(d)` for an item of dataset
    `d`; every dataset among `names` needs a weight (0 leaves it out), and no other may have one."""
    present, counts = np.unique(names, return_counts=True)
    problems = [
        f"{what} {sorted(which)}"
        for what, which in (
            ("no weight for", set(present.tolist()) - set(weights)),
            ("no training image from", set(weights) - set(present.tolist())),
        )
        if which
    ]
    if problems:
        raise ValueError(
            f"dataset_weights must weigh exactly the datasets of the training images {present.tolist()}: "
            + "; ".join(problems)
        )
    values = np.array([float(weights[name]) for name in present])
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ValueError(f"dataset_weights must be finite, non-negative and not all 0: {dict(weights)}")
    per_item = values / values.sum() / counts
    return per_item[np.searchsorted(present, names)]


def global_batch_sizes(n: int, batch_size: int, world_size: int = 1) -> list[int]:
    """Sizes of an epoch's global batches over `n` items: full batches, then the remainder unless it has
    fewer items than there are processes (every process needs at least one image a step)."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    return [size for size in sizes if size >= world_size]


def rank_share(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Process `rank`'s contiguous part of a global batch; parts differ in size by at most one item."""
    return np.array_split(batch, world_size)[rank]


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Process `rank`'s share of each global batch of `batch_size` items, in `EpochSampler`'s order
    (drawn by dataset `weights` when given).

    The global batches are the same whatever `world_size`: consecutive runs of the epoch's order, the last
    one partial (`global_batch_sizes`); each process takes its `rank_share` of every one.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: Mapping[str, float] | None = None,
    ):
        if not 0 <= rank < world_size or batch_size < world_size:
            raise ValueError(
                f"a global batch of {batch_size} cannot be shared by rank {rank} of {world_size}"
            )
        self.order = EpochSampler(dataset, shuffle, seed, weights)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def global_batch_sizes(self) -> list[int]:
        """Sizes of this epoch's global batches (summed over every process)."""
        return global_batch_sizes(len(self.order), self.batch_size, self.world_size)

    def __len__(self) -> int:
        return len(self.global_batch_sizes())

    def __iter__(self):
        items = np.array(list(self.order), dtype=np.int64).reshape(-1, 3)  # (epoch, index, draw) rows
        for start, size in zip(
            range(0, len(items), self.batch_size), self.global_batch_sizes(), strict=False
        ):
            share = rank_share(items[start : start + size], self.rank, self.world_size)
            yield [(int(epoch), int(index), int(draw)) for epoch, index, draw in share]


def make_loader(
    dataset: ShardDataset,
    batch_size: int = 32,
    shuffle: bool = False,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    weights: Mapping[str, float] | None = None,
) -> DataLoader:
    """A DataLoader over a shard dataset: persistent workers, order and augmentation set by `set_epoch`;
    `batch_size` is the global batch, of which process `rank` of `world_size` reads its share; `weights`
    draw each epoch by dataset (`EpochSampler`)."""
    return DataLoader(
        dataset,
        batch_sampler=GlobalBatchSampler(dataset, batch_size, shuffle, seed, rank, world_size, weights),
        generator=torch.Generator().manual_seed(seed),  # worker seeds never draw from the global RNG
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
