"""P5: training img/s fed by the real shard loader vs the same model on synthetic in-memory tensors.

The synthetic run is the compute ceiling: one uint8 batch already on the device, reused every step.
The real run reads the shard cache built from the real NIH PNGs, with augmentation, through the
DataLoader (pinned memory and non-blocking copies on CUDA). Both do identical optimizer steps, side by
side in one process. On CUDA: bf16 autocast, channels_last, optionally torch.compile (--compile).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from common import IMAGES
from torch import nn

from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.data.loader import ShardDataset, make_loader
from cxr.train import TrainConfig, _autocast, build_model, pick_device


def steps_per_second(model, batches, optimizer, device, steps: int, warmup: int) -> float:
    """Optimizer steps per second over `steps` steps after `warmup` untimed ones."""
    criterion = nn.BCEWithLogitsLoss()
    iterator = iter(batches)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images, labels = next(iterator)
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, True):
            loss = criterion(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def forever(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = pick_device()
    cuda = device.type == "cuda"
    batch = args.batch_size or (128 if cuda else 16)
    steps = args.steps or (60 if cuda else 6)
    workers = args.workers if args.workers is not None else (min(12, os.cpu_count() or 1) if cuda else 0)
    torch.backends.cudnn.benchmark = cuda
    config = TrainConfig(pretrained=False, crop=224, channels_last=True, compile=args.compile)
    model = build_model(config, device)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    catalog, _ = load_catalog(IMAGES[0].parents[2])
    with tempfile.TemporaryDirectory() as root:
        cache = build_cache(catalog, PreprocessSettings(size=256), root=root, progress=False)
        rows = np.tile(np.arange(len(cache)), 200)
        loader = make_loader(
            ShardDataset(cache, rows, crop=224, train=True),
            batch,
            shuffle=True,
            workers=workers,
            pin_memory=cuda,
        )
        fixed = (
            torch.randint(0, 256, (batch, 1, 224, 224), dtype=torch.uint8, device=device),
            torch.randint(0, 2, (batch, 14), device=device).float(),
        )

        def synthetic():
            while True:
                yield fixed

        warmup = 10 if cuda else 2
        results = {"synthetic": [], "loader": []}
        for _ in range(2):  # interleaved rounds against drift
            results["synthetic"].append(
                steps_per_second(step_model, synthetic(), optimizer, device, steps, warmup)
            )
            results["loader"].append(
                steps_per_second(step_model, forever(loader), optimizer, device, steps, warmup)
            )
    ceiling, fed = max(results["synthetic"]) * batch, max(results["loader"]) * batch
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch {batch}, crop 224, loader workers {workers}, compile {args.compile}")
    print(f"synthetic in-memory tensors {ceiling:9.1f} img/s (compute ceiling)")
    print(f"real shard loader           {fed:9.1f} img/s")
    print(
        f"P5: {fed / ceiling:.2f}x compute ceiling, training fed by the real loader on {name} (target 0.9x)"
    )


if __name__ == "__main__":
    main()
