"""Scoring many cache rows with the fastest verified backend, batch by batch, with progress in the log.

On a GPU the network runs there (in float32, as served). On a CPU it runs as the ONNX
Runtime export of the serving graph (about 3× eager PyTorch on 2 cores) once that export agrees with
PyTorch on a probe batch within `ONNX_TOLERANCE`; otherwise, and for sets too small to repay the export,
as eager PyTorch. Evaluation, the monitoring baseline, validation during training and re-scoring
production all score through here.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.data.loader import ShardDataset, make_loader
from cxr.model import CXRNet
from cxr.ood import APPEARANCE_DIM, appearance_features
from cxr.package import ONNX_TOLERANCE
from cxr.progress import Progress
from cxr.serve.predictor import Predictor, ServingNet, export_onnx, onnx_session

log = logging.getLogger(__name__)
ONNX_MIN_IMAGES = 1000  # below this, exporting the graph costs more time than it saves
BATCH = 64
PROBE = 16  # images the export is checked on before it scores anything


class NetPredictor:
    """An in-memory network on a device (CUDA when present), in float32 as served: uint8 batches →
    (probabilities, embeddings)."""

    backend = "torch"
    concurrency = 1

    def __init__(self, model: CXRNet, device: torch.device | str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metadata: dict[str, Any] = {}
        self.net = ServingNet(model.to(self.device).eval())

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        probs, embedding = self.net(images)
        return probs.cpu().numpy(), embedding.cpu().numpy()


class OnnxNetPredictor:
    """An exported serving graph under ONNX Runtime on the CPU."""

    backend = "onnx"
    concurrency = 1

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = onnx_session(path, threads)
        self.metadata: dict[str, Any] = {}

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, embedding = self.session.run(None, {"images": np.ascontiguousarray(batch)})
        return probs, embedding


@dataclass
class Scores:
    """Per-row outputs in the dataset's order; embeddings and the inputs' `cxr.ood.appearance_features`
    only when asked for."""

    probabilities: np.ndarray
    embeddings: np.ndarray | None = None
    appearances: np.ndarray | None = None


def fastest_predictor(
    model: CXRNet, dataset: ShardDataset, work_dir: str | Path, min_images: int = ONNX_MIN_IMAGES
) -> tuple[Predictor, dict[str, Any]]:
    """The backend to score `dataset` with, and why: the GPU; else a verified ONNX export (written to
    `work_dir`) when the set has at least `min_images`; else eager PyTorch on the CPU."""
    reference = NetPredictor(model)
    if reference.device.type == "cuda":
        return reference, {"backend": "torch", "device": "cuda"}
    if len(dataset) < min_images or not len(dataset):
        return reference, {"backend": "torch", "device": "cpu", "reason": f"{len(dataset)} images"}
    try:
        path = export_onnx(model.eval(), dataset.crop, Path(work_dir) / "score.onnx")
        onnx = OnnxNetPredictor(path)
    except ImportError:
        return reference, {"backend": "torch", "device": "cpu", "reason": "onnxruntime is not installed"}
    probe = np.stack([dataset[i][0].numpy() for i in range(min(PROBE, len(dataset)))])
    diff = float(np.abs(onnx.predict(probe)[0] - reference.predict(probe)[0]).max())
    if diff > ONNX_TOLERANCE:
        log.warning("ONNX export differs from PyTorch by %.2e on a probe batch; scoring with PyTorch", diff)
        return reference, {"backend": "torch", "device": "cpu", "reason": f"ONNX differs by {diff:.2e}"}
    return onnx, {"backend": "onnx", "device": "cpu", "probe_max_abs_diff": diff}


def score(
    predictor: Predictor, dataset: ShardDataset, label: str = "scoring", embeddings: bool = False,
    batch_size: int = BATCH, progress: bool = True, appearances: bool = False,
) -> Scores:  # fmt: skip
    """Probabilities (and embeddings, input appearances) of every row of `dataset`, logging progress."""
    probs: list[np.ndarray] = []
    embeds: list[np.ndarray] = []
    looks: list[np.ndarray] = []
    with Progress(label, len(dataset), enabled=progress) as bar:
        for images, _ in make_loader(dataset, batch_size=batch_size):
            p, e = predictor.predict(images.numpy())
            probs.append(np.asarray(p, dtype=np.float32))
            if embeddings:
                embeds.append(np.asarray(e, dtype=np.float32))
            if appearances:
                looks.append(appearance_features(images.numpy()))
            bar.update(len(images))
    return Scores(
        _joined(probs, 14) if probs else np.zeros((0, 14), dtype=np.float32),
        _joined(embeds, 512) if embeddings else None,
        _joined(looks, APPEARANCE_DIM) if appearances else None,
    )


def _joined(parts: list[np.ndarray], width: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)


def score_fast(
    model: CXRNet, dataset: ShardDataset, label: str = "scoring", min_images: int = ONNX_MIN_IMAGES,
    progress: bool = True,
) -> Scores:  # fmt: skip
    """`score` with `fastest_predictor`: probabilities of every row of `dataset`."""
    with tempfile.TemporaryDirectory() as work:
        predictor, choice = fastest_predictor(model, dataset, work, min_images)
        log.info("%s: %d images with %s", label, len(dataset), choice)
        return score(predictor, dataset, label, progress=progress)
