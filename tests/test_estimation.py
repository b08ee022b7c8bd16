"""Label-free performance estimation: the estimator against exact references, then validated on the real NIH
label table under covariate and label shifts built from real rows, and the monitor's `label_free` checks."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.calibration import fit_calibration
from cxr.data.findings import FINDINGS
from cxr.data.metadata import read_metadata
from cxr.data.split import patient_split
from cxr.evaluate import operating_point, youden_thresholds
from cxr.monitor.baseline import Baseline
from cxr.monitor.checks import MonitorConfig, label_free_checks, run_checks
from cxr.monitor.estimation import (
    estimate_performance,
    expected_auroc,
    expected_confusion,
    expected_operating_point,
    label_sampling_interval,
    prior_shift,
)
from cxr.monitor.reader import Traffic


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_expected_auroc_is_the_expectation_over_pairs_of_distinct_images():
    rng = np.random.default_rng(0)
    p = np.round(rng.random((40, 2)), 1)  # ties
    for c in range(2):
        x = p[:, c]
        wins = (x[:, None] > x[None, :]) + 0.5 * (x[:, None] == x[None, :])
        weight = x[:, None] * (1 - x[None, :])
        np.fill_diagonal(weight, 0)
        assert expected_auroc(p)[0][c] == pytest.approx((weight * wins).sum() / weight.sum(), abs=1e-12)


def test_with_certain_labels_the_estimates_are_the_measured_values():
    rng = np.random.default_rng(1)
    labels = (rng.random((500, 3)) < [0.1, 0.3, 0.5]).astype(float)
    scores = np.round(rng.random((500, 3)) + 0.4 * labels, 2)  # ties across classes
    thresholds = np.array([0.5, 0.6, 0.7])
    auroc, _ = expected_auroc(labels, scores)
    estimated = expected_operating_point(labels, thresholds, scores)
    for c in range(3):
        assert auroc[c] == pytest.approx(roc_auc_score(labels[:, c], scores[:, c]), abs=1e-12)
        measured = operating_point(labels[:, c], scores[:, c], thresholds[c])
        for name in ("sensitivity", "specificity", "ppv"):
            assert estimated[name][c] == pytest.approx(measured[name], abs=1e-12)
    confusion = expected_confusion(sigmoid(rng.normal(-1, 1, (300, 3))), thresholds)
    assert np.allclose(sum(confusion.values()), 300)


def test_estimates_are_the_mean_over_label_draws_and_their_errors_a_bootstrap_over_images():
    rng = np.random.default_rng(2)
    p = sigmoid(rng.normal(-1.5, 1.2, (2000, 2)))
    thresholds = np.array([0.3, 0.2])
    estimate = estimate_performance(p, thresholds)
    draws = [rng.random(p.shape) < p for _ in range(300)]
    realized = np.array([[roc_auc_score(y[:, c], p[:, c]) for c in range(2)] for y in draws])
    assert np.allclose(estimate["auroc"], realized.mean(0), atol=0.002)
    sens = np.array([[operating_point(y[:, c], p[:, c], thresholds[c])["sensitivity"] for c in range(2)]
                     for y in draws])  # fmt: skip
    assert np.allclose(estimate["sensitivity"], sens.mean(0), atol=0.005)
    boots = [estimate_performance(p[rng.integers(0, 2000, 2000)], thresholds) for _ in range(300)]
    for name in ("auroc", "sensitivity", "specificity"):
        spread = np.std([b[name] for b in boots], axis=0)
        assert np.allclose(estimate[f"{name}_se"], spread, rtol=0.2), name
    low, high = label_sampling_interval(p, draws=1000, seed=3)
    inside = (realized >= low) & (realized <= high)
    assert 0.9 <= inside.mean() <= 0.99


def test_prior_shift_recovers_the_prevalence_of_a_pure_label_shift():
    rng = np.random.default_rng(4)

    def sample(n, prevalence):  # evidence x | y fixed; probabilities calibrated at a prevalence of 0.1
        y = rng.random(n) < prevalence
        x = rng.normal(1.5 * y, 1)
        return y, sigmoid(np.log(0.1 / 0.9) + 1.5 * x - 1.125)[:, None]

    y, p = sample(20000, 0.3)
    adjusted, prevalence = prior_shift(p, np.array([0.1]))
    print(f"\nprevalence 0.30: mean probability {p.mean():.3f}, EM estimate {prevalence[0]:.3f}")
    assert prevalence[0] == pytest.approx(y.mean(), abs=0.015) and abs(p.mean() - y.mean()) > 0.05
    assert roc_auc_score(y, adjusted[:, 0]) == pytest.approx(roc_auc_score(y, p[:, 0]))
    _, same = sample(20000, 0.1)
    assert prior_shift(same, np.array([0.1]))[1][0] == pytest.approx(0.1, abs=0.01)


# ---- validation on the real NIH label table ----

MIN_CLASS = 100  # a finding counts in a window's errors when it has this many positives and negatives


@pytest.fixture(scope="module")
def nih_table(nih_root):
    """The real label table, a patient split, and each image's cell: view, sex, age band, follow-up band."""
    table, labels = read_metadata(nih_root / "Data_Entry_2017_v2020.csv.gz")
    split = patient_split(table["patient_id"].to_numpy(), labels, seed=0)
    table = table.assign(age=table["age"].astype(float).fillna(table["age"].median()))
    bands = {"age": np.digitize(table["age"], [20, 35, 50, 60, 70]),
             "follow_up": np.digitize(table["follow_up"], [1, 4, 10, 25])}  # fmt: skip
    cell = table[["view", "sex"]].assign(**bands).groupby(["view", "sex", "age", "follow_up"]).ngroup()
    return table, labels.astype(float), split, cell.to_numpy()


def cell_rates(labels, cell, rows, smoothing=0.0):
    """Each image's finding rates among the given rows of its cell (shrunk towards the overall rate)."""
    counts = np.bincount(cell[rows], minlength=cell.max() + 1)[:, None]
    positives = np.stack(
        [np.bincount(cell[rows], labels[rows, k], cell.max() + 1) for k in range(labels.shape[1])], 1
    )
    rate = (positives + smoothing * labels[rows].mean(0)) / np.maximum(counts + smoothing, 1)
    return np.clip(rate, 1e-4, 1 - 1e-4)[cell]


def scored(nih_table, rate):
    """A scorer that is the posterior P(finding | covariates, evidence): the cell's `rate` updated by image
    evidence that is weaker on AP films and in patients of 60 or more. Its raw output is over-confident;
    calibration fitted on the split's validation rows undoes it. Returns the test rows, scored."""
    table, labels, split, _ = nih_table
    strength = (1.8 - 0.9 * (table["view"] == "AP") - 0.5 * (table["age"] >= 60)).to_numpy()[:, None]
    evidence = strength * labels + np.random.default_rng(0).normal(0, 1, labels.shape)
    raw = sigmoid(2.0 * (np.log(rate / (1 - rate)) + strength * evidence - strength**2 / 2))
    calibrator = fit_calibration(labels[split.val], raw[split.val])
    thresholds = youden_thresholds(labels[split.val], calibrator.apply(raw[split.val]))
    test = split.test
    meta = table.iloc[test].reset_index(drop=True)
    return SimpleNamespace(
        meta=meta, labels=labels[test], probs=calibrator.apply(raw[test]), thresholds=thresholds
    )


@pytest.fixture(scope="module")
def nih(nih_table):
    """Scores calibrated within every cell: their rates come from the whole table."""
    _, labels, _, cell = nih_table
    return scored(nih_table, cell_rates(labels, cell, np.arange(len(labels))))


def covariate_shifts(meta, probs):
    """Windows selected by what the scorer sees (metadata, or its own scores): P(finding | image) holds."""
    keep = np.random.default_rng(1).random(len(meta)) < np.clip(2 * probs.max(1), 0, 1)
    return {
        "AP films only": (meta["view"] == "AP").to_numpy(),
        "PA films only": (meta["view"] == "PA").to_numpy(),
        "age 60 or more": (meta["age"] >= 60).to_numpy(),
        "age under 40": (meta["age"] < 40).to_numpy(),
        "follow-up 10 or more": (meta["follow_up"] >= 10).to_numpy(),
        "first visits": (meta["follow_up"] == 0).to_numpy(),
        "women": (meta["sex"] == "F").to_numpy(),
        "confident images kept": keep,
    }


