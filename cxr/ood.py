"""The input gate's out-of-distribution score: is an image like the chest films the model was trained on?

Two Mahalanobis distances, each to a Gaussian fitted with Ledoit–Wolf shrinkage on training images:
- `embedding`: the model's 512-d penultimate embedding — what the network makes of the image
  (the Mahalanobis detector of Lee et al., NeurIPS 2018, with no extra training);
- `appearance`: 144 numbers on what the model's input crop looks like — its 8×8 thumbnail, its 16-bin
  intensity histogram and the 8×8 map of its gradient magnitude. Chest films are aligned (lungs,
  mediastinum, diaphragm in fixed places) with a typical intensity profile, so a rotated, inverted,
  cropped or foreign image lies far from them whatever the network makes of it.
Each distance is divided by its threshold: the quantile of held-out validation images' distances above
which `refuse_rate / 2` of them lie. An image's score is the larger ratio; above 1 it is out of
distribution, so at most about `refuse_rate` of in-distribution images are refused. Scoring needs NumPy
and OpenCV only (it runs in the server); fitting needs scikit-learn.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

GRID = 8  # side of the thumbnail and of the gradient map
BINS = 16  # intensity histogram
APPEARANCE_DIM = 2 * GRID * GRID + BINS
DETECTORS = ("embedding", "appearance")
GATE_FILE = "input_gate.npz"
REASONS = {
    "embedding": "unlike the images the model was trained on (penultimate embedding)",
    "appearance": "does not look like a frontal chest radiograph (layout, intensities, edges)",
}


def appearance_features(crops: np.ndarray) -> np.ndarray:
    """uint8 model inputs [N, 1, crop, crop] (or [N, crop, crop]) → [N, 144]: 8×8 thumbnail and 16-bin
    histogram (both in [0, 1]) and the 8×8 map of the gradient magnitude."""
    crops = np.asarray(crops)
    if crops.ndim == 4:
        crops = crops[:, 0]
    out = np.empty((len(crops), APPEARANCE_DIM), dtype=np.float32)
    for i, crop in enumerate(crops):
        small = cv2.resize(crop, (8 * GRID, 8 * GRID), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        edges = np.hypot(cv2.Sobel(small, cv2.CV_32F, 1, 0), cv2.Sobel(small, cv2.CV_32F, 0, 1))
        thumbnail = cv2.resize(small, (GRID, GRID), interpolation=cv2.INTER_AREA).reshape(-1)
        histogram = np.bincount(crop.reshape(-1) >> 4, minlength=BINS) / crop.size
        edge_map = cv2.resize(edges, (GRID, GRID), interpolation=cv2.INTER_AREA).reshape(-1)
        out[i] = np.concatenate([thumbnail, histogram, edge_map])
    return out


@dataclass
class Gaussian:
    """A mean and a (shrunk) precision matrix: Mahalanobis distances to the fitted sample."""

    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, samples: np.ndarray) -> Gaussian:
        """Ledoit–Wolf shrinkage: a well-conditioned precision even with fewer samples than dimensions."""
        from sklearn.covariance import LedoitWolf

        model = LedoitWolf().fit(np.asarray(samples, dtype=np.float64))
        return cls(model.location_.astype(np.float32), model.precision_.astype(np.float32))

    def distance(self, samples: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row."""
        centred = np.asarray(samples, dtype=np.float32) - self.mean
        squared = np.einsum("ij,ij->i", centred @ self.precision, centred)
        return np.sqrt(np.maximum(squared, 0.0)).astype(np.float64)


