import hashlib
import http.server
import os
import threading
from typing import ClassVar

import pytest

from cxr.data.download import ARCHIVES, ChecksumError, RemoteFile, download_file

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path and honours `Range: bytes=N-`."""

    requests: ClassVar[list[str | None]] = []

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/file.gz"
    httpd.shutdown()


def test_resume_verify_and_skip(tmp_path, server):
    remote = RemoteFile("images_001.tar.gz", server, hashlib.md5(PAYLOAD).hexdigest())
    (tmp_path / "images_001.tar.gz.part").write_bytes(PAYLOAD[:1_000_000])  # an interrupted download
    path = download_file(remote, tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD and RangeHandler.requests == ["bytes=1000000-"]
    assert not (tmp_path / "images_001.tar.gz.part").exists()
    download_file(remote, tmp_path, progress=False)
    assert len(RangeHandler.requests) == 1, "a verified file is not downloaded again"


def test_checksum_mismatch_is_an_error_and_leaves_no_partial(tmp_path, server):
    remote = RemoteFile("images_002.tar.gz", server, "0" * 32)
    with pytest.raises(ChecksumError, match="MD5"):
        download_file(remote, tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_official_archives_are_listed_with_checksums():
    assert [a.name for a in ARCHIVES] == [f"images_{i:03d}.tar.gz" for i in range(1, 13)]
    assert all(a.url.startswith("https://") and len(a.md5 or "") == 32 for a in ARCHIVES)
    with pytest.raises(ValueError, match="only http"):
        download_file(RemoteFile("x", "file:///etc/passwd"), "/tmp/never-created-cxr", progress=False)
