"""Releasing a trained model: compare with production, package (with verified CPU backends), register.

The flow's register step and any script use the same calls, so every registered version has a
package in SageMaker's layout stamped with its own name and version, a model card and its metrics.
Files reach the registry only through its API (`register`, `put_files`), so either backend works.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.data.cache import ShardCache
from cxr.data.findings import FINDINGS
from cxr.evaluate import YOUDEN, auroc_or_nan, report_thresholds
from cxr.gate import GateDecision, threshold_table
from cxr.model import CXRNet
from cxr.model_card import render_model_card
from cxr.package import BackendChecks, build_package, export_and_verify, score_package
from cxr.registry import ModelRegistry, ModelVersion


@dataclass
class Release:
    """What registration produced."""

    version: ModelVersion
    onnx_check: dict[str, Any]
    openvino_checks: dict[str, dict[str, Any]] = field(default_factory=dict)


def monitoring_rows(rows: dict[str, np.ndarray]) -> np.ndarray:
    """Rows the monitoring baseline is drawn from: held out from training (validation and test).

    A trained model is more confident on the images it was fitted to; a baseline of those would make
    unchanged production traffic drift by construction.
    """
    return np.sort(np.concatenate([rows["val"], rows["test"]]))


SPLIT_FILE = "split_images.json.gz"  # beside each version: the images it was fitted to and tested on


def split_record(image_ids: Any, rows: dict[str, np.ndarray]) -> bytes:
    """The registry file naming a version's images: `fitted` (train + val) and `test` image ids."""
    ids = np.asarray(image_ids)
    fitted = sorted(ids[np.concatenate([rows["train"], rows["val"]])].tolist())
    record = {"fitted": fitted, "test": sorted(ids[rows["test"]].tolist())}
    return gzip.compress(json.dumps(record).encode(), mtime=0)


def fitted_images(version: ModelVersion) -> set[str] | None:
    """Image ids a registered version was trained or selected on (None when it recorded none)."""
    path = version.directory / SPLIT_FILE
    if not path.is_file():
        return None
    return set(json.loads(gzip.decompress(path.read_bytes()))["fitted"])


def registered_thresholds(version: ModelVersion) -> dict[str, dict[str, float]]:
    """`{operating point: {finding: threshold}}` a version was registered with (its metrics.json: Youden's
    and each named operating point); empty when it has no metrics file."""
    path = version.directory / "metrics.json"
    return report_thresholds(json.loads(path.read_text())) if path.is_file() else {}


@dataclass
class Comparison:
    """Candidate and production AUROC on the same test images, none of which either model was fitted to,
    and both models at production's operating thresholds there (`cxr.gate.threshold_table`)."""

    candidate: dict[str, float]
    production: dict[str, float] | None
    images: int
    excluded: int = 0
    refused: str | None = None
    at_production_thresholds: list[dict[str, Any]] = field(default_factory=list)


def compare_with_production(
    registry: ModelRegistry,
    cache: ShardCache,
    test_rows: np.ndarray,
    candidate_probs: np.ndarray,
    min_share: float = 0.5,
    candidate_thresholds: dict[str, dict[str, float]] | None = None,
) -> Comparison:
    """Score production on the candidate's test rows that production never trained on.

    Test rows in production's recorded training or validation images are left out of both sides; when
    production recorded none, or fewer than `min_share` of the test rows remain, the comparison is refused
    with the reason (the gate then keeps the candidate for a manual decision). On the rows compared, both
    models are also measured at production's registered thresholds, and the candidate at its own
    `candidate_thresholds` (`{point: {finding: threshold}}`, as `cxr.evaluate.report_thresholds` reads).
    """
    labels = cache.labels[test_rows]
    production = registry.production()
    if production is None:
        return Comparison(_aurocs(labels, candidate_probs), None, len(test_rows))
    fitted = fitted_images(production)
    if fitted is None:
        reason = (f"production version {production.version} recorded no training images, so its test AUROC "
                  "could be inflated: compare by hand and `cxr registry approve` if warranted")  # fmt: skip
        return Comparison(_aurocs(labels, candidate_probs), None, 0, len(test_rows), reason)
    clean = ~cache.meta["image_id"].iloc[test_rows].isin(fitted).to_numpy()
    images, excluded = int(clean.sum()), int((~clean).sum())
    if images < min_share * len(test_rows):
        reason = (f"production version {production.version} was trained on {excluded:,} of the "
                  f"{len(test_rows):,} test images; fix the test set (NIH's test_list.txt in the data root) "
                  "so that both models are compared on images neither has seen")  # fmt: skip
        return Comparison(_aurocs(labels, candidate_probs), None, images, excluded, reason)
    production_probs = score_package(
        production.package, cache, test_rows[clean], label=f"production v{production.version}"
    )
    candidate = _aurocs(labels[clean], candidate_probs[clean])
    table = threshold_table(labels[clean], candidate_probs[clean], production_probs,
                            registered_thresholds(production), candidate_thresholds)  # fmt: skip
    return Comparison(candidate, _aurocs(labels[clean], production_probs), images, excluded, None, table)


