"""Shared pieces of the benchmarks: the real NIH images and the naive loader reference repos use."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

NIH = Path(os.environ.get("CXR_TEST_NIH", Path(__file__).resolve().parents[2] / "shared" / "nih"))
IMAGES = sorted((NIH / "images_001" / "images").glob("*.png"))
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def naive_item(data: bytes) -> np.ndarray:
    """What CheXNet reproductions do per item, every epoch: PIL open → RGB → resize 224 → normalised CHW."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224))
    array = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return array.transpose(2, 0, 1)


def rate(work: Callable[[], int], min_seconds: float = 2.0) -> float:
    """Items per second of `work` (which returns how many items it did), repeated for at least min_seconds."""
    done, start = 0, time.perf_counter()
    while True:
        done += work()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed
