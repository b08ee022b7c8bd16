import itertools
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
from cxr.evaluate import (
    RATES,
    EvaluationError,
    bootstrap_aurocs,
    bootstrap_rates,
    calibration,
    choose_thresholds,
    evaluate,
    parse_operating_points,
    youden_thresholds,
)
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


TARGETS = {"high_sensitivity": {"sensitivity": 0.9, "per_finding": {"Hernia": 0.95}},
           "high_specificity": {"specificity": 0.9}}  # fmt: skip


def test_operating_thresholds_reach_their_targets(nih_scores):
    """On a real NIH patient split: each chosen threshold reaches its target on validation and is the
    extreme one that does (a step further misses it); on the 22,423 test images the achieved figure lands
    near the target wherever there are enough positives to measure it."""
    table, labels, scores = nih_scores
    split = patient_split(table["patient_id"].to_numpy(), labels, seed=0)
    targets = parse_operating_points(TARGETS)
    chosen = choose_thresholds(labels[split.val], scores[split.val], targets)
    deviation = {}
    for k, finding in enumerate(FINDINGS):
        yv, pv = labels[split.val, k] > 0.5, scores[split.val, k]
        sensitive, specific = chosen["high_sensitivity"][k], chosen["high_specificity"][k]
        goal = 0.95 if finding == "Hernia" else 0.9
        assert (pv[yv] >= sensitive).mean() >= goal
        assert (pv[yv] >= pv[yv][pv[yv] > sensitive].min()).mean() < goal  # the next positive up misses it
        assert (pv[~yv] < specific).mean() >= 0.9
        assert (pv[~yv] < pv[~yv][pv[~yv] < specific].max()).mean() < 0.9  # the next negative down misses it
        yt, pt = labels[split.test, k] > 0.5, scores[split.test, k]
        deviation[finding] = ((pt[yt] >= sensitive).mean() - goal, (pt[~yt] < specific).mean() - 0.9)
    print(
        "\ntest sensitivity − target, specificity − target:",
        {f: np.round(d, 4) for f, d in deviation.items()},
    )
    measured = [f for k, f in enumerate(FINDINGS) if labels[split.test, k].sum() >= 500]
    assert len(measured) == 10
    assert all(abs(deviation[f][0]) <= 0.05 for f in measured)
    assert np.mean([abs(deviation[f][0]) for f in measured]) <= 0.03
    assert all(abs(d[1]) <= 0.01 for d in deviation.values())  # negatives are plentiful for every finding


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # rare findings: no positives among 1,000 patients
def test_operating_point_cis_cover_the_truth(nih_scores):
    """Samples of 1,000 real NIH patients, thresholds fixed at the population's 90% sensitivity and 90%
    specificity: the patient bootstrap's 95% CIs of sensitivity, specificity, PPV and NPV contain the
    population value near nominally; the image bootstrap's miss it far more often."""
    table, labels, scores = nih_scores
    patients = table["patient_id"].to_numpy()
    chosen = choose_thresholds(labels, scores, parse_operating_points(TARGETS))
    thresholds = np.stack(list(chosen.values()))
    truth, _ = bootstrap_rates(labels, scores, thresholds, 0, 0)
    common = np.argsort(-labels.mean(axis=0))[:4]
    rng = np.random.default_rng(1)
    covered: dict[str, list] = {"images": [], "patients": []}
    for replicate in range(100):
        rows = np.flatnonzero(np.isin(patients, rng.choice(np.unique(patients), 1000, replace=False)))
        for unit, ids in (("images", None), ("patients", patients[rows])):
            _, boots = bootstrap_rates(labels[rows], scores[rows], thresholds, 200, replicate, ids)
            low, high = np.nanpercentile(boots, [2.5, 97.5], axis=0)
            covered[unit].append(((low <= truth) & (truth <= high))[..., common])
    coverage = {unit: np.mean(hits, axis=(0, 2, 3)) for unit, hits in covered.items()}  # per rate
    print(f"\n95% CI coverage of {RATES}: {coverage}")
    assert (coverage["patients"] >= 0.87).all() and coverage["patients"].mean() >= 0.9
    assert (coverage["images"] < 0.8).all()


