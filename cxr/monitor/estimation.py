"""Label-free performance estimation from calibrated probabilities (confidence-based performance
estimation, CBPE), per finding of a multilabel model.

When the served probability p of a finding is calibrated, P(finding | image) = p, so each image counts as a
fractional positive p and a fractional negative 1 − p. The expected confusion matrix at a threshold t sums
these over the images above and below t (expected TP = Σ_{p≥t} p, FP = Σ_{p≥t} (1 − p), …), and the
expected ROC curve has TPR(t) = Σ_{p≥t} p / Σ p and FPR(t) = Σ_{p≥t} (1 − p) / Σ (1 − p). Its area is the
fractionally weighted Mann–Whitney statistic over pairs of distinct images (ties count one half), computed
in linear time after one sort per finding.

Standard errors are delta-method (influence-function) errors over the window's images: how far the
estimate would move for another window drawn from the same traffic. `label_sampling_interval` gives the
other uncertainty: where the realized value on this very window lies when its labels are Bernoulli(p).

The estimate is right as long as the probabilities stay calibrated on the window, i.e. P(finding | image)
is unchanged (covariate shift). Under label shift (prevalence changes while the images of each class look
the same) they are not; `prior_shift` re-estimates the window's prevalence by EM (Saerens, Latinne and
Decaestecker, 2002) and adjusts the probabilities to it. That helps only where the shift is in the labels
and misleads badly where it is not (tests/test_estimation.py), so the monitor does not apply it.
"""

from __future__ import annotations

import numpy as np

CLIP = 1e-12  # probabilities are kept this far inside (0, 1) by `prior_shift`
DRAW_CHUNK = 100  # label draws per vectorised block of `label_sampling_interval`


