"""The endpoint the application reads films with: a local `cxr serve`, or SageMaker through the gateway.

Both speak the same contract (`POST /invocations`, `GET /metrics`, `/admin/weights` behind a bearer token),
so one small HTTP client serves both. Errors keep the endpoint's status and message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import urllib3

from cxr.serve.headers import EXPLAIN, INFERENCE_ID, TARGET_VARIANT, UNCERTAINTY


class EndpointError(Exception):
    """The endpoint refused or could not be reached; `status` is its HTTP status (502 when unreachable)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Endpoint:
    """An HTTP client for one endpoint URL (e.g. http://127.0.0.1:8080)."""

    url: str
    admin_token: str | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint URL must be http(s)://..., not {self.url!r}")
        self.url = self.url.rstrip("/")
        self.pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=self.timeout_s), retries=False
        )

    def invoke(
        self,
        body: bytes,
        content_type: str,
        explain: list[str] | None = None,
        inference_id: str | None = None,
        variant: str | None = None,
    ) -> dict[str, Any]:
        """The endpoint's answer for one image, with uncertainty and the Grad-CAM heatmaps asked for."""
        headers = {"Content-Type": content_type, "Accept": "application/json", UNCERTAINTY: "true"}
        if explain:
            headers[EXPLAIN] = ",".join(explain)
        if inference_id:
            headers[INFERENCE_ID] = inference_id
        if variant:
            headers[TARGET_VARIANT] = variant
        return self._json("POST", "/invocations", body, headers)

    def models(self) -> dict[str, Any]:
        """The served variants (a `cxr serve` endpoint; the gateway answers 404)."""
        return self._json("GET", "/models")

    def metrics(self) -> str:
        """The endpoint's Prometheus exposition."""
        return self._request("GET", "/metrics").data.decode()

    def weights(self) -> dict[str, float]:
        return self._json("GET", "/admin/weights", headers=self._admin())

    def set_weights(self, weights: dict[str, float]) -> dict[str, float]:
        headers = {"Content-Type": "application/json", **self._admin()}
        return self._json("POST", "/admin/weights", json.dumps(weights).encode(), headers)

    def _admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def _json(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        response = self._request(method, path, body, headers)
        try:
            return json.loads(response.data)
        except ValueError as error:
            raise EndpointError(
                502, f"the endpoint answered {path} with something other than JSON"
            ) from error

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        try:
            response = self.pool.request(method, self.url + path, body=body, headers=headers or {})
        except urllib3.exceptions.HTTPError as error:
            raise EndpointError(
                502, f"the endpoint {self.url} cannot be reached ({type(error).__name__})"
            ) from error
        if response.status >= 400:
            raise EndpointError(response.status, _message(response.data) or f"HTTP {response.status}")
        return response


def _message(data: bytes) -> str:
    try:
        found = json.loads(data)
    except ValueError:
        return data.decode(errors="replace")[:500]
    if isinstance(found, dict):
        return str(found.get("error") or found.get("message") or found)[:500]
    return str(found)[:500]
