"""Reading a film: sniff what was uploaded, ask the endpoint, keep the case without identifiers."""

from __future__ import annotations

import math
from typing import Any

from cxr.data.findings import FINDINGS
from cxr.data.images import encode_png
from cxr.serve.decoder import decode_one
from cxr.serve.errors import RequestError
from cxr_app.endpoint import Endpoint
from cxr_app.store import Store

PNG, JPEG, DICOM = "image/png", "image/jpeg", "application/dicom"


def sniff(body: bytes) -> str:
    """The upload's media type from its first bytes (a browser's guess for .dcm files is no help)."""
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if body.startswith(b"\xff\xd8\xff"):
        return JPEG
    if body[128:132] == b"DICM":
        return DICOM
    raise RequestError("upload a PNG, JPEG or DICOM (Part 10) file")


def read_film(store: Store, endpoint: Endpoint, body: bytes, username: str) -> str:
    """Send one uploaded image to the endpoint and keep the case; its inference id."""
    kind = sniff(body)
    pixels = decode_one(body, kind).pixels  # bounded decode; DICOM tags and file metadata stay behind
    answer = endpoint.invoke(body, kind)
    prediction = answer["predictions"][0]
    model = answer.get("model") or {}
    store.add_case({
        "inference_id": answer["inference_id"], "created_by": username,
        "variant": model.get("variant"), "model_version": str(model.get("version")),
        "answer": {**prediction, "model": model, "thresholds": answer.get("thresholds", {})},
        "priority": priority(prediction, answer.get("thresholds", {})), "image_png": encode_png(pixels),
    })  # fmt: skip
    return str(answer["inference_id"])


def priority(prediction: dict[str, Any], thresholds: dict[str, float]) -> int:
    """How uncertain a case is, for the worklist (higher first): the largest MC-dropout spread over the
    findings when the endpoint gave one, else how close the nearest probability is to its operating point
    on the logit scale."""
    spread = prediction.get("uncertainty")
    if spread:
        return round(1e6 * max(float(v) for v in spread.values()))
    gaps = [abs(_logit(p) - _logit(thresholds.get(f, 0.5))) for f, p in prediction["probabilities"].items()]
    return -round(1e6 * min(gaps))


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def findings_table(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per finding: probability, operating point, decision and uncertainty, positives first."""
    spread, thresholds = answer.get("uncertainty") or {}, answer["thresholds"]
    rows = [
        {"finding": f, "probability": answer["probabilities"][f], "threshold": thresholds.get(f, 0.5),
         "positive": bool(answer["decisions"][f]), "uncertainty": spread.get(f)}
        for f in FINDINGS
    ]  # fmt: skip
    return sorted(rows, key=lambda r: (not r["positive"], -r["probability"]))
