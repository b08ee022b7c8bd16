"""SageMaker inference handlers for a packaged cxr model (`model_fn`, `input_fn`, `predict_fn`, `output_fn`).

The same preprocessing as evaluation: decode to 8-bit gray, resize to the cached size, center-crop.
Accepts `image/png`, `image/jpeg` and `application/x-npy` (a 2-D uint8 array); answers `application/json`
with one probability per finding (`predictions`) and the input gate's verdict (`input_check`; these
handlers flag an out-of-distribution image, they cannot refuse it: `cxr serve` can).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.calibration import Calibrator
from cxr.data.findings import FINDINGS
from cxr.data.images import decode_xray, resize_square
from cxr.data.loader import center_crop
from cxr.model import CXRNet

IMAGE_TYPES = ("image/png", "image/jpeg", "application/x-image")
NPY_TYPE = "application/x-npy"
JSON_TYPE = "application/json"
INPUT_CHECK = "input_check"


class UnsupportedContentType(ValueError):
    """The request's content type is not one the model accepts (HTTP 415)."""

    status_code = 415


def load_model(model_dir: str | Path) -> tuple[CXRNet, dict[str, Any]]:
    """Load `model.pt` + `metadata.json` from an unpacked package directory."""
    model_dir = Path(model_dir)
    payload = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    metadata = json.loads((model_dir / "metadata.json").read_text())
    model = CXRNet(num_classes=len(metadata["findings"]), pretrained=False, dropout=metadata["dropout"])
    model.load_state_dict(payload)
    return model.eval(), metadata


def model_fn(model_dir: str) -> dict[str, Any]:
    """SageMaker: load the model once per worker, with its calibration and input gate."""
    from cxr.serve.predictor import ServingNet
    from cxr.serve.trust import Trust

    model, metadata = load_model(model_dir)
    calibrator = Calibrator.from_dict(metadata.get("calibration"))
    return {"model": model, "net": ServingNet(model), "metadata": metadata, "calibrator": calibrator,
            "trust": Trust.from_package(model_dir, metadata)}  # fmt: skip


def input_fn(body: bytes, content_type: str) -> np.ndarray:
    """SageMaker: request body → 2-D uint8 grayscale image."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in IMAGE_TYPES:
        return decode_xray(body)
    if kind == JSON_TYPE:
        return decode_xray(_single_json_image(body))
    if kind == NPY_TYPE:
        array = np.load(io.BytesIO(body), allow_pickle=False)
        if array.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale array, got shape {array.shape}")
        return np.clip(array, 0, 255).astype(np.uint8)
    raise UnsupportedContentType(
        f"unsupported content type {content_type!r}; use {', '.join(IMAGE_TYPES)}, {NPY_TYPE} or {JSON_TYPE}"
    )


def _single_json_image(body: bytes) -> bytes:
    """`{"instances": [{"b64": ...}]}` (the server's JSON form) with one image → its bytes."""
    try:
        payload = json.loads(body)
        items = payload["instances"] if isinstance(payload, dict) else payload
        (item,) = items
        return base64.b64decode(item["b64"] if isinstance(item, dict) else item, validate=True)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError('JSON body must be {"instances": [{"b64": "<one base64 image>"}]}') from error


def prepare(pixels: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """A decoded gray image → uint8 [1, crop, crop], identical to evaluation's preprocessing."""
    return center_crop(resize_square(pixels, int(metadata["image_size"])), int(metadata["crop"]))[None]


@torch.no_grad()
def predict_fn(image: np.ndarray, bundle: dict[str, Any]) -> dict[str, Any]:
    """SageMaker: probabilities per finding (calibrated when the package carries a calibration), and the
    input gate's verdict under `input_check`."""
    crop = prepare(image, bundle["metadata"])
    with torch.no_grad():
        raw, embedding = (t.numpy() for t in bundle["net"](torch.from_numpy(crop)[None]))
    calibrator = bundle.get("calibrator") or Calibrator()
    probs = calibrator.apply(raw)[0].tolist()
    prediction: dict[str, Any] = dict(zip(bundle["metadata"]["findings"], probs, strict=True))
    prediction[INPUT_CHECK] = bundle["trust"].checks([crop], embedding, [[]])[0]
    return prediction


def output_fn(prediction: dict[str, Any], accept: str = JSON_TYPE) -> tuple[str, str]:
    """SageMaker: prediction → JSON body: `{"predictions": {finding: p}, "input_check": {...}}`."""
    if accept and accept not in (JSON_TYPE, "*/*"):
        raise UnsupportedContentType(f"unsupported accept type {accept!r}; use {JSON_TYPE}")
    probabilities = {k: v for k, v in prediction.items() if k != INPUT_CHECK}
    extra = {INPUT_CHECK: prediction[INPUT_CHECK]} if INPUT_CHECK in prediction else {}
    return json.dumps({"predictions": probabilities, **extra}), JSON_TYPE


__all__ = ["FINDINGS", "input_fn", "load_model", "model_fn", "output_fn", "predict_fn"]
