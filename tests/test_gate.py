"""The promotion gate at production's operating thresholds, on the real NIH label table."""

import json

import numpy as np
import pytest

from cxr.data.findings import FINDINGS
from cxr.data.metadata import read_metadata
from cxr.data.split import patient_split
from cxr.evaluate import (
    auroc_or_nan,
    choose_thresholds,
    evaluate,
    parse_operating_points,
    report_thresholds,
    youden_thresholds,
)
from cxr.gate import MIN_POSITIVES, promotion_gate, threshold_table
from cxr.model_card import render_model_card
from cxr.registry import Registry
from cxr.release import registered_thresholds

TARGETS = parse_operating_points(
    {"high_sensitivity": {"sensitivity": 0.9}, "high_specificity": {"specificity": 0.9}}
)
DISTORTED = FINDINGS.index("Pneumothorax")


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.fixture(scope="module")
def models(nih_root):
    """A patient split of the real NIH label table and two models' probabilities drawn given the real
    labels: production, and a candidate that separates every finding better."""
    table, labels = read_metadata(nih_root / "Data_Entry_2017_v2020.csv.gz")
    split = patient_split(table["patient_id"].to_numpy(), labels, seed=0)
    rng = np.random.default_rng(0)
    production = sigmoid(1.5 * labels - 0.5 + rng.normal(0, 1.2, labels.shape))
    candidate = sigmoid(2.0 * labels - 0.5 + rng.normal(0, 1.0, labels.shape))
    return labels.astype(float), split, production, candidate


def registered_metrics(labels, split, probs):
    """The metrics a version is registered with: thresholds chosen on validation, figures on test."""
    val, test = split.val, split.test
    youden = youden_thresholds(labels[val], probs[val])
    chosen = choose_thresholds(labels[val], probs[val], TARGETS)
    report = evaluate(labels[test], probs[test], None, youden, 50, targets=TARGETS, target_thresholds=chosen)
    return json.loads(json.dumps(report.to_dict()))


def gate(labels, rows, candidate, production, production_metrics, candidate_metrics, **settings):
    thresholds = report_thresholds(production_metrics), report_thresholds(candidate_metrics)
    table = threshold_table(labels[rows], candidate[rows], production[rows], *thresholds)
    aurocs = [{f: auroc_or_nan(labels[rows, k], p[rows, k]) for k, f in enumerate(FINDINGS)}
              for p in (candidate, production)]  # fmt: skip
    return promotion_gate(*aurocs, at_production_thresholds=table, **settings)


def test_higher_auroc_but_fewer_positives_caught_at_productions_threshold_is_refused(models, tmp_path):
    """The candidate separates every finding better, but its Pneumothorax scores are squeezed down (a
    monotone distortion: AUROC unchanged), so production's Pneumothorax thresholds catch fewer positives.
    The gate refuses and names the finding; without the distortion it promotes."""
    labels, split, production, candidate = models
    distorted = candidate.copy()
    distorted[:, DISTORTED] **= 3
    production_metrics = registered_metrics(labels, split, production)
    version = Registry(tmp_path).register({"metrics.json": json.dumps(production_metrics).encode()}, {}, {})
    assert registered_thresholds(version) == report_thresholds(production_metrics)  # Youden's + both targets
    assert set(registered_thresholds(version)) == {"youden", "high_sensitivity", "high_specificity"}

    fair = gate(labels, split.test, candidate, production, production_metrics,
                registered_metrics(labels, split, candidate))  # fmt: skip
    assert fair.promote, fair.text()
    assert "sensitivity at production's thresholds: largest drop 0.000 within 0.050" in fair.text()

    refused = gate(labels, split.test, distorted, production, production_metrics,
                   registered_metrics(labels, split, distorted))  # fmt: skip
    print("\n" + refused.text())
    assert not refused.promote
    assert refused.mean_auroc_delta > 0.05 and refused.worst_drop < 0  # every finding's AUROC rose
    flagged = [r for r in refused.reasons if "sensitivity" in r and "→" in r]
    assert len(flagged) == 3 and all(r.startswith("Pneumothorax at production's") for r in flagged)
    rows = {r["point"]: r for r in refused.at_production_thresholds if r["finding"] == "Pneumothorax"}
    test = split.test
    for point, row in rows.items():
        positive = labels[test, DISTORTED] > 0.5
        caught = {who: (p[test, DISTORTED][positive] >= row["threshold"]).mean()
                  for who, p in (("production", production), ("candidate", distorted))}  # fmt: skip
        assert row["production_sensitivity"] == pytest.approx(caught["production"])
        assert row["candidate_sensitivity"] == pytest.approx(caught["candidate"])
        assert row["production_sensitivity"] - row["candidate_sensitivity"] > 0.1, point
        assert row["candidate_own_sensitivity"] >= row["candidate_sensitivity"]  # its own cut-off recovers
    assert rows["high_sensitivity"]["production_sensitivity"] == pytest.approx(0.9, abs=0.03)
    assert rows["high_sensitivity"]["candidate_own_sensitivity"] == pytest.approx(0.9, abs=0.03)
    assert json.dumps(refused.__dict__, allow_nan=False)  # JSON-ready, as the flow stores it

    unchecked = gate(labels, split.test, distorted, production, production_metrics,
                     registered_metrics(labels, split, distorted), max_sensitivity_drop=None)  # fmt: skip
    assert unchecked.promote and unchecked.at_production_thresholds == refused.at_production_thresholds
    looser = gate(labels, split.test, distorted, production, production_metrics,
                  registered_metrics(labels, split, distorted), max_sensitivity_drop=0.5)  # fmt: skip
    assert looser.promote

    card = render_model_card(2, registered_metrics(labels, split, distorted), {}, refused.text(), None,
                             refused.at_production_thresholds)  # fmt: skip
    high = rows["high_sensitivity"]
    assert "At production's thresholds, on the same test images" in card
    line = (
        f"| high_sensitivity | Pneumothorax | {high['positives']} | {high['threshold']:.3f}"
        f" | {high['production_sensitivity']:.3f} / {high['production_specificity']:.3f}"
        f" | {high['candidate_sensitivity']:.3f} / {high['candidate_specificity']:.3f} |"
    )
    assert line in card


def test_findings_with_few_positives_are_shown_not_judged(models):
    """On a few thousand images Hernia has fewer than MIN_POSITIVES positives: its sensitivity change is
    in the table, but too noisy to refuse on."""
    labels, split, production, candidate = models
    rows = split.test[:2000]
    hernia = FINDINGS.index("Hernia")
    assert 0 < labels[rows, hernia].sum() < MIN_POSITIVES
    distorted = candidate.copy()
    distorted[:, hernia] **= 3
    decision = gate(labels, rows, distorted, production, registered_metrics(labels, split, production),
                    registered_metrics(labels, split, distorted))  # fmt: skip
    hernia_rows = [r for r in decision.at_production_thresholds if r["finding"] == "Hernia"]
    assert len(hernia_rows) == 3 and any(
        r["candidate_sensitivity"] < r["production_sensitivity"] for r in hernia_rows
    )
    assert decision.promote, decision.text()
    assert "finding × point pairs with < 20 positives not judged" in decision.text()
