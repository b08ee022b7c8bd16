"""Helpers for web-application tests: the app on a loopback port (in this process or as `cxr app`), and a
signed-in HTTP client that carries the session cookie and the CSRF token like a browser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from werkzeug.serving import make_server

from cxr_app import create_app
from cxr_app.settings import AppSettings

from .conftest import free_port

CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


@contextmanager
def running_app(settings: AppSettings) -> Iterator[tuple[str, object]]:
    """The application on a threaded WSGI server, a free loopback port, in a thread: (base URL, Flask app).
    (`cxr app` itself runs waitress; `LiveApp` tests that.)"""
    app = create_app(settings)
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.shutdown()
        thread.join(timeout=10)


class Client:
    """A browser-like HTTP client: cookies kept, the page's CSRF token sent with every form."""

    def __init__(self, base: str):
        self.base, self.http, self.token = base, requests.Session(), ""

    def get(self, path: str, **kwargs) -> requests.Response:
        response = self.http.get(self.base + path, allow_redirects=False, timeout=30, **kwargs)
        found = (
            CSRF_FIELD.search(response.text)
            if "text/html" in response.headers.get("Content-Type", "")
            else None
        )
        self.token = found.group(1) if found else self.token
        return response

    def post(self, path: str, data: dict | None = None, csrf: bool = True, **kwargs) -> requests.Response:
        form = {**(data or {}), **({"csrf_token": self.token} if csrf else {})}
        return self.http.post(self.base + path, data=form, allow_redirects=False, timeout=60, **kwargs)

    def sign_in(self, username: str, password: str) -> requests.Response:
        self.get("/sign-in")
        return self.post("/sign-in", {"username": username, "password": password})


class LiveApp:
    """`cxr app` in its own process on a loopback port."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "cxr.cli", "app", "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cxr app exited: {self.process.stdout.read().decode()[-3000:]}")
            try:
                if requests.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError("cxr app did not answer /healthz in 60 s")

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return self.process.stdout.read().decode()


def add_user(username: str, password: str, role: str, env: dict | None = None) -> str:
    """`cxr app add-user` with the password on standard input; its output."""
    done = subprocess.run([sys.executable, "-m", "cxr.cli", "app", "add-user", username, "--role", role,
                           "--password-stdin"], input=password + "\n", capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60, check=True)  # fmt: skip
    return done.stdout + done.stderr
