"""Acquisition drift: the DICOM attributes captured with each image (`cxr.serve.dicom.ACQUISITION_ATTRIBUTES`)
of a current window against a reference window, attribute by attribute. Scanner and protocol changes
(a new manufacturer, a software update, another pixel spacing) are the usual cause of lost performance.

Each attribute's values are categories: text as it is; numbers as they are when both windows together
hold at most `MAX_CATEGORIES` distinct ones, else in bins at the pooled deciles; an image without the
attribute counts as `ABSENT`. Images without any attribute (PNG, JPEG, .npy traffic) are left out. The
2 × K table is tested with Pearson's chi-square, its rarest values pooled until every expected count
is at least 5; where that leaves fewer than two categories, with the statistic's exact permutation
distribution (sampled with the margins fixed; 9,999 permutations reach p = 10⁻⁴). Holm across the
attributes with more than one category; a violation needs also a total variation distance of at least
`min_shift`. Values the reference never had are named in the row's note, with their share of the window.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from cxr.monitor.checks import _decide, _row

CHECK = "acquisition_drift"
ABSENT = "(absent)"
MAX_CATEGORIES = 10  # more distinct numbers than this are binned
BINS = 10
MIN_EXPECTED = 5.0  # Cochran: below this expected count the chi-square approximation is not used
MAX_NAMED = 5  # new values named in a note

Attributes = Mapping[str, str | float]


def acquisition_drift(
    reference: Iterable[Attributes | None],
    window: Iterable[Attributes | None],
    alpha: float = 0.05,
    min_shift: float = 0.1,
    min_images: int = 20,
    permutations: int = 9999,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows (check `acquisition_drift`, feature `dicom.<attribute>`, statistic = total variation distance,
    threshold = `min_shift`, p-value, Holm-adjusted p-value, `alpha`, violation, note) comparing the
    window's captured attributes (one mapping per image; None or empty for non-DICOM images) with the
    reference's. No rows when the window has no DICOM image; one `dicom.images` row, never a violation,
    when either side has fewer than `min_images`."""
    before, after = _dicom(reference), _dicom(window)
    if not after:
        return []
    if min(len(before), len(after)) < max(min_images, 1):
        note = (
            f"{len(before)} reference and {len(after)} window DICOM image(s): fewer than {min_images}"
            " on a side, acquisition attributes not compared"
        )
        row = _row(CHECK, "dicom.images", min(len(before), len(after)), min_images, None)
        return [{**row, "violation": False, "note": note}]
    rng = np.random.default_rng(seed)
    names = sorted({name for record in before + after for name in record})
    rows = [_compare(name, before, after, min_shift, permutations, rng) for name in names]
    return _decide([row for row in rows if row is not None], alpha, min_shift)


def _dicom(records: Iterable[Attributes | None]) -> list[Attributes]:
    return [record for record in records if record]


def _compare(
    name: str,
    before: Sequence[Attributes],
    after: Sequence[Attributes],
    min_shift: float,
    permutations: int,
    rng: np.random.Generator,
) -> dict[str, Any] | None:
    """One attribute's row, or None when both windows hold a single category (nothing can have moved)."""
    reference, window, notes = _categories([r.get(name) for r in before], [r.get(name) for r in after])
    labels = sorted(set(reference) | set(window))
    if len(labels) < 2:
        return None
    table = np.array([[reference.count(c) for c in labels], [window.count(c) for c in labels]], dtype=float)
    shares = table / table.sum(axis=1, keepdims=True)
    distance = 0.5 * float(np.abs(shares[0] - shares[1]).sum())
    p_value, method = _homogeneity(table, permutations, rng)
    new = [(c, shares[1][i]) for i, c in enumerate(labels) if table[0, i] == 0]
    if new:
        named = ", ".join(f"{c!r} {share:.0%}" for c, share in sorted(new, key=lambda x: -x[1])[:MAX_NAMED])
        more = f" and {len(new) - MAX_NAMED} more" if len(new) > MAX_NAMED else ""
        notes.insert(0, f"not in the reference: {named}{more}")
    extra = {
        "method": method,
        "reference_images": len(before),
        "window_images": len(after),
        "new_share": float(sum(share for _, share in new)),
        "note": "; ".join(notes) or None,
    }
    return _row(CHECK, f"dicom.{name}", distance, min_shift, p_value, **extra)


