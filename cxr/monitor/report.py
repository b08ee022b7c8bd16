"""Monitoring outputs: report files in Model Monitor's shape, chart specs, drift summaries across runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.monitor.baseline import IMAGE_FEATURES, Baseline
from cxr.monitor.checks import constraint_violations
from cxr.monitor.reader import Traffic
from cxr.plots import SCHEMA


def drift_summary(results: pd.DataFrame) -> dict[str, float]:
    """Per check family, the largest statistic and smallest adjusted p-value of this window."""
    summary: dict[str, float] = {}
    for check, part in results.groupby("check"):
        summary[f"{check}.max_statistic"] = float(part["statistic"].max())
        if "adjusted_p_value" in part and part["adjusted_p_value"].notna().any():
            summary[f"{check}.min_adjusted_p"] = float(part["adjusted_p_value"].min())
        summary[f"{check}.violations"] = float(part["violation"].sum())
    return summary


def write_reports(directory: str | Path, results: pd.DataFrame, found: list[dict[str, Any]]) -> list[Path]:
    """constraint_violations.json, violations.json and results.csv."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [
        directory / "constraint_violations.json",
        directory / "violations.json",
        directory / "results.csv",
    ]
    paths[0].write_text(json.dumps(constraint_violations(found), indent=1))
    paths[1].write_text(json.dumps(found, indent=1, default=str))
    results.to_csv(paths[2], index=False)
    return paths


def distribution_chart(
    baseline: Baseline, traffic: Traffic, features: list[str], limit: int = 400, title: str | None = None
) -> dict:
    """Baseline vs window density of the given features (image.* or probability.*), one facet each."""
    base, window = baseline.columns(), _traffic_columns(traffic)
    rng = np.random.default_rng(0)
    values = []
    for name in features:
        for source, column in (("baseline", base.get(name)), ("window", window.get(name))):
            if column is None or not len(column):
                continue
            sample = column if len(column) <= limit else rng.choice(column, limit, replace=False)
            values += [{"feature": name, "source": source, "value": float(v)} for v in sample]
    panels = [
        {
            "title": name,
            "width": 150,
            "height": 100,
            "transform": [
                {"filter": {"field": "feature", "equal": name}},
                {"density": "value", "groupby": ["source"]},
            ],
            "mark": {"type": "area", "opacity": 0.5},
            "encoding": {
                "x": {"field": "value", "type": "quantitative", "title": None},
                "y": {"field": "density", "type": "quantitative", "title": None, "stack": None},
                "color": {"field": "source", "type": "nominal"},
            },
        }
        for name in features
    ]
    return {
        "$schema": SCHEMA,
        "title": title or f"Baseline vs window, variant {traffic.variant}",
        "data": {"values": values},
        "concat": panels,
        "columns": 4,
    }


def history_chart(history: list[dict[str, Any]]) -> dict:
    """Drift scores (largest KS statistic, MMD, violations) of this and earlier runs over time."""
    keys = ("input_drift.max_statistic", "prediction_drift.max_statistic", "embedding_drift.max_statistic")
    values = [{"run": h["run"], "time": h["time"], "score": k.split(".")[0], "value": h[k]}
              for h in history for k in keys if k in h]  # fmt: skip
    return {
        "$schema": SCHEMA,
        "title": "Drift scores across monitoring runs",
        "data": {"values": values},
        "width": 520,
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": "time", "type": "temporal"},
            "y": {"field": "value", "type": "quantitative"},
            "color": {"field": "score", "type": "nominal"},
            "tooltip": [{"field": "run"}, {"field": "score"}, {"field": "value"}],
        },
    }


def _traffic_columns(traffic: Traffic) -> dict[str, np.ndarray]:
    from cxr.data.findings import FINDINGS

    named = {f"image.{n}": traffic.image[:, i] for i, n in enumerate(IMAGE_FEATURES) if len(traffic.image)}
    if len(traffic.probabilities):
        named.update({f"probability.{f}": traffic.probabilities[:, i] for i, f in enumerate(FINDINGS)})
    return named
