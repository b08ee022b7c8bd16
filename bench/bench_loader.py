"""P2: training loader img/s from shards with augmentation vs the naive per-epoch PNG loader, same cores.

Both go through a torch DataLoader with the same number of worker processes (all cores) and batch size;
the naive dataset decodes the real 1024² PNG, converts to RGB, resizes to 224 and normalises, every epoch.
"""

from __future__ import annotations

import os
import tempfile

import torch
from common import IMAGES, naive_item, rate
from torch.utils.data import DataLoader, Dataset

from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.data.loader import ShardDataset, make_loader


class NaiveDataset(Dataset):
    """The reference loader: one PNG decode per item per epoch."""

    def __init__(self, copies: int):
        self.blobs = [path.read_bytes() for path in IMAGES] * copies

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(naive_item(self.blobs[index]))


def main() -> None:
    cores = os.cpu_count() or 1
    catalog, _ = load_catalog(IMAGES[0].parents[2])
    with tempfile.TemporaryDirectory() as root:
        cache = build_cache(catalog, PreprocessSettings(), root=root, workers=cores, progress=False)
        rows = torch.arange(len(cache)).repeat(40).numpy()  # 4,800 items an epoch
        ours = make_loader(ShardDataset(cache, rows, train=True), batch_size=64, shuffle=True, workers=cores)
        naive = DataLoader(NaiveDataset(copies=1), batch_size=64, shuffle=True, num_workers=cores)

        def epoch(loader) -> int:
            return sum(len(batch[0]) if isinstance(batch, list) else len(batch) for batch in loader)

        ours_rates, naive_rates = [], []
        for _ in range(2):
            ours_rates.append(rate(lambda: epoch(ours), 3.0))
            naive_rates.append(rate(lambda: epoch(naive), 3.0))
    best_ours, best_naive = max(ours_rates), max(naive_rates)
    print(f"cores/workers: {cores}, batch 64, crop 224 from 256 cache, augmentation on")
    print(f"cxr shard loader  {best_ours:9.1f} img/s")
    print(f"naive PNG loader  {best_naive:9.1f} img/s")
    print(f"P2: {best_ours / best_naive:.1f}x naive PNG loader img/s, shards + augmentation (target 50x)")


if __name__ == "__main__":
    main()