def label_shifts(labels):
    """Windows selected by the labels themselves: prevalence moves, P(image | findings) holds."""
    rng = np.random.default_rng(2)
    coin = rng.random(len(labels))
    sick = labels.sum(1) > 0
    return {
        "No Finding removed": sick,
        "No Finding ×0.4": sick | (coin < 0.4),
        "findings ×0.4": ~sick | (coin < 0.4),
        "Effusion ×5": (labels[:, 2] == 1) | (coin < 0.2),
        "Infiltration ÷3": (labels[:, 3] == 0) | (coin < 0.33),
    }


def errors(labels, probs, thresholds, windows, source_prior=None):
    """Absolute errors [window·finding, (AUROC, sensitivity, specificity, prevalence)] over findings with
    enough of both classes; with `source_prior`, of the estimates after the prior-shift adjustment."""
    out = []
    for selected in windows.values():
        y, p = labels[selected], probs[selected]
        weights = p if source_prior is None else prior_shift(p, source_prior)[0]
        estimate = estimate_performance(weights, thresholds, p)
        for k in np.flatnonzero((y.sum(0) >= MIN_CLASS) & ((1 - y).sum(0) >= MIN_CLASS)):
            point = operating_point(y[:, k], p[:, k], thresholds[k])
            true = [
                roc_auc_score(y[:, k], p[:, k]),
                point["sensitivity"],
                point["specificity"],
                y[:, k].mean(),
            ]
            out.append(np.abs([estimate[m][k] for m in ("auroc", "sensitivity", "specificity", "prevalence")]
                              - np.array(true)))  # fmt: skip
    return np.array(out)


def coverage(labels, probs, windows):
    """Share of (window, finding) whose true AUROC lies in the estimate's 95% label-sampling interval."""
    inside = []
    for selected in windows.values():
        y, p = labels[selected], probs[selected]
        low, high = label_sampling_interval(p, draws=200, seed=0)
        for k in np.flatnonzero((y.sum(0) >= MIN_CLASS) & ((1 - y).sum(0) >= MIN_CLASS)):
            inside.append(low[k] <= roc_auc_score(y[:, k], p[:, k]) <= high[k])
    return float(np.mean(inside))


def summary(name, table):
    """Print and return (mean, max) absolute errors per measure."""
    means, maxima = table.mean(0), table.max(0)
    cells = [f"{m} {a:.4f}/{b:.4f}" for m, a, b in zip(MEASURES, means, maxima, strict=True)]
    print(f"{name:>36}: mean/max |error|  " + "  ".join(cells) + f"  ({len(table)} window·findings)")
    return means, maxima


MEASURES = ("AUROC", "sensitivity", "specificity", "prevalence")


def test_estimates_track_true_performance_under_covariate_shift(nih):
    """Windows chosen by what the scorer sees: the estimate tracks the true AUROC, sensitivity and
    specificity at the validation thresholds, the remaining error being mostly the labels' own noise."""
    windows = covariate_shifts(nih.meta, nih.probs)
    print()
    for name, selected in windows.items():
        y = nih.labels[selected]
        print(f"{name:>22}: {selected.sum():5d} images, mean prevalence {y.mean():.3f}")
    unshifted = {"random half": np.random.default_rng(3).random(len(nih.probs)) < 0.5}
    summary("no shift (a random half)", errors(nih.labels, nih.probs, nih.thresholds, unshifted))
    means, maxima = summary(
        "covariate shift (8 windows)", errors(nih.labels, nih.probs, nih.thresholds, windows)
    )
    inside = coverage(nih.labels, nih.probs, windows)
    print(f"true AUROC inside the 95% label-sampling interval: {inside:.0%}")
    assert means[0] < 0.02 and maxima[0] < 0.06  # AUROC
    assert means[1] < 0.04 and maxima[1] < 0.15  # sensitivity
    assert means[2] < 0.005 and maxima[2] < 0.02  # specificity
    assert means[3] < 0.005  # prevalence
    assert inside > 0.7


