"""Post-hoc calibration per finding: fitted on validation, shipped in the package, applied wherever the
model answers (the server with either backend, the SageMaker handlers, evaluation).

Two maps from the network's probability to a calibrated one:
- temperature scaling: `sigmoid(logit(p) / T)`, one T per finding; monotone and strictly increasing, so
  the ranking (and AUROC) is unchanged;
- isotonic regression: a monotone piecewise-linear map; fixes any monotone miscalibration but ties
  scores, so AUROC can move a little.
`method="auto"` chooses per finding by 2-fold cross-fitting on the validation set: the map with the lower
held-out log loss. Everything is stored as plain JSON (`to_dict`) in the package's metadata; applying it
needs NumPy only (it runs inside serving containers), fitting needs SciPy and scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr.data.findings import FINDINGS

METHODS = ("auto", "temperature", "isotonic", "none")
EPS = 1e-7  # bounds of isotonic outputs and of log-loss terms
LOGIT_EPS = 1e-15  # probabilities are clipped this far from 0 and 1 before the logit (float64)


@dataclass
class Calibrator:
    """One map per finding, in FINDINGS order: {"method": "temperature", "temperature": T},
    {"method": "isotonic", "x": [...], "y": [...]} or {"method": "none"}."""

    maps: list[dict[str, Any]] = field(default_factory=lambda: [{"method": "none"} for _ in FINDINGS])

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [N, 14] (float64) from the network's."""
        probs = np.asarray(probs, dtype=np.float64)
        out = np.empty_like(probs)
        for k, entry in enumerate(self.maps):
            out[:, k] = apply_map(entry, probs[:, k])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"findings": [...], "maps": [...]}."""
        return {"findings": list(FINDINGS), "maps": self.maps}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibrator:
        """The calibrator stored by `to_dict` (None: the identity)."""
        if not data:
            return cls()
        if list(data.get("findings", FINDINGS)) != list(FINDINGS):
            raise ValueError("calibration was fitted for other findings")
        return cls([dict(m) for m in data["maps"]])

    @property
    def methods(self) -> dict[str, str]:
        """The map chosen per finding."""
        return {f: m["method"] for f, m in zip(FINDINGS, self.maps, strict=True)}


def apply_map(entry: dict[str, Any], p: np.ndarray) -> np.ndarray:
    """One finding's map applied to its probabilities."""
    method = entry["method"]
    if method == "temperature":
        return expit(logit(np.clip(p, LOGIT_EPS, 1 - LOGIT_EPS)) / entry["temperature"])
    if method == "isotonic":
        return np.interp(p, entry["x"], entry["y"])
    if method == "none":
        return p
    raise ValueError(f"unknown calibration method {method!r}")


def expit(z: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow."""
    return np.exp(-np.logaddexp(0.0, -z))


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p))."""
    return np.log(p) - np.log1p(-p)


def fit_temperature(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """The temperature minimising the log loss of `sigmoid(logit(p) / T)` on (y, p)."""
    from scipy.optimize import minimize_scalar

    z = logit(np.clip(np.asarray(p, dtype=np.float64), LOGIT_EPS, 1 - LOGIT_EPS))
    y = np.asarray(y, dtype=np.float64)

    def loss(log_t: float) -> float:
        return log_loss(y, expit(z / np.exp(log_t)))

    best = minimize_scalar(loss, bounds=(-4.0, 4.0), method="bounded")
    return {"method": "temperature", "temperature": float(np.exp(best.x))}


def fit_isotonic(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """A monotone map fitted on (y, p), stored as its breakpoints."""
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=EPS, y_max=1 - EPS, out_of_bounds="clip").fit(p, y)
    return {"method": "isotonic", "x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}


FITTERS = {"temperature": fit_temperature, "isotonic": fit_isotonic}


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary log loss."""
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def choose_method(y: np.ndarray, p: np.ndarray, seed: int = 0) -> str:
    """The map with the lower log loss on held-out halves (2-fold cross-fitting)."""
    fold = np.random.default_rng(seed).permutation(len(y)) % 2 == 0
    losses = {}
    for name, fitter in FITTERS.items():
        total = 0.0
        for train in (fold, ~fold):
            if not 0 < y[train].sum() < train.sum():
                return "temperature"  # too few positives to compare: the one-parameter map
            total += log_loss(y[~train], apply_map(fitter(y[train], p[train]), p[~train]))
        losses[name] = total
    return min(losses, key=losses.__getitem__)


def fit_calibration(labels: np.ndarray, probs: np.ndarray, method: str = "auto", seed: int = 0) -> Calibrator:
    """Per-finding maps fitted on validation labels and probabilities ([N, 14] each; NaN labels left out)."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, not {method!r}")
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    maps = []
    for k in range(len(FINDINGS)):
        known = ~np.isnan(labels[:, k])  # images whose dataset labels the finding
        y, p = labels[known, k], probs[known, k]
        if method == "none" or not 0 < y.sum() < len(y):
            maps.append({"method": "none"})
            continue
        chosen = choose_method(y, p, seed) if method == "auto" else method
        maps.append(FITTERS[chosen](y, p))
    return Calibrator(maps)


class CalibratedPredictor:
    """A predictor (see `cxr.serve.predictor.Predictor`) whose probabilities go through a calibrator;
    embeddings pass unchanged."""

    def __init__(self, predictor: Any, calibrator: Calibrator):
        self.predictor, self.calibrator = predictor, calibrator
        self.backend, self.metadata = predictor.backend, predictor.metadata
        self.concurrency = getattr(predictor, "concurrency", 1)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, embedding = self.predictor.predict(batch)
        return self.calibrator.apply(probs).astype(np.float32), embedding


def calibration_summary(calibrator: Calibrator, labels: np.ndarray, raw_probs: np.ndarray) -> dict[str, Any]:
    """Methods chosen and expected calibration error before and after, pooled and per finding."""
    from cxr.evaluate import calibration

    after = calibrator.apply(raw_probs)
    per_finding = {
        f: {"method": calibrator.maps[k]["method"],
            "ece_before": calibration(labels[:, k], raw_probs[:, k])[0],
            "ece_after": calibration(labels[:, k], after[:, k])[0]}
        for k, f in enumerate(FINDINGS)
    }  # fmt: skip
    return {"ece_before": calibration(labels, raw_probs)[0], "ece_after": calibration(labels, after)[0],
            "per_finding": per_finding}  # fmt: skip
