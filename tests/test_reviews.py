"""Reviewed ground truth: stored by inference id, read back as MonitorFlow's labels."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cxr.data.findings import FINDINGS
from cxr.features import EMBEDDING_DIM
from cxr.monitor.baseline import IMAGE_FEATURES
from cxr.monitor.reader import Traffic
from cxr.reviews import ReviewStore, default_database_url

from .conftest import REPO


def monitor_flow_module():
    spec = importlib.util.spec_from_file_location("monitor_flow", REPO / "flows" / "monitor_flow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_review_is_stored_replaced_and_read_as_one_row_per_case(tmp_path):
    store = ReviewStore(f"sqlite:///{tmp_path / 'reviews.db'}")
    first = dict.fromkeys(FINDINGS, 0) | {"Effusion": 1}
    store.save("case-1", first, "rita")
    store.save("case-2", dict.fromkeys(FINDINGS, 0), "rita")
    store.save("case-1", first | {"Mass": 1}, "ada")  # a correction replaces the earlier review
    table = store.table()
    assert list(table.columns) == ["inference_id", *FINDINGS] and len(table) == 2
    row = table.set_index("inference_id").loc["case-1"]
    assert row["Effusion"] == 1 and row["Mass"] == 1 and row.sum() == 2
    with pytest.raises(ValueError, match="each of the 14"):
        store.save("case-3", {"Effusion": 1}, "rita")
    with pytest.raises(ValueError, match="0 or 1"):
        store.save("case-3", dict.fromkeys(FINDINGS, 2), "rita")
    assert store.reviewed() == {"case-1", "case-2"}


def test_monitor_flow_reads_the_apps_reviews_by_default():
    read_labels = monitor_flow_module().read_labels
    assert read_labels("reviews") is None  # no app database yet: no ground truth, nothing created
    assert read_labels("none") is None
    ReviewStore(default_database_url()).save("case-1", dict.fromkeys(FINDINGS, 1), "rita")
    labels = read_labels("reviews")
    assert labels["inference_id"].tolist() == ["case-1"] and labels[list(FINDINGS)].to_numpy().sum() == 14
    assert read_labels(default_database_url())["inference_id"].tolist() == ["case-1"]


def test_a_case_asked_again_under_its_id_counts_once():
    n = 4
    traffic = Traffic("A", records=n, probabilities=np.arange(n * 14, dtype=float).reshape(n, 14),
                      image=np.zeros((n, len(IMAGE_FEATURES))), embedding=np.zeros((n, EMBEDDING_DIM)),
                      inference_ids=["a", "b", "a", "c"], image_ids=[None] * n, times=["t"] * n,
                      row_versions=["1"] * n)  # fmt: skip
    first = traffic.first_answers()
    assert first.inference_ids == ["a", "b", "c"] and first.records == n
    assert np.array_equal(first.probabilities, traffic.probabilities[[0, 1, 3]])
    assert len(first.gate_verdicts) == len(first.uncertainty) == 3


def test_uncertainty_orders_the_worklist_before_closeness_to_the_operating_point():
    from cxr_app.cases import priority

    probabilities = dict.fromkeys(FINDINGS, 0.1)
    thresholds = dict.fromkeys(FINDINGS, 0.5)
    near = priority({"probabilities": probabilities | {"Mass": 0.48}}, thresholds)
    far = priority({"probabilities": probabilities}, thresholds)
    assert near > far  # without uncertainty: a probability near its operating point is less certain
    spread = priority(
        {"probabilities": probabilities, "uncertainty": dict.fromkeys(FINDINGS, 0.02)}, thresholds
    )
    wider = priority(
        {"probabilities": probabilities, "uncertainty": dict.fromkeys(FINDINGS, 0.05)}, thresholds
    )
    assert wider > spread > 0 > near
