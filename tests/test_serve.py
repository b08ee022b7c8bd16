"""The real server as a process over HTTP on loopback: contract, inputs, bad inputs, explain, capture, A/B."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cxr.data.findings import FINDINGS
from cxr.data.loader import ShardDataset
from cxr.train import predict

from .conftest import free_port
from .serving_support import (
    CROP,
    LiveServer,
    decompression_bomb,
    dicom_bytes,
    dicom_with_voi_lut,
    make_package,
    npy_bytes,
    to_12_bit,
)


@pytest.fixture(scope="module")
def packages(tmp_path_factory, nih_root):
    root = tmp_path_factory.mktemp("packages")
    return make_package(root / "a", nih_root, seed=0, version=1), make_package(
        root / "b", nih_root, seed=1, version=2
    )


@pytest.fixture(scope="module")
def server(packages, tmp_path_factory):
    capture = tmp_path_factory.mktemp("capture")
    live = LiveServer(
        free_port(), "--model", str(packages[0][0]), "--capture", str(capture), "--max-body-mb", "8"
    )
    live.capture_dir = capture
    yield live
    live.stop()


def real_png(nih_root, index=0) -> tuple[str, bytes]:
    path = sorted((nih_root / "images_001" / "images").glob("*.png"))[index]
    return path.name, path.read_bytes()


def probabilities(response_body: bytes, item: int = 0) -> np.ndarray:
    payload = json.loads(response_body)
    return np.array([payload["predictions"][item]["probabilities"][f] for f in FINDINGS])


def test_contract_and_offline_equivalence(server, packages, nih_root):
    (_, model, cache) = packages[0]
    assert server.get("/ping")[0] == 200
    name, png = real_png(nih_root, 3)
    status, body, headers = server.post(png, "image/png")
    assert status == 200 and headers["X-Amzn-Invoked-Production-Variant"] == "A"
    payload = json.loads(body)
    assert payload["model"] == {"name": "cxr-test-0", "version": 1, "variant": "A", "backend": "onnx"}
    assert set(payload["predictions"][0]["decisions"]) == set(FINDINGS) and payload["latency_ms"] > 0
    assert payload["thresholds"]["Effusion"] == 0.4
    row = cache.rows_for([name])  # the offline evaluation path: shard cache + center crop + PyTorch
    offline = predict(model, ShardDataset(cache, row, crop=CROP))[0]
    assert np.allclose(probabilities(body), offline, atol=1e-4)
    effusion = payload["predictions"][0]
    assert effusion["decisions"]["Effusion"] == (effusion["probabilities"]["Effusion"] >= 0.4)


def test_every_input_type(server, nih_root):
    _, png = real_png(nih_root, 3)
    reference = probabilities(server.post(png, "image/png")[1])
    pixels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
    assert np.allclose(probabilities(server.post(jpeg, "image/jpeg")[1]), reference, atol=0.05)
    for monochrome1 in (False, True):
        status, body, _ = server.post(dicom_bytes(pixels, monochrome1), "application/dicom")
        assert status == 200 and np.allclose(probabilities(body), reference, atol=1e-5)
    assert np.allclose(
        probabilities(server.post(npy_bytes(pixels), "application/x-npy")[1]), reference, atol=1e-5
    )
    encoded_dicom = base64.b64encode(dicom_bytes(pixels)).decode()
    instances = [
        {"b64": base64.b64encode(png).decode(), "content_type": "image/png"},
        base64.b64encode(png).decode(),
        {"b64": encoded_dicom, "content_type": "application/dicom"},
    ]
    batch = {"instances": instances}
    status, body, _ = server.post(json.dumps(batch).encode(), "application/json")
    assert status == 200 and len(json.loads(body)["predictions"]) == 3
    assert all(np.allclose(probabilities(body, i), reference, atol=1e-5) for i in range(3))


def test_nih_quirks_are_served(server, nih_root, tmp_path):
    rgba = next(
        p for p in sorted((nih_root / "images_001" / "images").glob("*.png")) if Image.open(p).mode == "RGBA"
    )
    assert server.post(rgba.read_bytes(), "image/png")[0] == 200
    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(256 * 256).reshape(256, 256) % 65536).astype(np.uint16)).save(deep)
    assert server.post(deep.read_bytes(), "image/png")[0] == 200


def real_pixels(nih_root, index: int) -> tuple[bytes, np.ndarray]:
    png = real_png(nih_root, index)[1]
    return png, cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)


@pytest.mark.parametrize("index", [3, 55])  # values spanning 0..255, and only 0..161
def test_12_bit_data_in_16_bit_words_keep_their_brightness(server, nih_root, index):
    png, pixels = real_pixels(nih_root, index)
    reference = probabilities(server.post(png, "image/png")[1])
    twelve_bit_png = cv2.imencode(".png", to_12_bit(pixels))[1].tobytes()
    payloads = {
        "16-bit PNG of 12-bit values": (twelve_bit_png, "image/png"),
        "DICOM, BitsStored 12, no window": (dicom_bytes(pixels, window=False), "application/dicom"),
        "DICOM, BitsStored 16, 12-bit VOI LUT": (dicom_with_voi_lut(pixels), "application/dicom"),
        "DICOM, 12-bit VOI LUT declared 16-bit": (dicom_with_voi_lut(pixels, 16), "application/dicom"),
    }
    served = {name: server.post(*payload) for name, payload in payloads.items()}
    assert all(status == 200 for status, _, _ in served.values()), served
    far = {name: np.abs(probabilities(body) - reference).max() for name, (_, body, _) in served.items()}
    assert max(far.values()) < 1e-5, far


def test_admin_weights_refuse_non_finite_and_negative(server, nih_root):
    before = server.admin("GET", "/admin/weights")[1]
    for text in ('{"A": NaN}', '{"A": Infinity}', '{"A": -Infinity}', '{"A": -1}', '{"A": true}'):
        status, body, _ = server.admin("POST", "/admin/weights", text.encode())
        assert status == 400 and "finite, non-negative" in json.loads(body)["error"], (text, body)
    assert server.admin("GET", "/admin/weights")[1] == before
    assert server.post(real_png(nih_root)[1], "image/png")[0] == 200


def bad_inputs(nih_root) -> list[tuple[str, bytes, str | None, dict]]:
    _, png = real_png(nih_root)
    pixels = np.zeros((64, 64), np.uint8)
    return [
        ("zero bytes", b"", "image/png", {}),
        ("truncated png", png[: len(png) // 3], "image/png", {}),
        ("text as png", b"hello, this is not an image", "image/png", {}),
        ("no content type", png, None, {}),
        ("wrong content type", png, "text/plain", {}),
        ("decompression bomb", decompression_bomb(), "image/png", {}),
        ("dicom without pixels", dicom_bytes(pixels, with_pixels=False), "application/dicom", {}),
        ("not dicom", png, "application/dicom", {}),
        ("malformed json", b'{"instances": [', "application/json", {}),
        ("json without instances", b'{"images": []}', "application/json", {}),
        ("bad base64", b'{"instances": ["***"]}', "application/json", {}),
        ("pickled npy", npy_bytes(np.array([object()]), allow_pickle=True), "application/x-npy", {}),
        ("3-d npy", npy_bytes(np.zeros((2, 8, 8))), "application/x-npy", {}),
        ("oversized body", b"\0" * (9 * 1024 * 1024), "image/png", {}),
        ("unknown finding to explain", png, "image/png", {"X-Cxr-Explain": "Broken_Bone"}),
        ("unacceptable accept", png, "image/png", {"Accept": "text/html"}),
        ("unknown target variant", png, "image/png", {"X-Amzn-SageMaker-Target-Variant": "Z"}),
    ]


def test_bad_input_corpus_gets_4xx_and_the_server_lives(server, nih_root):
    results = {}
    for name, body, content_type, headers in bad_inputs(nih_root):
        status, response, _ = server.post(body, content_type, headers=headers)
        results[name] = status
        assert 400 <= status < 500, (name, status, response[:200])
        assert json.loads(response)["error"], name
    assert server.get("/ping")[0] == 200
    assert results["decompression bomb"] == 413 and results["oversized body"] == 413
    assert results["wrong content type"] == 415 and results["unacceptable accept"] == 406


def test_grad_cam_heatmap(server, nih_root):
    _, png = real_png(nih_root, 5)
    status, body, _ = server.post(png, "image/png", path="/invocations?explain=Effusion,Mass")
    assert status == 200
    maps = json.loads(body)["predictions"][0]["heatmaps"]
    assert set(maps) == {"Effusion", "Mass"}
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(maps["Effusion"]), np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (CROP, CROP, 3)


def test_metrics_endpoint(server, nih_root):
    _, png = real_png(nih_root)
    server.post(png, "image/png")
    status, body, headers = server.get("/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    ok = float(re.search(r'cxr_requests_total\{status="200",variant="A"\} (\S+)', text).group(1))
    assert ok >= 1
    assert 'cxr_model_info{backend="onnx",name="cxr-test-0",variant="A",version="1"} 1.0' in text
    assert "cxr_request_latency_seconds_bucket" in text and "cxr_batch_size_bucket" in text
    assert 'cxr_finding_probability_bucket{finding="Hernia"' in text


def capture_lines(directory: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(directory.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_capture_on_sigterm_matches_served_and_holds_no_patient_data(packages, nih_root, tmp_path):
    live = LiveServer(
        free_port(), "--model", str(packages[0][0]), "--capture", str(tmp_path), "--endpoint-name", "ep"
    )
    _, png = real_png(nih_root)
    pixels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    served = 0
    for body, kind in [
        (png, "image/png"),
        (dicom_bytes(pixels), "application/dicom"),
        (b"", "image/png"),
    ] * 5:
        served += live.post(body, kind)[0] == 200
    live.stop()  # SIGTERM: the buffer must be flushed
    everything = capture_lines(tmp_path)
    records = [r for r in everything if r["cxr"]["status"] == 200]
    rejected = [r for r in everything if r["cxr"]["status"] != 200]
    assert len(records) == served == 10 and len(rejected) == 5
    assert all(r["cxr"]["status"] == 400 and not r["captureData"]["endpointInput"]["data"] for r in rejected)
    paths = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl")]
    assert all(re.fullmatch(r"ep/A/\d{4}/\d{2}/\d{2}/\d{2}/[\w.-]+\.jsonl", p) for p in paths)
    record = records[0]
    assert record["captureData"]["endpointInput"]["encoding"] == "BASE64"
    assert (
        json.loads(record["captureData"]["endpointOutput"]["data"])["inference_id"]
        == record["eventMetadata"]["eventId"]
    )
    features = record["cxr"]["features"][0]
    assert len(features["embedding_projection"]) == 32 and set(features["image_stats"]) >= {"mean", "std"}
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*.jsonl"))
    decoded = b"".join(base64.b64decode(r["captureData"]["endpointInput"]["data"]) for r in records)
    for secret in (b"PID-SECRET-4242", b"Doe^Jane"):
        assert secret not in raw and secret not in decoded
    dicom_records = [r for r in records if r["cxr"]["features"][0]["content_type"] == "application/dicom"]
    assert dicom_records and all(
        r["captureData"]["endpointInput"]["observedContentType"] == "image/png" for r in dicom_records
    )


def test_ab_split_sticky_and_live_weight_change(packages, nih_root, tmp_path):
    live = LiveServer(free_port(), "--model", str(packages[0][0]), "--challenger", str(packages[1][0]),
                      "--weights", "A=50,B=50", "--capture", str(tmp_path))  # fmt: skip
    try:
        _, png = real_png(nih_root)
        tiny = cv2.imencode(".png", cv2.resize(cv2.imdecode(np.frombuffer(png, np.uint8), 0), (64, 64)))[
            1
        ].tobytes()

        def variant(key):
            status, body, headers = live.post(tiny, "image/png", headers={"X-Cxr-Route-Key": key})
            assert status == 200
            assert json.loads(body)["model"]["variant"] == headers["X-Amzn-Invoked-Production-Variant"]
            return headers["X-Amzn-Invoked-Production-Variant"]

        assert {variant("patient-7") for _ in range(10)} in ({"A"}, {"B"})  # sticky
        counts = [variant(f"key-{i}") for i in range(120)]
        assert 35 <= counts.count("B") <= 85
        status, body, _ = live.admin("POST", "/admin/weights", json.dumps({"A": 0, "B": 1}).encode())
        assert status == 200 and json.loads(body) == {"A": 0.0, "B": 1.0}
        assert {variant(f"key-{i}") for i in range(30)} == {"B"}
        assert live.admin("POST", "/admin/weights", b'{"A": 1, "C": 1}')[0] == 400
        forced = live.post(tiny, "image/png", headers={"X-Amzn-SageMaker-Target-Variant": "A"})
        assert forced[2]["X-Amzn-Invoked-Production-Variant"] == "A"
        metrics = live.get("/metrics")[1].decode()
        assert 'cxr_variant_weight{variant="B"} 1.0' in metrics and 'variant="B"' in metrics
    finally:
        live.stop()
    variants = {r["cxr"]["variant"] for r in capture_lines(tmp_path)}
    assert variants == {"A", "B"} and (tmp_path / "cxr-endpoint" / "B").is_dir()


def test_capture_to_s3_on_loopback(packages, nih_root, s3):
    s3.create_bucket(Bucket="cxr-capture")
    env = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    live = LiveServer(
        free_port(), "--model", str(packages[0][0]), "--capture", "s3://cxr-capture/datacapture", env=env
    )
    _, png = real_png(nih_root)
    served = sum(live.post(png, "image/png")[0] == 200 for _ in range(6))
    live.stop()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="cxr-capture", Prefix="datacapture/")["Contents"]]
    assert keys and all(
        re.fullmatch(r"datacapture/cxr-endpoint/A/\d{4}/\d{2}/\d{2}/\d{2}/[\w.-]+\.jsonl", k) for k in keys
    )
    lines = [
        line for k in keys for line in s3.get_object(Bucket="cxr-capture", Key=k)["Body"].read().splitlines()
    ]
    assert len(lines) == served == 6
    head = s3.head_object(Bucket="cxr-capture", Key=keys[0])
    assert head["ServerSideEncryption"] == "AES256"


def test_predict_cli_with_heatmap(packages, nih_root, tmp_path):
    _, png = real_png(nih_root, 2)
    image = tmp_path / "x.png"
    image.write_bytes(png)
    heatmap = tmp_path / "heat.png"
    command = [sys.executable, "-m", "cxr.cli", "predict", str(image), "--model", str(packages[0][0]),
               "--heatmap", str(heatmap), "--finding", "Mass"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert set(payload["findings"]) == set(FINDINGS) and payload["version"] == 1
    assert cv2.imread(str(heatmap)).shape == (CROP, CROP, 3)
