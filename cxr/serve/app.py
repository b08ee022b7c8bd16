"""The HTTP server: SageMaker's container contract plus metrics, A/B routing and capture.

GET  /ping            200 when the models are loaded (503 when configured capture cannot make records durable)
POST /invocations     image/png, image/jpeg, application/dicom, application/x-npy, application/json batch
GET  /metrics         Prometheus text format
GET  /models          the served variants
GET|POST /admin/weights   read or change A/B weights without a restart (bearer token: `cxr.serve.admin`)

Every answer carries the input gate's verdict per image (`cxr.serve.trust`); `?uncertainty=true` adds the
MC-dropout uncertainty per finding. A `shadow` model, when configured, scores a copy of every answered
request after the answer has gone out; its answer is captured (variant `shadow`, the same inference id)
and never returned.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from cxr.data.findings import FINDINGS
from cxr.data.images import encode_png
from cxr.features import image_stats, project_embedding
from cxr.inference import prepare
from cxr.serve.admin import load_admin_token, require_admin_token
from cxr.serve.batcher import DynamicBatcher, Scored
from cxr.serve.capture import CaptureUnavailable, CaptureWriter, capture_record, new_event_id
from cxr.serve.decoder import DICOM, JSON, DecodedImage, decode_request, media_type
from cxr.serve.errors import NotAcceptable, PayloadTooLarge, RequestError, ServiceUnavailable, ShuttingDown
from cxr.serve.headers import (
    CUSTOM_ATTRIBUTES,
    EXPLAIN,
    INFERENCE_ID,
    INVOKED_VARIANT,
    SHADOW,
    TARGET_VARIANT,
    UNCERTAINTY,
    route_key,
)
from cxr.serve.limits import Limits, exceeds
from cxr.serve.metrics import ServerMetrics
from cxr.serve.predictor import Predictor, load_predictor
from cxr.serve.router import Router
from cxr.serve.trust import POLICIES, InputRefused, Trust, enforce, wants_uncertainty

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Everything the server needs; `models` maps variant name → unpacked model directory."""

    models: dict[str, Path]
    weights: dict[str, float] | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    capture: str | None = None
    capture_sample_percent: float = 100.0
    endpoint_name: str = "cxr-endpoint"
    backend: str = "auto"
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_body_mb: float = 64.0
    threads: int | None = None  # intra-op threads per session (default: all cores)
    sessions: int = 2  # ONNX Runtime sessions scoring batches at once (one runs while the next fills)
    limits: Limits = field(default_factory=Limits)
    capture_wait_seconds: float = 1.0  # how long a request waits for room in a full capture queue
    input_gate: str = "refuse"  # out-of-distribution images: refuse (422) or flag in the answer
    shadow: Path | None = None  # a model directory mirrored in shadow mode (captured, never returned)
    max_shadow_pending: int = 64  # mirrored requests waiting at most; beyond, copies are skipped (counted)
    admin_token_file: Path | None = None  # default: $CXR_ADMIN_TOKEN, else $CXR_HOME/admin-token

    def __post_init__(self) -> None:
        if self.input_gate not in POLICIES:
            raise ValueError(f"input_gate must be one of {POLICIES}, not {self.input_gate!r}")


@dataclass
class Variant:
    """One served model."""

    name: str
    predictor: Predictor
    batcher: DynamicBatcher | None = None
    explainer: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    trust: Trust | None = None

    @property
    def info(self) -> dict[str, Any]:
        """Name, version and backend, as reported in responses."""
        return {
            "name": self.metadata.get("name", "cxr"),
            "version": self.metadata.get("version"),
            "variant": self.name,
            "backend": self.predictor.backend,
        }


