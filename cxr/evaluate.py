"""Clinical-grade evaluation of 14-finding predictions.

Per finding: AUROC with a 95% bootstrap CI (resampling patients, all images of a drawn patient together,
when patient ids are known; images otherwise), AUPRC, operating thresholds chosen on validation (Youden's J,
and any named target sensitivity or specificity) reported on test as sensitivity, specificity, PPV and NPV
with the same bootstrap's CIs, and calibration (expected calibration error). Overall: mean AUROC with its
CI, a pooled reliability curve, and AUROC by subgroup (sex, age band, view position) with the largest gap.
The same report is computed for any predictions file by `cxr evaluate`, so any model can be compared on
equal terms.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from threadpoolctl import threadpool_limits

from cxr.data.findings import FINDINGS, JOINT_FINDINGS, joint_scores

AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
CALIBRATION_BINS = 15
MIN_SUBGROUP = 20  # smallest subgroup (images) for which AUROC is reported
YOUDEN = "youden"  # the operating point every report has; named targets come from configuration
TARGET_METRICS = ("sensitivity", "specificity")
RATES = ("sensitivity", "specificity", "ppv", "npv")


class EvaluationError(ValueError):
    """Predictions and labels cannot be evaluated together."""


@dataclass
class EvaluationReport:
    """All figures of one evaluation; `to_dict()` is JSON-ready."""

    per_class: pd.DataFrame
    mean_auroc: float
    mean_auroc_ci: tuple[float, float]
    ece: float
    reliability: pd.DataFrame
    subgroups: pd.DataFrame
    largest_gap: dict[str, Any]
    roc_curves: dict[str, dict[str, list[float]]] = field(repr=False, default_factory=dict)
    n_images: int = 0
    thresholds_from: str = "validation"
    resampled: str = "images"  # the bootstrap's unit: "patients" or "images"
    n_resampled: int = 0  # how many of them
    operating_points: dict[str, dict[str, Any]] = field(default_factory=dict)  # see `operating_points()`
    joint: pd.DataFrame = field(default_factory=pd.DataFrame)  # see `joint_aurocs()`

    @property
    def auroc(self) -> dict[str, float]:
        """Per-finding AUROC."""
        return {k: float(v) for k, v in self.per_class["auroc"].items()}

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON types."""
        return {
            "n_images": self.n_images,
            "bootstrap": {"resampled": self.resampled, "units": self.n_resampled},
            "mean_auroc": self.mean_auroc,
            "mean_auroc_ci": list(self.mean_auroc_ci),
            "ece": self.ece,
            "thresholds_from": self.thresholds_from,
            "auroc": self.auroc,
            "per_class": json.loads(self.per_class.reset_index().to_json(orient="records")),
            "reliability": json.loads(self.reliability.to_json(orient="records")),
            "subgroups": json.loads(self.subgroups.to_json(orient="records")),
            "largest_gap": self.largest_gap,
            "operating_points": self.operating_points,
            "roc_curves": self.roc_curves,
            "joint": json.loads(self.joint.reset_index().to_json(orient="records"))
            if len(self.joint)
            else [],
        }

    def table(self) -> str:
        """A readable per-finding table plus the summary lines."""
        view = self.per_class[
            ["n_pos", "auroc", "auroc_lo", "auroc_hi", "auprc", "sensitivity", "specificity", "ppv"]
        ]
        lines = [
            view.to_string(float_format=lambda v: f"{v:.3f}"),
            f"mean AUROC {self.mean_auroc:.4f}"
            f" (95% CI {self.mean_auroc_ci[0]:.4f}-{self.mean_auroc_ci[1]:.4f}),"
            f" ECE {self.ece:.4f}, {self.n_images} images, CIs resample {self.n_resampled} {self.resampled},"
            f" thresholds from {self.thresholds_from}",
        ]
        if self.largest_gap:
            gap = self.largest_gap
            lines.append(
                f"largest subgroup gap: {gap['gap']:.3f} mean AUROC by {gap['dimension']}"
                f" ({gap['best']} vs {gap['worst']})"
            )
        for name, point in self.operating_points.items():
            lines += ["", _describe_point(name, point), _point_table(point)]
        if len(self.joint):
            lines += ["", "joint findings (scored by the highest member probability)",
                      self.joint.to_string(float_format=lambda v: f"{v:.3f}")]  # fmt: skip
        return "\n".join(lines)

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write report.json, per_class.csv and subgroups.csv into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": directory / "report.json",
            "per_class": directory / "per_class.csv",
            "subgroups": directory / "subgroups.csv",
        }
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1))
        self.per_class.to_csv(paths["per_class"])
        self.subgroups.to_csv(paths["subgroups"], index=False)
        return paths


