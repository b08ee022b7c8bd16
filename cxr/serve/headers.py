"""HTTP headers of the invocation contract and the sticky routing key, shared by the model server and the
A/B gateway (no model imports, so the gateway stays light)."""

from __future__ import annotations

from collections.abc import Mapping

TARGET_VARIANT = "X-Amzn-SageMaker-Target-Variant"
INVOKED_VARIANT = "X-Amzn-Invoked-Production-Variant"
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
INFERENCE_ID = "X-Amzn-SageMaker-Inference-Id"
ROUTE_KEY = "X-Cxr-Route-Key"
EXPLAIN = "X-Cxr-Explain"  # findings to explain with Grad-CAM heatmaps, comma-separated
UNCERTAINTY = "X-Cxr-Uncertainty"  # true: MC-dropout uncertainty per finding
SHADOW = "shadow"  # the variant under which a shadow model's answers are captured (never returned)


def route_key(headers: Mapping[str, str]) -> str | None:
    """The sticky A/B key of a request (case-insensitive `headers`, as aiohttp's): `X-Cxr-Route-Key`, else
    `route_key=…` or `session=…` in the SageMaker custom attributes."""
    key = headers.get(ROUTE_KEY)
    if key:
        return key
    attributes = headers.get(CUSTOM_ATTRIBUTES, "")
    for part in attributes.split(","):
        name, _, value = part.partition("=")
        if name.strip() in ("route_key", "session"):
            return value.strip()
    return None
