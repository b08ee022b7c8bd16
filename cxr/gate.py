"""The promotion gate: does a candidate model beat production on the same test split?

Beyond AUROC, it checks each finding at production's operating thresholds (Youden's and each named
operating point): a model with a higher AUROC can still catch fewer positives at the cut-off in use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr.data.findings import FINDINGS
from cxr.evaluate import json_number, operating_point

DEFAULT_MAX_SENSITIVITY_DROP = 0.05  # at production's threshold, per finding and operating point
MIN_POSITIVES = 20  # fewer positives among the compared images: the sensitivity change is shown, not judged


@dataclass
class GateDecision:
    """Outcome of comparing a candidate with production, with the reasons."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    mean_auroc_delta: float | None = None
    worst_finding: str | None = None
    worst_drop: float | None = None
    at_production_thresholds: list[dict[str, Any]] = field(default_factory=list)  # see `threshold_table`

    def text(self) -> str:
        """One paragraph for logs and the model card."""
        verdict = "promote to production" if self.promote else "keep as candidate"
        return f"{verdict}: " + "; ".join(self.reasons)


def threshold_table(
    labels: np.ndarray,
    candidate_probs: np.ndarray,
    production_probs: np.ndarray,
    production_thresholds: dict[str, dict[str, float]],
    candidate_thresholds: dict[str, dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Per operating point and finding, on the same images: sensitivity and specificity of production and
    of the candidate at production's threshold, and of the candidate at its own threshold for that point
    (JSON-ready rows; thresholds as `cxr.evaluate.report_thresholds` gives them)."""
    rows = []
    for point, thresholds in production_thresholds.items():
        own = (candidate_thresholds or {}).get(point, {})
        for k, finding in enumerate(FINDINGS):
            if finding not in thresholds:
                continue
            y = labels[:, k]
            row: dict[str, Any] = {
                "point": point,
                "finding": finding,
                "positives": int((y > 0.5).sum()),
                "threshold": thresholds[finding],
                "candidate_threshold": own.get(finding),
            }
            at = {
                "production": operating_point(y, production_probs[:, k], thresholds[finding]),
                "candidate": operating_point(y, candidate_probs[:, k], thresholds[finding]),
            }
            if finding in own:
                at["candidate_own"] = operating_point(y, candidate_probs[:, k], own[finding])
            for who, rates in at.items():
                for rate in ("sensitivity", "specificity"):
                    row[f"{who}_{rate}"] = json_number(rates[rate])
            rows.append(row)
    return rows


def promotion_gate(
    candidate_auroc: dict[str, float],
    production_auroc: dict[str, float] | None,
    min_improvement: float = 0.0,
    max_finding_drop: float = 0.02,
    manual: bool = False,
    refused: str | None = None,
    at_production_thresholds: list[dict[str, Any]] | None = None,
    max_sensitivity_drop: float | None = DEFAULT_MAX_SENSITIVITY_DROP,
) -> GateDecision:
    """Promote if mean AUROC beats production by `min_improvement`, no finding drops by more than
    `max_finding_drop`, and at production's thresholds (`threshold_table`) no finding with at least
    MIN_POSITIVES positives loses more than `max_sensitivity_drop` sensitivity (None: not checked); all
    from the same test images, unseen by both models. Manual mode never promotes; nor does a comparison
    `refused` for the reason given."""
    decision = _auroc_gate(
        candidate_auroc, production_auroc, min_improvement, max_finding_drop, manual, refused
    )
    table = at_production_thresholds or []
    decision.at_production_thresholds = table
    if table and production_auroc is not None and not refused and max_sensitivity_drop is not None:
        flagged, summary = _sensitivity_drops(table, max_sensitivity_drop)
        decision.reasons += flagged or [summary]
        decision.promote = decision.promote and not flagged
    return decision


def require_external_floors(
    decision: GateDecision, external: dict[str, dict[str, Any]], floors: dict[str, float]
) -> GateDecision:
    """Hold the candidate back unless each named external set (`cxr.external`) was evaluated and its mean
    AUROC reaches the set's floor (`registry.external_floors`); the reasons say how each fared."""
    for name, floor in floors.items():
        result = external.get(name)
        mean = None if result is None else result.get("mean_auroc")
        if mean is None or mean != mean:
            decision.reasons.append(f"external set {name}: not evaluated (floor {floor:.3f})")
            decision.promote = False
        elif mean < floor:
            decision.reasons.append(f"external set {name}: mean AUROC {mean:.3f} < floor {floor:.3f}")
            decision.promote = False
        else:
            decision.reasons.append(f"external set {name}: mean AUROC {mean:.3f} ≥ floor {floor:.3f}")
    return decision


def _sensitivity_drops(rows: list[dict[str, Any]], limit: float) -> tuple[list[str], str]:
    """Reasons for each finding whose sensitivity at production's threshold falls by more than `limit`,
    and a one-line summary when none does."""
    judged = [
        (r, r["production_sensitivity"] - r["candidate_sensitivity"])
        for r in rows
        if r["positives"] >= MIN_POSITIVES
        and None not in (r["production_sensitivity"], r["candidate_sensitivity"])
    ]
    flagged = [
        f"{r['finding']} at production's {r['point']} threshold {r['threshold']:.3f}: sensitivity"
        f" {r['production_sensitivity']:.3f} → {r['candidate_sensitivity']:.3f}"
        f" (drop {drop:.3f} > {limit:.3f})"
        for r, drop in judged
        if drop > limit
    ]
    largest = max((drop for _, drop in judged), default=None)
    summary = "sensitivity at production's thresholds: " + (
        "nothing to judge" if largest is None else f"largest drop {max(largest, 0.0):.3f} within {limit:.3f}"
    )
    if len(judged) < len(rows):
        summary += (
            f" ({len(rows) - len(judged)} finding × point pairs with < {MIN_POSITIVES} positives not judged)"
        )
    return flagged, summary


def _auroc_gate(
    candidate_auroc: dict[str, float],
    production_auroc: dict[str, float] | None,
    min_improvement: float,
    max_finding_drop: float,
    manual: bool,
    refused: str | None,
) -> GateDecision:
    cand = np.array([candidate_auroc.get(f, np.nan) for f in FINDINGS], dtype=float)
    cand_mean = float(np.nanmean(cand))
    if refused:
        return GateDecision(False, [f"no fair comparison with production: {refused}"])
    if manual:
        return GateDecision(
            False, [f"manual approval mode (mean AUROC {cand_mean:.4f}); run `cxr registry approve`"]
        )
    if production_auroc is None:
        return GateDecision(True, [f"no production model yet (mean AUROC {cand_mean:.4f})"])
    prod = np.array([production_auroc.get(f, np.nan) for f in FINDINGS], dtype=float)
    both = np.isfinite(cand) & np.isfinite(prod)
    delta = float(np.mean(cand[both]) - np.mean(prod[both]))
    drops = prod - cand
    drops[~both] = -np.inf
    worst = int(np.argmax(drops))
    reasons, promote = [], True
    if delta > min_improvement:
        reasons.append(f"mean AUROC {delta:+.4f} vs production (needs > {min_improvement:+.4f})")
    else:
        promote = False
        reasons.append(
            f"mean AUROC {delta:+.4f} vs production does not beat the margin {min_improvement:+.4f}"
        )
    if drops[worst] > max_finding_drop:
        promote = False
        reasons.append(f"{FINDINGS[worst]} drops {drops[worst]:.4f} (floor {max_finding_drop:.4f})")
    else:
        reasons.append(f"largest per-finding drop {max(drops[worst], 0.0):.4f} within {max_finding_drop:.4f}")
    return GateDecision(promote, reasons, delta, FINDINGS[worst], float(drops[worst]))
