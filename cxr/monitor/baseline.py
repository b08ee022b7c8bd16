"""The monitoring baseline, computed at evaluation time from held-out (validation and test) images.

It holds samples (capped) of exactly the features the server captures — image statistics of the model's
input crop, the 32-d projection of the penultimate embedding — and the per-finding probabilities, plus
positive rates at the registered thresholds and the baseline AUROC. It is written as `baseline.npz`
(samples) with Model Monitor-style `statistics.json` and `constraints.json` beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr.data.cache import ShardCache
from cxr.data.findings import FINDINGS
from cxr.data.loader import ShardDataset, make_loader
from cxr.features import image_stats, project_embedding
from cxr.model import CXRNet
from cxr.ood import InputGate
from cxr.progress import Progress
from cxr.serve.predictor import Predictor
from cxr.uncertainty import HeadSampler

IMAGE_FEATURES = ("mean", "std", "p5", "p50", "p95", "dark_fraction", "bright_fraction")
MAX_SAMPLES = 2000
FILES = ("baseline.npz", "statistics.json", "constraints.json")


@dataclass
class Baseline:
    """Reference samples: image stats [N, 7], embedding projections [N, 32], probabilities [N, 14]."""

    image: np.ndarray
    embedding: np.ndarray
    probabilities: np.ndarray
    thresholds: dict[str, float] = field(default_factory=dict)
    auroc: dict[str, float] = field(default_factory=dict)
    uncertainty: np.ndarray | None = None  # [N, 14] MC-dropout spread, as `?uncertainty=true` answers it
    gate_scores: np.ndarray | None = None  # [N] the input gate's score, when the package has a gate

    @property
    def positive_rates(self) -> np.ndarray:
        """Share of baseline images above each finding's threshold."""
        cut = np.array([self.thresholds.get(f, 0.5) for f in FINDINGS])
        return (self.probabilities >= cut).mean(axis=0)

    def save(self, directory: str | Path) -> list[Path]:
        """Write baseline.npz, statistics.json and constraints.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = self.trust_samples()
        np.savez_compressed(
            directory / "baseline.npz",
            image=self.image,
            embedding=self.embedding,
            probabilities=self.probabilities,
            thresholds=np.array(json.dumps(self.thresholds)),
            auroc=np.array(json.dumps(self.auroc)),
            **arrays,
        )
        (directory / "statistics.json").write_text(json.dumps(self.statistics(), indent=1))
        (directory / "constraints.json").write_text(json.dumps(self.constraints(), indent=1))
        return [directory / name for name in FILES]

    @classmethod
    def load(cls, directory: str | Path) -> Baseline:
        """Read a baseline written by `save`."""
        path = Path(directory) / "baseline.npz"
        if not path.is_file():
            raise FileNotFoundError(f"no monitoring baseline at {path}")
        data = np.load(path)
        optional = {name: data[name] for name in ("uncertainty", "gate_scores") if name in data.files}
        named = json.loads(str(data["thresholds"])), json.loads(str(data["auroc"]))
        return cls(data["image"], data["embedding"], data["probabilities"], *named, **optional)

    def trust_samples(self) -> dict[str, np.ndarray]:
        """The uncertainty and gate-score samples this baseline has."""
        found = {"uncertainty": self.uncertainty, "gate_scores": self.gate_scores}
        return {name: values for name, values in found.items() if values is not None}

    def columns(self) -> dict[str, np.ndarray]:
        """Every monitored feature by name (image stats, embedding dims, probabilities)."""
        named = {f"image.{n}": self.image[:, i] for i, n in enumerate(IMAGE_FEATURES)}
        named.update({f"embedding.{i}": self.embedding[:, i] for i in range(self.embedding.shape[1])})
        named.update({f"probability.{f}": self.probabilities[:, i] for i, f in enumerate(FINDINGS)})
        return named

    def statistics(self) -> dict[str, Any]:
        """SageMaker Model Monitor-shaped statistics.json."""
        features = []
        for name, values in self.columns().items():
            counts, edges = np.histogram(values, bins=10)
            buckets = [{"lower_bound": float(lo), "upper_bound": float(hi), "count": int(c)}
                       for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]  # fmt: skip
            features.append({
                "name": name,
                "inferred_type": "Fractional",
                "numerical_statistics": {
                    "common": {"num_present": len(values), "num_missing": 0},
                    "mean": float(values.mean()), "sum": float(values.sum()), "std_dev": float(values.std()),
                    "min": float(values.min()), "max": float(values.max()),
                    "distribution": {"kll": {"buckets": buckets}},
                },
            })  # fmt: skip
        return {"version": 0.0, "dataset": {"item_count": len(self.image)}, "features": features}

    def constraints(self) -> dict[str, Any]:
        """SageMaker Model Monitor-shaped constraints.json (with cxr's positive rates and AUROC)."""
        features = [{"name": n, "inferred_type": "Fractional", "completeness": 1.0} for n in self.columns()]
        rates = self.positive_rates
        return {
            "version": 0.0,
            "features": features,
            "positive_rate": {f: float(r) for f, r in zip(FINDINGS, rates, strict=True)},
            "auroc": self.auroc,
            "monitoring_config": {
                "evaluate_constraints": "Enabled",
                "emit_metrics": "Enabled",
                "distribution_constraints": {"perform_comparison": "Enabled", "comparison_method": "Robust"},
            },
        }


def compute_baseline(
    model: CXRNet | Predictor,
    cache: ShardCache,
    rows: np.ndarray,
    crop: int,
    thresholds: dict[str, float] | None = None,
    auroc: dict[str, float] | None = None,
    seed: int = 0,
    sampler: HeadSampler | None = None,
    gate: InputGate | None = None,
) -> Baseline:
    """Features of (at most MAX_SAMPLES of) the given cache rows, as the server would capture them, scored
    by `model` (a network, or any backend of `cxr.scoring`, e.g. the one evaluation chose); with the
    package's head `sampler` and input `gate`, their uncertainty and gate scores too."""
    from cxr.scoring import NetPredictor

    rows = np.asarray(rows)
    if len(rows) > MAX_SAMPLES:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_SAMPLES, replace=False))
    predictor = NetPredictor(model) if isinstance(model, CXRNet) else model
    stats, embeddings, probabilities, spread, scores = [], [], [], [], []
    with Progress("baseline", len(rows)) as bar:
        for images, _ in make_loader(ShardDataset(cache, rows, crop=crop), batch_size=64):
            probs, embedding = predictor.predict(images.numpy())
            probabilities.append(np.asarray(probs, dtype=np.float32))
            embeddings.append(project_embedding(np.asarray(embedding, dtype=np.float32)))
            if sampler is not None:
                spread.append(sampler.uncertainty(embedding))
            if gate is not None:
                scores.append(gate.score(embedding, images.numpy()))
            stats += [[image_stats(image[0].numpy())[k] for k in IMAGE_FEATURES] for image in images]
            bar.update(len(images))
    return Baseline(
        np.asarray(stats, dtype=np.float64), np.concatenate(embeddings), np.concatenate(probabilities),
        dict(thresholds or {}), dict(auroc or {}),
        np.concatenate(spread) if spread else None, np.concatenate(scores) if scores else None,
    )  # fmt: skip
