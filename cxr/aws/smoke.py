"""Smoke test of a deployed endpoint: a real invocation with a test image, schema and latency checked."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr.data.findings import FINDINGS


@dataclass
class SmokeResult:
    """What the smoke test saw; `passed` only when every check held."""

    endpoint: str
    latency_ms: float
    problems: list[str] = field(default_factory=list)
    probabilities: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """No problem found."""
        return not self.problems


def smoke_image(path: str | Path | None = None) -> bytes:
    """The image to send: a file, or a synthetic 256² chest X-ray (PNG) drawn with a fixed seed."""
    if path:
        return Path(path).read_bytes()
    from cxr.data.images import encode_png
    from cxr.data.synthetic import sample_xray

    return encode_png(sample_xray(256, seed=0))


def probabilities_of(body: bytes) -> dict[str, float]:
    """The 14 probabilities from either response schema (the cxr server's, or the package's handlers').

    Raises ValueError naming what is wrong.
    """
    payload = json.loads(body)
    predictions = payload.get("predictions") if isinstance(payload, dict) else None
    if isinstance(predictions, list) and predictions:
        predictions = predictions[0].get("probabilities")
    if not isinstance(predictions, dict):
        raise ValueError("response has no predictions mapping")
    missing = [f for f in FINDINGS if f not in predictions]
    if missing:
        raise ValueError(f"response lacks findings {missing}")
    values = {f: float(predictions[f]) for f in FINDINGS}
    outside = [f for f, p in values.items() if not 0.0 <= p <= 1.0]
    if outside:
        raise ValueError(f"probabilities outside [0, 1] for {outside}")
    return values


def smoke_test(
    runtime: Any,
    endpoint: str,
    image: bytes,
    latency_budget_ms: float = 5000.0,
    variant: str | None = None,
    content_type: str = "image/png",
) -> SmokeResult:
    """Invoke `endpoint` once with `image` (PNG, or as JSON base64); check status, schema and latency."""
    from botocore.exceptions import BotoCoreError, ClientError

    extra = {"TargetVariant": variant} if variant else {}
    if content_type == "application/json":
        image = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
    start = time.perf_counter()
    try:
        response = runtime.invoke_endpoint(
            EndpointName=endpoint, ContentType=content_type, Accept="application/json", Body=image, **extra
        )
        body = response["Body"].read()
    except (BotoCoreError, ClientError) as error:
        return SmokeResult(endpoint, (time.perf_counter() - start) * 1000, [f"invocation failed: {error}"])
    result = SmokeResult(endpoint, round((time.perf_counter() - start) * 1000, 1))
    if not response.get("ContentType", "").startswith("application/json"):
        result.problems.append(f"content type {response.get('ContentType')!r}, expected application/json")
    try:
        result.probabilities = probabilities_of(body)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        result.problems.append(f"bad response: {error}")
    if result.latency_ms > latency_budget_ms:
        result.problems.append(
            f"latency {result.latency_ms:.0f} ms over the {latency_budget_ms:.0f} ms budget"
        )
    return result