def _as_matrix(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[:, None] if values.ndim == 1 else values


def expected_confusion(probs: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Expected TP, FP, FN, TN per finding ([K] each) of `probs >= thresholds` (probs [N, K])."""
    probs = _as_matrix(probs)
    predicted = probs >= np.asarray(thresholds, dtype=np.float64)
    return {
        "tp": (probs * predicted).sum(0),
        "fp": ((1 - probs) * predicted).sum(0),
        "fn": (probs * ~predicted).sum(0),
        "tn": ((1 - probs) * ~predicted).sum(0),
    }


def expected_operating_point(
    probs: np.ndarray, thresholds: np.ndarray, scores: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Expected sensitivity, specificity and PPV per finding at `scores >= thresholds`, with standard errors
    of sensitivity and specificity. `probs` are the fractional labels; `scores` (default `probs`) decide."""
    probs = _as_matrix(probs)
    scores = probs if scores is None else _as_matrix(scores)
    predicted = (scores >= np.asarray(thresholds, dtype=np.float64)).astype(np.float64)
    n = len(probs)
    with np.errstate(invalid="ignore", divide="ignore"):
        positives, negatives = probs.mean(0), (1 - probs).mean(0)
        sensitivity = (probs * predicted).mean(0) / positives
        specificity = ((1 - probs) * (1 - predicted)).mean(0) / negatives
        ppv = (probs * predicted).sum(0) / predicted.sum(0)
        influence_sens = probs * (predicted - sensitivity) / positives
        influence_spec = (1 - probs) * ((1 - predicted) - specificity) / negatives
    return {
        "sensitivity": sensitivity,
        "sensitivity_se": _standard_error(influence_sens, n),
        "specificity": specificity,
        "specificity_se": _standard_error(influence_spec, n),
        "ppv": ppv,
    }


def _standard_error(influence: np.ndarray, n: int) -> np.ndarray:
    if n < 2:
        return np.full(influence.shape[1], np.nan)
    return np.sqrt((influence**2).sum(0)) / n


def expected_auroc(probs: np.ndarray, scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(expected AUROC, its standard error) per finding ([K] each) with fractional labels `probs`
    ([N, K]) ranked by `scores` (default `probs`); NaN where fewer than two images or no expected
    positive or negative mass."""
    probs = _as_matrix(probs)
    scores = probs if scores is None else _as_matrix(scores)
    k = probs.shape[1]
    auroc, se = np.full(k, np.nan), np.full(k, np.nan)
    for c in range(k):
        auroc[c], se[c] = _auroc_one(probs[:, c], scores[:, c])
    return auroc, se


def _auroc_one(p: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    n = len(p)
    q = 1 - p
    total_p, total_q = p.sum(), q.sum()
    pairs = total_p * total_q - (p * q).sum()  # expected positive–negative pairs of distinct images
    if n < 2 or pairs <= 0:
        return float("nan"), float("nan")
    order = np.argsort(s, kind="stable")
    p_sorted, q_sorted, scores = p[order], q[order], s[order]
    new_run = np.r_[True, scores[1:] != scores[:-1]]
    run = np.cumsum(new_run) - 1  # the tied-score run of each position
    p_run, q_run = np.bincount(run, p_sorted), np.bincount(run, q_sorted)
    q_below = np.r_[0.0, np.cumsum(q_run)[:-1]][run]  # negative mass in lower runs
    p_above = (total_p - np.cumsum(p_run))[run]  # positive mass in higher runs
    negatives_under = q_below + 0.5 * q_run[run]  # ties count one half
    positives_over = p_above + 0.5 * p_run[run]
    area = float((p_sorted * (negatives_under - 0.5 * q_sorted)).sum() / pairs)  # distinct images only
    mean_p, mean_q = total_p / n, total_q / n
    u = float((p_sorted * negatives_under).sum()) / n**2  # the V-statistic, whose influence is exact
    influence = p_sorted * negatives_under / n + q_sorted * positives_over / n - 2 * u
    influence -= u / (mean_p * mean_q) * (p_sorted - mean_p) * (mean_q - mean_p)
    return area, float(np.sqrt((influence**2).sum()) / (n * mean_p * mean_q))


def estimate_performance(
    probs: np.ndarray, thresholds: np.ndarray, scores: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Expected AUROC, sensitivity, specificity, PPV and prevalence per finding, with standard errors of
    AUROC, sensitivity and specificity ({name: [K]}). `probs` are the fractional labels (calibrated
    probabilities [N, K]); `scores` (default `probs`) rank and are compared with `thresholds`."""
    auroc, auroc_se = expected_auroc(probs, scores)
    prevalence = _as_matrix(probs).mean(0) if len(probs) else np.full(len(auroc), np.nan)
    return {
        "auroc": auroc,
        "auroc_se": auroc_se,
        **expected_operating_point(probs, thresholds, scores),
        "prevalence": prevalence,
    }


def label_sampling_interval(
    probs: np.ndarray, draws: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) per finding: where the window's realized AUROC lies when its labels are Bernoulli(p),
    drawn `draws` times. Each draw is the Mann–Whitney statistic from mid-ranks computed once per finding."""
    probs = _as_matrix(probs)
    rng = np.random.default_rng(seed)
    bounds = np.full((2, probs.shape[1]), np.nan)
    chunks = [min(DRAW_CHUNK, draws - start) for start in range(0, draws, DRAW_CHUNK)]
    for c in range(probs.shape[1]):
        p = probs[:, c]
        ranks = _mid_ranks(p)
        auc = np.concatenate([_bernoulli_aurocs(rng.random((size, len(p))) < p, ranks) for size in chunks])
        auc = auc[np.isfinite(auc)]
        if len(auc):
            bounds[:, c] = np.quantile(auc, [(1 - level) / 2, (1 + level) / 2])
    return bounds[0], bounds[1]


def _bernoulli_aurocs(labels: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    n_pos = labels.sum(1)
    n_neg = labels.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (labels @ ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _mid_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new_run = np.r_[True, ordered[1:] != ordered[:-1]]
    run = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = ((starts + 1 + ends) / 2)[run]  # 1-based mid-rank of each tied run
    return ranks


def prior_shift(
    probs: np.ndarray, source_prior: np.ndarray, iterations: int = 200, tolerance: float = 1e-7
) -> tuple[np.ndarray, np.ndarray]:
    """(adjusted probabilities [N, K], estimated prevalence [K]) under a pure label shift: EM re-estimates
    each finding's prevalence on the window from probabilities calibrated at `source_prior` and adjusts
    them by Bayes' rule (Saerens, Latinne and Decaestecker, 2002). Monotone per finding: rankings stay."""
    probs = np.clip(_as_matrix(probs), CLIP, 1 - CLIP)
    source = np.clip(np.asarray(source_prior, dtype=np.float64), CLIP, 1 - CLIP)
    prior = probs.mean(0) if len(probs) else source.copy()
    adjusted = probs
    for _ in range(iterations):
        adjusted = _reweight(probs, source, prior)
        updated = adjusted.mean(0)
        converged = np.max(np.abs(updated - prior)) < tolerance
        prior = updated
        if converged:
            break
    return _reweight(probs, source, prior), prior


def _reweight(probs: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    positive = probs * (target / source)
    negative = (1 - probs) * ((1 - target) / (1 - source))
    return positive / (positive + negative)
