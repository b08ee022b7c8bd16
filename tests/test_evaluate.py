import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from cxr.data.findings import FINDINGS
from cxr.data.metadata import read_metadata
from cxr.data.split import patient_split
from cxr.evaluate import EvaluationError, bootstrap_aurocs, calibration, evaluate, youden_thresholds
from cxr.model_card import render_model_card


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    n = 800
    prevalence = np.linspace(0.05, 0.4, 14)
    y = (rng.random((n, 14)) < prevalence).astype(float)
    p = 1 / (1 + np.exp(-(2.0 * y - 1.0 + rng.normal(0, 1.2, y.shape))))
    meta = pd.DataFrame(
        {
            "sex": rng.choice(["M", "F"], n),
            "age": rng.integers(20, 90, n),
            "view": rng.choice(["PA", "AP"], n),
        }
    )
    return y, p, meta


def test_per_class_metrics_match_scikit_learn(data):
    y, p, meta = data
    report = evaluate(y, p, meta, n_boot=200, seed=3)
    for k, finding in enumerate(FINDINGS):
        row = report.per_class.loc[finding]
        assert row["auroc"] == pytest.approx(roc_auc_score(y[:, k], p[:, k]), abs=1e-12)
        assert row["auprc"] == pytest.approx(average_precision_score(y[:, k], p[:, k]), abs=1e-12)
        assert row["auroc_lo"] < row["auroc"] < row["auroc_hi"]
        tn, fp, fn, tp = confusion_matrix(y[:, k], p[:, k] >= row["threshold"]).ravel()
        assert row["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert row["specificity"] == pytest.approx(tn / (tn + fp))
        assert row["ppv"] == pytest.approx(tp / (tp + fp))
    assert report.mean_auroc == pytest.approx(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in range(14)]))
    assert report.mean_auroc_ci[0] < report.mean_auroc < report.mean_auroc_ci[1]


def test_bootstrap_resample_matches_scikit_learn(data):
    y, p, _ = data
    boots = bootstrap_aurocs(y, p, n_boot=3, seed=11)
    idx = np.random.default_rng(11).integers(0, len(y), size=(3, len(y)))  # the same draws, re-made here
    for b in range(3):
        for k in (0, 7, 13):
            assert boots[b, k] == pytest.approx(roc_auc_score(y[idx[b], k], p[idx[b], k]), abs=1e-12)


def test_patient_bootstrap_resample_matches_scikit_learn(data):
    """A patient resample is every image of each drawn patient, as often as the patient was drawn."""
    y, p, _ = data
    patients = np.random.default_rng(4).integers(100, 330, len(y))  # about 3.5 images per patient
    boots = bootstrap_aurocs(y, p, n_boot=3, seed=11, patient_ids=patients)
    cluster, ids = pd.factorize(patients)  # patients numbered in order of first appearance
    draws = np.random.default_rng(11).integers(0, len(ids), size=(3, len(ids)))
    for b in range(3):
        rows = np.concatenate([np.flatnonzero(cluster == g) for g in draws[b]])
        for k in (0, 7, 13):
            assert boots[b, k] == pytest.approx(roc_auc_score(y[rows, k], p[rows, k]), abs=1e-12)


@pytest.fixture(scope="module")
def nih_scores(nih_root):
    """All 112,120 real NIH rows: labels, patient ids, and scores that share a per-patient effect (images
    of one patient look alike to a model), as the population whose image-level AUROC is the truth."""
    table, labels = read_metadata(nih_root / "Data_Entry_2017_v2020.csv.gz")
    rng = np.random.default_rng(0)
    patients = table["patient_id"].to_numpy()
    owner = np.unique(patients, return_inverse=True)[1]
    effect = rng.normal(0, 1, owner.max() + 1)[owner][:, None]
    scores = 1 / (1 + np.exp(-(labels + effect + rng.normal(0, 0.5, labels.shape))))
    return table, labels.astype(float), scores


def test_patient_bootstrap_covers_where_the_image_bootstrap_does_not(nih_scores):
    """Samples of 1,000 real NIH patients (their real image counts and labels): the image bootstrap's 95%
    CI is too narrow and misses the population AUROC far more often than 5%; the patient bootstrap's is
    wider and its coverage near nominal."""
    table, labels, scores = nih_scores
    patients = table["patient_id"].to_numpy()
    common = np.argsort(-labels.mean(axis=0))[:4]  # the four most prevalent findings
    truth = np.array([roc_auc_score(labels[:, c], scores[:, c]) for c in common])
    rng = np.random.default_rng(1)
    covered: dict[str, list] = {"images": [], "patients": []}
    width: dict[str, list] = {"images": [], "patients": []}
    for replicate in range(100):
        rows = np.flatnonzero(np.isin(patients, rng.choice(np.unique(patients), 1000, replace=False)))
        y, p = labels[rows][:, common], scores[rows][:, common]
        for unit, ids in (("images", None), ("patients", patients[rows])):
            low, high = np.percentile(bootstrap_aurocs(y, p, 200, replicate, ids), [2.5, 97.5], axis=0)
            covered[unit] += list((low <= truth) & (truth <= high))
            width[unit] += list(high - low)
    coverage = {unit: float(np.mean(v)) for unit, v in covered.items()}
    widths = {unit: float(np.mean(v)) for unit, v in width.items()}
    print(f"\n95% CI coverage over {len(covered['images'])} samples: {coverage}; mean widths {widths}")
    assert coverage["images"] < 0.85  # the image bootstrap under-covers
    assert abs(coverage["patients"] - 0.95) < abs(coverage["images"] - 0.95)
    assert coverage["patients"] >= 0.87
    assert widths["patients"] > 1.4 * widths["images"]


