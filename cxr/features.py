"""Compact per-image features for drift monitoring, computed at serving time and stored with the capture.

Image statistics describe the input distribution; a fixed random projection of the model's 512-d
penultimate embedding describes what the model sees. The projection is seeded, so any process (the
server, the monitor, a notebook) reproduces it exactly.
"""

from __future__ import annotations

import functools

import numpy as np

EMBEDDING_DIM = 512
PROJECTED_DIM = 32
PROJECTION_SEED = 20170101


@functools.lru_cache(maxsize=4)
def projection_matrix(
    in_dim: int = EMBEDDING_DIM, out_dim: int = PROJECTED_DIM, seed: int = PROJECTION_SEED
) -> np.ndarray:
    """The fixed Gaussian random projection (Johnson–Lindenstrauss scaling), in_dim × out_dim."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((in_dim, out_dim)) / np.sqrt(out_dim)).astype(np.float32)


def project_embedding(embeddings: np.ndarray) -> np.ndarray:
    """[N, 512] embeddings → [N, 32] projections."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings @ projection_matrix(embeddings.shape[1])


def image_stats(pixels: np.ndarray) -> dict[str, float]:
    """Intensity statistics of an 8-bit grayscale image (as the model's input sees it)."""
    values = np.asarray(pixels, dtype=np.float32)
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {
        "mean": round(float(values.mean()), 3),
        "std": round(float(values.std()), 3),
        "p5": float(p5),
        "p50": float(p50),
        "p95": float(p95),
        "dark_fraction": round(float((values < 16).mean()), 5),
        "bright_fraction": round(float((values > 239).mean()), 5),
    }
