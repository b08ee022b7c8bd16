"""Capture features for records that lack them (SageMaker's own Data Capture), from a model package.

The cxr server stores image statistics and the embedding projection with each capture record; SageMaker
Data Capture stores only the request and the response. This module recomputes those features from the
captured image with the server's own code: `cxr.inference.prepare` for the model's input crop,
`cxr.serve.predictor.load_predictor` for the embedding, `cxr.features` for statistics and projection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr.features import PROJECTED_DIM, image_stats, project_embedding
from cxr.inference import prepare
from cxr.monitor.baseline import IMAGE_FEATURES
from cxr.serve.predictor import Predictor, load_predictor
from cxr.serve.resolve import model_dir

BATCH = 64


class Featurizer:
    """A packaged model (`model.tar.gz` or an unpacked directory); the network is loaded on first use."""

    def __init__(self, model: str | Path, backend: str = "auto"):
        self.directory = model_dir(model)
        self.metadata: dict[str, Any] = json.loads((self.directory / "metadata.json").read_text())
        self.backend = backend
        self._predictor: Predictor | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """What `prepare` needs (small and picklable, for parsing workers)."""
        return {"image_size": self.metadata["image_size"], "crop": self.metadata["crop"]}

    @property
    def predictor(self) -> Predictor:
        """The serving backend, as the server loads it."""
        if self._predictor is None:
            self._predictor = load_predictor(self.directory, self.backend)
        return self._predictor

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """A decoded 8-bit gray image → the model's uint8 [1, crop, crop] input."""
        return prepare(pixels, self.settings)

    def features(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 1, crop, crop] → (image stats [N, 7] in IMAGE_FEATURES order, projections [N, 32])."""
        if not len(crops):
            return np.zeros((0, len(IMAGE_FEATURES))), np.zeros((0, PROJECTED_DIM))
        stats = [[image_stats(crop)[k] for k in IMAGE_FEATURES] for crop in crops]
        embeddings = np.concatenate(
            [self.predictor.predict(crops[i : i + BATCH])[1] for i in range(0, len(crops), BATCH)]
        )
        # rounded as the server stores them in its capture records
        projections = [[round(float(v), 5) for v in row] for row in project_embedding(embeddings)]
        return np.asarray(stats, dtype=np.float64), np.asarray(projections, dtype=np.float64)


def featurize(
    images: Sequence[np.ndarray], model: str | Path, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded uint8 gray images → (image stats [N, 7], embedding projections [N, 32]), as the server
    computes them with the packaged model."""
    featurizer = Featurizer(model, backend)
    crops = np.stack([featurizer.prepare(image) for image in images]) if len(images) else np.zeros(0)
    return featurizer.features(crops)