def test_evaluate_resamples_patients_when_it_knows_them(nih_scores):
    """On a real NIH patient split's test set, the report's CIs resample its patients: wider than the image
    resampling the same report makes without patient ids."""
    table, labels, scores = nih_scores
    test = patient_split(table["patient_id"].to_numpy(), labels, seed=0).test
    meta = table.iloc[test].reset_index(drop=True)
    by_patient = evaluate(labels[test], scores[test], meta, n_boot=200)
    by_image = evaluate(labels[test], scores[test], meta.drop(columns="patient_id"), n_boot=200)
    assert (by_patient.resampled, by_image.resampled) == ("patients", "images")
    assert by_patient.n_resampled == meta["patient_id"].nunique() and by_image.n_resampled == len(test)
    assert by_patient.to_dict()["bootstrap"] == {"resampled": "patients", "units": by_patient.n_resampled}
    width = {
        name: (report.per_class["auroc_hi"] - report.per_class["auroc_lo"]).mean()
        for name, report in (("patients", by_patient), ("images", by_image))
    }
    print(f"\n{len(test)} test images, {by_patient.n_resampled} patients: mean per-finding CI width {width}")
    assert width["patients"] > 1.4 * width["images"]
    overall = [r.mean_auroc_ci[1] - r.mean_auroc_ci[0] for r in (by_patient, by_image)]
    assert overall[0] > overall[1]
    explicit = evaluate(labels[test], scores[test], n_boot=200, patient_ids=meta["patient_id"])
    assert explicit.mean_auroc_ci == by_patient.mean_auroc_ci
    card = render_model_card(1, by_patient.to_dict(), {}, "promoted")  # the card says what was resampled
    assert f"resampling {by_patient.n_resampled:,} patients) on {len(test)} images" in card


def test_calibration_and_subgroups(data):
    y, p, meta = data
    ece, table = calibration(y[:, 0], p[:, 0], bins=10)
    edges = np.linspace(0, 1, 11)
    manual = 0.0
    for b in range(10):
        mask = (p[:, 0] >= edges[b]) & ((p[:, 0] < edges[b + 1]) if b < 9 else (p[:, 0] <= 1))
        if mask.any():
            manual += mask.mean() * abs(p[mask, 0].mean() - y[mask, 0].mean())
    assert ece == pytest.approx(manual) and table["count"].sum() == len(y)
    report = evaluate(y, p, meta, n_boot=0)
    men = report.subgroups.query("dimension == 'sex' and group == 'M'").iloc[0]
    mask = (meta["sex"] == "M").to_numpy()
    assert men["Mass"] == pytest.approx(roc_auc_score(y[mask, 4], p[mask, 4]))
    assert set(report.subgroups["dimension"]) == {"sex", "age_band", "view"}
    gap = report.largest_gap
    dim = report.subgroups[report.subgroups["dimension"] == gap["dimension"]]["mean_auroc"]
    assert gap["gap"] == pytest.approx(dim.max() - dim.min())


def test_thresholds_from_validation_are_used(data):
    y, p, _ = data
    fixed = np.full(14, 0.5)
    report = evaluate(y, p, thresholds=fixed, n_boot=0)
    assert (report.per_class["threshold"] == 0.5).all() and report.thresholds_from == "validation"
    assert youden_thresholds(y, p).shape == (14,)


def test_bad_inputs_are_clear_errors(data):
    y, p, _ = data
    with pytest.raises(EvaluationError, match="N×14"):
        evaluate(y[:, :3], p[:, :3])
    with pytest.raises(EvaluationError, match="probabilities"):
        evaluate(y, p * 5)


def test_cli_on_real_nih_labels(nih_root, tmp_path):
    table, labels = read_metadata(nih_root / "Data_Entry_2017_v2020.csv.gz")
    ids = sorted(p.name for p in (nih_root / "images_001" / "images").glob("*.png"))
    rows = pd.Index(table["image_id"]).get_indexer(ids)
    y = labels[rows]
    rng = np.random.default_rng(0)
    p = np.clip(0.6 * y + rng.random(y.shape) * 0.5, 0, 1)
    frame = pd.DataFrame({"Image Index": ids})
    for k, finding in enumerate(FINDINGS):  # both naming styles are accepted
        frame[finding if k % 2 else f"prob_{finding}"] = p[:, k]
    preds = tmp_path / "preds.csv"
    frame.to_csv(preds, index=False)
    out = tmp_path / "report"
    cmd = [
        sys.executable,
        "-m",
        "cxr.cli",
        "evaluate",
        "--predictions",
        str(preds),
        "--labels",
        str(nih_root / "Data_Entry_2017_v2020.csv.gz"),
        "--out",
        str(out),
        "--bootstrap",
        "100",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "mean AUROC" in result.stdout and "Hernia" in result.stdout
    written = json.loads((out / "report.json").read_text())
    assert written["bootstrap"] == {
        "resampled": "patients",
        "units": int(table["patient_id"].iloc[rows].nunique()),
    }
    for k, finding in enumerate(FINDINGS):
        assert written["auroc"][finding] == pytest.approx(roc_auc_score(y[:, k], p[:, k]))
    assert (out / "per_class.csv").is_file() and (out / "subgroups.csv").is_file()

    frame.loc[0, "Image Index"] = "99999999_999.png"
    frame.to_csv(preds, index=False)
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and "not in" in bad.stderr
