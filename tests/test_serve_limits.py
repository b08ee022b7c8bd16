"""Hostile requests against `cxr serve` with its default settings, over HTTP on loopback.

Each bomb is refused with a 413 that names the limit, before its pixels are decoded, and the server's
peak memory (VmHWM) stays bounded; requests within the limits are still served; explanation work is
deduplicated and capped, and SIGTERM stops the server even while explanations run.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import subprocess
import threading

import cv2
import numpy as np
import pytest

from cxr.data.findings import FINDINGS
from cxr.serve.decoder import decode_request
from cxr.serve.errors import PayloadTooLarge
from cxr.serve.limits import Limits, add_limit_arguments, limits_from_args

from .conftest import free_port
from .serving_support import (
    LiveServer,
    black_png_batch,
    deflated_dicom,
    jpeg_multiframe_dicom,
    make_package,
    peak_rss_bytes,
)

PEAK_RSS_BOUND = int(1.5 * 2**30)
DICOM, JSON, PNG = "application/dicom", "application/json", "image/png"


@pytest.fixture(scope="module")
def package(tmp_path_factory, nih_root):
    return make_package(tmp_path_factory.mktemp("limits"), nih_root)[0]


@pytest.fixture(scope="module")
def server(package):
    live = LiveServer(free_port(), "--model", str(package))  # the default limits
    yield live
    live.stop()


def nih_pngs(nih_root, count: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((nih_root / "images_001" / "images").glob("*.png"))[:count]]


def batch(pngs: list[bytes]) -> bytes:
    return json.dumps({"instances": [base64.b64encode(png).decode() for png in pngs]}).encode()


def error_of(body: bytes) -> str:
    return str(json.loads(body)["error"])


BLANK = np.zeros((1024, 1024), np.uint8)
BOMBS = {  # name → (body, content type, the limit its refusal names)
    "64 black 6000×6000 PNGs in a 3 MB batch": (black_png_batch, JSON, "max_request_pixels"),
    "1.5 MB deflated DICOM inflating to 1.5 GB": (
        lambda: deflated_dicom(BLANK, padding=1_500_000_000),
        DICOM,
        "max_inflated_mb",
    ),
    "2 MB deflated DICOM of 2,000 frames": (
        lambda: deflated_dicom(BLANK, frames=2000),
        DICOM,
        "max_inflated_mb",
    ),
    "25 MB JPEG DICOM of 2,000 frames": (lambda: jpeg_multiframe_dicom(2000), DICOM, "max_frames"),
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_are_refused_with_bounded_memory(server, nih_root, name):
    make, kind, limit = BOMBS[name]
    status, body, _ = server.post(make(), kind)
    assert status == 413, (status, body[:300])
    assert limit in error_of(body) and "exceeds the limit" in error_of(body)
    assert server.post(nih_pngs(nih_root, 1)[0], PNG)[0] == 200
    assert peak_rss_bytes(server.process.pid) < PEAK_RSS_BOUND


@pytest.mark.timeout(900)
def test_requests_within_the_limits_are_served(server, nih_root):
    png = nih_pngs(nih_root, 4)[3]
    pixels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    reference = json.loads(server.post(png, PNG)[1])["predictions"][0]["probabilities"]
    for payload in (deflated_dicom(pixels), deflated_dicom(pixels, frames=3)):  # the first frame is scored
        status, body, _ = server.post(payload, DICOM)
        assert status == 200, body[:300]
        served = json.loads(body)["predictions"][0]["probabilities"]
        assert np.allclose([served[f] for f in FINDINGS], [reference[f] for f in FINDINGS], atol=1e-5)
    status, body, _ = server.post(batch(nih_pngs(nih_root, 64)), JSON)  # 64 NIH images: 67 MP
    assert status == 200 and len(json.loads(body)["predictions"]) == 64
    big = cv2.imencode(".png", cv2.resize(pixels, (6000, 6000)))[1].tobytes()  # 36 MP, one image
    assert server.post(big, PNG)[0] == 200
    assert peak_rss_bytes(server.process.pid) < PEAK_RSS_BOUND


@pytest.mark.timeout(900)
def test_explanations_are_deduplicated_and_capped(server, nih_root):
    pngs = nih_pngs(nih_root, 64)
    every_finding_30_times = {"X-Cxr-Explain": ",".join(list(FINDINGS) * 30)}
    status, body, _ = server.post(batch(pngs), JSON, headers=every_finding_30_times)
    assert status == 413 and "max_explanations" in error_of(body), body[:300]
    assert "64 image(s) × 14 finding(s) = 896" in error_of(body)
    status, body, _ = server.post(pngs[0], PNG, headers={"X-Cxr-Explain": "Effusion," * 30})
    assert status == 200 and set(json.loads(body)["predictions"][0]["heatmaps"]) == {"Effusion"}
    status, body, _ = server.post(pngs[0], PNG, headers=every_finding_30_times)  # 1 × 14 distinct
    assert status == 200 and set(json.loads(body)["predictions"][0]["heatmaps"]) == set(FINDINGS)
    assert peak_rss_bytes(server.process.pid) < PEAK_RSS_BOUND


@pytest.mark.timeout(900)
def test_sigterm_stops_the_server_while_explanations_run(package, nih_root):
    live = LiveServer(free_port(), "--model", str(package))
    png = nih_pngs(nih_root, 1)[0]
    statuses: list[int | None] = []
    answered = threading.Event()

    def explain_everything() -> None:
        try:
            status = live.post(png, PNG, headers={"X-Cxr-Explain": ",".join(FINDINGS)})[0]
        except OSError:  # the server closed before it took this request
            status = None
        statuses.append(status)
        answered.set()

    heavy = live.post(batch(nih_pngs(nih_root, 64)), JSON, headers={"X-Cxr-Explain": ",".join(FINDINGS * 30)})
    assert heavy[0] == 413
    clients = [threading.Thread(target=explain_everything) for _ in range(32)]
    for client in clients:
        client.start()
    assert answered.wait(300)
    live.process.send_signal(signal.SIGTERM)
    try:
        live.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        live.process.kill()
        pytest.fail("the server did not exit on SIGTERM while explaining")
    for client in clients:
        client.join(120)
    assert 500 not in statuses
    assert 503 in statuses, statuses  # explanations still queued were abandoned, not run to the end


def test_limits_are_configurable(nih_root):
    parser = argparse.ArgumentParser()
    add_limit_arguments(parser)
    limits = limits_from_args(parser.parse_args(["--max-images", "2", "--max-inflated-mb", "0.5"]))
    assert limits == Limits(max_images=2, max_inflated_mb=0.5)
    with pytest.raises(PayloadTooLarge, match=r"max_images=2 \(set with cxr serve --max-images\)"):
        decode_request(batch(nih_pngs(nih_root, 3)), JSON, limits)
    with pytest.raises(PayloadTooLarge, match=r"max_inflated_mb=0\.5"):
        decode_request(deflated_dicom(BLANK), DICOM, limits)  # 1 MB of pixels inflated
    with pytest.raises(ValueError, match="max_frames must be positive"):
        Limits(max_frames=0)