def _aurocs(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
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
    package_files: dict[str, str | Path] | None = None,
    calibration_rows: np.ndarray | None = None,
) -> Release:
    """Package, verify the CPU backends on the test rows, register, stamp the version; status comes last.

    The ONNX export is checked under ONNX Runtime and OpenVINO (FP32, BF16), and an INT8 model is
    quantised on `calibration_rows` (default: the cache rows outside `test_rows`) and checked; each
    verified backend ships in the package (`cxr.package.export_and_verify`).

    `package_settings` needs image_size, crop and dropout. The version is registered as a candidate, gets
    its stamped package, card and `files` (e.g. the monitoring baseline), and only then its `status`
    (default: the gate's, as `registration_status` without a deploy step), so a failure anywhere leaves
    no production version with missing files. `package_files` go into the package itself (the input gate).
    """
    thresholds = report_thresholds(metrics)
    metadata = {
        **package_settings,
        "thresholds": thresholds.pop(YOUDEN, {}),
        "operating_points": thresholds,  # {name: {finding: threshold}} besides Youden's
        "lineage": lineage,
        "name": f"cxr-{registry.group}",
    }
    model = CXRNet(pretrained=False, dropout=float(package_settings["dropout"]))
    model.load_state_dict(state_dict)
    if calibration_rows is None:
        calibration_rows = np.setdiff1d(np.arange(len(cache)), test_rows)
    with tempfile.TemporaryDirectory() as work:
        checks = export_and_verify(model, int(package_settings["crop"]), cache, test_rows,
                                   Path(work), calibration_rows=calibration_rows)  # fmt: skip
        metadata.update({"onnx": checks.onnx, "openvino": checks.openvino})
        package_files = {**(package_files or {}), **checks.files}
        draft = build_package(state_dict, metadata, Path(work) / "model.tar.gz", "", files=package_files)
        version = registry.register(
            {"model.tar.gz": draft, "metrics.json": json.dumps(metrics).encode()},
            metrics={"mean_auroc": metrics["mean_auroc"], "auroc": metrics["auroc"]},
            lineage=lineage,
            status="candidate",
            decision=decision.text(),
        )
        card = render_model_card(version.version, metrics, lineage, decision.text(),
                                 _check_lines(checks), decision.at_production_thresholds)  # fmt: skip
        stamped = build_package(
            state_dict,
            {**metadata, "version": version.version},
            Path(work) / "stamped" / "model.tar.gz",
            card,
            files=package_files,
        )
        version = registry.put_files(
            version.version, {**(files or {}), "model_card.md": card.encode(), "model.tar.gz": stamped}
        )
    status = status or registration_status(decision, deploys=False)
    if status != "candidate":
        version = registry.set_status(version.version, status, decision.text())
    return Release(version, checks.onnx, checks.openvino)


def _check_lines(checks: BackendChecks) -> dict[str, Any]:
    """The model card's lines on the backend checks."""
    return {
        "ONNX check": checks.onnx,
        **{f"OpenVINO {p.upper()} check": c for p, c in checks.openvino.items()},
    }
