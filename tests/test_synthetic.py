import cv2
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxr.data.catalog import load_catalog
from cxr.data.findings import FINDINGS
from cxr.data.split import patient_split
from cxr.data.synthetic import NIH_PREVALENCE, make_demo_dataset


def test_demo_set_is_nih_shaped_and_learnable(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", n_patients=300, size=64, seed=1, progress=False)
    catalog, report = load_catalog(root)
    assert report.missing_images == 0 and len(catalog) > 600
    per_patient = catalog.meta.groupby("patient_id").size()
    assert per_patient.max() > 1 and per_patient.mean() > 2
    prevalence = catalog.labels.mean(axis=0)
    assert prevalence[FINDINGS.index("Infiltration")] > prevalence[FINDINGS.index("Hernia")]
    assert np.corrcoef(prevalence, NIH_PREVALENCE)[0, 1] > 0.8
    pixels = np.stack(
        [cv2.imread(str(root / "images" / i), cv2.IMREAD_GRAYSCALE) for i in catalog.meta["image_id"]]
    )
    assert pixels.shape[1:] == (64, 64) and pixels.dtype == np.uint8
    features = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
    split = patient_split(catalog.meta["patient_id"].to_numpy(), catalog.labels, (0.7, 0.0, 0.3), seed=0)
    aurocs = {}
    for i, finding in enumerate(FINDINGS):
        y_train, y_test = catalog.labels[split.train, i], catalog.labels[split.test, i]
        if y_train.min() == y_train.max() or y_test.min() == y_test.max():
            continue
        model = LogisticRegression(C=0.05, max_iter=300).fit(features[split.train], y_train)
        aurocs[finding] = roc_auc_score(y_test, model.predict_proba(features[split.test])[:, 1])
    print(pd.Series(aurocs).round(3).to_string())
    assert len(aurocs) >= 12 and np.mean(list(aurocs.values())) > 0.7


def test_demo_set_is_reused(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", n_patients=10, size=32, progress=False)
    stamp = (root / "Data_Entry_2017_v2020.csv").stat().st_mtime_ns
    make_demo_dataset(tmp_path / "demo", n_patients=10, size=32, progress=False)
    assert (root / "Data_Entry_2017_v2020.csv").stat().st_mtime_ns == stamp
