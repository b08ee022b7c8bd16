"""The monitoring baseline of a model trained until it fits its training images.

A trained model is more confident on images it was fitted to, so a baseline of training images makes
unchanged traffic look like drift. Here a model is trained well past that point, the baseline comes from
held-out rows as the flow draws it, unseen in-distribution images are replayed through the live server,
and the monitor's checks are run on what the server captured.
"""

from __future__ import annotations

import datetime as dt

import cv2
import numpy as np
import pytest

from cxr.data.cache import PreprocessSettings, build_cache, cache_rows
from cxr.data.catalog import load_catalog
from cxr.data.findings import FINDINGS
from cxr.data.split import patient_split
from cxr.data.synthetic import make_demo_dataset
from cxr.model import CXRNet
from cxr.monitor.baseline import compute_baseline
from cxr.monitor.checks import MonitorConfig, run_checks, violations
from cxr.monitor.reader import read_traffic
from cxr.package import build_package, export_and_verify_onnx
from cxr.release import monitoring_rows
from cxr.train import TrainConfig, mean_auroc, predict, train

from .conftest import free_port
from .serving_support import LiveServer

SIZE, CROP = 64, 56
TRAINED = dict(epochs=24, batch_size=32, crop=CROP, pretrained=False, workers=2, lr=2e-3, channels_last=False,
               schedule="none", patience=100)  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A model trained until it fits its training images; rows of four disjoint patient groups."""
    work = tmp_path_factory.mktemp("fitted")
    root = make_demo_dataset(
        work / "demo", n_patients=320, max_images_per_patient=4, size=SIZE, progress=False
    )
    catalog, _ = load_catalog(root)
    cache = build_cache(catalog, PreprocessSettings(size=SIZE), root=work / "cache", progress=False)
    patients = catalog.meta["patient_id"].to_numpy()
    split = patient_split(patients, catalog.labels, (0.2, 0.1, 0.7))
    rows = cache_rows(cache, catalog.meta["image_id"], split)
    # New patients: half of the test split's stay the test split, the other half is traffic arriving later.
    rest = rows.pop("test")
    rest_patients = cache.meta["patient_id"].to_numpy()[rest]
    later = np.isin(rest_patients, np.unique(rest_patients)[1::2])
    rows.update(test=rest[~later], traffic=rest[later])
    config = TrainConfig(**TRAINED)
    result = train(cache, rows["train"], rows["val"], config, work / "checkpoints", progress=False)
    model = CXRNet(pretrained=False).eval()
    model.load_state_dict(result.best_state)
    return model, cache, rows, result


def test_model_fits_its_training_images_better_than_new_ones(fitted):
    from cxr.data.loader import ShardDataset

    model, cache, rows, _ = fitted
    seen, unseen = (ShardDataset(cache, rows[s], crop=CROP) for s in ("train", "traffic"))
    fit_gap = mean_auroc(seen.labels, predict(model, seen)) - mean_auroc(
        unseen.labels, predict(model, unseen)
    )
    assert fit_gap > 0.03, fit_gap  # trained well past random init: it knows its training images


def test_baseline_rows_are_held_out():
    rows = {s: np.arange(10) + 10 * i for i, s in enumerate(("train", "val", "test"))}
    chosen = monitoring_rows(rows)
    assert not np.isin(chosen, rows["train"]).any()
    assert set(chosen) == set(rows["val"]) | set(rows["test"])


def replay(package, capture, cache, rows, transform=lambda x: x):
    live = LiveServer(free_port(), "--model", str(package), "--capture", str(capture))
    try:
        for row in rows:
            body = cv2.imencode(".png", transform(np.asarray(cache.image(int(row)))))[1].tobytes()
            assert live.post(body, "image/png")[0] == 200
    finally:
        live.stop()
    now = dt.datetime.now(dt.UTC)
    traffic = read_traffic(str(capture), "cxr-endpoint", now - dt.timedelta(hours=2), now)
    return traffic["A"]


@pytest.mark.slow
def test_unseen_traffic_is_quiet_against_a_held_out_baseline_and_a_shift_is_caught(fitted, tmp_path):
    model, cache, rows, _ = fitted
    check = export_and_verify_onnx(model, CROP, cache, rows["val"][:32], tmp_path / "model.onnx")
    metadata = {"image_size": SIZE, "crop": CROP, "dropout": 0.3, "onnx": check, "version": 1,
                "name": "cxr-fitted", "thresholds": {}}  # fmt: skip
    package = build_package(
        model.state_dict(), metadata, tmp_path / "model.tar.gz", "", tmp_path / "model.onnx"
    )
    config = MonitorConfig()
    thresholds = dict.fromkeys(FINDINGS, 0.5)

    def results(baseline_rows, traffic):
        baseline = compute_baseline(model, cache, baseline_rows, CROP, thresholds, {})
        return run_checks(baseline, traffic, config)

    unchanged = replay(package, tmp_path / "same", cache, rows["traffic"])
    assert unchanged.served == len(rows["traffic"]) >= config.min_images
    held_out = results(monitoring_rows(rows), unchanged)
    assert violations(held_out) == []

    def shifted(pixels):  # a different acquisition chain: inverted polarity, gamma
        return (255 * (1 - pixels / 255.0) ** 0.6).astype(np.uint8)

    shift = replay(package, tmp_path / "shifted", cache, rows["traffic"], shifted)
    checks = {v["check"] for v in violations(results(monitoring_rows(rows), shift))}
    assert {"input_drift", "embedding_drift"} <= checks, checks