def _categories(
    reference: list[str | float | None], window: list[str | float | None]
) -> tuple[list[str], list[str], list[str]]:
    """Both windows' values as category labels (numbers binned when there are many), and notes."""
    edges = _bin_edges([v for v in reference + window if v is not None])
    if not len(edges):
        return [_label(v) for v in reference], [_label(v) for v in window], []
    bounds = [f"{e:g}" for e in edges]
    names = [f"< {bounds[0]}", *(f"{a}–{b}" for a, b in itertools.pairwise(bounds)), f">= {bounds[-1]}"]

    def binned(values: list[str | float | None]) -> list[str]:
        return [ABSENT if v is None else names[np.searchsorted(edges, float(v), "right")] for v in values]

    return binned(reference), binned(window), _outside(reference, window)


def _bin_edges(present: list[str | float]) -> np.ndarray:
    """Inner edges at the pooled deciles of many distinct numbers; none for text or few values."""
    if not present or not all(isinstance(v, float) for v in present) or len(set(present)) <= MAX_CATEGORIES:
        return np.zeros(0)
    return np.unique(np.quantile(np.asarray(present, dtype=float), np.linspace(0, 1, BINS + 1)))[1:-1]


def _label(value: str | float | None) -> str:
    return ABSENT if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def _outside(reference: list[str | float | None], window: list[str | float | None]) -> list[str]:
    """A note on the share of the window's numbers outside the reference's range, when there are any."""
    known = [float(v) for v in reference if v is not None]
    if not known:
        return []
    low, high = min(known), max(known)
    outside = sum(1 for v in window if v is not None and not low <= float(v) <= high)
    if not outside:
        return []
    share = outside / len(window)
    return [f"{outside} window image(s) ({share:.1%}) outside the reference range {low:g}–{high:g}"]


def _homogeneity(table: np.ndarray, permutations: int, rng: np.random.Generator) -> tuple[float, str]:
    """p-value that the table's two rows come from one categorical distribution, and the method used."""
    pooled = _pool_rare(table)
    if pooled is not None:
        method = "chi-square" if pooled.shape == table.shape else "chi-square, rare values pooled"
        return float(stats.chi2_contingency(pooled, correction=False).pvalue), method
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    columns, first = table.sum(axis=0).astype(np.int64), int(table[0].sum())
    draws = rng.multivariate_hypergeometric(columns, first, size=permutations).astype(float)
    null = _pearson(np.stack([draws, columns - draws], axis=1), expected)
    observed = _pearson(table[None], expected)[0]
    return float((1 + np.sum(null >= observed * (1 - 1e-12))) / (1 + permutations)), "permutation"


def _pool_rare(table: np.ndarray) -> np.ndarray | None:
    """The table with its rarest categories merged into one, fewest first, until every expected count is
    at least `MIN_EXPECTED` (the table itself when it already is); None when no two categories remain.
    Which categories merge depends on the margins alone, which the null hypothesis leaves fixed."""
    totals = table.sum(axis=0)
    needed = MIN_EXPECTED * table.sum() / table.sum(axis=1).min()  # a category's total for expected ≥ 5
    order = np.argsort(totals, kind="stable")
    pooled = int(np.sum(totals < needed))  # the rare categories are the smallest
    if pooled == 0:
        return table
    while pooled < len(order) and totals[order[:pooled]].sum() < needed:
        pooled += 1
    if pooled >= len(order):
        return None
    keep = order[pooled:]
    return np.column_stack([table[:, keep], table[:, order[:pooled]].sum(axis=1)])


def _pearson(tables: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Pearson's chi-square statistic of each table (all share the margins behind `expected`)."""
    return ((tables - expected) ** 2 / expected).sum(axis=(1, 2))


def acquisition_checks(reference: Any, traffic: Any, config: Any) -> list[dict[str, Any]]:
    """`acquisition_drift` of a window's `Traffic` against earlier traffic's, with a monitor config's
    thresholds (its share of the false-alarm budget, minimum shift, minimum images)."""
    from cxr.monitor.checks import FAMILIES

    return acquisition_drift(reference.acquisition, traffic.acquisition, config.alpha / len(FAMILIES),
                             config.min_acquisition_shift, config.min_images, seed=config.seed)  # fmt: skip