class Server:
    """State of one running server (variants, router, capture, metrics)."""

    def __init__(self, config: ServerConfig):
        if not config.models:
            raise ValueError("no model to serve")
        self.config = config
        self.metrics = ServerMetrics()
        self.variants = {}
        for name, directory in config.models.items():
            predictor = load_predictor(directory, config.backend, config.threads, config.sessions)
            trust = Trust.from_package(directory, predictor.metadata)
            self.variants[name] = Variant(name, predictor, metadata=predictor.metadata, trust=trust)
        self.model_dirs = dict(config.models)
        self.shadow = self._load_shadow(config)
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        default = (
            {"A": 0.9, "B": 0.1} if set(self.variants) == {"A", "B"} else {n: 1.0 for n in self.variants}
        )
        self.router = Router(config.weights or default)
        self.capture = (
            CaptureWriter(
                config.capture, config.endpoint_name, config.capture_sample_percent,
                on_written=self.metrics.captured.inc, on_lost=self.metrics.capture_lost.inc,
            )
            if config.capture
            else None
        )  # fmt: skip
        if self.capture is not None:
            self.metrics.watch_capture(self.capture)
        self.cpu_pool = ThreadPoolExecutor(2, thread_name_prefix="decode")
        self.stopping = threading.Event()  # set on SIGTERM: long work (explanations) is abandoned
        self.served = 0
        for variant in self.variants.values():
            info = variant.info
            self.metrics.model_info.labels(
                variant.name, info["name"], str(info["version"]), info["backend"]
            ).set(1)
        self._publish_weights()

    def _load_shadow(self, config: ServerConfig) -> Variant | None:
        if config.shadow is None:
            return None
        if SHADOW in config.models:
            raise ValueError(f"{SHADOW!r} names the shadow model; give served variants other names")
        predictor = load_predictor(config.shadow, config.backend, config.threads, config.sessions)
        self.model_dirs[SHADOW] = config.shadow
        trust = Trust.from_package(config.shadow, predictor.metadata)
        return Variant(SHADOW, predictor, metadata=predictor.metadata, trust=trust)

    def _publish_weights(self) -> None:
        for name, weight in self.router.weights.items():
            self.metrics.weight.labels(name).set(weight)

    async def start(self, _app: web.Application | None = None) -> None:
        """Start one batcher per variant (and the shadow's)."""
        for variant in [*self.variants.values(), *([self.shadow] if self.shadow else [])]:
            histogram = self.metrics.batch_size.labels(variant.name)
            variant.batcher = DynamicBatcher(
                variant.predictor, self.config.max_batch, self.config.max_wait_ms, histogram.observe
            )
            variant.batcher.start()

    async def begin_shutdown(self, _app: web.Application | None = None) -> None:
        """SIGTERM: explanations in progress stop at their next image, so in-flight requests end soon."""
        self.stopping.set()

    async def stop(self, _app: web.Application | None = None) -> None:
        """Drain batchers, flush capture (also on SIGTERM)."""
        self.stopping.set()
        if self._shadow_tasks:  # mirrored requests finish and are captured before capture closes
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)
        for variant in [*self.variants.values(), *([self.shadow] if self.shadow else [])]:
            if variant.batcher is not None:
                await variant.batcher.stop()
        if self.capture is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.capture.close, 60.0)
        self.cpu_pool.shutdown(wait=True, cancel_futures=True)

    # -- handlers -------------------------------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        """SageMaker health check: 503 while configured capture cannot make records durable."""
        if self.capture is not None and not self.capture.healthy:
            reason = self.capture.failure or "data capture is closed"
            return web.json_response({"status": "unhealthy", "reason": reason}, status=503)
        return web.json_response({"status": "healthy", "variants": sorted(self.variants)})

    async def invocations(self, request: web.Request) -> web.Response:
        """Score one image or a JSON batch; 4xx with a message for any bad input."""
        start = time.perf_counter()
        variant_name = "none"
        limits = self.config.limits
        try:
            variant_name = self.router.choose(route_key(request.headers), request.headers.get(TARGET_VARIANT))
            variant = self.variants[variant_name]
            accept = media_type(request.headers.get("Accept"))
            if accept not in ("", "*/*", JSON, "application/*"):
                raise NotAcceptable(f"cannot produce {accept!r}; responses are {JSON}")
            explain = _explain_request(request, limits)
            asked = request.query.get("uncertainty") or request.headers.get(UNCERTAINTY)
            uncertain = wants_uncertainty(asked)
            body = await _read_body(request)
            loop = asyncio.get_running_loop()
            content_type = request.headers.get("Content-Type")
            images = await loop.run_in_executor(self.cpu_pool, decode_request, body, content_type, limits)
            _check_explanations(len(images), explain, limits)
            crops = await loop.run_in_executor(self.cpu_pool, _prepare_all, images, variant.metadata)
            batcher = variant.batcher
            if batcher is None:
                raise RuntimeError("the server has not started its batchers")
            scored = await asyncio.gather(*(batcher.submit(crop) for crop in crops))
            checks, spread = await loop.run_in_executor(
                self.cpu_pool, self._trust, variant, images, crops, scored, uncertain
            )
            self._count_verdicts(variant, checks)
            enforce(checks, self.config.input_gate, batch=len(images) > 1 or media_type(content_type) == JSON)
            heatmaps = await loop.run_in_executor(self.cpu_pool, self._explain, variant, crops, explain)
            event_id = _inference_id(request.headers.get(INFERENCE_ID))
            response = self._response(variant, scored, heatmaps, event_id, start, checks, spread)
            text = json.dumps(response)
            trusted = {"checks": checks, "uncertainty": spread}
            await self._capture(variant, request, body, images, crops, scored, text, event_id, trusted)
            self._record(variant, 200, start, scored)
            self._mirror(variant, images, crops, event_id)
            self.served += 1
            return web.Response(text=text, content_type=JSON, headers={INVOKED_VARIANT: variant.name})
        except InputRefused as error:  # captured with the gate's verdicts, so refusals can be monitored
            gate = {"input_gate": [{k: c[k] for k in ("score", "verdict")} for c in error.checks],
                    "model": self.variants[variant_name].info}  # the model whose gate refused  # fmt: skip
            return await self._error(request, variant_name, 422, str(error), start, extra=gate)
        except RequestError as error:
            return await self._error(request, variant_name, error.status_code, str(error), start)
        except CaptureUnavailable as error:  # not captured: capture is what failed
            return await self._error(request, variant_name, 503, str(error), start, capture=False)
        except ServiceUnavailable as error:
            return await self._error(request, variant_name, 503, str(error), start)
        except Exception as error:
            log.exception("internal error while serving a request")
            detail = f"internal server error: {type(error).__name__}: {error}"
            return await self._error(request, variant_name, 500, "internal server error", start, detail)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        """Prometheus scrape target."""
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def models(self, request: web.Request) -> web.Response:
        """The served variants with their metadata and weights."""
        weights = self.router.weights
        return web.json_response(
            {name: {**v.info, "weight": weights[name], "image_size": v.metadata.get("image_size"),
                    "crop": v.metadata.get("crop")} for name, v in self.variants.items()}
        )  # fmt: skip

    async def weights(self, request: web.Request) -> web.Response:
        """GET the A/B weights, or POST {"A": 0.5, "B": 0.5} to change them now."""
        if request.method == "POST":
            try:
                payload = json.loads(await request.read())
                if not isinstance(payload, dict):
                    raise RequestError("send a JSON object of variant → weight")
                self.router.set_weights(payload)
            except ValueError as error:
                status = getattr(error, "status_code", 400)
                return web.json_response({"error": str(error)}, status=status)
            self._publish_weights()
        return web.json_response(self.router.weights)

    # -- helpers -----------------------------------------------------------------------------------------

    def _response(
        self,
        variant: Variant,
        scored: list[Scored],
        heatmaps: list[dict[str, str]],
        event_id: str,
        start: float,
        checks: list[dict[str, Any]],
        spread: list[dict[str, float]] | None,
    ) -> dict[str, Any]:
        thresholds = variant.metadata.get("thresholds") or {}
        predictions = []
        for index, (result, maps) in enumerate(zip(scored, heatmaps, strict=True)):
            probabilities = {
                f: round(float(p), 6) for f, p in zip(FINDINGS, result.probabilities, strict=True)
            }
            decisions = {f: bool(probabilities[f] >= float(thresholds.get(f, 0.5))) for f in FINDINGS}
            prediction: dict[str, Any] = {"probabilities": probabilities, "decisions": decisions,
                                          "input_check": checks[index]}  # fmt: skip
            if spread is not None:
                prediction["uncertainty"] = spread[index]
            if maps:
                prediction["heatmaps"] = maps
            predictions.append(prediction)
        return {
            "inference_id": event_id,
            "model": variant.info,
            "predictions": predictions,
            "thresholds": {f: float(thresholds.get(f, 0.5)) for f in FINDINGS},
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    def _trust(
        self, variant: Variant, images: list[DecodedImage], crops: list[np.ndarray], scored: list[Scored],
        uncertain: bool,
    ) -> tuple[list[dict[str, Any]], list[dict[str, float]] | None]:  # fmt: skip
        """The input gate's verdict per image and, when asked, the uncertainty per finding."""
        trust = variant.trust or Trust(self.model_dirs[variant.name], variant.metadata)
        embeddings = np.stack([s.embedding for s in scored])
        checks = trust.checks(crops, embeddings, [image.problems for image in images])
        return checks, trust.uncertainty(embeddings) if uncertain else None

    def _count_verdicts(self, variant: Variant, checks: list[dict[str, Any]]) -> None:
        for check in checks:
            self.metrics.input_gate.labels(variant.name, check["verdict"]).inc()

    def _explain(
        self, variant: Variant, crops: list[np.ndarray], findings: list[str]
    ) -> list[dict[str, str]]:
        if not findings:
            return [{} for _ in crops]
        from cxr.inference import load_model
        from cxr.serve.explain import grad_cams, overlay_png

        if variant.explainer is None:
            variant.explainer = load_model(self.model_dirs[variant.name])[0]
        heatmaps = []
        for crop in crops:
            if self.stopping.is_set():
                raise ShuttingDown("the server is shutting down; explanation abandoned, retry")
            maps = grad_cams(variant.explainer, crop, findings)
            pairs = zip(findings, maps, strict=True)
            heatmaps.append({f: base64.b64encode(overlay_png(crop[0], m)).decode() for f, m in pairs})
        return heatmaps

    def _record(self, variant: Variant, status: int, start: float, scored: list[Scored]) -> None:
        self._record_status(variant.name, status, start)
        for result in scored:
            self.metrics.observe_probabilities(variant.name, [float(p) for p in result.probabilities])

    def _record_status(self, variant: str, status: int, start: float) -> None:
        self.metrics.requests.labels(variant, str(status)).inc()
        self.metrics.latency.labels(variant).observe(time.perf_counter() - start)

    async def _capture(
        self,
        variant: Variant,
        request: web.Request,
        body: bytes,
        images: list[DecodedImage],
        crops: list[np.ndarray],
        scored: list[Scored],
        output: str,
        event_id: str,
        trusted: dict[str, Any],
    ) -> None:
        """Queue the record before the 200 goes out; CaptureUnavailable (a 503) when capture cannot."""
        if self.capture is None or not self.capture.sampled():
            return
        input_type, data = _capturable_input(request, body, images)
        features = _features(images, crops, scored, trusted)
        attributes = request.headers.get(CUSTOM_ATTRIBUTES)
        version = variant.metadata.get("version")
        record = capture_record(
            input_type, data, output, event_id, variant.name, version, features, custom_attributes=attributes
        )
        try:
            await self.capture.put(record, self.config.capture_wait_seconds)
        except CaptureUnavailable as error:
            self.metrics.capture_refused.labels("served").inc()
            log.warning("answering 503: %s", error)
            raise

    def _mirror(
        self, served: Variant, images: list[DecodedImage], crops: list[np.ndarray], event_id: str
    ) -> None:
        """Score a copy of an answered request with the shadow model, in the background (bounded)."""
        if self.shadow is None:
            return
        if len(self._shadow_tasks) >= self.config.max_shadow_pending:
            self.metrics.shadow.labels("skipped").inc()
            return
        task = asyncio.create_task(self._shadow_answer(served, images, crops, event_id))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow_answer(
        self, served: Variant, images: list[DecodedImage], crops: list[np.ndarray], event_id: str
    ) -> None:
        """The shadow's answer to a request already answered, captured under variant `shadow`."""
        shadow = self.shadow
        try:
            if shadow is None or shadow.batcher is None:
                raise RuntimeError("the shadow model has no batcher")
            start = time.perf_counter()
            scored = await asyncio.gather(*(shadow.batcher.submit(crop) for crop in crops))
            loop = asyncio.get_running_loop()
            checks, _ = await loop.run_in_executor(
                self.cpu_pool, self._trust, shadow, images, crops, scored, False
            )
            response = self._response(shadow, scored, [{} for _ in crops], event_id, start, checks, None)
            response["shadow_of"] = served.name
            if self.capture is not None:
                features = _features(images, crops, scored, {"checks": checks, "uncertainty": None})
                record = capture_record(JSON, b"", json.dumps(response), event_id, SHADOW,
                                        shadow.metadata.get("version"), features)  # fmt: skip
                await self.capture.put(record, self.config.capture_wait_seconds)
            self.metrics.shadow.labels("captured" if self.capture is not None else "scored").inc()
        except Exception:  # a shadow's failure never reaches the client it did not answer
            log.exception("shadow model failed on request %s", event_id)
            self.metrics.shadow.labels("failed").inc()

    async def _error(
        self,
        request: web.Request,
        variant: str,
        status: int,
        message: str,
        start: float,
        detail: str = "",
        capture: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> web.Response:
        """Answer an error and capture it: status and message (or `detail`) and any `extra` fields (the input
        gate's verdicts of a refusal), never the payload."""
        self._record_status(variant, status, start)
        if capture and self.capture is not None and self.capture.sampled():
            version = self.variants[variant].metadata.get("version") if variant in self.variants else None
            output = json.dumps({"error": (detail or message)[:500], **(extra or {})})
            kind = media_type(request.headers.get("Content-Type")) or "unknown"
            record = capture_record(kind, b"", output, new_event_id(), variant, version, [], status=status)
            try:
                await self.capture.put(record, self.config.capture_wait_seconds)
            except CaptureUnavailable as error:
                self.metrics.capture_refused.labels("error").inc()
                log.warning("data capture could not take the record of a %d response: %s", status, error)
        return web.json_response({"error": message, **(extra or {})}, status=status)


def _inference_id(given: str | None) -> str:
    """The request's `X-Amzn-SageMaker-Inference-Id` (1–64 printable characters, as SageMaker allows), else
    a new one: the id of the response and of its capture record, so that answers can be paired."""
    if given is None:
        return new_event_id()
    if not 0 < len(given) <= 64 or not given.isprintable():
        raise RequestError("X-Amzn-SageMaker-Inference-Id must be 1-64 printable characters")
    return given


def _explain_request(request: web.Request, limits: Limits) -> list[str]:
    """The distinct findings to explain, in the order asked."""
    raw = request.query.get("explain") or request.headers.get(EXPLAIN) or ""
    findings = list(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise RequestError(f"cannot explain unknown findings {unknown}; one of {', '.join(FINDINGS)}")
    _check_explanations(1, findings, limits)
    return findings


def _check_explanations(images: int, findings: list[str], limits: Limits) -> None:
    count = images * len(findings)
    if count > limits.max_explanations:
        what = f"{images} image(s) × {len(findings)} finding(s) = {count} Grad-CAM heatmaps"
        raise PayloadTooLarge(exceeds(what, "max_explanations", limits.max_explanations))


def _features(
    images: list[DecodedImage], crops: list[np.ndarray], scored: list[Scored], trusted: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per image, what the capture record keeps for monitoring: image statistics, the embedding's
    projection, the input gate's score and verdict, the uncertainty when asked, DICOM attributes."""
    projections = project_embedding(np.stack([s.embedding for s in scored]))
    features = []
    for index, (image, crop, projection) in enumerate(zip(images, crops, projections, strict=True)):
        check = trusted["checks"][index]
        feature = {
            "shape": list(image.original_shape),
            "content_type": image.content_type,
            "image_stats": image_stats(crop),
            "embedding_projection": [round(float(v), 5) for v in projection],
            "input_gate": {"score": check["score"], "verdict": check["verdict"]},
        }
        if trusted["uncertainty"] is not None:
            feature["uncertainty"] = [trusted["uncertainty"][index][f] for f in FINDINGS]
        if image.acquisition:
            feature["acquisition"] = image.acquisition
        features.append(feature)
    return features


def _prepare_all(images: list[DecodedImage], metadata: dict[str, Any]) -> list[np.ndarray]:
    return [prepare(image.pixels, metadata) for image in images]


def _capturable_input(request: web.Request, body: bytes, images: list[DecodedImage]) -> tuple[str, bytes]:
    """The request payload as it may be stored: DICOM (with its patient tags) becomes the decoded PNG."""
    kind = media_type(request.headers.get("Content-Type"))
    if kind == JSON:
        if not any(image.content_type == DICOM for image in images):
            return JSON, body
        instances = [
            {"b64": base64.b64encode(image.raw or encode_png(image.pixels)).decode(),
             "content_type": "image/png" if image.content_type == DICOM else image.content_type}
            for image in images
        ]  # fmt: skip
        return JSON, json.dumps({"instances": instances}).encode()
    image = images[0]
    if image.content_type == DICOM:
        return "image/png", encode_png(image.pixels)
    return kind, body


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as error:
        raise PayloadTooLarge(f"request body exceeds {request.app['max_body_bytes']:,} bytes") from error


def build_app(config: ServerConfig) -> web.Application:
    """The aiohttp application for a configuration."""
    admin = require_admin_token(load_admin_token(config.admin_token_file))  # before the models: fails fast
    server = Server(config)
    max_bytes = int(config.max_body_mb * 1024 * 1024)
    app = web.Application(client_max_size=max_bytes, middlewares=[admin])
    app["server"], app["max_body_bytes"] = server, max_bytes
    app.router.add_get("/ping", server.ping)
    app.router.add_post("/invocations", server.invocations)
    app.router.add_get("/metrics", server.metrics_endpoint)
    app.router.add_get("/models", server.models)
    app.router.add_route("*", "/admin/weights", server.weights)
    app.on_startup.append(server.start)
    app.on_shutdown.append(server.begin_shutdown)
    app.on_cleanup.append(server.stop)
    return app


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT; capture is flushed on the way out."""
    app = build_app(config)
    log.info(
        "serving %s on http://%s:%d", {k: str(v) for k, v in config.models.items()}, config.host, config.port
    )
    web.run_app(app, host=config.host, port=config.port, access_log=None, print=None, shutdown_timeout=30)
