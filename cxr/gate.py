"""The promotion gate: does a candidate model beat production on the same test split?"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cxr.data.findings import FINDINGS


@dataclass
class GateDecision:
    """Outcome of comparing a candidate with production, with the reasons."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    mean_auroc_delta: float | None = None
    worst_finding: str | None = None
    worst_drop: float | None = None

    def text(self) -> str:
        """One paragraph for logs and the model card."""
        verdict = "promote to production" if self.promote else "keep as candidate"
        return f"{verdict}: " + "; ".join(self.reasons)


def promotion_gate(
    candidate_auroc: dict[str, float],
    production_auroc: dict[str, float] | None,
    min_improvement: float = 0.0,
    max_finding_drop: float = 0.02,
    manual: bool = False,
    refused: str | None = None,
) -> GateDecision:
    """Promote if mean AUROC beats production by `min_improvement` and no finding drops by more than
    `max_finding_drop`; both AUROC sets must come from the same test images, unseen by both models.
    Manual mode never promotes; nor does a comparison `refused` for the reason given."""
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
