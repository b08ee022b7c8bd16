"""What the watch page shows: endpoint traffic and latency, MonitorFlow's verdicts and drift over time,
A/B comparison from reviews, and the registry's versions."""

from __future__ import annotations

import datetime as dt
import io
from collections import defaultdict
from itertools import islice
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from cxr.data.findings import FINDINGS
from cxr.registry import ModelRegistry, ModelVersion

MONITOR_FLOW = "CXRMonitorFlow"


def traffic(exposition: str) -> list[dict[str, Any]]:
    """Per variant: requests by status and latency p50/p95 (from `cxr serve`'s or the gateway's metrics)."""
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"requests": 0, "errors": 0, "buckets": []})
    for family in text_string_to_metric_families(exposition):
        if family.name in ("cxr_requests", "cxr_gateway_requests"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    row = rows[sample.labels["variant"]]
                    row["requests"] += int(sample.value)
                    row["errors"] += int(sample.value) if sample.labels.get("status", "200") >= "400" else 0
        if family.name in ("cxr_request_latency_seconds", "cxr_gateway_request_latency_seconds"):
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    rows[sample.labels["variant"]]["buckets"].append(
                        (float(sample.labels["le"]), sample.value)
                    )
    return [
        {"variant": name, "requests": row["requests"], "errors": row["errors"],
         "p50_ms": _quantile(row["buckets"], 0.5), "p95_ms": _quantile(row["buckets"], 0.95)}
        for name, row in sorted(rows.items())
    ]  # fmt: skip


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """A latency quantile in ms from cumulative histogram buckets (linear within a bucket, as PromQL)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if np.isinf(upper):
                return round(lower * 1000, 1)
            share = (rank - below) / (count - below) if count > below else 1.0
            return round((lower + (upper - lower) * share) * 1000, 1)
        lower, below = upper, count
    return None


def monitor_runs(limit: int = 30) -> list[dict[str, Any]]:
    """The latest finished MonitorFlow runs (newest first) through the Metaflow client."""
    from metaflow import Flow, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)
    try:
        flow = Flow(MONITOR_FLOW)
    except MetaflowNotFound:
        return []
    runs: list[dict[str, Any]] = []
    for run in islice(flow.runs(), limit * 3):  # newest first; failed and unfinished ones are skipped
        data = run.data if run.successful else None
        window = getattr(data, "window", None)
        if data is None or window is None or len(runs) >= limit:
            continue
        runs.append({
            "run": run.pathspec, "finished": run.finished_at, "window_end": window[1],
            "violations": list(getattr(data, "violations", [])),
            "drift": dict(getattr(data, "drift_summary", {})),
            "labelled_cases": getattr(data, "labelled_cases", None),
            "shadow_agreement": _mean_agreement(getattr(data, "shadow_agreement", None) or []),
        })  # fmt: skip
    return runs


def _mean_agreement(rows: list[dict[str, Any]]) -> float | None:
    """The champion's and the shadow's decisions agreeing, averaged over findings (None without a shadow)."""
    values = [float(r["statistic"]) for r in rows if r.get("statistic") is not None]
    return float(np.mean(values)) if values else None


def drift_plot(runs: list[dict[str, Any]]) -> bytes:
    """SVG: violations per check family in each monitor run's window, over time."""
    from matplotlib.figure import Figure  # no pyplot: its global state is not for a threaded server
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 3.2))
    axis = figure.subplots()
    ordered = sorted(runs, key=lambda r: r["window_end"])
    families = sorted(
        {k.removesuffix(".violations") for r in ordered for k in r["drift"] if k.endswith(".violations")}
    )
    ends = [r["window_end"] for r in ordered]
    highest = 0.0
    for family in families:
        counts = [r["drift"].get(f"{family}.violations", 0) for r in ordered]
        highest = max(highest, *counts)
        axis.plot(ends, counts, marker="o", label=family)
    axis.set_ylabel("violations")
    axis.set_ylim(0, max(1.0, highest) * 1.15)
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    if len(ends) == 1:  # one run: a day around it, not years
        axis.set_xlim(ends[0] - dt.timedelta(hours=12), ends[0] + dt.timedelta(hours=12))
    axis.set_title("MonitorFlow violations per check, by window end")
    if families:
        axis.legend(fontsize=7, loc="upper left", ncols=3)
    figure.autofmt_xdate()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg")
    return buffer.getvalue()


def reviewed_accuracy(reviewed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: reviewed cases, agreement of the decisions with the reviews, sensitivity, specificity."""
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for case in reviewed:
        by_variant[case["variant"] or "?"].append(case)
    rows = []
    for variant, cases in sorted(by_variant.items()):
        decided = np.array([[case["answer"]["decisions"][f] for f in FINDINGS] for case in cases], dtype=bool)
        truth = np.array([[case["labels"][f] for f in FINDINGS] for case in cases], dtype=bool)
        positives, negatives = truth.sum(), (~truth).sum()
        rows.append({
            "variant": variant, "reviewed": len(cases), "agreement": float((decided == truth).mean()),
            "sensitivity": float((decided & truth).sum() / positives) if positives else None,
            "specificity": float((~decided & ~truth).sum() / negatives) if negatives else None,
        })  # fmt: skip
    return rows


def registry_versions(registry: ModelRegistry) -> list[ModelVersion]:
    """The registry's versions, newest first."""
    return sorted(registry.versions(), key=lambda v: v.version, reverse=True)