def _has_both(y: np.ndarray) -> bool:
    """Whether the labelled entries (NaN: not labelled) hold both classes."""
    return bool((y > 0.5).any() and (y < 0.5).any())


def labelled(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One finding's labels and scores where it is labelled (NaN labels: the dataset does not say)."""
    known = ~np.isnan(y)
    return y[known], p[known]


def auroc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC over the labelled images, or NaN when they hold only one class."""
    y, p = labelled(y, p)
    return float(roc_auc_score(y, p)) if _has_both(y) else float("nan")


BOOT_CHUNK = 50  # resamples per vectorised block: memory stays at BOOT_CHUNK × N weights


def clusters(patient_ids: Any, n: int) -> tuple[np.ndarray, int]:
    """(cluster index per image, number of clusters): one per patient, or one per image without ids.

    Images with a missing patient id are clusters of their own.
    """
    if patient_ids is None:
        return np.arange(n), n
    codes, uniques = pd.factorize(np.asarray(patient_ids, dtype=object))
    if len(codes) != n:
        raise EvaluationError(f"{len(codes)} patient ids for {n} images")
    missing = codes < 0
    codes[missing] = len(uniques) + np.arange(missing.sum())
    return codes, int(len(uniques) + missing.sum())


def resample_counts(n_clusters: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples as blocks [≤ BOOT_CHUNK, n_clusters] of how often each cluster was drawn.

    The same `seed` gives the same resamples, so every statistic of one report shares them."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, BOOT_CHUNK):
        size = min(BOOT_CHUNK, n_boot - start)
        draws = rng.integers(0, n_clusters, size=(size, n_clusters))
        offsets = (np.arange(size) * n_clusters)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=size * n_clusters)
        yield counts.reshape(size, n_clusters)  # integers: exact sums, and cumsum is fast on them


def bootstrap_aurocs(
    y: np.ndarray, p: np.ndarray, n_boot: int, seed: int, patient_ids: Any = None
) -> np.ndarray:
    """[n_boot, K] AUROCs over bootstrap resamples (NaN where one lacks a class).

    With `patient_ids` (one per image) the resamples draw patients with replacement and take all their
    images (cluster bootstrap), so the spread reflects images of one patient being alike; without, images.
    A resample is a weight per image (how often its patient was drawn); its AUROC is the weighted
    Mann–Whitney statistic from weighted mid-ranks over images sorted once per finding: linear in N.
    """
    n, k = y.shape
    out = np.full((n_boot, k), np.nan)
    if n == 0:
        return out
    cluster, n_clusters = clusters(patient_ids, n)
    known = ~np.isnan(y)
    ranked = [_score_order(y[known[:, c], c], p[known[:, c], c], cluster[known[:, c]]) for c in range(k)]
    start = 0
    for counts in resample_counts(n_clusters, n_boot, seed):
        for c, ranking in enumerate(ranked):
            out[start : start + len(counts), c] = _weighted_auroc(
                np.take(counts, ranking.owner, axis=1), ranking
            )
        start += len(counts)
    return out


@dataclass
class _Ranking:
    """One finding's images in ascending score order: whose they are, and where the positives sit."""

    owner: np.ndarray  # cluster of each image
    positives: np.ndarray  # positions of the positive images
    first: np.ndarray  # for each positive, the first position of its tied-score run
    last: np.ndarray  # ... and the last


def _score_order(y: np.ndarray, p: np.ndarray, cluster: np.ndarray) -> _Ranking:
    order = np.argsort(p, kind="stable")
    scores = p[order]
    new_run = np.r_[True, scores[1:] != scores[:-1]]
    run = np.cumsum(new_run) - 1  # the tied-score run of each position
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(scores)] - 1
    positives = np.flatnonzero(y[order] > 0.5)
    return _Ranking(cluster[order], positives, starts[run[positives]], ends[run[positives]])