def test_scores_calibrated_only_overall_mislead_the_estimate_in_subgroups(nih_table):
    """The same scorer with its covariate rates learned from the training patients: calibrated overall,
    not within each subgroup, so the estimate is good on average but far off in some windows."""
    _, labels, split, cell = nih_table
    learned = scored(nih_table, cell_rates(labels, cell, split.train, smoothing=50))
    windows = covariate_shifts(learned.meta, learned.probs)
    print()
    means, maxima = summary(
        "covariate shift, rates learned", errors(learned.labels, learned.probs, learned.thresholds, windows)
    )
    assert means[0] < 0.03 and maxima[0] > 0.06


def test_label_shift_is_where_the_estimate_goes_wrong(nih):
    """Windows chosen by the labels: the scores are no longer calibrated on them, so prevalence and
    specificity estimates are off by much more than under covariate shift. Re-estimating the prevalence by
    EM (Saerens et al.) fixes much of that, but the same correction ruins covariate-shifted windows."""
    source = nih.probs.mean(0)
    shifts = {"covariate": covariate_shifts(nih.meta, nih.probs), "label": label_shifts(nih.labels)}
    print()
    plain = {
        k: summary(f"{k} shift, CBPE", errors(nih.labels, nih.probs, nih.thresholds, w))
        for k, w in shifts.items()
    }
    adjusted = {
        k: summary(f"{k} shift, CBPE after EM", errors(nih.labels, nih.probs, nih.thresholds, w, source))
        for k, w in shifts.items()
    }
    inside = coverage(nih.labels, nih.probs, shifts["label"])
    print(f"label shift: true AUROC inside the 95% label-sampling interval: {inside:.0%}")
    assert plain["label"][0][3] > 4 * plain["covariate"][0][3]  # prevalence
    assert plain["label"][1][2] > 3 * plain["covariate"][1][2]  # specificity, worst case
    assert adjusted["label"][0][3] < plain["label"][0][3]  # EM helps where the shift is in the labels ...
    assert adjusted["covariate"][0][3] > 4 * plain["covariate"][0][3]  # ... and hurts where it is not


# ---- the monitor's label_free checks ----


def as_traffic(probs, seed):
    """A window of served probabilities (image features drawn like the baseline's)."""
    rng = np.random.default_rng(seed)
    n = len(probs)
    traffic = Traffic("A", records=n, image=rng.normal(0, 1, (n, 7)), embedding=rng.normal(0, 1, (n, 32)),
                      probabilities=probs, inference_ids=[f"id-{i}" for i in range(n)])  # fmt: skip
    traffic.statuses[200] = n
    return traffic


@pytest.fixture(scope="module")
def monitored(nih):
    """A baseline of 2,000 held-out rows (thresholds from validation, AUROC measured on its labels) and
    the other test rows to draw windows from."""
    order = np.random.default_rng(5).permutation(len(nih.probs))
    rows, pool = order[:2000], order[2000:]
    auroc = {f: roc_auc_score(nih.labels[rows, k], nih.probs[rows, k]) for k, f in enumerate(FINDINGS)}
    rng = np.random.default_rng(6)
    baseline = Baseline(rng.normal(0, 1, (2000, 7)), rng.normal(0, 1, (2000, 32)), nih.probs[rows],
                        dict(zip(FINDINGS, nih.thresholds, strict=True)), auroc)  # fmt: skip
    return baseline, pool


def label_free(results):
    return results[results["check"] == "label_free"].set_index("feature")


