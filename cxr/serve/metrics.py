"""Prometheus metrics of the endpoint (prometheus_client conventions, one registry per server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cxr.data.findings import FINDINGS

if TYPE_CHECKING:
    from cxr.serve.capture import CaptureWriter

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
PROBABILITY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))


class ServerMetrics:
    """Requests, errors, latency, batch sizes, per-finding confidence and model versions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cxr_requests",
            "Invocations by variant and HTTP status",
            ["variant", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cxr_request_latency_seconds", "End-to-end /invocations latency", ["variant"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "cxr_batch_size", "Images per model batch", ["variant"],
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry,
        )  # fmt: skip
        self.probability = Histogram(
            "cxr_finding_probability", "Predicted probability per finding", ["variant", "finding"],
            buckets=PROBABILITY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.input_gate = Counter(
            "cxr_input_gate", "Images by the input gate's verdict (in_distribution, out_of_distribution, "
            "unchecked)", ["variant", "verdict"], registry=self.registry,
        )  # fmt: skip
        self.shadow = Counter(
            "cxr_shadow", "Requests mirrored to the shadow model, by outcome (captured, scored, skipped when "
            "too many wait, failed)", ["outcome"], registry=self.registry,
        )  # fmt: skip
        self.model_info = Gauge(
            "cxr_model_info", "Served model (value 1) by variant, name, version and backend",
            ["variant", "name", "version", "backend"], registry=self.registry,
        )  # fmt: skip
        self.weight = Gauge(
            "cxr_variant_weight", "Traffic weight per variant", ["variant"], registry=self.registry
        )
        self.captured = Counter(
            "cxr_capture_records",
            "Capture records made durable (written to the destination or the local spool)",
            registry=self.registry,
        )
        self.capture_refused = Counter(
            "cxr_capture_refused",
            "Records capture could not take (full or stopped): a served request was answered 503 "
            "(kind=served), an error response went uncaptured (kind=error)",
            ["kind"],
            registry=self.registry,
        )
        self.capture_lost = Counter(
            "cxr_capture_lost_records",
            "Accepted capture records that could not be made durable (writer stopped, or shut down "
            "while destination and spool failed)",
            registry=self.registry,
        )

    def observe_probabilities(self, variant: str, probabilities: list[float]) -> None:
        """Record one image's probabilities."""
        for finding, value in zip(FINDINGS, probabilities, strict=True):
            self.probability.labels(variant, finding).observe(value)

    def watch_capture(self, writer: CaptureWriter) -> None:
        """Report a capture writer's health and backlog at each scrape (only a server that captures)."""
        healthy = Gauge(
            "cxr_capture_healthy",
            "1 while data capture makes records durable, 0 when its writes fail or its writer stopped",
            registry=self.registry,
        )
        pending = Gauge(
            "cxr_capture_pending_records", "Capture records accepted, not yet durable", registry=self.registry
        )
        healthy.set_function(lambda: float(writer.healthy))
        pending.set_function(lambda: float(writer.pending))

    def exposition(self) -> bytes:
        """The text exposition format for /metrics."""
        return generate_latest(self.registry)
