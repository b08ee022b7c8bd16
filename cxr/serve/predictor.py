"""Model backends for serving: eager PyTorch, ONNX Runtime or OpenVINO (FP32, BF16, INT8), all returning
probabilities and embeddings.

All consume uint8 [B, 1, crop, crop] batches prepared exactly as evaluation prepares them (resize to the
cached size, center crop) and return (probabilities [B, 14], penultimate embeddings [B, 512]).
"""

from __future__ import annotations

import logging
import os
import queue
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cxr.calibration import CalibratedPredictor, Calibrator
from cxr.inference import load_model
from cxr.model import CXRNet
from cxr.serve.backends import AUTO_ORDER, BACKENDS, ONNX_FILE, SOURCES
from cxr.serve.openvino_backend import OpenVinoPredictor, backend_name, cpu_supports

log = logging.getLogger(__name__)


class ServingNet(nn.Module):
    """CXRNet returning (sigmoid probabilities, 512-d penultimate embedding); what ONNX export traces."""

    def __init__(self, model: CXRNet):
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,1,H,W] → (probabilities [B,14], embedding [B,512])."""
        features = F.relu(self.model.features(self.model.prepare(images)))
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        embedding = self.model.head[1](self.model.head[0](pooled))  # Linear + ReLU
        logits = self.model.head[3](self.model.head[2](embedding))  # Dropout (identity in eval) + Linear
        return torch.sigmoid(logits), embedding


class Predictor(Protocol):
    """A loaded model ready to score batches."""

    backend: str
    metadata: dict[str, Any]
    concurrency: int  # batches it can score at the same time (from different threads)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B,1,crop,crop] → (probabilities [B,14], embeddings [B,512])."""
        ...


class TorchPredictor:
    """Eager PyTorch on CPU (or CUDA when present)."""

    backend = "torch"
    concurrency = 1

    def __init__(self, model_dir: str | Path, threads: int | None = None):
        model, self.metadata = load_model(model_dir)
        self.model = model
        self.net = ServingNet(model)
        if threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, embedding = self.net(torch.from_numpy(np.ascontiguousarray(batch)))
        return probs.numpy(), embedding.numpy()


class OnnxPredictor:
    """ONNX Runtime on CPU, from the package's verified `model.onnx`: `sessions` sessions of `threads`
    intra-op threads each, so that many batches can be scored at once."""

    backend = "onnx"

    def __init__(self, model_dir: str | Path, threads: int | None = None, sessions: int = 1):
        import json

        self.metadata = json.loads((Path(model_dir) / "metadata.json").read_text())
        self.concurrency = max(1, sessions)
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.concurrency):  # several sessions share the cores: idle threads sleep, not spin
            self._free.put(onnx_session(Path(model_dir) / ONNX_FILE, threads, spinning=self.concurrency == 1))

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        session = self._free.get()
        try:
            probs, embedding = session.run(None, {"images": np.ascontiguousarray(batch)})
        finally:
            self._free.put(session)
        return probs, embedding


def onnx_session(path: str | Path, threads: int | None = None, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session over an exported serving graph, all graph optimizations on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verified_backends(model_dir: str | Path, metadata: dict[str, Any]) -> list[str]:
    """The backends a package offers: those verified at registration whose files it holds."""
    model_dir = Path(model_dir)
    checks = {"onnx": metadata.get("onnx") or {}}
    checks.update({backend_name(p): c for p, c in (metadata.get("openvino") or {}).items()})
    return [
        name
        for name, check in checks.items()
        if check.get("verified") and name in SOURCES and (model_dir / SOURCES[name]).is_file()
    ]


def load_predictor(
    model_dir: str | Path, backend: str = "auto", threads: int | None = None, sessions: int = 1
) -> Predictor:
    """One of `BACKENDS`: `auto` is the first of `AUTO_ORDER` the package verified, whose library is
    installed and whose precision this CPU runs natively, else eager PyTorch; the others are that backend
    or an error. `sessions` batches at once with `threads` threads each. A package with a calibration
    answers with calibrated probabilities."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    import json

    metadata = json.loads((Path(model_dir) / "metadata.json").read_text())
    offered = verified_backends(model_dir, metadata)
    if backend not in ("auto", "torch", *offered):
        raise FileNotFoundError(f"{model_dir} has no verified {backend} model; serve with --backend torch")
    predictor: Predictor | None = None
    for name in [backend] if backend != "auto" else [b for b in AUTO_ORDER if b in offered]:
        try:
            predictor = _open(name, model_dir, threads, sessions, auto=backend == "auto")
        except ImportError as error:
            if backend != "auto":
                raise
            log.warning("%s is not installed (%s); trying the next backend", name, error)
        if predictor is not None:
            break
    predictor = predictor or TorchPredictor(model_dir, threads)
    predictor.metadata = metadata
    if metadata.get("calibration"):  # served probabilities are the calibrated ones, whatever the backend
        return CalibratedPredictor(predictor, Calibrator.from_dict(metadata["calibration"]))
    return predictor


def _open(
    name: str, model_dir: str | Path, threads: int | None, sessions: int, auto: bool
) -> Predictor | None:
    """Backend `name` of a package; None when `auto` and this CPU lacks its precision."""
    if name == "torch":
        return TorchPredictor(model_dir, threads)
    if name == "onnx":
        return OnnxPredictor(model_dir, threads, sessions)
    precision = name.removeprefix("openvino-")
    if auto and not cpu_supports(precision):
        log.info("this CPU has no native %s: not serving %s", precision.upper(), name)
        return None
    return OpenVinoPredictor(Path(model_dir) / SOURCES[name], precision, threads, sessions)


def export_onnx(model: CXRNet, crop: int, path: str | Path) -> Path:
    """Export the serving graph (uint8 in; probabilities and embedding out; dynamic batch) to ONNX."""
    net = ServingNet(model).eval()
    example = torch.zeros(1, 1, crop, crop, dtype=torch.uint8)
    with warnings.catch_warnings():  # the tracer's notes on the fixed 1-channel input are expected
        warnings.simplefilter("ignore")
        _export(net, example, path)
    return Path(path)


def _export(net: nn.Module, example: torch.Tensor, path: str | Path) -> None:
    torch.onnx.export(
        net,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["probabilities", "embedding"],
        dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
