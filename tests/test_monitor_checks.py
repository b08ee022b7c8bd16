import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from cxr.data.findings import FINDINGS
from cxr.monitor.baseline import Baseline
from cxr.monitor.checks import (
    MonitorConfig,
    check_variant,
    constraint_violations,
    holm,
    mmd_test,
    run_checks,
    violations,
)
from cxr.monitor.reader import Traffic, read_traffic
from cxr.serve.capture import CaptureWriter, capture_record

RNG = np.random.default_rng(0)


def population(n, rng, shift=0.0, scale=1.0):
    columns = [rng.normal(120 + shift, 10 * scale, n), rng.normal(50, 5, n), rng.normal(20, 3, n)]
    columns += [rng.normal(120, 10, n), rng.normal(220, 8, n), rng.beta(2, 50, n), rng.beta(2, 50, n)]
    image = np.column_stack(columns)
    embedding = rng.normal(shift / 20, 1, (n, 32))
    probabilities = 1 / (1 + np.exp(-rng.normal(-2 + shift / 40, 1, (n, 14))))
    return image, embedding, probabilities


def baseline(n=1500, seed=1):
    image, embedding, probabilities = population(n, np.random.default_rng(seed))
    return Baseline(image, embedding, probabilities, {f: 0.3 for f in FINDINGS}, {f: 0.8 for f in FINDINGS})


def window(n, seed, **kw):
    image, embedding, probabilities = population(n, np.random.default_rng(seed), **kw)
    traffic = Traffic("A", records=n, image=image, embedding=embedding, probabilities=probabilities)
    traffic.statuses[200] = n
    traffic.inference_ids = [f"id-{i}" for i in range(n)]
    traffic.image_ids = [f"img-{i}" for i in range(n)]
    traffic.times = ["2026-11-20T10:15:00.000Z"] * n
    return traffic


def test_holm_and_mmd_against_references():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    assert np.allclose(holm(p), [0.04, 0.09, 0.09, 0.2])
    x, y = RNG.normal(0, 1, (80, 3)), RNG.normal(0, 1, (80, 3))
    assert mmd_test(x, y, 199, 0)[1] > 0.01
    assert mmd_test(x, y + 1.0, 199, 0)[1] == pytest.approx(1 / 200)


def test_false_alarm_rate_on_unchanged_windows_stays_at_alpha():
    config = MonitorConfig(alpha=0.05, permutations=199)
    ref = baseline()
    alarms = [bool(violations(run_checks(ref, window(300, 100 + k), config))) for k in range(40)]
    rate = np.mean(alarms)
    print(f"\nfalse-alarm rate over 40 unchanged windows: {rate:.3f} (alpha 0.05)")
    assert stats.binomtest(sum(alarms), 40, 0.05, alternative="greater").pvalue > 0.01


def test_shifted_window_raises_the_right_violations():
    found = violations(run_checks(baseline(), window(300, 7, shift=30.0), MonitorConfig(permutations=199)))
    checks = {(v["check"], v["feature"]) for v in found}
    assert ("input_drift", "image.mean") in checks and ("embedding_drift", "embedding.projection") in checks
    assert any(c == "prediction_drift" for c, _ in checks)
    assert ("input_drift", "image.p95") not in checks  # unchanged feature, no alarm
    assert all({"check", "feature", "statistic", "threshold", "p_value"} <= set(v) for v in found)


def test_performance_with_ground_truth():
    traffic = window(400, 3)
    rng = np.random.default_rng(5)
    good = (rng.random((400, 14)) < traffic.probabilities).astype(float)  # labels that agree with the scores
    labels = pd.DataFrame(good, columns=list(FINDINGS)).assign(inference_id=traffic.inference_ids)
    ref = baseline()
    results = run_checks(ref, traffic, MonitorConfig(permutations=99), labels)
    perf = results[results["check"] == "performance"].set_index("feature")
    assert perf.loc["auroc.Mass", "statistic"] == pytest.approx(
        roc_auc_score(good[:, 4], traffic.probabilities[:, 4])
    )
    assert not perf["violation"].any()
    noise = labels.copy()
    noise[list(FINDINGS)] = (rng.random((400, 14)) < 0.3).astype(float)  # labels unrelated to the scores
    bad = run_checks(ref, traffic, MonitorConfig(permutations=99), noise.rename(columns={"inference_id": "x"})
                     .assign(image_id=traffic.image_ids))  # fmt: skip
    assert bad[bad["check"] == "performance"]["violation"].sum() >= 10


