"""Per-finding uncertainty by Monte Carlo dropout over the classifier's head (Gal & Ghahramani, 2016).

The network's only dropout sits between the 512-d penultimate embedding and the last linear layer, so the
backbone runs once and only that layer is repeated: `samples` dropout masks on the embedding (kept units
scaled by 1/(1 − p), as in training), each through the last layer, the sigmoid and the package's
calibration. The uncertainty of a finding is the standard deviation of its calibrated probability over
the samples; the masks are seeded, so the same image always gets the same answer. NumPy only: it runs
beside either serving backend on the embedding they already return.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr.calibration import Calibrator, expit

SAMPLES = 30
SEED = 0


@dataclass
class HeadSampler:
    """The head's last layer (weight [K, 512], bias [K]) and dropout rate."""

    weight: np.ndarray
    bias: np.ndarray
    dropout: float
    calibrator: Calibrator | None = None

    @classmethod
    def from_package(cls, model_dir: str | Path, metadata: dict[str, Any]) -> HeadSampler:
        """The last layer read from a package's `model.pt`, with its dropout rate and calibration."""
        import torch

        state = torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)
        calibrator = Calibrator.from_dict(metadata.get("calibration"))
        return cls.from_state(state, float(metadata["dropout"]), calibrator)

    @classmethod
    def from_state(
        cls, state: dict[str, Any], dropout: float, calibrator: Calibrator | None = None
    ) -> HeadSampler:
        """The last layer of a CXRNet state dict."""
        weight, bias = (state[f"head.3.{name}"].detach().cpu().numpy() for name in ("weight", "bias"))
        return cls(weight, bias, dropout, calibrator)

    def sample(self, embeddings: np.ndarray, samples: int = SAMPLES, seed: int = SEED) -> np.ndarray:
        """Calibrated probabilities under `samples` dropout masks: [samples, N, K]."""
        embeddings = np.asarray(embeddings, dtype=np.float64)
        rng = np.random.default_rng(seed)
        keep = 1.0 - self.dropout
        masks = (rng.random((samples, embeddings.shape[1])) < keep) / keep  # one mask per sample, all images
        logits = np.einsum("nd,sd,kd->snk", embeddings, masks, self.weight) + self.bias
        probs = expit(logits)
        if self.calibrator is not None:
            probs = self.calibrator.apply(probs.reshape(-1, probs.shape[-1])).reshape(probs.shape)
        return probs

    def uncertainty(self, embeddings: np.ndarray, samples: int = SAMPLES, seed: int = SEED) -> np.ndarray:
        """Standard deviation of each finding's calibrated probability over the dropout samples: [N, K]."""
        return self.sample(embeddings, samples, seed).std(axis=0)
