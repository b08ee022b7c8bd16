"""A/B gateway for serverless endpoints: a weighted router in front of one SageMaker endpoint per variant.

Serverless endpoints support neither several production variants nor Data Capture, so A/B on serverless
runs one endpoint per variant behind this gateway. It reuses the server's Router (weights, sticky keys,
target-variant override, live weight changes) and header contract, and forwards each request with
`sagemaker-runtime` InvokeEndpoint with its body, Content-Type, Accept, custom attributes and inference id;
the target-variant header only picks the gateway's variant and is not forwarded (each serverless endpoint
has one variant). Each endpoint's container captures its own traffic; the gateway captures nothing.

Shadow mode (`shadow_endpoint`; SageMaker's shadow tests do not exist for serverless endpoints): after a
variant has answered, the same request goes to the shadow endpoint in the background with the same
inference id (the caller's, else one the gateway gives both calls) and `shadow_of=<variant>` in its
custom attributes; its answer is dropped, its container captures it, and the monitor pairs the two.

GET  /ping                liveness
POST /invocations         forwarded to the chosen variant's endpoint
GET  /metrics             Prometheus text format (requests, latency, upstream errors, weights, refusals)
GET|POST /admin/weights   read or change the weights without a restart (bearer token: `cxr.serve.admin`)

Each client gets a request rate limit (`cxr.serve.ratelimit`; /ping and /metrics are exempt): beyond it,
429 with Retry-After before any endpoint is called.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from aiohttp import web
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoRegionError,
    ParamValidationError,
    ReadTimeoutError,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cxr.serve.admin import load_admin_token, require_admin_token
from cxr.serve.errors import PayloadTooLarge, RequestError
from cxr.serve.headers import CUSTOM_ATTRIBUTES, INFERENCE_ID, INVOKED_VARIANT, TARGET_VARIANT, route_key
from cxr.serve.ratelimit import (
    DEFAULT_RATE_LIMIT,
    ClientRateLimiter,
    parse_networks,
    parse_rate_limit,
    rate_limit_middleware,
)
from cxr.serve.router import Router

log = logging.getLogger(__name__)

ENDPOINT = "X-Cxr-Endpoint"
VARIANT_NAME = re.compile(r"[\w.-]{1,63}")
ENDPOINT_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")  # SageMaker's EndpointName pattern
# Serverless cold starts take seconds; a serverless container has 60 s to answer.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
TRANSIENT = frozenset(
    {"ThrottlingException", "Throttling", "ServiceUnavailable", "InternalFailure",
     "InternalDependencyException", "ModelNotReadyException"}
)  # fmt: skip
FORWARDED = (("ContentType", "Content-Type"), ("Accept", "Accept"),
             ("CustomAttributes", CUSTOM_ATTRIBUTES), ("InferenceId", INFERENCE_ID))  # fmt: skip


@dataclass
class GatewayConfig:
    """What the gateway needs; `endpoints` maps variant name → SageMaker endpoint name."""

    endpoints: dict[str, str]
    weights: dict[str, float] | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    region: str | None = None
    max_body_mb: float = 4.0  # serverless invocations carry at most 4 MB
    connect_timeout: float = 5.0
    read_timeout: float = 70.0
    max_attempts: int = 2
    threads: int = 32
    shadow_endpoint: str | None = None  # mirrored in the background; its answers are never returned
    max_shadow_pending: int = 64  # mirrored calls waiting at most; beyond, copies are skipped (counted)
    rate_limit: str | None = DEFAULT_RATE_LIMIT  # per client, e.g. "20/second;1000/hour"; None or "none": off
    trusted_proxies: tuple[str, ...] = ()  # networks whose X-Forwarded-For names the client
    admin_token_file: Path | None = None  # default: $CXR_ADMIN_TOKEN, else $CXR_HOME/admin-token

    def __post_init__(self) -> None:
        parse_rate_limit(self.rate_limit)  # raises ValueError for a string `limits` cannot read
        parse_networks(self.trusted_proxies)
        if not self.endpoints:
            raise ValueError("the gateway needs at least one variant=endpoint")
        bad_variants = [v for v in self.endpoints if not VARIANT_NAME.fullmatch(v)]
        if bad_variants:
            raise ValueError(f"variant names must be 1-63 letters, digits, '_', '.' or '-': {bad_variants}")
        named = [*self.endpoints.values(), *([self.shadow_endpoint] if self.shadow_endpoint else [])]
        bad = [name for name in named if not ENDPOINT_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"not valid SageMaker endpoint names: {bad}")
        if self.weights is not None:
            if set(self.weights) != set(self.endpoints):
                names, given = sorted(self.endpoints), sorted(self.weights)
                raise ValueError(f"weights must name exactly the variants {names}, got {given}")
            Router(self.weights)  # raises RequestError (a ValueError) for negative or all-zero weights


class GatewayMetrics:
    """Requests by variant and status, latency, failed endpoint calls, weights, endpoint per variant."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cxr_gateway_requests", "Gateway invocations by variant and HTTP status", ["variant", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "cxr_gateway_request_latency_seconds", "Gateway /invocations latency, endpoint call included",
            ["variant"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "cxr_gateway_upstream_errors", "Failed InvokeEndpoint calls by variant and error code",
            ["variant", "code"], registry=self.registry,
        )  # fmt: skip
        self.weight = Gauge(
            "cxr_gateway_variant_weight", "Traffic weight per variant", ["variant"], registry=self.registry
        )
        self.shadow = Counter(
            "cxr_gateway_shadow", "Requests mirrored to the shadow endpoint, by outcome (answered, failed, "
            "skipped when too many wait)", ["outcome"], registry=self.registry,
        )  # fmt: skip
        self.endpoint = Gauge(
            "cxr_gateway_endpoint_info", "SageMaker endpoint (value 1) behind each variant",
            ["variant", "endpoint"], registry=self.registry,
        )  # fmt: skip
        self.rate_limited = Counter(
            "cxr_gateway_rate_limited", "Requests refused (429) for exceeding their client's rate limit, by "
            "route", ["route"], registry=self.registry,
        )  # fmt: skip
        self.rate_limit = Gauge(
            "cxr_gateway_rate_limit_info", "Per-client rate limit in force (value 1)", ["limit"],
            registry=self.registry,
        )  # fmt: skip

    def exposition(self) -> bytes:
        """The text exposition format for /metrics."""
        return generate_latest(self.registry)


def runtime_client(config: GatewayConfig) -> Any:
    """A `sagemaker-runtime` client with the configured region, timeouts, retries and pool size."""
    settings = Config(
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        retries={"mode": "standard", "max_attempts": config.max_attempts},
        max_pool_connections=config.threads,
    )
    try:
        return boto3.client("sagemaker-runtime", region_name=config.region, config=settings)
    except NoRegionError as error:
        raise ValueError("no AWS region: pass --region or set AWS_REGION") from error


def default_weights(variants: dict[str, str]) -> dict[str, float]:
    """The server's default split: A=0.9/B=0.1 for variants A and B, else equal weights."""
    if set(variants) == {"A", "B"}:
        return {"A": 0.9, "B": 0.1}
    return {name: 1.0 for name in variants}


class Gateway:
    """State of one running gateway: router, runtime client, thread pool and metrics."""

    def __init__(self, config: GatewayConfig, client: Any = None):
        self.config = config
        self.client = client if client is not None else runtime_client(config)
        self.router = Router(config.weights or default_weights(config.endpoints))
        self.metrics = GatewayMetrics()
        self.pool = ThreadPoolExecutor(config.threads, thread_name_prefix="invoke")
        self.max_body_bytes = int(config.max_body_mb * 1024 * 1024)
        self._shadow_tasks: set[asyncio.Future[None]] = set()
        self.rate_limiter = ClientRateLimiter(config.rate_limit, config.trusted_proxies)
        self.metrics.rate_limit.labels(self.rate_limiter.description).set(1)
        for variant, endpoint in config.endpoints.items():
            self.metrics.endpoint.labels(variant, endpoint).set(1)
        self._publish_weights()

    async def close(self, _app: web.Application | None = None) -> None:
        """Release the thread pool (in-flight requests have finished by the time aiohttp cleans up); mirrored
        calls get up to the read timeout to finish."""
        if self._shadow_tasks:
            await asyncio.wait(list(self._shadow_tasks), timeout=self.config.read_timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def ping(self, request: web.Request) -> web.Response:
        """Liveness: the gateway answers; endpoints are not called."""
        return web.json_response({"status": "healthy", "endpoints": self.config.endpoints})

    async def invocations(self, request: web.Request) -> web.Response:
        """Forward one request to the chosen variant's endpoint; every failure becomes a JSON 4xx/5xx."""
        start = time.perf_counter()
        variant, status = "none", 500  # recorded as a 500 if anything unexpected escapes
        try:
            variant = self.router.choose(route_key(request.headers), request.headers.get(TARGET_VARIANT))
            response = await self._forward(request, variant)
            status = response.status
            return response
        except RequestError as error:
            status = error.status_code
            return _error(status, str(error))
        finally:
            self.metrics.requests.labels(variant, str(status)).inc()
            self.metrics.latency.labels(variant).observe(time.perf_counter() - start)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        """Prometheus scrape target."""
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def weights(self, request: web.Request) -> web.Response:
        """GET the weights, or POST {"A": 0.5, "B": 0.5} to change them now."""
        if request.method == "POST":
            try:
                payload = json.loads(await request.read())
                if not isinstance(payload, dict):
                    raise RequestError("send a JSON object of variant → weight")
                self.router.set_weights(payload)
            except ValueError as error:  # RequestError and JSONDecodeError are ValueErrors
                return _error(getattr(error, "status_code", 400), str(error))
            self._publish_weights()
        return web.json_response(self.router.weights)

    async def _forward(self, request: web.Request, variant: str) -> web.Response:
        endpoint = self.config.endpoints[variant]
        params = {"EndpointName": endpoint, "Body": await self._read_body(request)}
        params.update({p: request.headers[h] for p, h in FORWARDED if request.headers.get(h)})
        if self.config.shadow_endpoint:  # both calls carry one id, so their captures can be paired
            params.setdefault("InferenceId", str(uuid.uuid4()))
        loop = asyncio.get_running_loop()
        headers = {INVOKED_VARIANT: variant, ENDPOINT: endpoint}
        try:
            body, answer = await loop.run_in_executor(self.pool, self._invoke, params)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", "Unknown"))
            status, message = upstream_error(error, endpoint)
        except BotoCoreError as error:
            code = type(error).__name__
            status, message = transport_error(error, endpoint)
        else:
            self._mirror(params, variant)
            return web.Response(body=body, headers={**headers, **answer})
        self.metrics.upstream_errors.labels(variant, code).inc()
        log.warning("variant %s (endpoint %s): %s → %d", variant, endpoint, code, status)
        if status == 503:
            headers["Retry-After"] = "1"
        return _error(status, message, headers)

    def _mirror(self, params: dict[str, Any], variant: str) -> None:
        """Send an answered request to the shadow endpoint in the background (bounded)."""
        if not self.config.shadow_endpoint:
            return
        if len(self._shadow_tasks) >= self.config.max_shadow_pending:
            self.metrics.shadow.labels("skipped").inc()
            return
        attributes = ",".join(filter(None, [params.get("CustomAttributes"), f"shadow_of={variant}"]))[:1024]
        mirrored = {**params, "EndpointName": self.config.shadow_endpoint, "CustomAttributes": attributes}
        task = asyncio.get_running_loop().run_in_executor(self.pool, self._invoke_shadow, mirrored)
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    def _invoke_shadow(self, params: dict[str, Any]) -> None:
        try:
            self._invoke(params)
        except (BotoCoreError, ClientError) as error:
            self.metrics.shadow.labels("failed").inc()
            log.warning("shadow endpoint %s: %s", params["EndpointName"], error)
        else:
            self.metrics.shadow.labels("answered").inc()

    def _invoke(self, params: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The blocking endpoint call, run in the thread pool: the body and the headers to pass back."""
        response = self.client.invoke_endpoint(**params)
        headers = {"Content-Type": response.get("ContentType") or "application/octet-stream"}
        if response.get("CustomAttributes"):
            headers[CUSTOM_ATTRIBUTES] = response["CustomAttributes"]
        return response["Body"].read(), headers

    async def _read_body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge as error:
            raise PayloadTooLarge(f"request body exceeds {self.max_body_bytes:,} bytes") from error

    def _publish_weights(self) -> None:
        for name, weight in self.router.weights.items():
            self.metrics.weight.labels(name).set(weight)


def upstream_error(error: ClientError, endpoint: str) -> tuple[int, str]:
    """HTTP status and message for an InvokeEndpoint error: a 4xx of the model or of request validation
    passes through with the endpoint's message, throttling and unavailability are 503, the rest 502."""
    details = error.response.get("Error", {})
    code, message = str(details.get("Code", "Unknown")), str(details.get("Message") or error)
    http = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 500)
    if code == "ModelError":
        status = int(error.response.get("OriginalStatusCode") or http)
        text = _model_message(error.response.get("OriginalMessage")) or message
        if 400 <= status < 500 and status != 424:  # 424 is SageMaker's own "the model failed"
            return status, text
        return 502, f"endpoint {endpoint} failed on this request ({status}): {text}"
    if code in ("ValidationError", "ValidationException"):
        if "not found" in message.lower():
            return 503, f"endpoint {endpoint} is not available: {message}"
        return (http if 400 <= http < 500 else 400), message
    if code in TRANSIENT or http == 429 or http >= 500:
        return 503, f"endpoint {endpoint} is unavailable ({code}: {message}); retry later"
    return 502, f"endpoint {endpoint} refused the call ({code}: {message})"


def transport_error(error: BotoCoreError, endpoint: str) -> tuple[int, str]:
    """HTTP status and message for a call that got no answer from SageMaker (or could not be made)."""
    if isinstance(error, ParamValidationError):
        return 400, f"cannot forward this request: {error}"
    if isinstance(error, ReadTimeoutError):
        return 504, f"endpoint {endpoint} did not answer in time: {error}"
    return 503, f"cannot reach endpoint {endpoint}: {error}"


def _model_message(original: Any) -> str | None:
    """The container's own message: the `error` of a cxr JSON error body, else the body text."""
    if not original:
        return None
    try:
        payload = json.loads(original)
    except (TypeError, ValueError):
        return str(original)[:1000]
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return str(payload["error"])
    return str(original)[:1000]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


GATEWAY = web.AppKey("gateway", Gateway)


def build_gateway_app(config: GatewayConfig, client: Any = None) -> web.Application:
    """The aiohttp application; `client` replaces the `sagemaker-runtime` client (tests stub it)."""
    admin = require_admin_token(load_admin_token(config.admin_token_file))  # first: fails fast
    gateway = Gateway(config, client)
    limit = rate_limit_middleware(
        gateway.rate_limiter, lambda route: gateway.metrics.rate_limited.labels(route).inc()
    )
    app = web.Application(client_max_size=gateway.max_body_bytes, middlewares=[limit, admin])
    app[GATEWAY] = gateway
    app.router.add_get("/ping", gateway.ping)
    app.router.add_post("/invocations", gateway.invocations)
    app.router.add_get("/metrics", gateway.metrics_endpoint)
    app.router.add_route("*", "/admin/weights", gateway.weights)
    app.on_cleanup.append(gateway.close)
    return app


def run_gateway(config: GatewayConfig) -> None:
    """Run until SIGTERM/SIGINT, letting in-flight requests finish."""
    app = build_gateway_app(config)
    log.info("gateway %s on http://%s:%d", config.endpoints, config.host, config.port)
    web.run_app(app, host=config.host, port=config.port, access_log=None, print=None, shutdown_timeout=30)
