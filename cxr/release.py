"""Releasing a trained model: compare with production, package (with a verified ONNX export), register.

The flow's register step and any script use the same calls, so every registered version has a
package in SageMaker's layout stamped with its own name and version, a model card and its metrics.
Files reach the registry only through its API (`register`, `put_files`), so either backend works.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.data.cache import ShardCache
from cxr.data.findings import FINDINGS
from cxr.evaluate import auroc_or_nan
from cxr.gate import GateDecision
from cxr.model import CXRNet
from cxr.model_card import render_model_card
from cxr.package import build_package, export_and_verify_onnx, score_package
from cxr.registry import ModelRegistry, ModelVersion


@dataclass
class Release:
    """What registration produced."""

    version: ModelVersion
    onnx_check: dict[str, Any]


def monitoring_rows(rows: dict[str, np.ndarray]) -> np.ndarray:
    """Rows the monitoring baseline is drawn from: held out from training (validation and test).

    A trained model is more confident on the images it was fitted to; a baseline of those would make
    unchanged production traffic drift by construction.
    """
    return np.sort(np.concatenate([rows["val"], rows["test"]]))


def production_auroc(registry: ModelRegistry, cache: ShardCache, rows: np.ndarray) -> dict[str, float] | None:
    """Per-finding AUROC of the registry's production model on these cache rows (None without one)."""
    production = registry.production()
    if production is None:
        return None
    probs = score_package(production.package, cache, rows)
    labels = cache.labels[rows]
    return {f: auroc_or_nan(labels[:, k], probs[:, k]) for k, f in enumerate(FINDINGS)}


def registration_status(decision: GateDecision, deploys: bool) -> str:
    """The registry status a gate decision earns: `production` names what serves, so when a deploy step
    follows, a promoted version is `approved` until that deploy succeeds (the deploy marks it production)."""
    if not decision.promote:
        return "candidate"
    return "approved" if deploys else "production"


def release_model(
    registry: ModelRegistry,
    state_dict: dict[str, torch.Tensor],
    package_settings: dict[str, Any],
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    decision: GateDecision,
    cache: ShardCache,
    test_rows: np.ndarray,
    status: str | None = None,
    files: dict[str, str | Path | bytes] | None = None,
) -> Release:
    """Package, verify the ONNX export on the test rows, register, stamp the version; status comes last.

    `package_settings` needs image_size, crop and dropout. The version is registered as a candidate, gets
    its stamped package, card and `files` (e.g. the monitoring baseline), and only then its `status`
    (default: the gate's, as `registration_status` without a deploy step), so a failure anywhere leaves
    no production version with missing files.
    """
    thresholds = {row["finding"]: row["threshold"] for row in metrics.get("per_class", [])}
    metadata = {
        **package_settings,
        "thresholds": thresholds,
        "lineage": lineage,
        "name": f"cxr-{registry.group}",
    }
    model = CXRNet(pretrained=False, dropout=float(package_settings["dropout"]))
    model.load_state_dict(state_dict)
    with tempfile.TemporaryDirectory() as work:
        onnx_path = Path(work) / "model.onnx"
        onnx_check = export_and_verify_onnx(model, int(package_settings["crop"]), cache, test_rows, onnx_path)
        served_onnx = onnx_path if onnx_check["verified"] else None
        metadata["onnx"] = onnx_check
        draft = build_package(state_dict, metadata, Path(work) / "model.tar.gz", "", served_onnx)
        version = registry.register(
            {"model.tar.gz": draft, "metrics.json": json.dumps(metrics).encode()},
            metrics={"mean_auroc": metrics["mean_auroc"], "auroc": metrics["auroc"]},
            lineage=lineage,
            status="candidate",
            decision=decision.text(),
        )
        card = render_model_card(
            version.version, metrics, lineage, decision.text(), {"ONNX check": onnx_check}
        )
        stamped = build_package(
            state_dict,
            {**metadata, "version": version.version},
            Path(work) / "stamped" / "model.tar.gz",
            card,
            served_onnx,
        )
        version = registry.put_files(
            version.version, {**(files or {}), "model_card.md": card.encode(), "model.tar.gz": stamped}
        )
    status = status or registration_status(decision, deploys=False)
    if status != "candidate":
        version = registry.set_status(version.version, status, decision.text())
    return Release(version, onnx_check)