def test_performance_ci_resamples_patients_when_ground_truth_names_them():
    """Four images per patient, alike within the patient: with a patient_id column the AUROC CIs resample
    patients and are wider; without one they fall back to images and say so."""
    rng = np.random.default_rng(9)
    patients = np.repeat(np.arange(150), 4)
    truth = (rng.random((150, 14)) < 0.3).astype(float)[
        patients
    ]  # findings persist across a patient's images
    effect = rng.normal(0, 1.5, (150, 14))[patients]
    traffic = window(len(patients), 4)
    traffic.probabilities = 1 / (1 + np.exp(-(truth + effect + rng.normal(0, 0.3, truth.shape))))
    labels = pd.DataFrame(truth, columns=list(FINDINGS)).assign(inference_id=traffic.inference_ids)
    config = MonitorConfig(permutations=99)

    def performance(table):
        results = run_checks(baseline(), traffic, config, table)
        return results[results["check"] == "performance"].set_index("feature")

    by_patient = performance(labels.assign(patient_id=[f"p{i}" for i in patients]))
    by_image = performance(labels)
    assert (by_patient["resampled"] == "patients").all() and "note" not in by_patient
    assert (by_image["resampled"] == "images").all() and by_image["note"].str.contains("patient_id").all()
    widths = [(t["ci_high"] - t["ci_low"]).mean() for t in (by_patient, by_image)]
    print(f"\nmean AUROC CI width, 150 patients × 4 images: patients {widths[0]:.3f}, images {widths[1]:.3f}")
    assert widths[0] > 1.3 * widths[1]
    assert np.allclose(by_patient["statistic"], by_image["statistic"])  # the point estimates are the same


def served_by(traffic, versions):
    """Label each row of `traffic` with the model version that served it."""
    traffic.row_versions = list(versions)
    traffic.model_versions.update(traffic.row_versions)
    return traffic


def test_each_model_version_is_checked_against_its_own_baseline():
    """One variant's window served by two versions: each part against its own baseline. A part compared
    with the other version's baseline would drift; a version without a baseline is a violation that says
    why, and is not compared with anything."""
    config = MonitorConfig(permutations=199)
    own = {"1": baseline(seed=1)}
    image, embedding, probabilities = population(1500, np.random.default_rng(2), shift=30.0)
    own["2"] = Baseline(image, embedding, probabilities, own["1"].thresholds, own["1"].auroc)
    traffic = window(600, 5)
    shifted = window(300, 6, shift=30.0)
    for name in ("image", "embedding", "probabilities"):
        setattr(traffic, name, np.vstack([getattr(traffic, name)[:300], getattr(shifted, name)]))
    served_by(traffic, ["1"] * 300 + ["2"] * 300)

    results = check_variant(traffic, own, config)
    assert not violations(results)
    assert set(results.loc[results["check"] == "embedding_drift", "model_version"]) == {"1", "2"}
    assert (results.loc[results["check"] == "data_quality", "model_version"].isna()).all()
    crossed = check_variant(traffic, {"1": own["1"], "2": own["1"]}, config)  # B against A's baseline
    assert {v["model_version"] for v in violations(crossed)} == {"2"}

    missing = check_variant(
        traffic, {"1": own["1"], "2": "model version 2 is not in registry group 'g'"}, config
    )
    found = violations(missing)
    assert [(v["check"], v["feature"], v["model_version"]) for v in found] == [
        ("baseline", "model_version.2", "2")
    ]
    assert found[0]["statistic"] == 300 and "not in registry group" in found[0]["note"]
    assert "model version 2" in constraint_violations(found)["violations"][0]["description"]
    assert set(missing.loc[missing["model_version"] == "2", "check"]) == {"baseline"}  # nothing else


def test_reader_counts_malformed_and_rejected(tmp_path):
    writer = CaptureWriter(str(tmp_path), endpoint="ep", max_seconds=0.1)
    when = dt.datetime(2026, 11, 20, 10, 15, tzinfo=dt.UTC)
    output = json.dumps({"predictions": [{"probabilities": dict.fromkeys(FINDINGS, 0.25)}]})
    names = ["mean", "std", "p5", "p50", "p95", "dark_fraction", "bright_fraction"]
    features = [{"image_stats": dict.fromkeys(names, 1.0), "embedding_projection": [0.0] * 32}]
    for i in range(30):
        writer.submit(capture_record("image/png", b"x", output, f"e{i}", "A", 1, features, when=when))
    writer.submit(
        capture_record("image/png", b"", '{"error": "bad"}', "bad", "A", 1, [], when=when, status=415)
    )
    writer.submit(
        capture_record("image/png", b"x", output, "late", "A", 1, features, when=when + dt.timedelta(hours=3))
    )
    writer.close()
    path = next((tmp_path / "ep" / "A" / "2026" / "11" / "20" / "10").glob("*.jsonl"))
    path.write_text(path.read_text() + "{not json\n" + '{"eventMetadata": {}}\n')
    start, end = dt.datetime(2026, 11, 20, 10, tzinfo=dt.UTC), dt.datetime(2026, 11, 20, 11, tzinfo=dt.UTC)
    traffic = read_traffic(str(tmp_path), "ep", start, end)["A"]
    assert (traffic.records, traffic.served, traffic.rejected, traffic.malformed) == (31, 30, 1, 2)
    assert traffic.probabilities.shape == (30, 14) and traffic.embedding.shape == (30, 32)
