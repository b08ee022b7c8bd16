"""SageMaker-native Data Capture records (no `cxr` block): the monitor featurizes the captured input with the
model package and gets the features the real server captured for the same images."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr.data.findings import FINDINGS
from cxr.inference import input_fn, model_fn, output_fn, predict_fn
from cxr.monitor.baseline import IMAGE_FEATURES
from cxr.monitor.featurize import featurize
from cxr.monitor.reader import read_traffic
from cxr.package import unpack

from .conftest import free_port
from .serving_support import LiveServer, dicom_bytes, make_package, npy_bytes

WHEN = dt.datetime(2026, 11, 20, 10, 15, tzinfo=dt.UTC)
WINDOW = (dt.datetime(2026, 11, 20, 10, tzinfo=dt.UTC), dt.datetime(2026, 11, 20, 11, tzinfo=dt.UTC))
PNGS = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory, nih_root):
    """A package, and what the real server answered and captured for real NIH images of every input type."""
    root = tmp_path_factory.mktemp("native")
    package, _, _ = make_package(root / "pkg", nih_root)
    paths = sorted((nih_root / "images_001" / "images").glob("*.png"))[:PNGS]
    pixels = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths[:3]]
    batch = {"instances": [{"b64": base64.b64encode(p.read_bytes()).decode()} for p in paths[3:5]]}
    requests = [(p.read_bytes(), "image/png", p.name) for p in paths] + [
        (dicom_bytes(pixels[0]), "application/dicom", None),
        (npy_bytes(pixels[1]), "application/x-npy", None),
        (cv2.imencode(".jpg", pixels[2])[1].tobytes(), "image/jpeg", None),
        (json.dumps(batch).encode(), "application/json", None),
    ]
    live = LiveServer(free_port(), "--model", str(package), "--capture", str(root / "server"),
                      "--endpoint-name", "ep", env={"CXR_HOME": str(root / "home")})  # fmt: skip
    try:
        responses = [live.post(body, kind) for body, kind, _ in requests]
    finally:
        live.stop()
    assert all(status == 200 for status, _, _ in responses)
    files = sorted((root / "server").rglob("*.jsonl"))
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    captured = {r["eventMetadata"]["eventId"]: r for r in lines}  # the server's event id is its inference id
    return package, requests, [body.decode() for _, body, _ in responses], captured, root / "server"


def native(body, kind, output, when, image_id=None, inference_id=None, encodings=("BASE64", "JSON")):
    """One record as SageMaker Data Capture writes it (JSON content types captured as text)."""

    def payload(data, content_type, encoding):
        text = base64.b64encode(data).decode() if encoding == "BASE64" else data.decode()
        return {"observedContentType": content_type, "mode": "INPUT", "data": text, "encoding": encoding}

    metadata = {"eventId": str(uuid.uuid4()), "inferenceTime": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if inference_id:
        metadata["inferenceId"] = inference_id
    if image_id:
        metadata["customAttributes"] = [f"image_id={image_id}"]
    parts = {
        "endpointInput": payload(body, kind, encodings[0]),
        "endpointOutput": {**payload(output.encode(), "application/json", encodings[1]), "mode": "OUTPUT"},
    }
    return {"captureData": parts, "eventMetadata": metadata, "eventVersion": "0"}


def write(root: Path, records: list[dict], files: int = 1, variant: str = "A") -> None:
    folder = root / "ep" / variant / WHEN.strftime("%Y/%m/%d/%H")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = "".join(json.dumps(r) + "\n" for r in records[i::files])
        (folder / f"{i:02d}.jsonl").write_text(lines)


def server_features(captured, inference_id: str) -> list[tuple[list[float], list[float]]]:
    features = captured[inference_id]["cxr"]["features"]
    return [([f["image_stats"][k] for k in IMAGE_FEATURES], f["embedding_projection"]) for f in features]


def test_native_records_get_the_features_the_server_captured(served, tmp_path):
    package, requests, outputs, captured, _ = served
    records = [
        native(body, kind, output, WHEN + dt.timedelta(seconds=i), image_id=name,
               encodings=("JSON" if kind == "application/json" else "BASE64", "JSON"))
        for i, ((body, kind, name), output) in enumerate(zip(requests, outputs, strict=True))
    ]  # fmt: skip
    write(tmp_path, records, files=5)
    traffic = read_traffic(str(tmp_path), "ep", *WINDOW, model=package, workers=2)["A"]
    images = len(requests) + 1  # the JSON request holds two images
    counts = (traffic.records, traffic.served, traffic.missing_features, traffic.malformed)
    assert counts == (len(requests), len(requests), 0, 0)
    assert traffic.featurized == images and traffic.image.shape == (images, 7)
    assert traffic.embedding.shape == (images, 32) and traffic.model_versions == {"1": len(requests)}

    expected_stats, expected_projection, expected_probabilities = [], [], []
    for row_id in traffic.inference_ids:  # the response's inference id: the server's capture event
        server_id, _, index = row_id.partition("#")
        stats, projection = server_features(captured, server_id)[int(index or 0)]
        expected_stats.append(stats)
        expected_projection.append(projection)
        prediction = json.loads(captured[server_id]["captureData"]["endpointOutput"]["data"])["predictions"]
        expected_probabilities.append([prediction[int(index or 0)]["probabilities"][f] for f in FINDINGS])
    stats_diff = np.abs(traffic.image - np.array(expected_stats)).max()
    projection_diff = np.abs(traffic.embedding - np.array(expected_projection)).max()
    largest = np.abs(traffic.embedding).max()
    print(f"\nagreement with the server's capture, {images} images: image stats max |Δ| {stats_diff:.2g}, "
          f"embedding projection max |Δ| {projection_diff:.2g} (values up to {largest:.2f})")  # fmt: skip
    assert stats_diff <= 1e-9
    assert projection_diff <= 2e-5
    assert np.array_equal(traffic.probabilities, np.array(expected_probabilities))
    assert {i for i in traffic.image_ids if i} == {name for _, _, name in requests if name}
    assert len({*traffic.inference_ids}) == images

    unchanged = read_traffic(str(tmp_path), "ep", *WINDOW)["A"]  # without a model: missing, as before
    assert (unchanged.missing_features, len(unchanged.image), unchanged.featurized) == (len(requests), 0, 0)


def test_server_capture_is_read_as_before_with_a_model(served):
    package, requests, _, _, root = served
    now = dt.datetime.now(dt.UTC)
    window = (now - dt.timedelta(hours=2), now + dt.timedelta(hours=1))
    with_model = read_traffic(str(root), "ep", *window, model=package)["A"]
    without = read_traffic(str(root), "ep", *window)["A"]
    assert with_model.featurized == 0 and with_model.missing_features == 0
    assert np.array_equal(with_model.image, without.image)
    assert np.array_equal(with_model.embedding, without.embedding)
    assert len(with_model.image) == len(requests) + 1


def test_package_handler_output_schema(served, tmp_path):
    package, _, _, captured, _ = served
    bundle = model_fn(str(unpack(package, tmp_path / "model")))
    records, handler_probabilities = [], []
    for i, (server_id, record) in enumerate(sorted(captured.items())):
        body = base64.b64decode(record["captureData"]["endpointInput"]["data"])
        kind = record["captureData"]["endpointInput"]["observedContentType"]
        if kind not in ("image/png", "image/jpeg", "application/x-npy"):
            continue  # the handlers take one image per request
        prediction = predict_fn(input_fn(body, kind), bundle)
        handler_probabilities.append([prediction[f] for f in FINDINGS])
        output = output_fn(prediction)[0]  # {"predictions": {finding: p}}
        records.append(native(body, kind, output, WHEN + dt.timedelta(seconds=i), inference_id=server_id,
                              encodings=("BASE64", "BASE64")))  # fmt: skip
    write(tmp_path, records)
    traffic = read_traffic(str(tmp_path), "ep", *WINDOW, model=package)["A"]
    assert traffic.missing_features == 0 and len(traffic.image) == len(records) >= PNGS
    assert traffic.model_versions == {"None": len(records)}  # the handlers' response names no model
    assert np.allclose(traffic.probabilities, handler_probabilities, atol=1e-7)
    served_by_server = [server_features(captured, i)[0] for i in traffic.inference_ids]
    assert np.allclose(traffic.image, [s for s, _ in served_by_server], atol=1e-9)
    assert np.allclose(traffic.embedding, [p for _, p in served_by_server], atol=2e-5)


def test_undecodable_inputs_count_as_missing(served, tmp_path):
    package, requests, outputs, _, _ = served
    png, output = requests[0][0], outputs[0]
    good = native(png, "image/png", output, WHEN)
    not_base64 = native(png, "image/png", output, WHEN)
    not_base64["captureData"]["endpointInput"]["data"] = "%%% not base64 %%%"
    records = [
        good,
        not_base64,
        native(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png", output, WHEN),  # truncated PNG
        native(b"0.1,0.2,0.3", "text/csv", output, WHEN, encodings=("CSV", "JSON")),  # unsupported type
        native(
            b'{"instances": [{"b64": "@@"}]}', "application/json", output, WHEN, encodings=("JSON", "JSON")
        ),
        native(npy_bytes(np.zeros((2, 2, 2), np.uint8)), "application/x-npy", output, WHEN),  # not 2-D
        native(png, "application/dicom", output, WHEN),  # not a DICOM file
        native(png, "image/png", json.dumps({"predictions": [{"probabilities": {}}]}), WHEN),  # no scores
        native(png, "image/png", "not json", WHEN),
    ]
    write(tmp_path, records)
    traffic = read_traffic(str(tmp_path), "ep", *WINDOW, model=package)["A"]
    assert (traffic.records, traffic.served, traffic.malformed) == (len(records), len(records), 0)
    assert traffic.missing_features == len(records) - 1 and len(traffic.image) == traffic.featurized == 1


def test_featurize_decoded_images(served):
    package, _, outputs, captured, _ = served
    ids = [json.loads(o)["inference_id"] for o in outputs[:PNGS]]
    pixels = [
        input_fn(base64.b64decode(captured[i]["captureData"]["endpointInput"]["data"]), "image/png")
        for i in ids
    ]
    stats, projections = featurize(pixels, package)
    expected = [server_features(captured, i)[0] for i in ids]
    assert np.allclose(stats, [s for s, _ in expected], atol=1e-9)
    assert np.allclose(projections, [p for _, p in expected], atol=2e-5)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, nih_root):
    """One server with two different networks: A serves version 1, B version 2; what it captured."""
    root = tmp_path_factory.mktemp("versions")
    packages = {str(v): make_package(root / f"v{v}", nih_root, seed=v, version=v)[0] for v in (1, 2)}
    live = LiveServer(free_port(), "--model", str(packages["1"]), "--challenger", str(packages["2"]),
                      "--capture", str(root / "server"), "--endpoint-name", "ep",
                      env={"CXR_HOME": str(root / "home")})  # fmt: skip
    try:
        for path in sorted((nih_root / "images_001" / "images").glob("*.png"))[:PNGS]:
            for variant in ("A", "B"):
                headers = {"X-Amzn-SageMaker-Target-Variant": variant}
                assert live.post(path.read_bytes(), "image/png", headers=headers)[0] == 200
    finally:
        live.stop()
    lines = [
        json.loads(line)
        for f in sorted((root / "server").rglob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    return packages, {r["eventMetadata"]["eventId"]: r for r in lines}


def as_native(record: dict, when: dt.datetime, output: str | None = None) -> dict:
    """A server capture record as SageMaker Data Capture would have written it (no `cxr` block)."""
    captured = record["captureData"]
    body = base64.b64decode(captured["endpointInput"]["data"])
    return native(body, captured["endpointInput"]["observedContentType"],
                  output or captured["endpointOutput"]["data"], when)  # fmt: skip


def test_native_records_are_featurized_by_the_version_that_served_them(two_versions, tmp_path):
    """Each variant's records get the features its own model captured on the server. Featurized with one
    package for all (the production model's), B's embeddings would be another network's."""
    packages, captured = two_versions
    for variant in ("A", "B"):
        mine = [r for r in captured.values() if r["cxr"]["variant"] == variant]
        write(
            tmp_path,
            [as_native(r, WHEN + dt.timedelta(seconds=i)) for i, r in enumerate(mine)],
            variant=variant,
        )
    traffic = read_traffic(str(tmp_path), "ep", *WINDOW, model=packages.get, workers=1)
    for variant, version in (("A", "1"), ("B", "2")):
        read = traffic[variant]
        assert read.model_versions == {version: PNGS} and read.row_versions == [version] * PNGS
        assert read.featurized == PNGS and read.missing_features == 0
        expected = [server_features(captured, i)[0] for i in read.inference_ids]
        assert np.allclose(read.image, [s for s, _ in expected], atol=1e-9)
        assert np.abs(read.embedding - np.array([p for _, p in expected])).max() <= 2e-5
    with_production = read_traffic(str(tmp_path), "ep", *WINDOW, variants=["B"], model=packages["1"])["B"]
    gap = np.abs(with_production.embedding - traffic["B"].embedding).max()
    print(f"\nB's embedding projections featurized with A's package instead: max |Δ| {gap:.3f}")
    assert gap > 0.01


def test_records_naming_no_version_take_the_version_their_variant_serves(two_versions, tmp_path):
    """The package handlers' response names no model: `versions` says what the variant serves; without it
    the records stay unfeaturized rather than featurized by a guess."""
    packages, captured = two_versions
    mine = [r for r in captured.values() if r["cxr"]["variant"] == "B"]
    records = []
    for i, record in enumerate(mine):
        served = json.loads(record["captureData"]["endpointOutput"]["data"])["predictions"][0]
        handler_output = json.dumps({"predictions": served["probabilities"]})  # the handlers' schema
        records.append(as_native(record, WHEN + dt.timedelta(seconds=i), handler_output))
    write(tmp_path, records, variant="B")
    named = read_traffic(str(tmp_path), "ep", *WINDOW, model=packages.get, versions={"B": "2"})["B"]
    assert named.model_versions == {"2": PNGS} and named.featurized == PNGS
    expected = [server_features(captured, r["eventMetadata"]["eventId"])[0] for r in mine]
    assert np.abs(named.embedding - np.array([p for _, p in expected])).max() <= 2e-5
    unnamed = read_traffic(str(tmp_path), "ep", *WINDOW, model=packages.get)["B"]
    assert unnamed.model_versions == {"None": PNGS}
    assert (unnamed.featurized, unnamed.missing_features, len(unnamed.image)) == (0, PNGS, 0)