def _weighted_auroc(weights: np.ndarray, ranking: _Ranking) -> np.ndarray:
    """AUROC per row of integer image weights [resamples, N in score order]; ties count one half."""
    if weights.shape[1] == 0:  # a finding no image labels
        return np.full(len(weights), np.nan)
    below = np.cumsum(weights, axis=1)  # weight at or below each position
    first = ranking.first
    twice_mid_rank = below[:, first] - weights[:, first] + below[:, ranking.last]
    positive = weights[:, ranking.positives]
    n_pos = positive.sum(axis=1)
    n_neg = below[:, -1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((positive * twice_mid_rank).sum(axis=1) - n_pos**2) / (2.0 * n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def youden_thresholds(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per finding, the threshold maximising sensitivity + specificity − 1 (0.5 when undefined)."""
    thresholds = np.full(y.shape[1], 0.5)
    for c in range(y.shape[1]):
        yc, pc = labelled(y[:, c], p[:, c])
        if _has_both(yc):
            fpr, tpr, cut = roc_curve(yc, pc)
            best = int(np.argmax(tpr - fpr))
            thresholds[c] = float(min(cut[best], 1.0))
    return thresholds


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity and PPV of `p >= threshold`."""
    pred = p >= threshold
    tp, fp = float((pred & (y == 1)).sum()), float((pred & (y == 0)).sum())
    fn, tn = float((~pred & (y == 1)).sum()), float((~pred & (y == 0)).sum())
    nan = float("nan")
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else nan,
        "specificity": tn / (tn + fp) if tn + fp else nan,
        "ppv": tp / (tp + fp) if tp + fp else nan,
    }


@dataclass
class OperatingTarget:
    """A named operating point: per finding, the threshold at which validation `metric` reaches `target`."""

    name: str
    metric: str  # "sensitivity" or "specificity"
    target: float
    per_finding: dict[str, float] = field(default_factory=dict)  # overrides of `target`

    def target_for(self, finding: str) -> float:
        """The target for one finding."""
        return self.per_finding.get(finding, self.target)


def parse_operating_points(setting: Any) -> list[OperatingTarget]:
    """Named targets from configuration (`evaluate.operating_points`):
    `{name: {sensitivity: 0.9}}` or `{name: {specificity: 0.9, per_finding: {Hernia: 0.95}}}`."""
    if not setting:
        return []
    if not isinstance(setting, dict):
        raise EvaluationError("operating_points must map names to {sensitivity|specificity: target}")
    return [_parse_target(name, spec) for name, spec in setting.items()]


def _parse_target(name: Any, spec: Any) -> OperatingTarget:
    where = f"operating point {name!r}"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,39}", name) or name == YOUDEN:
        raise EvaluationError(f"{where}: names are letters, digits and _ (and not {YOUDEN!r})")
    metrics = [m for m in TARGET_METRICS if m in (spec or {})] if isinstance(spec, dict) else []
    if len(metrics) != 1 or set(spec) - {*TARGET_METRICS, "per_finding"}:
        raise EvaluationError(f"{where}: give exactly one of sensitivity or specificity (and per_finding)")
    overrides = spec.get("per_finding") or {}
    if not isinstance(overrides, dict) or set(overrides) - set(FINDINGS):
        raise EvaluationError(f"{where}: per_finding maps findings ({', '.join(FINDINGS)}) to targets")
    values = {key: _target_value(where, value) for key, value in overrides.items()}
    return OperatingTarget(name, metrics[0], _target_value(where, spec[metrics[0]]), values)


def _target_value(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise EvaluationError(f"{where}: a target is a number in (0, 1], not {value!r}")
    return float(value)


def thresholds_at_target(y: np.ndarray, p: np.ndarray, target: OperatingTarget) -> np.ndarray:
    """Per finding, the threshold (`p >= threshold` is positive) that reaches the target on these labels.

    Sensitivity: the highest threshold whose sensitivity is at least the target (the score of the positive
    that completes the needed share). Specificity: the lowest threshold whose specificity is at least the
    target (just above the score of the negative that completes it). NaN where a class is missing.
    """
    out = np.full(y.shape[1], np.nan)
    for c, finding in enumerate(FINDINGS):
        if not _has_both(y[:, c]):
            continue
        positive, negative = y[:, c] > 0.5, y[:, c] < 0.5  # neither where the finding is not labelled
        goal = target.target_for(finding)
        if target.metric == "sensitivity":
            scores = np.sort(p[positive, c])[::-1]
            out[c] = scores[_needed(goal, len(scores)) - 1]
        else:
            scores = np.sort(p[negative, c])
            out[c] = np.nextafter(scores[_needed(goal, len(scores)) - 1], np.inf)
    return out


def _needed(goal: float, n: int) -> int:
    """How many of n make a share of at least `goal` (guarding against 0.9 × 10 = 9.000000000000002)."""
    return max(1, int(np.ceil(goal * n - 1e-9)))


def choose_thresholds(
    y: np.ndarray, p: np.ndarray, targets: Sequence[OperatingTarget]
) -> dict[str, np.ndarray]:
    """Per named target, its per-finding thresholds on these labels (validation's, in the flow)."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    return {target.name: thresholds_at_target(y, p, target) for target in targets}


def bootstrap_rates(
    y: np.ndarray, p: np.ndarray, thresholds: np.ndarray, n_boot: int, seed: int, patient_ids: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity, specificity, PPV and NPV at thresholds [P points, K findings]: ([4, P, K] on these images,
    [n_boot, 4, P, K] over the resamples of `bootstrap_aurocs` with the same seed); NaN where undefined.

    Each image's counts (true and false positives at each threshold, positives, negatives) are summed per
    patient once; a resample's counts are its patients' multiplicities times those sums, one matrix product
    per block, so the cost is linear in N.
    """
    n, (points, k) = len(y), thresholds.shape
    cluster, n_clusters = clusters(patient_ids, n)
    positive, negative = y > 0.5, y < 0.5  # neither where a finding is not labelled (NaN)
    predicted = p[:, None, :] >= thresholds[None]  # NaN thresholds predict nothing; masked below
    columns = [
        (predicted & positive[:, None]).reshape(n, -1),
        (predicted & negative[:, None]).reshape(n, -1),
    ]
    images = np.concatenate([*columns, positive, negative], axis=1)
    membership = sparse.csr_matrix((np.ones(n), (cluster, np.arange(n))), shape=(n_clusters, n))
    per_cluster = np.asarray(membership @ images.astype(np.float64))
    exact = np.float32 if per_cluster.max(initial=0) * n_clusters < 2**24 else np.float64  # integer sums
    per_cluster = per_cluster.astype(exact)
    undefined = ~np.isfinite(thresholds)
    whole = _rates(per_cluster.sum(axis=0, dtype=np.float64)[None], points, k, undefined)[0]
    boots = np.full((n_boot, *whole.shape), np.nan)
    start = 0
    with threadpool_limits(1, "blas"):  # small products: threads only wait on each other (10-100× slower)
        for counts in resample_counts(n_clusters, n_boot, seed):
            drawn = counts.astype(exact) @ per_cluster
            boots[start : start + len(counts)] = _rates(drawn, points, k, undefined)
            start += len(counts)
    return whole, boots


def _rates(sums: np.ndarray, points: int, k: int, undefined: np.ndarray) -> np.ndarray:
    """Rows of summed counts (TP [P×K], FP [P×K], positives [K], negatives [K]) → [rows, 4 `RATES`, P, K]."""
    rows = len(sums)
    tp = sums[:, : points * k].reshape(rows, points, k).astype(np.float64)
    fp = sums[:, points * k : 2 * points * k].reshape(rows, points, k).astype(np.float64)
    pos = sums[:, 2 * points * k : 2 * points * k + k][:, None, :].astype(np.float64)
    neg = sums[:, 2 * points * k + k :][:, None, :].astype(np.float64)
    tn, fn = neg - fp, pos - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.stack([tp / pos, tn / neg, tp / (tp + fp), tn / (tn + fn)], axis=1)
    rates[:, :, undefined] = np.nan
    return rates


def operating_points(
    y: np.ndarray,
    p: np.ndarray,
    points: dict[str, tuple[dict[str, Any], np.ndarray]],
    n_boot: int,
    seed: int,
    patient_ids: Any = None,
) -> dict[str, dict[str, Any]]:
    """Test figures at each point's thresholds, JSON-ready: `{name: {metric, target, thresholds_from,
    findings: {finding: {threshold, target, n_pos, sensitivity, sensitivity_lo, sensitivity_hi, ...}}}}`
    for RATES, with 95% percentile CIs from the (patient) bootstrap. `points` maps a name to (its
    description: metric, target, per_finding, thresholds_from) and its per-finding thresholds."""
    if not points:
        return {}
    thresholds = np.stack([np.asarray(t, dtype=float) for _, t in points.values()])
    whole, boots = bootstrap_rates(y, p, thresholds, n_boot, seed, patient_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: rates never defined
        low, high = np.nanpercentile(boots, [2.5, 97.5], axis=0) if n_boot else (whole * np.nan,) * 2
    out = {}
    for q, (name, (description, _)) in enumerate(points.items()):
        findings = {}
        for c, finding in enumerate(FINDINGS):
            row: dict[str, Any] = {
                "threshold": json_number(thresholds[q, c]),
                "target": json_number(description["per_finding"].get(finding, description["target"])),
                "n_pos": int((y[:, c] > 0.5).sum()),
            }
            for r, rate in enumerate(RATES):
                row |= {rate: json_number(whole[r, q, c]), f"{rate}_lo": json_number(low[r, q, c]),
                        f"{rate}_hi": json_number(high[r, q, c])}  # fmt: skip
            findings[finding] = row
        out[name] = {**description, "findings": findings}
    return out


def json_number(value: Any) -> float | None:
    """A float for JSON: None for NaN or missing."""
    return None if value is None or not np.isfinite(value) else float(value)


def report_thresholds(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{point: {finding: threshold}}` of a report dict (`to_dict()`, a version's metrics.json): Youden's from
    its per-finding table, and every named operating point it has; undefined thresholds left out."""
    points = {YOUDEN: {row["finding"]: row.get("threshold") for row in metrics.get("per_class", [])}}
    for name, point in (metrics.get("operating_points") or {}).items():
        points[name] = {finding: row.get("threshold") for finding, row in point["findings"].items()}
    return {
        name: {f: float(t) for f, t in values.items() if t is not None and np.isfinite(t)}
        for name, values in points.items()
    }


def _describe_point(name: str, point: dict[str, Any]) -> str:
    goal = (
        "max sensitivity + specificity"
        if point["metric"] == YOUDEN
        else f"{point['metric']} ≥ {point['target']}"
    )
    return f"operating point {name} ({goal}; thresholds from {point['thresholds_from']})"


def _point_table(point: dict[str, Any]) -> str:
    rows = {
        finding: {"threshold": row["threshold"], **{rate: with_ci(row, rate) for rate in RATES}}
        for finding, row in point["findings"].items()
    }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    return frame.to_string(float_format=lambda v: f"{v:.3f}", na_rep="n/a")


def with_ci(row: dict[str, Any], rate: str) -> str:
    """`0.912 (0.880–0.940)` from a row's `rate`, `rate_lo`, `rate_hi` (the value alone without a CI)."""
    value, low, high = row.get(rate), row.get(f"{rate}_lo"), row.get(f"{rate}_hi")
    if value is None or value != value:
        return "n/a"
    return f"{value:.3f}" if low is None or high is None else f"{value:.3f} ({low:.3f}–{high:.3f})"


def calibration(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> tuple[float, pd.DataFrame]:
    """Expected calibration error (equal-width bins) and its reliability table, for flattened inputs (the
    labelled entries: NaN labels are left out)."""
    y, p = labelled(np.asarray(y, dtype=float).ravel(), np.asarray(p, dtype=float).ravel())
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        confidence, observed = float(p[mask].mean()), float(y[mask].mean())
        ece += mask.mean() * abs(confidence - observed)
        rows.append(
            {
                "bin": b,
                "lower": edges[b],
                "upper": edges[b + 1],
                "mean_predicted": confidence,
                "fraction_positive": observed,
                "count": int(mask.sum()),
            }
        )
    return float(ece), pd.DataFrame(rows)


def age_band(ages: pd.Series) -> pd.Series:
    """Age in years → band label ('<40', '40-59', '60-79', '80+'; 'unknown' when missing)."""
    ages = pd.to_numeric(ages, errors="coerce")
    bands = pd.Series("unknown", index=ages.index, dtype=object)
    for low, high, name in AGE_BANDS:
        bands[(ages >= low) & (ages < high)] = name
    return bands


def subgroup_aurocs(y: np.ndarray, p: np.ndarray, meta: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Mean and per-finding AUROC by sex, age band and view; the largest gap in mean AUROC."""
    groups = {
        "sex": meta["sex"].astype(str).to_numpy(),
        "age_band": age_band(meta["age"]).to_numpy(),
        "view": meta["view"].astype(str).to_numpy(),
    }
    rows = []
    for dimension, values in groups.items():
        for group in sorted(set(values)):
            mask = values == group
            if mask.sum() < MIN_SUBGROUP or group == "unknown":
                continue
            per = {f: auroc_or_nan(y[mask, c], p[mask, c]) for c, f in enumerate(FINDINGS)}
            finite = [v for v in per.values() if np.isfinite(v)]
            mean = float(np.mean(finite)) if finite else float("nan")
            rows.append(
                {"dimension": dimension, "group": group, "n": int(mask.sum()), "mean_auroc": mean, **per}
            )
    table = pd.DataFrame(rows)
    gap: dict[str, Any] = {}
    for dimension, part in table.groupby("dimension") if len(table) else []:
        part = part.dropna(subset=["mean_auroc"])
        if len(part) < 2:
            continue
        best, worst = part.loc[part["mean_auroc"].idxmax()], part.loc[part["mean_auroc"].idxmin()]
        size = float(best["mean_auroc"] - worst["mean_auroc"])
        if not gap or size > gap["gap"]:
            gap = {"dimension": dimension, "best": best["group"], "worst": worst["group"], "gap": size}
    return table, gap


def evaluate(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    meta: pd.DataFrame | None = None,
    thresholds: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    patient_ids: Any = None,
    targets: Sequence[OperatingTarget] = (),
    target_thresholds: dict[str, np.ndarray] | None = None,
    joint: pd.DataFrame | None = None,
) -> EvaluationReport:
    """Evaluate N×14 probabilities against N×14 labels; `thresholds` (Youden's) and `target_thresholds`
    (per named target, from `choose_thresholds`) come from validation when given, else from this set.

    The CIs resample patients given `patient_ids` (one per image; default: `meta`'s `patient_id` column
    when it has one), else images. `joint` holds labels of findings named jointly (`JOINT_FINDINGS`,
    row-aligned; NaN where not labelled), reported apart in `EvaluationReport.joint`.
    """
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_prob, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(FINDINGS):
        raise EvaluationError(f"labels {y.shape} and predictions {p.shape} must both be N×{len(FINDINGS)}")
    if patient_ids is None and meta is not None and "patient_id" in meta.columns:
        patient_ids = meta["patient_id"].to_numpy()
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise EvaluationError("predictions must be probabilities in [0, 1] (apply a sigmoid to logits)")
    source = "validation" if thresholds is not None else "this set (Youden; optimistic)"
    thresholds = youden_thresholds(y, p) if thresholds is None else np.asarray(thresholds, dtype=float)
    boots = bootstrap_aurocs(y, p, n_boot, seed, patient_ids) if n_boot else np.full((0, y.shape[1]), np.nan)
    points: dict[str, tuple[dict[str, Any], np.ndarray]] = {
        YOUDEN: ({"metric": YOUDEN, "target": None, "per_finding": {}, "thresholds_from": source}, thresholds)
    }
    target_source = "validation" if target_thresholds is not None else "this set (optimistic)"
    chosen = choose_thresholds(y, p, targets) if target_thresholds is None else target_thresholds
    for target in targets:
        description = {"metric": target.metric, "target": target.target, "per_finding": target.per_finding}
        points[target.name] = (description | {"thresholds_from": target_source}, chosen[target.name])
    rows, curves = [], {}
    for c, finding in enumerate(FINDINGS):
        yc, pc = labelled(y[:, c], p[:, c])
        defined = _has_both(yc)
        finite = boots[:, c][np.isfinite(boots[:, c])]
        lo, hi = np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan)
        ece_c, _ = calibration(yc, pc)
        rows.append(
            {
                "finding": finding,
                "n_labelled": len(yc),
                "n_pos": int(yc.sum()),
                "auroc": auroc_or_nan(yc, pc),
                "auroc_lo": float(lo),
                "auroc_hi": float(hi),
                "auprc": float(average_precision_score(yc, pc)) if defined else float("nan"),
                "threshold": float(thresholds[c]),
                **operating_point(yc, pc, thresholds[c]),
                "ece": ece_c,
            }
        )
        if defined:
            fpr, tpr, _ = roc_curve(yc, pc, drop_intermediate=True)
            keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
            curves[finding] = {"fpr": fpr[keep].round(4).tolist(), "tpr": tpr[keep].round(4).tolist()}
    per_class = pd.DataFrame(rows).set_index("finding")
    mean = float(np.nanmean(per_class["auroc"])) if per_class["auroc"].notna().any() else float("nan")
    boot_means = np.nanmean(boots, axis=1) if len(boots) else np.array([])
    boot_means = boot_means[np.isfinite(boot_means)]
    ci = (
        tuple(float(v) for v in np.percentile(boot_means, [2.5, 97.5]))
        if len(boot_means)
        else (np.nan, np.nan)
    )
    ece, reliability = calibration(y, p)
    subgroups, gap = subgroup_aurocs(y, p, meta) if meta is not None else (pd.DataFrame(), {})
    return EvaluationReport(
        per_class,
        mean,
        (float(ci[0]), float(ci[1])),
        ece,
        reliability,
        subgroups,
        gap,
        curves,
        len(y),
        source,
        "images" if patient_ids is None else "patients",
        clusters(patient_ids, len(y))[1],
        operating_points(y, p, points, n_boot, seed, patient_ids),
        joint_aurocs(joint, p, n_boot, seed, patient_ids) if joint is not None else pd.DataFrame(),
    )


def joint_aurocs(
    joint: pd.DataFrame, probs: np.ndarray, n_boot: int, seed: int, patient_ids: Any = None
) -> pd.DataFrame:
    """Per joint finding (a column of `joint`): the members it covers, labelled images, positives, and the
    AUROC (95% bootstrap CI, resampling as `evaluate` does) of the highest member probability."""
    names = list(joint.columns)
    unknown = [n for n in names if n not in JOINT_FINDINGS]
    if unknown:
        raise EvaluationError(f"unknown joint findings {unknown}; known: {', '.join(JOINT_FINDINGS)}")
    y = joint.to_numpy(dtype=np.float64)
    scores = joint_scores(probs, names)
    boots = (
        bootstrap_aurocs(y, scores, n_boot, seed, patient_ids) if n_boot else np.full((0, len(names)), np.nan)
    )
    rows = []
    for j, name in enumerate(names):
        yj, pj = labelled(y[:, j], scores[:, j])
        finite = boots[:, j][np.isfinite(boots[:, j])]
        lo, hi = np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan)
        rows.append({"finding": name, "members": "|".join(JOINT_FINDINGS[name]), "n_labelled": len(yj),
                     "n_pos": int(yj.sum()), "auroc": auroc_or_nan(yj, pj), "auroc_lo": float(lo),
                     "auroc_hi": float(hi)})  # fmt: skip
    return pd.DataFrame(rows).set_index("finding")


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A predictions CSV keyed by `Image Index`, one column per finding named `Label` or `prob_Label`."""
    table = pd.read_csv(path)
    if "Image Index" not in table.columns:
        raise EvaluationError(f"{path}: needs an 'Image Index' column")
    columns = {}
    for finding in FINDINGS:
        for name in (finding, f"prob_{finding}"):
            if name in table.columns:
                columns[name] = finding
                break
        else:
            raise EvaluationError(f"{path}: no column '{finding}' or 'prob_{finding}'")
    out = table[["Image Index", *columns]].rename(columns=columns)
    if out["Image Index"].duplicated().any():
        raise EvaluationError(f"{path}: 'Image Index' has duplicates")
    return out.set_index("Image Index")


def evaluate_files(
    predictions: str | Path,
    labels: str | Path,
    thresholds_from: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    targets: Sequence[OperatingTarget] = (),
) -> EvaluationReport:
    """Evaluate a predictions CSV against labels: an NIH Data_Entry file, NIH's radiologist-adjudicated
    labels (`cxr.data.expert_labels`), or the root of a dataset cxr reads (`cxr.data.datasets`; its
    images named by their path under the root). Thresholds (Youden's and at each of `targets`) from
    another CSV if given. The CIs resample the labels' patients."""
    meta, label_array, joint = read_reference(labels)
    preds = read_predictions(predictions)

    def aligned(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        rows = pd.Index(meta["image_id"]).get_indexer(frame.index)
        if (rows < 0).any():
            missing = frame.index[rows < 0][:5].tolist()
            raise EvaluationError(f"{(rows < 0).sum()} predicted images are not in {labels}, e.g. {missing}")
        return label_array[rows], frame[list(FINDINGS)].to_numpy(dtype=float), meta.iloc[rows]

    y, p, sub = aligned(preds)
    rows = pd.Index(meta["image_id"]).get_indexer(preds.index)
    thresholds, chosen = None, None
    if thresholds_from is not None:
        yv, pv, _ = aligned(read_predictions(thresholds_from))
        thresholds, chosen = youden_thresholds(yv, pv), choose_thresholds(yv, pv, targets)
    sub = sub.reset_index(drop=True)
    patients = sub["patient_id"].to_numpy()
    joined = None if joint is None else joint.iloc[rows].reset_index(drop=True)
    return evaluate(y, p, sub, thresholds, n_boot, seed, patients, targets, chosen, joined)


def read_reference(labels: str | Path) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame | None]:
    """(table with `image_id` and `patient_id`, N×14 labels, joint-finding labels or None) from a labels
    file or a dataset root."""
    from cxr.data import expert_labels
    from cxr.data.catalog import load_catalog
    from cxr.data.metadata import read_metadata

    if Path(labels).is_dir():
        catalog, _ = load_catalog(labels)
        return catalog.meta, catalog.labels, None
    if expert_labels.is_google2019(labels):
        expert = expert_labels.read_google2019(labels)
        return expert.table, expert.labels, expert.joint
    meta, label_array = read_metadata(labels)
    return meta, label_array, None