def test_operating_point_resample_matches_a_confusion_matrix(data):
    """A bootstrap resample's rates are those of the resampled images (patients drawn with replacement)."""
    y, p, _ = data
    patients = np.random.default_rng(4).integers(100, 330, len(y))
    thresholds = np.stack([np.full(14, 0.5), youden_thresholds(y, p)])
    whole, boots = bootstrap_rates(y, p, thresholds, 3, 11, patients)
    cluster, ids = pd.factorize(patients)
    draws = np.random.default_rng(11).integers(0, len(ids), size=(3, len(ids)))  # the same draws
    for b, (q, k) in itertools.product(range(3), ((0, 0), (1, 7), (1, 13))):
        rows = np.concatenate([np.flatnonzero(cluster == g) for g in draws[b]])
        tn, fp, fn, tp = confusion_matrix(y[rows, k], p[rows, k] >= thresholds[q, k]).ravel()
        expected = [tp / (tp + fn), tn / (tn + fp), tp / (tp + fp), tn / (tn + fn)]
        assert boots[b, :, q, k] == pytest.approx(expected, abs=1e-12)
    tn, fp, fn, tp = confusion_matrix(y[:, 7], p[:, 7] >= thresholds[1, 7]).ravel()
    assert whole[:, 1, 7] == pytest.approx([tp / (tp + fn), tn / (tn + fp), tp / (tp + fp), tn / (tn + fn)])


def test_report_carries_operating_points(data):
    """Youden's and each named point, with CIs around the value, in the JSON report (strict JSON) and
    the table; thresholds from validation when given, else from the set itself, said so."""
    y, p, meta = data
    targets = parse_operating_points(TARGETS)
    chosen = choose_thresholds(y[:400], p[:400], targets)
    report = evaluate(y[400:], p[400:], meta.iloc[400:], youden_thresholds(y[:400], p[:400]), 200, 0,
                      targets=targets, target_thresholds=chosen)  # fmt: skip
    points = json.loads(json.dumps(report.to_dict(), allow_nan=False))["operating_points"]
    assert list(points) == ["youden", "high_sensitivity", "high_specificity"]
    assert {point["thresholds_from"] for point in points.values()} == {"validation"}
    row = points["high_sensitivity"]["findings"]["Hernia"]
    assert row["threshold"] == pytest.approx(chosen["high_sensitivity"][13]) and row["target"] == 0.95
    tn, _fp, fn, tp = confusion_matrix(y[400:, 13], p[400:, 13] >= row["threshold"]).ravel()
    assert (row["sensitivity"], row["npv"]) == (pytest.approx(tp / (tp + fn)), pytest.approx(tn / (tn + fn)))
    for point in points.values():
        for finding, values in point["findings"].items():
            for rate in RATES:
                assert values[f"{rate}_lo"] <= values[rate] <= values[f"{rate}_hi"], (finding, rate)
    youden = points["youden"]["findings"]["Mass"]
    assert youden["sensitivity"] == pytest.approx(report.per_class.loc["Mass", "sensitivity"])
    assert (
        "operating point high_specificity (specificity ≥ 0.9; thresholds from validation)" in report.table()
    )
    optimistic = evaluate(y, p, n_boot=0, targets=targets).to_dict()["operating_points"]
    assert optimistic["high_sensitivity"]["thresholds_from"] == "this set (optimistic)"
    assert optimistic["high_sensitivity"]["findings"]["Mass"]["sensitivity"] >= 0.9
    assert optimistic["high_sensitivity"]["findings"]["Mass"]["sensitivity_lo"] is None  # no resamples
    card = render_model_card(1, report.to_dict(), {}, "promoted")
    assert "## Operating points" in card and "**high_sensitivity**: the highest threshold with" in card
    assert (
        f"| Hernia | {row['threshold']:.3f} | {row['sensitivity']:.3f} ({row['sensitivity_lo']:.3f}–" in card
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"youden": {"sensitivity": 0.9}}, "names are"),
        ({"a b": {"sensitivity": 0.9}}, "names are"),
        ({"both": {"sensitivity": 0.9, "specificity": 0.9}}, "exactly one"),
        ({"none": {"ppv": 0.9}}, "exactly one"),
        ({"zero": {"sensitivity": 0}}, r"\(0, 1\]"),
        ({"text": {"sensitivity": "high"}}, r"\(0, 1\]"),
        ({"finding": {"sensitivity": 0.9, "per_finding": {"Cancer": 0.9}}}, "per_finding maps"),
        ({"override": {"sensitivity": 0.9, "per_finding": {"Hernia": 1.5}}}, r"\(0, 1\]"),
        (["sensitivity"], "must map names"),
    ],
)
def test_bad_operating_points_are_clear_errors(setting, message):
    with pytest.raises(EvaluationError, match=message):
        parse_operating_points(setting)


