"""Drift, performance and data-quality checks of a traffic window against a baseline.

Every test yields a row: check, feature, statistic, threshold, p-value (where one applies), and whether it
is a violation. Statistical families — input features (KS), embeddings (MMD permutation test),
prediction scores (KS), positive rates (two-proportion z-test), the input gate's score and the
uncertainty per finding (KS, over the images that carry them) — share the false-alarm budget `alpha`
equally (Bonferroni across families, Holm within each), so a window of unchanged traffic raises any alarm
with probability at most `alpha`. A significant result must also be large enough to matter (KS statistic,
rate change) before it counts as a violation.

Without labels, `label_free` estimates each finding's AUROC and sensitivity/specificity at the baseline's
threshold from the calibrated probabilities alone (`cxr.monitor.estimation`), on the window and on the
baseline's own probabilities alike, and flags an estimate that has fallen below the baseline's by more than
a margin (or below an absolute AUROC floor): one-sided z-tests, Holm-adjusted within the family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from cxr.data.findings import FINDINGS
from cxr.evaluate import auroc_or_nan, bootstrap_aurocs
from cxr.monitor.baseline import IMAGE_FEATURES, Baseline
from cxr.monitor.estimation import estimate_performance
from cxr.monitor.reader import Traffic

# acquisition_drift runs in the monitor flow against earlier traffic (cxr.monitor.acquisition)
FAMILIES = ("input_drift", "embedding_drift", "prediction_drift", "positive_rate_shift", "trust_drift",
            "acquisition_drift")  # fmt: skip
# Probabilities are compared above this floor: a trained model's confident negatives lie far below it, where
# backends differ only in rounding and underflow (PyTorch's 1e-30 is ONNX Runtime's 0, or 0 after a 6-digit
# response), which would otherwise read as a shift of the whole distribution's lower tail.
PROBABILITY_FLOOR = 1e-4
PATIENT_COLUMN = "patient_id"  # optional in the ground truth: a pseudonymous patient key
NO_PATIENTS = (
    "ground truth has no patient_id: the CI resamples images, too narrow when patients have several images"
)


@dataclass
class MonitorConfig:
    """Thresholds of the checks."""

    alpha: float = 0.05  # probability of any false alarm on an unchanged window
    min_ks: float = 0.1  # smallest KS statistic that counts as drift
    min_rate_shift: float = 0.05  # smallest absolute change of a positive rate that counts
    permutations: int = 999  # MMD permutation test
    max_samples: int = 500  # per side, for the MMD test
    min_images: int = 20  # below this the statistical checks are skipped (reported as such)
    max_error_rate: float = 0.05  # share of rejected requests
    max_ood_rate: float = 0.05  # share of images the input gate refused or flagged (it is fitted to 1%)
    min_acquisition_shift: float = 0.1  # smallest total variation distance of a DICOM attribute that counts
    min_shadow_agreement: float = (
        0.0  # champion vs shadow: alarm below this share of agreeing decisions (0: off)
    )
    max_missing_rate: float = 0.01  # share of served records without usable features
    max_malformed_rate: float = 0.01  # share of unreadable capture lines
    auroc_margin: float = 0.05  # performance: alarm when the window's AUROC CI lies below baseline − margin
    operating_point_margin: float = 0.1  # label_free: largest tolerated fall of estimated sens./spec.
    min_estimated_auroc: float = 0.0  # label_free: alarm when an estimated AUROC falls below this (0: off)
    bootstrap: int = 500
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> MonitorConfig:
        """From a config mapping; unknown keys are an error."""
        values = dict(values or {})
        unknown = set(values) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"unknown monitor settings {sorted(unknown)}")
        return cls(**values)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 3:
        return 0.0
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.histogram(reference, edges)[0] / len(reference) + 1e-4
    cur = np.histogram(current, edges)[0] / len(current) + 1e-4
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> tuple[float, float]:
    """Squared MMD with an RBF kernel (median-heuristic bandwidth) and its permutation p-value."""
    z = np.vstack([x, y])
    squared = np.maximum((z**2).sum(1)[:, None] + (z**2).sum(1)[None, :] - 2 * z @ z.T, 0)
    bandwidth = np.median(squared[np.triu_indices(len(z), 1)]) or 1.0
    kernel = np.exp(-squared / bandwidth)
    n, m = len(x), len(y)

    def statistic(signs: np.ndarray) -> np.ndarray:  # rows of +1/n (first sample) and −1/m (second)
        return np.einsum("bi,ij,bj->b", signs, kernel, signs, optimize=True)

    observed = statistic(np.concatenate([np.full(n, 1 / n), np.full(m, -1 / m)])[None])[0]
    rng = np.random.default_rng(seed)
    base = np.concatenate([np.full(n, 1 / n), np.full(m, -1 / m)])
    chunks = [min(200, permutations - s) for s in range(0, permutations, 200)]
    null = np.concatenate([statistic(np.stack([rng.permutation(base) for _ in range(k)])) for k in chunks])
    return float(observed), float((1 + (null >= observed).sum()) / (1 + len(null)))


def _two_proportion(p1: float, n1: int, p2: float, n2: int) -> float:
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return 1.0 if se == 0 else float(2 * stats.norm.sf(abs(p1 - p2) / se))


def _row(
    check: str, feature: str, statistic: float, threshold: float, p_value: float | None, **extra: Any
) -> dict:
    return {"check": check, "feature": feature, "statistic": float(statistic), "threshold": float(threshold),
            "p_value": None if p_value is None else float(p_value), **extra}  # fmt: skip


def statistical_checks(baseline: Baseline, traffic: Traffic, config: MonitorConfig) -> list[dict[str, Any]]:
    """The four drift families, multiplicity-controlled."""
    family_alpha = config.alpha / len(FAMILIES)
    rows: list[dict[str, Any]] = []
    n = len(traffic.image)
    ks_rows = []
    for i, name in enumerate(IMAGE_FEATURES):
        result = stats.ks_2samp(baseline.image[:, i], traffic.image[:, i])
        ks_rows.append(_row("input_drift", f"image.{name}", result.statistic, config.min_ks, result.pvalue,
                            psi=psi(baseline.image[:, i], traffic.image[:, i])))  # fmt: skip
    rows += _decide(ks_rows, family_alpha, config.min_ks)

    rng = np.random.default_rng(config.seed)
    x = _subsample(baseline.embedding, config.max_samples, rng)
    y = _subsample(traffic.embedding, config.max_samples, rng)
    mmd, p = mmd_test(x, y, config.permutations, config.seed)
    rows += _decide([_row("embedding_drift", "embedding.projection", mmd, 0.0, p)], family_alpha, 0.0)

    pred_rows = []
    reference, window = (  # in one dtype, so the floor is one value on both sides
        np.maximum(np.asarray(p, np.float64), PROBABILITY_FLOOR)
        for p in (baseline.probabilities, traffic.probabilities)
    )
    for i, finding in enumerate(FINDINGS):
        result = stats.ks_2samp(reference[:, i], window[:, i])
        pred_rows.append(
            _row("prediction_drift", f"probability.{finding}", result.statistic, config.min_ks, result.pvalue)
        )
    rows += _decide(pred_rows, family_alpha, config.min_ks)

    cut = np.array([baseline.thresholds.get(f, 0.5) for f in FINDINGS])
    window_rates = (traffic.probabilities >= cut).mean(axis=0)
    rate_rows = []
    for i, finding in enumerate(FINDINGS):
        base_rate, rate = float(baseline.positive_rates[i]), float(window_rates[i])
        p = _two_proportion(base_rate, len(baseline.probabilities), rate, n)
        shift = abs(rate - base_rate)
        name = f"positive_rate.{finding}"
        extra = {"baseline_value": base_rate, "window_value": rate}
        rate_rows.append(_row("positive_rate_shift", name, shift, config.min_rate_shift, p, **extra))
    rows += _decide(rate_rows, family_alpha, config.min_rate_shift)
    return rows + trust_drift(baseline, traffic, config, family_alpha)


def trust_drift(
    baseline: Baseline, traffic: Traffic, config: MonitorConfig, family_alpha: float
) -> list[dict[str, Any]]:
    """KS tests of the input gate's score and of each finding's MC-dropout uncertainty, against the
    baseline's, over the window's images that carry them (uncertainty only comes when clients ask)."""
    pairs = []
    if baseline.gate_scores is not None:
        pairs.append(("input_gate.score", baseline.gate_scores, traffic.gate_scores))
    if baseline.uncertainty is not None:
        pairs += [(f"uncertainty.{f}", baseline.uncertainty[:, i], traffic.uncertainty[:, i])
                  for i, f in enumerate(FINDINGS)]  # fmt: skip
    rows = []
    for name, reference, window in pairs:
        window = window[np.isfinite(window)]
        if len(window) < config.min_images:
            continue
        result = stats.ks_2samp(reference, window)
        rows.append(
            _row("trust_drift", name, result.statistic, config.min_ks, result.pvalue, images=len(window))
        )
    return _decide(rows, family_alpha, config.min_ks) if rows else []


def _subsample(values: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return values if len(values) <= limit else values[rng.choice(len(values), limit, replace=False)]


def _decide(rows: list[dict[str, Any]], family_alpha: float, min_effect: float) -> list[dict[str, Any]]:
    adjusted = holm(np.array([r["p_value"] for r in rows]))
    for row, p in zip(rows, adjusted, strict=True):
        row["adjusted_p_value"] = float(p)
        row["alpha"] = family_alpha
        row["violation"] = bool(p < family_alpha and row["statistic"] >= min_effect)
    return rows


def quality_checks(traffic: Traffic, config: MonitorConfig) -> list[dict[str, Any]]:
    """Error (rejected-input) rate, missing features and malformed capture lines."""
    total = max(traffic.records, 1)
    served = max(traffic.served, 1)
    lines = max(traffic.records + traffic.malformed, 1)
    checks = [
        ("rejected_inputs", traffic.rejected / total, config.max_error_rate),
        (
            "out_of_distribution",
            traffic.out_of_distribution / max(traffic.served + traffic.gate_refused, 1),
            config.max_ood_rate,
        ),
        ("server_errors", sum(n for s, n in traffic.statuses.items() if s >= 500) / total, 0.0),
        ("missing_features", traffic.missing_features / served, config.max_missing_rate),
        ("malformed_records", traffic.malformed / lines, config.max_malformed_rate),
    ]
    return [{**_row("data_quality", name, value, limit, None), "violation": bool(value > limit)}
            for name, value, limit in checks]  # fmt: skip


def performance_checks(
    baseline: Baseline, traffic: Traffic, labels: pd.DataFrame | None, config: MonitorConfig
) -> list[dict[str, Any]]:
    """Per-finding AUROC on the labelled part of the window against the baseline AUROC, with 95% CIs.

    The CIs resample patients when the ground truth has a (pseudonymous) `patient_id` column, else images;
    each row says which (`resampled`).
    """
    if labels is None or not baseline.auroc:
        return []
    y, p, patients = match_labels(traffic, labels)
    if len(y) < config.min_images:
        return [
            {**_row("performance", "labelled_images", len(y), config.min_images, None), "violation": False}
        ]
    boots = bootstrap_aurocs(y, p, config.bootstrap, config.seed, patients)
    unit = {"resampled": "patients"} if patients is not None else {"resampled": "images", "note": NO_PATIENTS}
    rows = []
    for i, finding in enumerate(FINDINGS):
        reference = baseline.auroc.get(finding)
        value = auroc_or_nan(y[:, i], p[:, i])
        finite = boots[:, i][np.isfinite(boots[:, i])]
        if reference is None or not np.isfinite(value) or not len(finite):
            continue
        low, high = np.percentile(finite, [2.5, 97.5])
        floor = reference - config.auroc_margin
        p_value = float((finite >= floor).mean())  # one-sided bootstrap p for "AUROC fell below the floor"
        extra = {"ci_low": float(low), "ci_high": float(high), "baseline_value": float(reference), **unit}
        rows.append(
            {
                **_row("performance", f"auroc.{finding}", value, floor, p_value),
                **extra,
                "violation": bool(high < floor),
            }
        )
    return rows


LABEL_FREE_METRICS = ("auroc", "sensitivity", "specificity")
MIN_EXPECTED_CASES = (
    10  # label_free: fewer expected positives (or negatives) on a side and a row is not judged
)


def label_free_checks(baseline: Baseline, traffic: Traffic, config: MonitorConfig) -> list[dict[str, Any]]:
    """Per finding, the estimated AUROC and sensitivity/specificity at the baseline's threshold (from
    calibrated probabilities, no labels) on the window against the same estimates on the baseline.

    The floor is the baseline's estimate minus a margin (`auroc_margin`, `operating_point_margin`), or
    `min_estimated_auroc` for AUROC where that is higher. The statistic is the shortfall (baseline's estimate
    minus the window's), the threshold the shortfall allowed; the p-value is one-sided (standard errors of
    both estimates, or the window's alone against the absolute floor); a violation when the Holm-adjusted
    p-value is below `alpha`. Rows carry the `estimate`, its 95% CI, the `floor`, the baseline's estimate
    (`baseline_value`) and, for AUROC, the baseline's measured value (`baseline_measured`).
    """
    cut = np.array([baseline.thresholds.get(f, 0.5) for f in FINDINGS])
    reference = estimate_performance(baseline.probabilities, cut)
    window = estimate_performance(traffic.probabilities, cut)
    rows = [
        row
        for metric in LABEL_FREE_METRICS
        for i in range(len(FINDINGS))
        if (row := _label_free_row(metric, i, window, reference, baseline, config)) is not None
    ]
    counts = _expected_counts(reference["prevalence"], len(baseline.probabilities))
    counts = np.minimum(counts, _expected_counts(window["prevalence"], len(traffic.probabilities)))
    for row in rows:  # a handful of expected cases makes the estimates jumpy: shown, not judged
        row["judged"] = bool(counts[FINDINGS.index(row["feature"].split(".", 1)[1])] >= MIN_EXPECTED_CASES)
        if not row["judged"]:
            row["p_value"] = 1.0
    adjusted = holm(np.array([r["p_value"] for r in rows]))
    for row, p in zip(rows, adjusted, strict=True):
        row.update(adjusted_p_value=float(p), alpha=config.alpha, violation=bool(p < config.alpha))
    return rows


def _expected_counts(prevalence: np.ndarray, n: int) -> np.ndarray:
    """Per finding, the fewer of expected positives and expected negatives among `n` images."""
    prevalence = np.nan_to_num(np.asarray(prevalence, dtype=float))
    return np.minimum(prevalence, 1 - prevalence) * n


def _label_free_row(
    metric: str,
    i: int,
    window: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    baseline: Baseline,
    config: MonitorConfig,
) -> dict[str, Any] | None:
    """One finding's estimate against its floor, as a shortfall (the baseline's estimate minus the window's)
    against the shortfall allowed; None where either side has no estimate."""
    value, se, base, base_se = (side[k][i] for side in (window, reference) for k in (metric, f"{metric}_se"))
    if not np.isfinite([value, se, base, base_se]).all():
        return None
    allowed = config.auroc_margin if metric == "auroc" else config.operating_point_margin
    spread = float(np.hypot(se, base_se))  # both sides are estimates
    if metric == "auroc" and config.min_estimated_auroc > base - allowed:  # a fixed floor binds ...
        allowed, spread = base - config.min_estimated_auroc, float(se)  # ... only the window's error counts
    shortfall = base - value
    p_value = float(stats.norm.sf((shortfall - allowed) / spread) if spread > 0 else shortfall < allowed)
    low, high = value - 1.96 * se, value + 1.96 * se
    name = f"{metric}.{FINDINGS[i]}"
    extra = {
        "estimate": float(value),
        "ci_low": float(low),
        "ci_high": float(high),
        "baseline_value": float(base),
        "floor": float(base - allowed),
        "estimated_prevalence": float(window["prevalence"][i]),
    }
    if metric == "auroc" and FINDINGS[i] in baseline.auroc:
        extra["baseline_measured"] = float(baseline.auroc[FINDINGS[i]])
    return _row("label_free", name, shortfall, allowed, p_value, **extra)


def match_labels(traffic: Traffic, labels: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ground truth (keyed by `inference_id` or `image_id`) aligned with the window's predictions:
    (labels, probabilities, patient ids or None when the ground truth has no `patient_id` column)."""
    key = "inference_id" if "inference_id" in labels.columns else "image_id"
    ids = traffic.inference_ids if key == "inference_id" else traffic.image_ids
    table = labels.drop_duplicates(key).set_index(key)
    rows = [(i, table.index.get_loc(k)) for i, k in enumerate(ids) if k is not None and k in table.index]
    has_patients = PATIENT_COLUMN in table.columns
    if not rows:
        empty = np.zeros((0, len(FINDINGS)))
        return empty, empty.copy(), (np.zeros(0, dtype=object) if has_patients else None)
    mine, theirs = (np.array(r) for r in zip(*rows, strict=True))
    patients = table[PATIENT_COLUMN].to_numpy(dtype=object)[theirs] if has_patients else None
    return table[list(FINDINGS)].to_numpy(dtype=float)[theirs], traffic.probabilities[mine], patients


def run_checks(
    baseline: Baseline, traffic: Traffic, config: MonitorConfig, labels: pd.DataFrame | None = None
) -> pd.DataFrame:
    """All checks for one variant's window against one baseline, one row each."""
    table = pd.DataFrame(quality_checks(traffic, config) + model_checks(baseline, traffic, config, labels))
    table.insert(0, "variant", traffic.variant)
    return table


def check_variant(
    traffic: Traffic,
    baselines: Mapping[str, Baseline | str],
    config: MonitorConfig,
    labels: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """All checks for one variant's window: data quality over all of it; drift and performance for each
    model version that served it, against that version's own baseline (`baselines`: version → baseline,
    or why it has none). A version without a baseline is a `baseline` violation; it is never compared with
    another model's baseline. Rows carry `model_version`."""
    tables = [pd.DataFrame(quality_checks(traffic, config)).assign(model_version=None)]
    for version in sorted(traffic.model_versions):
        reference = baselines.get(version, f"no baseline was looked up for model version {version}")
        if isinstance(reference, Baseline):
            rows = model_checks(reference, traffic.of_version(version), config, labels)
        else:
            served = traffic.model_versions[version]
            rows = [{**_row("baseline", f"model_version.{version}", served, 0.0, None), "violation": True,
                     "note": f"{served} served record(s) not checked: {reference}"}]  # fmt: skip
        tables.append(pd.DataFrame(rows).assign(model_version=version))
    if not traffic.model_versions:
        tables.append(pd.DataFrame(model_checks(None, traffic, config, labels)).assign(model_version=None))
    table = pd.concat(tables, ignore_index=True)
    table.insert(0, "variant", traffic.variant)
    return table


def model_checks(
    baseline: Baseline | None, traffic: Traffic, config: MonitorConfig, labels: pd.DataFrame | None = None
) -> list[dict[str, Any]]:
    """Drift and label-free performance estimates (when the window has enough images; else a `volume` row)
    and performance with ground truth, against a baseline."""
    if baseline is None or len(traffic.image) < config.min_images:
        volume = _row("volume", "served_images", len(traffic.image), config.min_images, None)
        rows = [{**volume, "violation": False}]
    else:
        rows = statistical_checks(baseline, traffic, config) + label_free_checks(baseline, traffic, config)
    return rows + (performance_checks(baseline, traffic, labels, config) if baseline is not None else [])


def violations(results: pd.DataFrame) -> list[dict[str, Any]]:
    """The violated rows as dicts: variant, check, feature, statistic, threshold, p_value (and the model
    version and a note, where the results have them)."""
    if results.empty:
        return []
    keep = ["variant", "check", "feature", "statistic", "threshold", "p_value"]
    keep += [c for c in ("model_version", "note") if c in results.columns]
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in results.loc[results["violation"].astype(bool), keep].to_dict(orient="records")
    ]


def constraint_violations(found: list[dict[str, Any]]) -> dict[str, Any]:
    """Model Monitor-shaped `constraint_violations.json`."""
    entries = []
    for v in found:
        served_by = f", model version {v['model_version']}" if v.get("model_version") is not None else ""
        text = f"{v['check']} on {v['feature']} (variant {v['variant']}{served_by}):"
        text += f" statistic {v['statistic']:.4g} vs threshold {v['threshold']:.4g}"
        if v.get("p_value") is not None:
            text += f", p-value {v['p_value']:.3g}"
        if v.get("note"):
            text += f"; {v['note']}"
        entries.append(
            {"feature_name": v["feature"], "constraint_check_type": v["check"], "description": text}
        )
    return {"violations": entries}
