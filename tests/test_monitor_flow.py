"""MonitorFlow end to end: real NIH images through the live server, captured, then checked for drift."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import threading

import cv2
import numpy as np
import pandas as pd
import pytest
from metaflow import Runner

from cxr.data.findings import FINDINGS
from cxr.monitor.baseline import compute_baseline
from cxr.registry import Registry

from .conftest import REPO, free_port
from .serving_support import CROP, LiveServer, make_package
from .test_train_flow import TINY

FLOW = REPO / "flows" / "monitor_flow.py"
BASELINE_IMAGES = 80


class Hook(http.server.BaseHTTPRequestHandler):
    received: list = []  # noqa: RUF012

    def do_POST(self):
        type(self).received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def replay(package, capture, images, transform, nih_root):
    """Send images through a live server that captures to `capture`."""
    live = LiveServer(free_port(), "--model", str(package), "--capture", str(capture))
    try:
        for path in images:
            pixels = transform(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
            body = cv2.imencode(".png", pixels)[1].tobytes()
            headers = {"X-Amzn-SageMaker-Custom-Attributes": f"image_id={path.name}"}
            assert live.post(body, "image/png", headers=headers)[0] == 200
    finally:
        live.stop()


def monitor(tmp_path, capture, **params):
    env = {
        **os.environ,
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path),
    }
    end = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)).isoformat()
    runner = Runner(str(FLOW), show_output=False, env=env, cwd=str(tmp_path))
    with runner.run(capture_uri=str(capture), window_end=end, window_hours=2.0, **params) as running:
        assert running.status == "successful", running.stderr
        return running.run


@pytest.mark.slow
def test_in_distribution_is_quiet_and_a_shift_is_caught(tmp_path, nih_root):
    package, model, cache = make_package(tmp_path / "pkg", nih_root)
    # A random split: sorted by patient id, the later NIH patients' images are darker (a real drift over
    # acquisition time that the monitor does flag), so "in distribution" means drawn from the same mix.
    images = sorted((nih_root / "images_001" / "images").glob("*.png"))
    order = np.random.default_rng(0).permutation(len(images))
    images = [images[i] for i in order]
    reference = cache.rows_for([p.name for p in images[:BASELINE_IMAGES]])
    baseline = compute_baseline(model, cache, reference, CROP, {}, dict.fromkeys(FINDINGS, 0.5))
    version = Registry().register({"model.tar.gz": package}, {"mean_auroc": 0.5}, {}, status="production")
    baseline.save(version.directory)  # the default baseline: the production model's

    held_out = images[BASELINE_IMAGES:]
    replay(package, tmp_path / "same", held_out, lambda x: x, nih_root)
    quiet = monitor(tmp_path, tmp_path / "same")
    join = quiet["join"].task
    assert join["violations"].data == [], join["violations"].data
    assert join["traffic_summary"].data[0]["served"] == len(held_out)
    assert set(join["results"].data["check"]) >= {
        "input_drift",
        "embedding_drift",
        "prediction_drift",
        "data_quality",
    }

    def shifted(pixels):  # inverted polarity and a gamma change: a different acquisition chain
        return (255 * (1 - pixels / 255.0) ** 0.6).astype(np.uint8)

    replay(package, tmp_path / "shifted", held_out, shifted, nih_root)
    truth = tmp_path / "truth.csv"
    table = pd.read_csv(nih_root / "Data_Entry_2017_v2020.csv.gz")
    rows = table[table["Image Index"].isin([p.name for p in held_out])]
    labels = pd.DataFrame({f: rows["Finding Labels"].str.contains(f).astype(int) for f in FINDINGS})
    labels.insert(0, "image_id", rows["Image Index"].to_numpy())
    labels.to_csv(truth, index=False)
    train_config = tmp_path / "tiny.yaml"
    train_config.write_text(TINY % {"remote": "none", "epochs": 1})

    Hook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        loud = monitor(tmp_path, tmp_path / "shifted", labels=str(truth), notify=f"http://127.0.0.1:{server.server_address[1]}/hook",
                       retrain=True, retrain_config=str(train_config))  # fmt: skip
    finally:
        server.shutdown()
    found = loud["join"].task["violations"].data
    checks = {(v["check"], v["feature"]) for v in found}
    assert ("input_drift", "image.mean") in checks and ("embedding_drift", "embedding.projection") in checks
    assert all(
        v["p_value"] is not None and v["statistic"] >= v["threshold"]
        for v in found
        if v["check"] != "data_quality"
    )
    results = loud["join"].task["results"].data
    assert (results["check"] == "performance").any()  # ground truth was matched by image id
    assert Hook.received and Hook.received[0]["alert"]["violations"]
    retrain = loud["alert"].task["retrain_run"].data
    assert retrain.startswith("CXRTrainFlow/")
    with open(loud["join"].task["report_files"].data[0]) as handle:
        report = json.load(handle)
    assert len(report["violations"]) == len(found)


def replay_ab(packages, capture, images, transforms):
    """Send every image to variant A and to variant B of one live server (A/B, each its own model)."""
    live = LiveServer(free_port(), "--model", str(packages[0]), "--challenger", str(packages[1]),
                      "--capture", str(capture))  # fmt: skip
    try:
        for path in images:
            pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            for variant, transform in transforms.items():
                body = cv2.imencode(".png", transform(pixels))[1].tobytes()
                headers = {"X-Amzn-SageMaker-Target-Variant": variant}
                status, _, answered = live.post(body, "image/png", headers=headers)
                assert status == 200 and answered["X-Amzn-Invoked-Production-Variant"] == variant
    finally:
        live.stop()


@pytest.mark.slow
def test_each_variant_is_checked_against_the_baseline_of_the_version_it_served(tmp_path, nih_root):
    """A serves version 1, B version 2: another network, whose embeddings and scores differ by design.
    Unchanged traffic on both is quiet (B against version 2's baseline, not production's); a shift on B
    is caught on B alone."""
    images = sorted((nih_root / "images_001" / "images").glob("*.png"))
    images = [images[i] for i in np.random.default_rng(0).permutation(len(images))]
    reference, held_out = images[:BASELINE_IMAGES], images[BASELINE_IMAGES:]
    registry, packages = Registry(), []
    for seed, status in ((0, "production"), (1, "approved")):
        package, model, cache = make_package(tmp_path / f"v{seed + 1}", nih_root, seed=seed, version=seed + 1)
        rows = cache.rows_for([p.name for p in reference])
        baseline = compute_baseline(model, cache, rows, CROP, {}, dict.fromkeys(FINDINGS, 0.5))
        version = registry.register({"model.tar.gz": package}, {"mean_auroc": 0.5}, {}, status=status)
        assert version.version == seed + 1
        baseline.save(version.directory)
        packages.append(package)

    def same(pixels):
        return pixels

    def shifted(pixels):  # inverted polarity and a gamma change
        return (255 * (1 - pixels / 255.0) ** 0.6).astype(np.uint8)

    replay_ab(packages, tmp_path / "same", held_out, {"A": same, "B": same})
    quiet = monitor(tmp_path, tmp_path / "same")["join"].task
    results = quiet["results"].data
    print("\nunchanged traffic, B's drift statistics:")
    print(results[(results["variant"] == "B") & results["check"].str.endswith("drift")]
          .groupby("check")[["statistic", "adjusted_p_value"]].agg(["max", "min"]))  # fmt: skip
    assert quiet["violations"].data == [], quiet["violations"].data
    checked = results[results["check"] == "embedding_drift"].set_index("variant")["model_version"]
    assert checked.to_dict() == {"A": "1", "B": "2"}
    sources = quiet["baseline_sources"].data
    assert sources == {"A": {"1": str(registry.get(1).directory)}, "B": {"2": str(registry.get(2).directory)}}

    replay_ab(packages, tmp_path / "shifted", held_out, {"A": same, "B": shifted})
    found = monitor(tmp_path, tmp_path / "shifted")["join"].task["violations"].data
    assert found and {(v["variant"], v["model_version"]) for v in found} == {("B", "2")}
    checks = {(v["check"], v["feature"]) for v in found}
    assert ("input_drift", "image.mean") in checks and ("embedding_drift", "embedding.projection") in checks
