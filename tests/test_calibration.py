"""Calibration on the real NIH label table: maps fitted on a patient split's validation rows fix an
over-confident scorer on its test rows, keep the ranking (temperature), and survive a JSON round trip."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.calibration import Calibrator, fit_calibration
from cxr.data.findings import FINDINGS
from cxr.data.images import decode_xray, resize_square
from cxr.data.metadata import read_metadata
from cxr.data.split import patient_split
from cxr.evaluate import calibration
from cxr.inference import model_fn, predict_fn
from cxr.package import unpack
from cxr.scoring import NetPredictor
from cxr.serve.predictor import load_predictor

from .conftest import free_port
from .serving_support import IMAGE_SIZE, LiveServer, make_package


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


def test_every_serving_path_answers_calibrated(nih_root, tmp_path):
    """Both backends, the SageMaker handler and the server over HTTP answer with the shipped calibration."""
    maps = [{"method": "temperature", "temperature": 2.0}] * 7
    maps += [{"method": "isotonic", "x": [0.0, 0.5, 1.0], "y": [0.1, 0.2, 0.9]}] * 7
    calibrator = Calibrator(maps)
    package, model, _ = make_package(tmp_path / "p", nih_root, calibration=calibrator.to_dict())
    directory = unpack(package, tmp_path / "unpacked")
    path = sorted((nih_root / "images_001" / "images").glob("*.png"))[0]
    pixels = resize_square(decode_xray(path.read_bytes()), IMAGE_SIZE)
    crop = pixels[4:60, 4:60][None, None].copy()
    expected = calibrator.apply(NetPredictor(model, "cpu").predict(crop)[0])[0]
    for backend in ("torch", "onnx"):
        assert np.abs(load_predictor(directory, backend).predict(crop)[0][0] - expected).max() < 1e-4
    handler = predict_fn(pixels, model_fn(str(directory)))
    assert np.abs(np.array([handler[f] for f in FINDINGS]) - expected).max() < 1e-4
    server = LiveServer(free_port(), "--model", str(package))
    try:
        status, body = server.post(path.read_bytes(), "image/png")[:2]
    finally:
        server.stop()
    served = json.loads(body)["predictions"][0]["probabilities"]
    assert status == 200 and np.abs(np.array([served[f] for f in FINDINGS]) - expected).max() < 1e-4
