"""Champion and shadow on the same requests: per finding, how often their decisions agree.

The server's shadow model answers a copy of every request it answered, under the same inference id
(`cxr serve --shadow`); the monitor pairs the two captures by that id. Per finding: the share of paired
images on which both models decide alike (each at its own registered threshold), each model's positive
rate, and the mean absolute difference of their probabilities. Disagreement is what a switch would
change for patients; it is reported, and a violation only below `min_shadow_agreement` when configured.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr.data.findings import FINDINGS
from cxr.monitor.reader import Traffic

CHECK = "shadow_agreement"


def paired_rows(champion: Traffic, shadow: Traffic) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (champion, shadow) of the images both answered, matched by inference id."""
    where = {key: i for i, key in enumerate(champion.inference_ids)}
    pairs = [(where[key], j) for j, key in enumerate(shadow.inference_ids) if key in where]
    if not pairs:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    mine, theirs = (np.array(side) for side in zip(*pairs, strict=True))
    return mine, theirs


def shadow_agreement(champion: Traffic, shadow: Traffic, min_agreement: float = 0.0) -> list[dict[str, Any]]:
    """One row per finding (check `shadow_agreement`, statistic = agreement of decisions) for the
    champion variant's images the shadow answered too; none when no image was paired."""
    a, b = paired_rows(champion, shadow)
    if not len(a):
        return []
    rows = []
    for k, finding in enumerate(FINDINGS):
        mine, theirs = champion.decisions[a, k], shadow.decisions[b, k]
        both = np.isfinite(mine) & np.isfinite(theirs)
        if not both.any():
            continue
        agreement = float((mine[both] == theirs[both]).mean())
        gap = float(np.abs(champion.probabilities[a, k] - shadow.probabilities[b, k]).mean())
        rows.append({
            "check": CHECK, "feature": f"agreement.{finding}", "statistic": agreement,
            "threshold": float(min_agreement), "p_value": None, "images": int(both.sum()),
            "champion_positive_rate": float(mine[both].mean()),
            "shadow_positive_rate": float(theirs[both].mean()),
            "mean_abs_probability_difference": gap, "violation": bool(agreement < min_agreement),
        })  # fmt: skip
    return rows
