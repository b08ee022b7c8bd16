"""P2: training loader img/s from shards with augmentation, against two baselines on the same workers.

All three go through a torch DataLoader with the same number of worker processes (all cores) and batch
size, and yield one training image per item:

- naive: what CheXNet reproductions do, every epoch: decode the real 1024² PNG, convert to RGB, resize to
  224 and normalise (plain DataLoader; its epoch is the 120 images, so workers start again every epoch).
  This figure is mostly what caching is worth.
- plain: the same uint8 cache read the obvious way: a Dataset that memory-maps the shards with np.load and
  applies the same augmentation (random 224 crop, flip, ±7° rotation, 0.95–1.05 scale, ±3% shift) with
  torchvision's transforms, through a DataLoader with the loader's own settings (persistent workers,
  prefetch, epoch size). This figure is what the loader's engineering is worth.
`--quick` runs a short smoke version (numbers not comparable).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import IMAGES, naive_item, rate
from torch.utils.data import DataLoader, Dataset

from cxr.data.cache import PreprocessSettings, build_cache, shard_path
from cxr.data.catalog import load_catalog
from cxr.data.loader import ShardDataset, make_loader
from cxr.torchvision_compat import import_torchvision

BATCH = 64


class NaiveDataset(Dataset):
    """The reference loader: one PNG decode per item per epoch."""

    def __init__(self, copies: int):
        self.blobs = [path.read_bytes() for path in IMAGES] * copies

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(naive_item(self.blobs[index]))


class PlainCacheDataset(Dataset):
    """The cache's files read the obvious way: np.load memory maps, torchvision augmentation, uint8 out."""

    def __init__(self, directory: Path, rows: np.ndarray, crop: int = 224):
        meta = pd.read_csv(directory / "meta.csv")
        self.directory, self.rows = directory, rows
        self.shard, self.offset = meta["shard"].to_numpy(), meta["offset"].to_numpy()
        self.labels = np.load(directory / "labels.npy")
        self.arrays: dict[int, np.ndarray] = {}
        import_torchvision()  # torchvision's own import, tolerant of a mismatched install
        from torchvision.transforms import InterpolationMode, v2

        bilinear = InterpolationMode.BILINEAR
        self.transform = v2.Compose([
            v2.RandomCrop(crop),
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=7, translate=(0.03, 0.03), scale=(0.95, 1.05),
                            interpolation=bilinear),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[index]
        shard = int(self.shard[row])
        if shard not in self.arrays:
            self.arrays[shard] = np.load(shard_path(self.directory, shard), mmap_mode="r")
        image = torch.from_numpy(np.array(self.arrays[shard][self.offset[row]]))[None]  # uint8 [1, H, W]
        return self.transform(image), torch.from_numpy(self.labels[row])


def images_in(loader: DataLoader) -> int:
    """Iterate one epoch; the number of images it yielded."""
    return sum(len(batch[0]) if isinstance(batch, list) else len(batch) for batch in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run; its numbers mean nothing")
    quick = parser.parse_args().quick
    seconds, rounds, copies = (1.0, 1, 8) if quick else (3.0, 2, 40)
    cores = os.cpu_count() or 1
    catalog, _ = load_catalog(IMAGES[0].parents[2])
    with tempfile.TemporaryDirectory() as root:
        cache = build_cache(catalog, PreprocessSettings(), root=root, workers=cores, progress=False)
        rows = np.tile(np.arange(len(cache)), copies)  # 4,800 items an epoch (960 with --quick)
        loaders = {
            "cxr shard loader": make_loader(
                ShardDataset(cache, rows, train=True), batch_size=BATCH, shuffle=True, workers=cores
            ),
            "plain Dataset over the cache": DataLoader(
                PlainCacheDataset(cache.directory, rows),
                batch_size=BATCH,
                shuffle=True,
                num_workers=cores,
                persistent_workers=True,
                prefetch_factor=4,
            ),
            "naive PNG loader": DataLoader(NaiveDataset(copies=1), BATCH, shuffle=True, num_workers=cores),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(rounds):  # interleaved, so that a busy moment hits every loader alike
            for name, loader in loaders.items():
                rates[name].append(rate(lambda loader=loader: images_in(loader), seconds))
    best = {name: max(values) for name, values in rates.items()}
    print(f"cores/workers: {cores}, batch {BATCH}, crop 224 from 256 cache, augmentation on")
    for name, value in best.items():
        print(f"{name:30s} {value:9.1f} img/s")
    ours = best["cxr shard loader"]
    print(f"P2: {ours / best['naive PNG loader']:.1f}x naive per-epoch PNG loader img/s (target 50x)")
    print(
        f"P2: {ours / best['plain Dataset over the cache']:.2f}x plain Dataset over the same uint8 cache"
        " (np.load memory maps + torchvision augmentation), same workers (target 2x)"
    )


if __name__ == "__main__":
    main()
