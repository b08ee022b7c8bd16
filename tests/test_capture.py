"""Data capture's guarantees on the real server over loopback HTTP: a bounded delay from a 200 to a
durable record (checked by SIGKILL under load), server errors captured without their payload, and a
writer that cannot write shows on /ping, /metrics and the log, never silently."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest

from cxr.monitor.checks import MonitorConfig, quality_checks
from cxr.monitor.reader import read_traffic
from cxr.serve.capture import CaptureUnavailable, CaptureWriter, capture_record

from .conftest import free_port
from .serving_support import LiveServer, make_package

DURABLE_WITHIN_SECONDS = 2.0


@pytest.fixture(scope="module")
def package(tmp_path_factory, nih_root):
    return make_package(tmp_path_factory.mktemp("capture"), nih_root)[0]


def nih_png(nih_root, index: int = 0) -> bytes:
    return sorted((nih_root / "images_001" / "images").glob("*.png"))[index].read_bytes()


def captured(directory: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(directory.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


@pytest.mark.timeout(600)
def test_sigkill_under_load_loses_only_the_last_seconds(package, nih_root, tmp_path):
    live = LiveServer(free_port(), "--model", str(package), "--capture", str(tmp_path))
    png = nih_png(nih_root)
    answered: list[tuple[str, float]] = []  # inference id of each 200, and when it arrived
    lock = threading.Lock()

    def client() -> None:
        for _ in range(50):
            try:
                status, body, _ = live.post(png, "image/png")
            except OSError:  # the server is gone
                return
            if status == 200:
                with lock:
                    answered.append((json.loads(body)["inference_id"], time.monotonic()))
            time.sleep(0.15)

    clients = [threading.Thread(target=client) for _ in range(4)]  # ≤ 200 requests over ~10 s
    for thread in clients:
        thread.start()
    time.sleep(8)
    killed_at = time.monotonic()
    live.process.send_signal(signal.SIGKILL)
    live.process.wait(60)
    for thread in clients:
        thread.join(120)
    on_disk = {r["eventMetadata"]["eventId"] for r in captured(tmp_path)}
    old_enough = {i for i, at in answered if at < killed_at - DURABLE_WITHIN_SECONDS}
    assert len(old_enough) >= 20, len(answered)
    assert old_enough <= on_disk, f"{len(old_enough - on_disk)} of {len(old_enough)} answered records lost"
    lost = {i for i, _ in answered} - on_disk
    assert all(at >= killed_at - DURABLE_WITHIN_SECONDS for i, at in answered if i in lost)


def broken_package(package: Path, directory: Path) -> Path:
    """The package unpacked, with a crop its ONNX graph does not take: every inference raises."""
    with tarfile.open(package) as archive:
        archive.extractall(directory, filter="data")
    metadata = json.loads((directory / "metadata.json").read_text())
    (directory / "metadata.json").write_text(json.dumps({**metadata, "crop": metadata["crop"] - 16}))
    return directory


@pytest.mark.timeout(600)
def test_server_errors_are_captured_without_payload_and_counted(package, nih_root, tmp_path):
    capture = tmp_path / "capture"
    model = broken_package(package, tmp_path / "model")
    live = LiveServer(free_port(), "--model", str(model), "--capture", str(capture), "--endpoint-name", "ep")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    try:
        statuses = [live.post(nih_png(nih_root), "image/png")[0] for _ in range(3)]
        statuses.append(live.post(b"not an image", "image/png")[0])
    finally:
        log = live.stop()
    assert statuses == [500, 500, 500, 422]
    records = captured(capture)
    errors = [r for r in records if r["cxr"]["status"] == 500]
    assert len(errors) == 3 and "internal error while serving a request" in log
    for record in errors:
        assert record["captureData"]["endpointInput"]["data"] == ""
        assert record["cxr"]["features"] == []
        assert "internal server error" in json.loads(record["captureData"]["endpointOutput"]["data"])["error"]
    traffic = read_traffic(str(capture), "ep", start, dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))["A"]
    assert traffic.statuses[500] == 3 and traffic.rejected == 1
    server_errors = next(
        c for c in quality_checks(traffic, MonitorConfig()) if c["feature"] == "server_errors"
    )
    assert server_errors["violation"] and server_errors["statistic"] == 0.75


@pytest.mark.timeout(600)
def test_a_writer_that_cannot_write_is_visible(package, nih_root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for blocker in (tmp_path / "capture", home / "capture-spool"):  # files where directories must go
        blocker.write_text("not a directory")
    live = LiveServer(free_port(), "--model", str(package), "--capture", str(tmp_path / "capture"),
                      env={"CXR_HOME": str(home)})  # fmt: skip
    try:
        assert live.post(nih_png(nih_root), "image/png")[0] == 200
        deadline = time.monotonic() + 120
        while live.get("/ping")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        status, body, _ = live.get("/ping")
        metrics = live.get("/metrics")[1].decode()
    finally:
        log = live.stop()
    assert status == 503 and "spool" in json.loads(body)["reason"]
    assert "cxr_capture_healthy 0.0" in metrics
    assert re.search(r"cxr_capture_pending_records 1\.0", metrics)
    assert re.search(r"cxr_capture_records_total 0\.0", metrics)  # counts durable records only
    assert "local spool both failed" in log


def test_writer_death_and_back_pressure_are_loud(tmp_path, monkeypatch):
    output = json.dumps({"predictions": []})

    def record(i: int) -> dict:
        return capture_record("image/png", b"x" * 1000, output, f"e{i}", "A", 1, [])

    lost: list[int] = []
    writer = CaptureWriter(str(tmp_path), max_seconds=60, max_pending_mb=0.015, on_lost=lost.append)
    assert writer.offer(record(0)) and writer.offer(record(1))
    assert not writer.offer(record(2))  # full: the caller decides (the server answers 503)
    with pytest.raises(CaptureUnavailable):
        writer.submit(record(2), timeout=0.2)

    def bug(key: str, body: bytes) -> None:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(writer, "_write_or_spool", bug)
    writer.close()
    assert not writer.healthy and "RuntimeError" in str(writer.failure) and lost == [2]
    with pytest.raises(CaptureUnavailable):
        writer.offer(record(3))
