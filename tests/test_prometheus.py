"""A real Prometheus server (Debian's package, started here on loopback) scrapes the live endpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from .conftest import free_port
from .serving_support import LiveServer, make_package


def query(prometheus: str, expression: str) -> list:
    url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expression)}"
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
        return json.loads(response.read())["data"]["result"]


@pytest.mark.slow
def test_prometheus_scrapes_requests_latency_and_model_info(tmp_path, nih_root):
    binary = shutil.which("prometheus")
    if binary is None:
        message = "the prometheus binary is missing: apt-get install prometheus (.ci/run does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    package, _, _ = make_package(tmp_path / "pkg", nih_root)
    live = LiveServer(free_port(), "--model", str(package))
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = live.url.removeprefix("http://")
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: cxr\n    static_configs:\n      - targets: ['{target}']\n"
    )
    prometheus = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    try:
        png = next((nih_root / "images_001" / "images").glob("*.png")).read_bytes()
        for _ in range(7):
            assert live.post(png, "image/png")[0] == 200
        assert live.post(b"", "image/png")[0] == 400
        deadline, ok, bad = time.monotonic() + 90, [], []
        while time.monotonic() < deadline:
            try:
                ok = query(api, 'cxr_requests_total{status="200",variant="A"}')
                bad = query(api, 'cxr_requests_total{status="400"}')
            except OSError:
                pass
            if ok and float(ok[0]["value"][1]) == 7 and bad:
                break
            time.sleep(1)
        assert ok and float(ok[0]["value"][1]) == 7, ok
        assert float(bad[0]["value"][1]) == 1
        assert float(query(api, 'up{job="cxr"}')[0]["value"][1]) == 1
        info = query(api, "cxr_model_info")[0]["metric"]
        assert info["backend"] == "onnx" and info["version"] == "1"
        assert float(query(api, "cxr_request_latency_seconds_count")[0]["value"][1]) == 8
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        live.stop()
