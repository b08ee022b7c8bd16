"""The watch page's figures: traffic and latency from an endpoint's Prometheus exposition, the drift plot,
A/B accuracy from reviews."""

from __future__ import annotations

import datetime as dt

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cxr.data.findings import FINDINGS
from cxr_app import watch


def test_traffic_and_latency_quantiles_come_from_the_endpoints_histograms():
    registry = CollectorRegistry()
    requests = Counter("cxr_requests", "r", ["variant", "status"], registry=registry)
    latency = Histogram("cxr_request_latency_seconds", "l", ["variant"], registry=registry,
                        buckets=(0.01, 0.02, 0.05, 0.1, 0.5))  # fmt: skip
    for seconds in [0.015] * 60 + [0.04] * 30 + [0.3] * 10:
        latency.labels("A").observe(seconds)
    requests.labels("A", "200").inc(100)
    requests.labels("A", "422").inc(3)
    requests.labels("B", "200").inc(5)
    rows = {r["variant"]: r for r in watch.traffic(generate_latest(registry).decode())}
    assert rows["A"]["requests"] == 103 and rows["A"]["errors"] == 3 and rows["B"]["errors"] == 0
    assert 10 <= rows["A"]["p50_ms"] <= 20  # the median lies in the 10-20 ms bucket
    assert 100 <= rows["A"]["p95_ms"] <= 500
    assert rows["B"]["p50_ms"] is None  # no latency observed


def test_the_drift_plot_draws_each_check_family():
    end = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    drift = [{"input_drift.violations": float(i), "performance.violations": 0.0} for i in range(3)]
    runs = [{"window_end": end + dt.timedelta(days=i), "drift": d} for i, d in enumerate(drift)]
    svg = watch.drift_plot(runs).decode()
    assert svg.startswith("<?xml") and "input_drift" in svg and "performance" in svg
    assert "<svg" in watch.drift_plot(runs[:1]).decode()


def test_ab_accuracy_per_variant_from_reviews():
    decided = dict.fromkeys(FINDINGS, False) | {"Effusion": True, "Mass": True}
    truth = dict.fromkeys(FINDINGS, 0) | {"Effusion": 1}
    negative = dict.fromkeys(FINDINGS, False)
    cases = [{"variant": "A", "answer": {"decisions": decided}, "labels": truth},
             {"variant": "B", "answer": {"decisions": negative}, "labels": truth}]  # fmt: skip
    rows = {r["variant"]: r for r in watch.reviewed_accuracy(cases)}
    assert rows["A"]["sensitivity"] == 1.0 and rows["A"]["specificity"] == 12 / 13
    assert rows["B"]["sensitivity"] == 0.0 and rows["B"]["agreement"] == 13 / 14


def test_the_gateways_metrics_read_the_same_way():
    from cxr.serve.gateway import GatewayMetrics

    metrics = GatewayMetrics()
    for seconds in (0.2, 0.3, 0.4):
        metrics.latency.labels("B").observe(seconds)
    metrics.requests.labels("B", "200").inc(3)
    metrics.requests.labels("B", "429").inc(2)
    (row,) = watch.traffic(metrics.exposition().decode())
    assert row["variant"] == "B" and row["requests"] == 5 and row["errors"] == 2
    assert 100 <= row["p50_ms"] <= 500