def test_label_free_check_is_quiet_on_unchanged_windows(nih, monitored):
    """Windows of real rows drawn like the baseline's: no label_free violation in any of 20."""
    baseline, pool = monitored
    rng = np.random.default_rng(7)
    config = MonitorConfig()
    lowest = []
    for k in range(20):
        rows = rng.choice(pool, 500, replace=False)
        found = pd.DataFrame(label_free_checks(baseline, as_traffic(nih.probs[rows], k), config))
        assert not found["violation"].any(), found[found["violation"]]
        lowest.append(found["adjusted_p_value"].min())
    print(f"\nlowest adjusted p over 20 unchanged windows: {min(lowest):.3f}")
    results = run_checks(baseline, as_traffic(nih.probs[pool[:500]], 99), MonitorConfig(permutations=99))
    rows = label_free(results)  # part of every window's checks, no nih.labels needed
    assert len(rows) == 3 * len(FINDINGS) and not rows["violation"].any()
    assert {"estimate", "ci_low", "ci_high", "floor", "baseline_value", "baseline_measured"} <= set(
        rows.columns
    )
    assert np.allclose(rows["statistic"], rows["baseline_value"] - rows["estimate"])  # the shortfall
    assert rows.loc["auroc.Effusion", "baseline_measured"] == baseline.auroc["Effusion"]


def test_label_free_check_flags_a_real_fall(nih, monitored):
    """A window of AP films only, where the image evidence is weaker: scores crowd towards the prior, the
    estimated AUROC falls, and the findings flagged are ones whose true AUROC (from the nih.labels the check
    never sees) fell too."""
    baseline, pool = monitored
    ap = pool[(nih.meta["view"].to_numpy()[pool] == "AP")]
    rows = np.random.default_rng(8).choice(ap, 500, replace=False)
    found = label_free(
        pd.DataFrame(label_free_checks(baseline, as_traffic(nih.probs[rows], 0), MonitorConfig()))
    )
    flagged = [f.split(".", 1)[1] for f in found.index[found["violation"]] if f.startswith("auroc.")]
    print(f"\nAP-only window: AUROC flagged for {flagged}")
    for finding in flagged:
        k = FINDINGS.index(finding)
        true = roc_auc_score(nih.labels[ap, k], nih.probs[ap, k])  # all AP films of the pool
        row = found.loc[f"auroc.{finding}"]
        print(f"{finding:>18}: estimate {row['estimate']:.3f}, true on AP films {true:.3f}, "
              f"baseline {row['baseline_value']:.3f} (measured {baseline.auroc[finding]:.3f})")  # fmt: skip
        assert true < baseline.auroc[finding] - 0.05
    assert len(flagged) >= 5


def test_label_free_check_cannot_see_a_fall_that_leaves_the_scores_alike(nih, monitored):
    """The limit of estimating without labels: scores that keep their distribution but lose their link to
    the findings (here shuffled across images) look unchanged; only ground truth shows the fall."""
    baseline, pool = monitored
    rows = np.random.default_rng(9).choice(pool, 500, replace=False)
    shuffled = np.random.default_rng(10).permuted(nih.probs[rows], axis=0)
    traffic = as_traffic(shuffled, 0)
    truth = pd.DataFrame(nih.labels[rows], columns=list(FINDINGS)).assign(inference_id=traffic.inference_ids)
    results = run_checks(baseline, traffic, MonitorConfig(permutations=99), truth)
    assert not label_free(results)["violation"].any()
    assert results.loc[results["check"] == "performance", "violation"].sum() >= 5


def test_an_absolute_floor_and_the_settings(nih, monitored):
    """`min_estimated_auroc` replaces a lower floor (against the window's error alone); margins come from
    the monitor settings; a window too small for any estimate yields no rows."""
    baseline, pool = monitored
    config = MonitorConfig.from_dict({"min_estimated_auroc": 0.95, "operating_point_margin": 0.2})
    found = label_free(
        pd.DataFrame(label_free_checks(baseline, as_traffic(nih.probs[pool[:1000]], 0), config))
    )
    auroc = found[found.index.str.startswith("auroc.")]
    assert np.allclose(auroc["floor"], 0.95) and auroc["violation"].sum() >= 10
    assert np.allclose(auroc["threshold"], auroc["baseline_value"] - 0.95)
    assert not found.loc[~found.index.str.startswith("auroc."), "violation"].any()
    assert (
        label_free_checks(baseline, as_traffic(nih.probs[pool[:1]], 0), MonitorConfig()) == []
    )  # no estimate
