"""Vega-Lite chart specs for reports and Metaflow cards (plain dicts; any Vega-Lite renderer shows them)."""

from __future__ import annotations

from typing import Any

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"


def prevalence_chart(split_summary: list[dict[str, Any]], findings: list[str]) -> dict[str, Any]:
    """Grouped bars: label prevalence per finding, one color per split."""
    values = [
        {"split": r["split"], "finding": f, "prevalence": r[f]} for r in split_summary for f in findings
    ]
    return {
        "$schema": SCHEMA,
        "title": "Label prevalence per split",
        "data": {"values": values},
        "mark": "bar",
        "width": 600,
        "encoding": {
            "x": {"field": "finding", "type": "nominal", "sort": findings},
            "xOffset": {"field": "split"},
            "y": {"field": "prevalence", "type": "quantitative", "axis": {"format": "%"}},
            "color": {"field": "split", "type": "nominal"},
            "tooltip": [{"field": "split"}, {"field": "finding"}, {"field": "prevalence", "format": ".2%"}],
        },
    }


def training_curves(history: list[dict[str, float]]) -> dict[str, Any]:
    """Train loss and validation mean AUROC per epoch, side by side."""
    values = [
        {"epoch": h["epoch"], "metric": m, "value": h[m]}
        for h in history
        for m in ("train_loss", "val_mean_auroc")
    ]
    return {
        "$schema": SCHEMA,
        "title": "Training curves",
        "data": {"values": values},
        "facet": {"column": {"field": "metric", "type": "nominal"}},
        "resolve": {"scale": {"y": "independent"}},
        "spec": {
            "width": 280,
            "mark": {"type": "line", "point": True},
            "encoding": {
                "x": {"field": "epoch", "type": "quantitative", "axis": {"tickMinStep": 1}},
                "y": {"field": "value", "type": "quantitative", "scale": {"zero": False}},
            },
        },
    }


def roc_chart(curves: dict[str, dict[str, list[float]]], auroc: dict[str, float]) -> dict[str, Any]:
    """Per-finding ROC curves (one facet each) with the chance diagonal."""
    values = [
        {"finding": f"{name} ({auroc.get(name, float('nan')):.3f})", "fpr": x, "tpr": y}
        for name, curve in curves.items()
        for x, y in zip(curve["fpr"], curve["tpr"], strict=True)
    ]
    return {
        "$schema": SCHEMA,
        "title": "ROC curves on test (AUROC in brackets)",
        "data": {"values": values},
        "facet": {"field": "finding", "type": "nominal"},
        "columns": 4,
        "spec": {
            "width": 120,
            "height": 120,
            "layer": [
                {
                    "mark": {"type": "line", "interpolate": "step-after"},
                    "encoding": {
                        "x": {"field": "fpr", "type": "quantitative", "title": "1 - specificity"},
                        "y": {"field": "tpr", "type": "quantitative", "title": "sensitivity"},
                    },
                },
                {
                    "data": {"values": [{"fpr": 0, "tpr": 0}, {"fpr": 1, "tpr": 1}]},
                    "mark": {"type": "line", "strokeDash": [4, 4], "color": "gray"},
                    "encoding": {
                        "x": {"field": "fpr", "type": "quantitative"},
                        "y": {"field": "tpr", "type": "quantitative"},
                    },
                },
            ],
        },
    }


def reliability_chart(reliability: list[dict[str, Any]], ece: float) -> dict[str, Any]:
    """Reliability diagram: observed positive fraction against mean predicted probability, per bin."""
    return {
        "$schema": SCHEMA,
        "title": f"Reliability (all findings pooled), ECE {ece:.4f}",
        "width": 320,
        "height": 320,
        "layer": [
            {
                "data": {"values": reliability},
                "mark": {"type": "line", "point": True},
                "encoding": {
                    "x": {"field": "mean_predicted", "type": "quantitative", "scale": {"domain": [0, 1]}},
                    "y": {"field": "fraction_positive", "type": "quantitative", "scale": {"domain": [0, 1]}},
                    "tooltip": [
                        {"field": "count"},
                        {"field": "mean_predicted"},
                        {"field": "fraction_positive"},
                    ],
                },
            },
            {
                "data": {"values": [{"x": 0, "y": 0}, {"x": 1, "y": 1}]},
                "mark": {"type": "line", "strokeDash": [4, 4], "color": "gray"},
                "encoding": {
                    "x": {"field": "x", "type": "quantitative"},
                    "y": {"field": "y", "type": "quantitative"},
                },
            },
        ],
    }


def auroc_forest_chart(sets: dict[str, list[dict[str, Any]]], findings: list[str]) -> dict[str, Any]:
    """Per finding, AUROC with its 95% CI on each evaluated set (the own test split and each external
    one): a point and a bar per set; findings a set does not label are left out of it."""
    values = [
        {"set": name, "finding": r["finding"], "auroc": r["auroc"], "lo": r["auroc_lo"], "hi": r["auroc_hi"]}
        for name, rows in sets.items()
        for r in rows
        if r.get("auroc") is not None and r["auroc"] == r["auroc"]
    ]
    y = {"field": "finding", "type": "nominal", "sort": findings}
    return {
        "$schema": SCHEMA,
        "title": "AUROC (95% CI) on the test split and external sets",
        "data": {"values": values},
        "width": 420,
        "layer": [
            {
                "mark": "rule",
                "encoding": {
                    "y": y,
                    "yOffset": {"field": "set"},
                    "color": {"field": "set"},
                    "x": {
                        "field": "lo",
                        "type": "quantitative",
                        "title": "AUROC",
                        "scale": {"domain": [0.4, 1.0]},
                    },
                    "x2": {"field": "hi"},
                },
            },
            {
                "mark": {"type": "point", "filled": True},
                "encoding": {
                    "y": y,
                    "yOffset": {"field": "set"},
                    "color": {"field": "set", "type": "nominal"},
                    "x": {"field": "auroc", "type": "quantitative"},
                    "tooltip": [
                        {"field": "set"},
                        {"field": "finding"},
                        {"field": "auroc", "format": ".3f"},
                        {"field": "lo", "format": ".3f"},
                        {"field": "hi", "format": ".3f"},
                    ],
                },
            },
        ],
    }
