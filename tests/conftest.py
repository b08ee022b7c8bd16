"""Shared fixtures: the real NIH data beside the checkout, an isolated CXR_HOME, an S3 API on loopback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

import cxr.model  # noqa: F401 - torchvision before anything loads Metaflow's vendored typing_extensions

os.environ.setdefault("USER", "tester")  # Metaflow needs a user name; CI environments may lack one

REPO = Path(__file__).resolve().parent.parent
NIH = Path(os.environ.get("CXR_TEST_NIH", REPO.parent / "shared" / "nih"))
METADATA = NIH / "Data_Entry_2017_v2020.csv.gz"
IMAGES = NIH / "images_001" / "images"


@pytest.fixture(scope="session")
def nih_root() -> Path:
    """The real partial NIH download (full metadata, 120 images)."""
    if not METADATA.is_file():
        pytest.fail(f"real NIH test data not found at {NIH} (set CXR_TEST_NIH)")
    return NIH


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own CXR_HOME; Metaflow gets a user name."""
    home = tmp_path_factory.mktemp("cxr_home")
    monkeypatch.setenv("CXR_HOME", str(home))
    monkeypatch.setenv("METAFLOW_USER", "tester")
    return home


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL. Requests it records
    (`/moto-api/recorder/`, off unless a test starts it) go to a file of the session's temporary folder."""
    recording = tmp_path_factory.mktemp("moto") / "recording"
    os.environ.setdefault("MOTO_RECORDER_FILEPATH", str(recording))  # read when moto is imported
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """A boto3 S3 client against the loopback server, with the environment pointing cxr at it."""
    import boto3

    for name, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    return boto3.client("s3")


def script_invocations(server: str, *results: dict) -> None:
    """Queue canned InvokeEndpoint results on the loopback server (it hands each to the next new request)."""
    import json
    import urllib.request

    payload = json.dumps({"results": list(results)}).encode()
    request = urllib.request.Request(f"{server}/moto-api/static/sagemaker/endpoint-results", data=payload)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium through Playwright, one per test module: Playwright's sync API holds an
    event loop in the test thread while it runs, which would break asyncio.run() in other modules' tests."""
    from tests.browser import launched_browser

    with launched_browser() as launched:
        yield launched


@pytest.fixture
def page_guard():
    """Requests beyond loopback and uncaught errors of the test's page; it fails the test unless cleared."""
    from tests.browser import PageGuard

    return PageGuard()


@pytest.fixture
def page(browser, page_guard):
    """A page in a fresh browser context, offline but for loopback."""
    from tests.browser import guarded_page

    with guarded_page(browser, page_guard) as fresh:
        yield fresh
