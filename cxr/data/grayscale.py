"""Pixel values of any depth → 8-bit gray, a block of rows at a time so memory stays near the output's.

`window_to_uint8` maps a value range linearly onto 0..255 (clipping outside it); `stretch_to_uint8` uses
the image's own darkest and brightest values as that range (values already within 0..255 are kept);
`stored_depth_to_uint8` maps the range of the bit depth the values were stored with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

BLOCK_PIXELS = 1 << 20  # ~1 MP per block: float64 temporaries of a few MB whatever the image size


def row_blocks(values: np.ndarray) -> Iterator[slice]:
    """Slices of whole rows covering `values`, each about BLOCK_PIXELS pixels."""
    per_row = max(1, int(np.prod(values.shape[1:], dtype=np.int64)))
    step = max(1, BLOCK_PIXELS // per_row)
    for start in range(0, values.shape[0], step):
        yield slice(start, start + step)


def window_to_uint8(
    values: np.ndarray,
    low: float,
    high: float,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Map [low, high] linearly onto 0..255, after an optional pointwise `transform` of the values."""
    shape = values.shape[1:] if transform is None else transform(values[:1]).shape[1:]
    out = np.empty((values.shape[0], *shape), np.uint8)
    scale = 255.0 / max(high - low, 1e-12)
    for rows in row_blocks(values):
        block = values[rows] if transform is None else transform(values[rows])
        block = np.nan_to_num(np.asarray(block, dtype=np.float64), nan=low)
        out[rows] = (np.clip((block - low) * scale, 0.0, 255.0)).round()
    return out


def value_range(values: np.ndarray) -> tuple[float, float]:
    """The smallest and largest finite value; ValueError when there is none."""
    if np.issubdtype(values.dtype, np.integer):
        return float(values.min()), float(values.max())
    low, high = np.inf, -np.inf
    for rows in row_blocks(values):
        finite = values[rows][np.isfinite(values[rows])]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if low > high:
        raise ValueError("no finite values")
    return low, high


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """The image's own value range onto 0..255; values already within 0..255 are kept as they are."""
    low, high = value_range(values)
    if low >= 0 and high <= 255:
        low, high = 0.0, 255.0
    return window_to_uint8(values, low, high)


STORED_DEPTHS = (8, 10, 12, 14, 16)


def stored_depth(values: np.ndarray) -> int:
    """The smallest common stored bit depth (8, 10, 12, 14 or 16) that holds the brightest value."""
    brightest = int(values.max())
    return next((bits for bits in STORED_DEPTHS if brightest < 2**bits), STORED_DEPTHS[-1])


def stored_depth_to_uint8(values: np.ndarray) -> np.ndarray:
    """Unsigned integers stored with fewer bits than their type (12-bit data in 16-bit words): the
    stored range 0 .. 2**depth - 1 onto 0..255, so the image keeps the brightness it was stored with."""
    return window_to_uint8(values, 0.0, float(2 ** stored_depth(values) - 1))
