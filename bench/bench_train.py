"""P5: training img/s fed by real data, against the same model on synthetic in-memory tensors.

Three contenders do identical optimizer steps, interleaved in one process:
- synthetic: the compute ceiling, one uint8 batch already on the device, reused every step;
- loader: the shard cache built from the real NIH PNGs, augmented by the DataLoader's workers with OpenCV
  (pinned memory and non-blocking copies on CUDA);
- device: the same cache resident on the device, augmented there by batched grid sampling
  (`cxr.data.device_augment`), the same crops, flips, rotations, scales and shifts.
On CUDA: bf16 autocast, channels_last, optionally torch.compile (--compile). `--paths` picks the real
data paths (default both). The P5 lines give each path's ratio to the ceiling (target 0.95x) and, on an
H100 or H200, the best real-data img/s against the per-GPU target.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import numpy as np
import torch
from common import IMAGES
from torch import nn

from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.data.device_augment import DeviceCache, DeviceLoader
from cxr.data.loader import ShardDataset, make_loader
from cxr.train import TrainConfig, _autocast, _optimizer, build_model, pick_device

LABELS = {
    "synthetic": "synthetic in-memory tensors",
    "loader": "the real shard loader",
    "device": "the device data path",
}
PATHS = ("loader", "device")
TARGET_RATIO = 0.95
TARGET_IMG_S = {"H200": 5000, "H100": 4000}  # DenseNet121, 224 crops, bf16, per GPU


def steps_per_second(model, batches, optimizer, device, steps: int, warmup: int) -> float:
    """Optimizer steps per second over `steps` steps after `warmup` untimed ones."""
    criterion = nn.BCEWithLogitsLoss()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        images, labels = next(batches)
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, True):
            loss = criterion(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return steps / (time.perf_counter() - start)


def batches_per_second(batches, device, steps: int, warmup: int) -> float:
    """Batches per second a data path delivers on its own, with no model to feed."""
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        next(batches)
    sync(device)
    return steps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic(batch: int, device: torch.device):
    """The compute ceiling: one uint8 batch already on the device, reused every step."""
    fixed = (
        torch.randint(0, 256, (batch, 1, 224, 224), dtype=torch.uint8, device=device),
        torch.randint(0, 2, (batch, 14), device=device).float(),
    )
    while True:
        yield fixed


def forever(loader, dataset: ShardDataset):
    """A loader's batches epoch after epoch, each epoch announced to the dataset as training does."""
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        yield from loader


def report(rates: dict[str, float], device: torch.device, setting: str) -> None:
    """img/s of each contender, then the P5 lines."""
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"device: {name}; {setting}")
    for key, rate in rates.items():
        print(f"{LABELS[key]:28s} {rate:9.1f} img/s")
    ceiling = rates["synthetic"]
    fed = {key: rates[key] for key in PATHS if key in rates}
    for key, rate in fed.items():
        print(f"P5: {rate / ceiling:.2f}x compute ceiling, training fed by {LABELS[key]} on {name}", end="")
        print(f" (target {TARGET_RATIO}x)")
    target = next((rate for gpu, rate in TARGET_IMG_S.items() if gpu in name), None)
    if target and fed:
        best = max(fed, key=fed.__getitem__)
        print(
            f"P5: {fed[best] / target:.2f}x the {target} img/s target, {fed[best]:.0f} img/s fed by", end=""
        )
        print(f" {LABELS[best]} on {name} (target 1x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="real data paths")
    args = parser.parse_args()
    device = pick_device()
    cuda = device.type == "cuda"
    batch = args.batch_size or (128 if cuda else 16)
    steps = args.steps or (60 if cuda else 6)
    warmup = 10 if cuda else 2
    workers = args.workers if args.workers is not None else (min(12, os.cpu_count() or 1) if cuda else 0)
    torch.backends.cudnn.benchmark = cuda
    config = TrainConfig(pretrained=False, crop=224, channels_last=True, compile=args.compile, lr=1e-4)
    model = build_model(config, device)
    step_model = torch.compile(model) if args.compile else model
    optimizer = _optimizer(config, model)

    catalog, _ = load_catalog(IMAGES[0].parents[2])
    notes = []
    with tempfile.TemporaryDirectory() as root:
        cache = build_cache(catalog, PreprocessSettings(size=256), root=root, progress=False)
        rows = np.tile(np.arange(len(cache)), 200)
        contenders = {"synthetic": synthetic(batch, device)}
        if "loader" in args.paths:
            dataset = ShardDataset(cache, rows, crop=224, train=True)
            loader = make_loader(dataset, batch, shuffle=True, workers=workers, pin_memory=cuda)
            contenders["loader"] = forever(loader, dataset)
        if "device" in args.paths:
            started = time.perf_counter()
            resident = DeviceCache(cache, device=device)
            notes.append(f"{len(cache)} images onto the device in {time.perf_counter() - started:.2f} s")
            dataset = ShardDataset(cache, rows, crop=224, train=True)
            contenders["device"] = forever(DeviceLoader(dataset, resident, batch, shuffle=True), dataset)
            alone = batches_per_second(contenders["device"], device, steps, warmup) * batch
            notes.append(f"the device data path alone (no model) {alone:.0f} img/s")

        results: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(2):  # interleaved rounds against drift
            for name, batches in contenders.items():
                results[name].append(steps_per_second(step_model, batches, optimizer, device, steps, warmup))
    rates = {name: max(values) * batch for name, values in results.items()}
    report(rates, device, f"batch {batch}, crop 224, loader workers {workers}, compile {args.compile}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
