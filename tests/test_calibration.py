"""Calibration on the real NIH label table: maps fitted on a patient split's validation rows fix an
over-confident scorer on its test rows, keep the ranking (temperature), and survive a JSON round trip."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.calibration import Calibrator, fit_calibration
from cxr.data.metadata import read_metadata
from cxr.data.split import patient_split
from cxr.evaluate import calibration


@pytest.fixture(scope="module")
def nih(nih_root):
    """Real labels and patient split; a latent score per image whose true positive rate is known."""
    table, labels = read_metadata(nih_root / "Data_Entry_2017_v2020.csv.gz")
    split = patient_split(table["patient_id"].to_numpy(), labels, seed=0)
    rng = np.random.default_rng(0)
    latent = 1.5 * labels + rng.normal(0, 1, labels.shape)  # a model's evidence for each finding
    prevalence = labels.mean(axis=0)
    true_logit = np.log(prevalence / (1 - prevalence)) + 1.5 * latent - 1.125  # P(finding | evidence)
    return labels.astype(float), true_logit, split


def ece(y, p):
    return np.mean([calibration(y[:, k], p[:, k])[0] for k in range(y.shape[1])])


def test_temperature_fixes_over_confidence_and_keeps_the_ranking(nih):
    labels, true_logit, split = nih
    raw = 1 / (1 + np.exp(-3.0 * true_logit))  # over-confident
    calibrator = fit_calibration(labels[split.val], raw[split.val], "temperature")
    test = split.test
    calibrated = calibrator.apply(raw[test])
    before, after = ece(labels[test], raw[test]), ece(labels[test], calibrated)
    print(f"\nECE on {len(test):,} real test rows: {before:.4f} before, {after:.4f} after")
    assert after < 0.5 * before
    for k in range(labels.shape[1]):
        assert roc_auc_score(labels[test, k], calibrated[:, k]) == pytest.approx(
            roc_auc_score(labels[test, k], raw[test, k]), abs=1e-4
        )


def test_auto_picks_isotonic_where_the_distortion_is_not_a_temperature(nih):
    labels, true_logit, split = nih
    raw = (1 / (1 + np.exp(-true_logit))) ** 0.25  # a bent, not scaled, map
    calibrator = fit_calibration(labels[split.val], raw[split.val], "auto")
    methods = list(calibrator.methods.values())
    assert methods.count("isotonic") >= 7, methods
    test = split.test
    assert ece(labels[test], calibrator.apply(raw[test])) < 0.5 * ece(labels[test], raw[test])


def test_calibration_round_trips_through_json(nih):
    labels, true_logit, split = nih
    raw = 1 / (1 + np.exp(-true_logit))
    calibrator = fit_calibration(labels[split.val], raw[split.val], "auto")
    again = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    assert np.array_equal(again.apply(raw[:500]), calibrator.apply(raw[:500]))
    assert np.array_equal(Calibrator.from_dict(None).apply(raw[:5]), raw[:5])


def test_a_finding_without_positives_is_left_alone():
    labels = np.zeros((50, 14))
    labels[::2, 1:] = 1
    probs = np.random.default_rng(0).random((50, 14))
    calibrator = fit_calibration(labels, probs)
    assert calibrator.maps[0] == {"method": "none"}
    with pytest.raises(ValueError, match="one of"):
        fit_calibration(labels, probs, "platt")
