"""The admin token: where it comes from, how its file is made, and `cxr serve` refusing /admin/* without it
(the real server as a process over HTTP on loopback; the gateway's side is in tests/test_gateway.py)."""

from __future__ import annotations

import json
import stat
import threading

import pytest

from cxr.serve.admin import admin_token_path, admin_token_source, load_admin_token

from .conftest import free_port
from .serving_support import LiveServer, make_package


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_token_is_created_0600_once_and_then_reused(isolated_home, monkeypatch):
    monkeypatch.delenv("CXR_ADMIN_TOKEN", raising=False)
    path = admin_token_path()
    assert path == isolated_home / "admin-token" and not path.exists()
    assert admin_token_source() == str(path)
    token = load_admin_token()
    assert len(token) >= 40 and path.read_text().strip() == token and mode(path) == 0o600
    assert load_admin_token() == token  # read again, never replaced
    assert [p.name for p in isolated_home.iterdir()] == ["admin-token"]  # no temporary file left behind


def test_concurrent_first_starts_agree_on_one_token(isolated_home, monkeypatch):
    monkeypatch.delenv("CXR_ADMIN_TOKEN", raising=False)
    tokens: list[str] = []
    start = threading.Barrier(8)

    def first_start() -> None:
        start.wait()
        tokens.append(load_admin_token())

    threads = [threading.Thread(target=first_start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert (isolated_home / "admin-token").read_text().strip() == tokens[0]
    assert [p.name for p in isolated_home.iterdir()] == ["admin-token"]


def test_a_given_file_wins_over_the_environment_which_wins_over_the_default(tmp_path, monkeypatch):
    given = tmp_path / "token"
    given.write_text("from-the-given-file-0123456789\n")
    monkeypatch.setenv("CXR_ADMIN_TOKEN", "from-the-environment-0123456789")
    assert load_admin_token(given) == "from-the-given-file-0123456789"
    assert load_admin_token() == "from-the-environment-0123456789"
    assert admin_token_source() == "$CXR_ADMIN_TOKEN" and not admin_token_path().exists()
    with pytest.raises(FileNotFoundError):  # a given file is never created: a typo must not mint a token
        load_admin_token(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("token", ["short", "has a space inside it 0123", "é" * 20])
def test_weak_or_malformed_tokens_are_refused(token, monkeypatch):
    monkeypatch.setenv("CXR_ADMIN_TOKEN", token)
    with pytest.raises(ValueError, match="16-1024 printable ASCII"):
        load_admin_token()


@pytest.fixture(scope="module")
def package(tmp_path_factory, nih_root):
    return make_package(tmp_path_factory.mktemp("package"), nih_root)[0]


def test_serve_refuses_admin_routes_without_the_token_and_never_logs_it(package, tmp_path):
    """With neither flag nor environment, the server makes $CXR_HOME/admin-token and requires it."""
    home = tmp_path / "home"
    environment = {"CXR_HOME": str(home), "CXR_ADMIN_TOKEN": ""}  # empty: not set
    live = LiveServer(free_port(), "--model", str(package), env=environment, verbose=True)
    try:
        token_file = home / "admin-token"
        token = token_file.read_text().strip()
        assert mode(token_file) == 0o600 and token != live.admin_token
        before = live.admin("GET", "/admin/weights", token=token)
        assert before[0] == 200 and json.loads(before[1]) == {"A": 1.0}
        anonymous = [
            live.request("GET", "/admin/weights"),
            live.request("POST", "/admin/weights", b'{"A": 2}'),
            live.request("POST", "/admin/weights", b'{"A": 2}', {"Authorization": "Basic YWRtaW46YWRtaW4="}),
            live.request("GET", "/admin/weights", headers={"Authorization": "Bearer "}),
            live.request("GET", "/admin/anything-else"),  # unknown admin routes are not revealed
        ]
        for status, body, headers in anonymous:
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), body
            assert "Authorization: Bearer" in json.loads(body)["error"]
        for wrong in (live.admin_token, token[:-1], token + "x", token.upper()):
            status, body, _ = live.admin("POST", "/admin/weights", b'{"A": 2}', token=wrong)
            assert status == 403 and json.loads(body) == {"error": "wrong admin token"}
        assert live.admin("GET", "/admin/weights", token=token)[1] == before[1]  # nothing was changed
        assert live.admin("GET", "/admin/anything-else", token=token)[0] == 404
        assert [live.get(path)[0] for path in ("/ping", "/metrics", "/models")] == [200] * 3
    finally:
        output = live.stop()
    assert str(token_file) in output and token not in output