def test_unlabelled_findings_are_left_out_not_counted_negative(data):
    """A finding a dataset does not label (NaN) is evaluated on the images that label it: AUROC, CI,
    operating points and calibration as if the unlabelled images were not there; a finding labelled
    nowhere has no AUROC and stays out of the mean."""
    y, p, meta = data
    masked = y.copy()
    unlabelled = np.random.default_rng(5).random(len(y)) < 0.4
    masked[unlabelled, 2] = np.nan  # Effusion labelled on 60% of the images
    masked[:, 13] = np.nan  # Hernia labelled nowhere
    report = evaluate(masked, p, meta, n_boot=100, seed=3)
    kept = ~unlabelled
    alone = evaluate(y[kept], p[kept], meta[kept].reset_index(drop=True), n_boot=100, seed=3)
    effusion = report.per_class.loc["Effusion"]
    assert effusion["n_labelled"] == kept.sum() and effusion["n_pos"] == y[kept, 2].sum()
    assert effusion["auroc"] == pytest.approx(roc_auc_score(y[kept, 2], p[kept, 2]), abs=1e-12)
    for column in ("auprc", "threshold", "sensitivity", "specificity", "ppv", "ece"):
        assert effusion[column] == pytest.approx(alone.per_class.loc["Effusion", column], abs=1e-12), column
    assert report.per_class.loc["Atelectasis", "n_labelled"] == len(y)
    hernia = report.per_class.loc["Hernia"]
    assert hernia["n_labelled"] == 0 and np.isnan(hernia["auroc"]) and np.isnan(hernia["auroc_lo"])
    assert report.mean_auroc == pytest.approx(np.nanmean(report.per_class["auroc"].to_numpy()))
    assert report.mean_auroc == pytest.approx(
        np.mean([roc_auc_score(*(c[~np.isnan(masked[:, k])] for c in (y[:, k], p[:, k]))) for k in range(13)])
    )
    point = report.operating_points["youden"]["findings"]["Effusion"]
    tn, fp, fn, tp = confusion_matrix(y[kept, 2], p[kept, 2] >= point["threshold"]).ravel()
    assert point["specificity"] == pytest.approx(tn / (tn + fp)) and point["sensitivity"] == pytest.approx(
        tp / (tp + fn)
    )
    assert point["specificity_lo"] < point["specificity"] < point["specificity_hi"]
    assert report.ece == pytest.approx(calibration(masked[~np.isnan(masked)], p[~np.isnan(masked)])[0])


def test_cli_against_nih_radiologist_adjudicated_labels(nih_root, tmp_path):
    """`cxr evaluate --labels` the real Google 2019 file: Pneumothorax against the experts' labels, not the
    text-mined ones; Nodule or mass and Airspace opacity scored by their members' highest probability; the
    other findings, which the experts did not read, left out."""
    expert = pd.read_csv(nih_root / "google2019_nih-chest-xray-labels.csv.gz")
    table, text_mined = read_metadata(nih_root / "google2019_nih-chest-xray-labels.csv.gz")
    rng = np.random.default_rng(0)  # a model that learnt the text-mined labels
    p = np.clip(0.5 * text_mined + rng.random(text_mined.shape) * 0.6, 0, 1)
    frame = pd.DataFrame(p, columns=list(FINDINGS)).assign(**{"Image Index": table["image_id"]})
    frame.to_csv(tmp_path / "preds.csv", index=False)
    out = tmp_path / "report"
    command = [sys.executable, "-m", "cxr.cli", "evaluate", "--predictions", str(tmp_path / "preds.csv"),
               "--labels", str(nih_root / "google2019_nih-chest-xray-labels.csv.gz"), "--out", str(out),
               "--bootstrap", "50"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "joint findings" in result.stdout and "Nodule or mass" in result.stdout
    written = json.loads((out / "report.json").read_text())
    yes = {
        c: (expert[c] == "YES").to_numpy(float)
        for c in ("Pneumothorax", "Nodule or mass", "Airspace opacity")
    }
    k = FINDINGS.index("Pneumothorax")
    assert written["auroc"]["Pneumothorax"] == pytest.approx(roc_auc_score(yes["Pneumothorax"], p[:, k]))
    assert written["auroc"]["Pneumothorax"] < roc_auc_score(text_mined[:, k], p[:, k])  # experts disagree
    assert {f for f, v in written["auroc"].items() if v == v} == {"Pneumothorax"}  # NaN elsewhere
    assert written["mean_auroc"] == pytest.approx(written["auroc"]["Pneumothorax"])
    joint = {row["finding"]: row for row in written["joint"]}
    members = [FINDINGS.index(f) for f in ("Mass", "Nodule")]
    nodule = joint["Nodule or mass"]
    assert nodule["members"] == "Mass|Nodule" and nodule["n_pos"] == yes["Nodule or mass"].sum() == 605
    assert nodule["auroc"] == pytest.approx(roc_auc_score(yes["Nodule or mass"], p[:, members].max(axis=1)))
    assert nodule["auroc_lo"] < nodule["auroc"] < nodule["auroc_hi"]
    assert joint["Airspace opacity"]["members"] == "Consolidation|Infiltration|Pneumonia"
    assert written["bootstrap"]["units"] == expert["Patient ID"].nunique()
