"""Shadow mode over HTTP: the shadow model answers a copy of every request, captured under the same
inference id and never returned; the monitor pairs the two and reports agreement per finding."""

from __future__ import annotations

import datetime as dt
import json
import time

import cv2
import numpy as np
import pytest

from cxr.data.findings import FINDINGS
from cxr.monitor.reader import read_traffic
from cxr.monitor.shadow import paired_rows, shadow_agreement

from .conftest import free_port
from .serving_support import LiveServer, make_package

IMAGES = 6


@pytest.fixture(scope="module")
def packages(tmp_path_factory, nih_root):
    work = tmp_path_factory.mktemp("shadow")
    champion, _, cache = make_package(work / "a", nih_root, seed=0, version=1)
    challenger, _, _ = make_package(work / "b", nih_root, seed=1, version=2)
    films = [cv2.imencode(".png", cache.image(i))[1].tobytes() for i in range(IMAGES)]
    return champion, challenger, films


def serve_with_shadow(champion, shadow, films, capture, ids=None):
    """Answers of the champion (the shadow's are only captured) and the server's metrics."""
    live = LiveServer(
        free_port(), "--model", str(champion), "--shadow", str(shadow), "--capture", str(capture)
    )
    try:
        answers = []
        for i, film in enumerate(films):
            headers = {"X-Amzn-SageMaker-Inference-Id": ids[i]} if ids else None
            status, body, response_headers = live.post(film, "image/png", headers=headers)
            assert status == 200, body
            assert response_headers["X-Amzn-Invoked-Production-Variant"] == "A"
            answers.append(json.loads(body))
        too_long = live.post(films[0], "image/png", headers={"X-Amzn-SageMaker-Inference-Id": "x" * 65})
        metrics = shadow_metrics(live, len(films))
    finally:
        live.stop()
    assert too_long[0] == 400, too_long
    return answers, metrics


def shadow_metrics(live, expected: int, seconds: float = 60.0) -> str:
    """/metrics once the shadow has captured `expected` copies (it works after the answers go out)."""
    deadline = time.monotonic() + seconds
    while True:
        text = live.get("/metrics")[1].decode()
        if f'cxr_shadow_total{{outcome="captured"}} {expected}.0' in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def window(capture):
    now = dt.datetime.now(dt.UTC)
    return read_traffic(
        str(capture), "cxr-endpoint", now - dt.timedelta(minutes=10), now + dt.timedelta(minutes=1)
    )


def test_shadow_answers_are_captured_under_the_same_id_and_never_returned(packages, tmp_path):
    champion, challenger, films = packages
    ids = [f"case-{i}" for i in range(IMAGES)]
    answers, metrics = serve_with_shadow(champion, challenger, films, tmp_path, ids)
    assert [a["inference_id"] for a in answers] == ids  # the caller's id names the answer and its capture
    assert all(a["model"]["version"] == 1 and "shadow_of" not in a for a in answers)
    assert 'cxr_shadow_total{outcome="captured"} 6.0' in metrics, metrics
    traffic = window(tmp_path)
    assert set(traffic) == {"A", "shadow"}
    champion_rows, shadow_rows = traffic["A"], traffic["shadow"]
    assert sorted(shadow_rows.inference_ids) == ids and dict(shadow_rows.model_versions) == {"2": IMAGES}
    records = [json.loads(line) for path in (tmp_path / "cxr-endpoint" / "shadow").rglob("*.jsonl")
               for line in path.read_text().splitlines()]  # fmt: skip
    assert all(json.loads(r["captureData"]["endpointOutput"]["data"])["shadow_of"] == "A" for r in records)

    rows = shadow_agreement(champion_rows, shadow_rows)
    assert [r["feature"] for r in rows] == [f"agreement.{f}" for f in FINDINGS]
    a, b = paired_rows(champion_rows, shadow_rows)
    for k, row in enumerate(rows):  # recomputed from the two captures
        expected = (champion_rows.decisions[a, k] == shadow_rows.decisions[b, k]).mean()
        assert row["images"] == IMAGES and row["statistic"] == pytest.approx(expected)
        assert not row["violation"]
    gap = np.abs(champion_rows.probabilities[a] - shadow_rows.probabilities[b]).mean(axis=0)
    assert gap.max() > 0 and [r["mean_abs_probability_difference"] for r in rows] == pytest.approx(
        gap.tolist()
    )


def test_a_model_shadowing_itself_agrees_everywhere(packages, tmp_path):
    champion, _, films = packages
    serve_with_shadow(champion, champion, films, tmp_path)
    traffic = window(tmp_path)
    rows = shadow_agreement(traffic["A"], traffic["shadow"], min_agreement=0.99)
    assert len(rows) == len(FINDINGS)
    assert all(r["statistic"] == 1.0 and not r["violation"] and r["mean_abs_probability_difference"] < 1e-6
               for r in rows)  # fmt: skip