@dataclass
class InputGate:
    """The fitted detectors with their thresholds; `score` > 1 means out of distribution."""

    detectors: dict[str, Gaussian]
    thresholds: dict[str, float]
    refuse_rate: float
    fitted_on: int = 0

    def ratios(self, embeddings: np.ndarray, crops: np.ndarray) -> dict[str, np.ndarray]:
        """Each detector's distance over its threshold, per image."""
        return self.feature_ratios(embeddings, appearance_features(crops))

    def feature_ratios(self, embeddings: np.ndarray, appearances: np.ndarray) -> dict[str, np.ndarray]:
        """`ratios` from embeddings and `appearance_features` computed beforehand."""
        inputs = {"embedding": embeddings, "appearance": appearances}
        return {name: g.distance(inputs[name]) / self.thresholds[name] for name, g in self.detectors.items()}

    def score(self, embeddings: np.ndarray, crops: np.ndarray) -> np.ndarray:
        """The out-of-distribution score per image: the largest ratio (> 1: out of distribution)."""
        return self.feature_score(embeddings, appearance_features(crops))

    def feature_score(self, embeddings: np.ndarray, appearances: np.ndarray) -> np.ndarray:
        """`score` from embeddings and `appearance_features` computed beforehand."""
        return np.max(np.stack(list(self.feature_ratios(embeddings, appearances).values())), axis=0)

    def verdicts(self, embeddings: np.ndarray, crops: np.ndarray) -> list[dict[str, Any]]:
        """Per image: score, verdict and the reasons (which detectors exceeded their thresholds)."""
        ratios = self.ratios(embeddings, crops)
        out = []
        for i in range(len(embeddings)):
            score = max(float(r[i]) for r in ratios.values())
            reasons = [f"{REASONS[name]}: {float(r[i]):.2f}× its threshold" for name, r in ratios.items()
                       if r[i] > 1.0]  # fmt: skip
            verdict = "out_of_distribution" if reasons else "in_distribution"
            out.append({"score": round(score, 4), "verdict": verdict, "reasons": reasons})
        return out

    def save(self, path: str | Path) -> Path:
        """Write the gate as one .npz (means, precisions, thresholds)."""
        arrays: dict[str, Any] = {"refuse_rate": np.float64(self.refuse_rate), "fitted_on": self.fitted_on}
        for name, gaussian in self.detectors.items():
            arrays[f"{name}_mean"], arrays[f"{name}_precision"] = gaussian.mean, gaussian.precision
            arrays[f"{name}_threshold"] = np.float64(self.thresholds[name])
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        Path(path).write_bytes(buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> InputGate:
        """The gate written by `save`."""
        with np.load(path, allow_pickle=False) as data:
            detectors = {n: Gaussian(data[f"{n}_mean"], data[f"{n}_precision"]) for n in DETECTORS}
            thresholds = {n: float(data[f"{n}_threshold"]) for n in DETECTORS}
            return cls(detectors, thresholds, float(data["refuse_rate"]), int(data["fitted_on"]))


def fit_input_gate(
    train_embeddings: np.ndarray,
    train_crops: np.ndarray,
    val_embeddings: np.ndarray,
    val_crops: np.ndarray,
    refuse_rate: float = 0.01,
) -> InputGate:
    """Gaussians on training images; thresholds on held-out validation images, so that each detector
    refuses `refuse_rate / 2` of them (and both together at most `refuse_rate`)."""
    return fit_from_features(
        train_embeddings,
        appearance_features(train_crops),
        val_embeddings,
        appearance_features(val_crops),
        refuse_rate,
    )


def fit_from_features(
    train_embeddings: np.ndarray,
    train_appearances: np.ndarray,
    val_embeddings: np.ndarray,
    val_appearances: np.ndarray,
    refuse_rate: float = 0.01,
) -> InputGate:
    """`fit_input_gate` from embeddings and `appearance_features` computed beforehand."""
    if not 0 < refuse_rate < 1:
        raise ValueError(f"refuse_rate must be in (0, 1), not {refuse_rate}")
    train = {"embedding": train_embeddings, "appearance": train_appearances}
    held_out = {"embedding": val_embeddings, "appearance": val_appearances}
    detectors = {name: Gaussian.fit(samples) for name, samples in train.items()}
    quantile = 1 - refuse_rate / 2
    thresholds = {name: float(np.quantile(g.distance(held_out[name]), quantile))
                  for name, g in detectors.items()}  # fmt: skip
    return InputGate(detectors, thresholds, refuse_rate, len(train_embeddings))
