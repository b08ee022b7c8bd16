"""The A/B gateway over HTTP on loopback, against moto's SageMaker runtime and botocore's Stubber."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import boto3
import pytest
from aiohttp import web
from botocore.config import Config
from botocore.response import StreamingBody
from botocore.stub import Stubber

from cxr.cli import main
from cxr.serve.admin import admin_headers, load_admin_token
from cxr.serve.gateway import GATEWAY, GatewayConfig, build_gateway_app, runtime_client

from .conftest import free_port, script_invocations

PAYLOAD = b'{"instances": ["aGVsbG8="]}'
JSON = "application/json"
VARIANT = "X-Amzn-Invoked-Production-Variant"


def call(url: str, path: str, body: bytes | None = None, headers: dict | None = None, method: str = "POST"):
    """One HTTP request on loopback: (status, parsed JSON or text, headers)."""
    request = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, answer = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, answer = error.code, error.read(), error.headers
    kind = answer.get("Content-Type", "")
    return status, json.loads(raw) if kind.startswith(JSON) else raw.decode(), answer


class GatewayThread:
    """The gateway app on its own event loop in a thread, on a free loopback port."""

    def __init__(self, config: GatewayConfig, client=None):
        self.url = f"http://127.0.0.1:{config.port}"
        self.endpoints = config.endpoints
        self.app = build_gateway_app(config, client)
        self.admin_token = load_admin_token(config.admin_token_file)  # the one the gateway read or made
        self.runner = web.AppRunner(self.app, access_log=None)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._start(config.port))

    async def _start(self, port: int) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def post(self, headers: dict | None = None, body: bytes = PAYLOAD):
        return call(self.url, "/invocations", body, {"Content-Type": JSON, **(headers or {})})

    def admin(self, body: bytes | None = None, method: str = "POST", headers: dict | None = None):
        """/admin/weights with the gateway's admin token."""
        return call(
            self.url, "/admin/weights", body, {**admin_headers(self.admin_token), **(headers or {})}, method
        )

    def stop(self) -> None:
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def canned(tag: str, custom_attributes: str | None = None) -> dict:
    result = {"Body": json.dumps({"served_by": tag}), "ContentType": JSON, "InvokedProductionVariant": "All"}
    return {**result, "CustomAttributes": custom_attributes} if custom_attributes else result


def tag_endpoint(client):
    """Moto's server mode keys canned results by request (body, Accept, X-Amzn-SageMaker-* headers) but
    not by endpoint (it reads no EndpointName from the URL), so copy each call's endpoint into a header."""

    def add_header(params, **_):
        params["headers"]["X-Amzn-SageMaker-Cxr-Test-Endpoint"] = params["url_path"].split("/")[2]

    client.meta.events.register("before-call.sagemaker-runtime.InvokeEndpoint", add_header)
    return client


@pytest.fixture
def moto_queue(s3_server, s3):
    """Moto's queue of canned results, emptied before and after each test so that a failure leaves nothing
    for the next one (the server runs in this process)."""
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    queue = sagemakerruntime_backends["123456789012"]["us-east-1"].results_queue
    queue.clear()
    yield queue
    queue.clear()


@pytest.fixture
def endpoints(s3_server, moto_queue) -> dict[str, str]:
    """Two fresh endpoints that answer PAYLOAD with {"served_by": "A"} and {"served_by": "B"}: one direct
    call per endpoint, made as the gateway makes it, pins each endpoint's canned answer for the test."""
    suffix = uuid.uuid4().hex[:8]
    names = {"A": f"cxr-a-{suffix}", "B": f"cxr-b-{suffix}"}
    runtime = tag_endpoint(boto3.client("sagemaker-runtime"))
    for variant, name in names.items():
        script_invocations(s3_server, canned(variant))
        answer = runtime.invoke_endpoint(EndpointName=name, Body=PAYLOAD, ContentType=JSON)
        assert json.loads(answer["Body"].read()) == {"served_by": variant}
    return names


@pytest.fixture
def gateway(endpoints):
    """Routing tests send hundreds of requests at once from one client: no rate limit here."""
    config = GatewayConfig(endpoints, weights={"A": 1, "B": 0}, port=free_port(), rate_limit=None)
    live = GatewayThread(config, tag_endpoint(runtime_client(config)))
    yield live
    live.stop()


def served(live: GatewayThread, headers: dict | None = None) -> str:
    """The variant that answered one request, checked against the body and the endpoint header."""
    status, body, answer = live.post(headers)
    assert status == 200 and answer["Content-Type"] == JSON, (status, body)
    variant = answer[VARIANT]
    assert body == {"served_by": variant}
    assert answer["X-Cxr-Endpoint"] == live.endpoints[variant]
    return variant


def test_weights_send_everything_to_a_and_target_variant_forces_b(gateway):
    assert call(gateway.url, "/ping", method="GET")[0] == 200
    assert {served(gateway) for _ in range(20)} == {"A"}
    forced = [served(gateway, {"X-Amzn-SageMaker-Target-Variant": "B"}) for _ in range(5)]
    assert forced == ["B"] * 5
    status, body, _ = gateway.post({"X-Amzn-SageMaker-Target-Variant": "Z"})
    assert status == 400 and "unknown target variant" in body["error"]


def test_sticky_keys_and_an_even_split(gateway, s3_server):
    assert gateway.admin(json.dumps({"A": 0.5, "B": 0.5}).encode())[0] == 200
    sticky = {served(gateway, {"X-Cxr-Route-Key": "patient-7"}) for _ in range(10)}
    assert len(sticky) == 1
    counts = [served(gateway, {"X-Cxr-Route-Key": f"key-{i}"}) for i in range(200)]
    assert 70 <= counts.count("B") <= 130
    # The key may come in SageMaker custom attributes, which are forwarded: moto sees a new request.
    script_invocations(s3_server, canned("attributes", custom_attributes="seen"))
    status, body, answer = gateway.post({"X-Amzn-SageMaker-Custom-Attributes": "route_key=patient-7"})
    assert status == 200 and body == {"served_by": "attributes"}
    assert answer[VARIANT] == sticky.pop() and answer["X-Amzn-SageMaker-Custom-Attributes"] == "seen"


def test_live_weight_change(gateway):
    assert {served(gateway) for _ in range(10)} == {"A"}
    status, body, _ = gateway.admin(json.dumps({"A": 0, "B": 3}).encode())
    assert status == 200 and body == {"A": 0.0, "B": 1.0}
    assert {served(gateway) for _ in range(10)} == {"B"}
    assert gateway.admin(method="GET")[1] == {"A": 0.0, "B": 1.0}
    for bad in (b'{"A": 1, "C": 1}', b"[1, 2]", b"not json", b'{"A": -1, "B": 1}'):
        status, body, _ = gateway.admin(bad)
        assert status == 400 and body["error"], bad


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(selector)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_what_was_sent(gateway, endpoints):
    sent = {"A": 7, "B": 4}
    for variant, n in sent.items():
        for _ in range(n):
            served(gateway, {"X-Amzn-SageMaker-Target-Variant": variant})
    gateway.post({"X-Amzn-SageMaker-Target-Variant": "Z"})
    status, text, answer = call(gateway.url, "/metrics", method="GET")
    assert status == 200 and answer["Content-Type"].startswith("text/plain")
    for variant, n in sent.items():
        assert metric(text, "cxr_gateway_requests_total", status="200", variant=variant) == n
        assert metric(text, "cxr_gateway_request_latency_seconds_count", variant=variant) == n
        assert metric(text, "cxr_gateway_endpoint_info", endpoint=endpoints[variant], variant=variant) == 1
    assert metric(text, "cxr_gateway_requests_total", status="400", variant="none") == 1
    assert metric(text, "cxr_gateway_variant_weight", variant="A") == 1.0
    assert metric(text, "cxr_gateway_variant_weight", variant="B") == 0.0


def streaming(body: bytes) -> StreamingBody:
    return StreamingBody(io.BytesIO(body), len(body))


def test_endpoint_errors_map_to_4xx_and_503_and_the_gateway_lives(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("sagemaker-runtime", region_name="us-east-1")
    stubber = Stubber(client)
    stubber.add_client_error(
        "invoke_endpoint", "ModelError", "Received client error (400) from primary", 424,
        modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": '{"error": "not a PNG image"}'},
    )  # fmt: skip
    stubber.add_client_error("invoke_endpoint", "ModelError", "unsupported media type", 400)
    stubber.add_client_error("invoke_endpoint", "ValidationError", "Body is too large", 400)
    stubber.add_client_error("invoke_endpoint", "ThrottlingException", "Rate exceeded", 400)
    stubber.add_client_error("invoke_endpoint", "ServiceUnavailable", "Service unavailable", 503)
    stubber.add_client_error(
        "invoke_endpoint", "ModelError", "Received server error (500) from primary", 424,
        modeled_fields={"OriginalStatusCode": 500, "OriginalMessage": "boom"},
    )  # fmt: skip
    forwarded = {"EndpointName": "cxr-a", "Body": PAYLOAD, "ContentType": JSON, "Accept": JSON,
                 "CustomAttributes": "route_key=p1", "InferenceId": "inference-1"}  # fmt: skip
    answer = {"Body": streaming(b'{"ok": true}'), "ContentType": JSON, "CustomAttributes": "trace=1"}
    stubber.add_response("invoke_endpoint", answer, expected_params=forwarded)
    config = GatewayConfig({"A": "cxr-a"}, port=free_port(), max_body_mb=0.01)
    live = GatewayThread(config, client)
    try:
        with stubber:
            expected = [(400, "not a PNG image"), (400, "unsupported media type"), (400, "Body is too large"),
                        (503, "Rate exceeded"), (503, "Service unavailable"), (502, "boom")]  # fmt: skip
            for status, message in expected:
                got, body, headers = live.post()
                assert got == status and message in body["error"], (got, body)
                assert headers[VARIANT] == "A" and headers["X-Cxr-Endpoint"] == "cxr-a"
            status, body, headers = live.post(
                {"Accept": JSON, "X-Amzn-SageMaker-Custom-Attributes": "route_key=p1",
                 "X-Amzn-SageMaker-Inference-Id": "inference-1"}
            )  # fmt: skip
            assert status == 200 and body == {"ok": True}
            assert headers["X-Amzn-SageMaker-Custom-Attributes"] == "trace=1"
            stubber.assert_no_pending_responses()
        status, body, _ = live.post(body=b"x" * 20_000)
        assert status == 413 and "exceeds" in body["error"]
        assert call(live.url, "/ping", method="GET")[0] == 200
        text = call(live.url, "/metrics", method="GET")[1]
        assert metric(text, "cxr_gateway_upstream_errors_total", code="ModelError", variant="A") == 3
        assert metric(text, "cxr_gateway_requests_total", status="503", variant="A") == 2
    finally:
        live.stop()


def test_unreachable_endpoint_is_503(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2)
    client = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=closed, config=settings)
    live = GatewayThread(GatewayConfig({"A": "cxr-a"}, port=free_port()), client)
    try:
        status, body, headers = live.post()
        assert status == 503 and "cannot reach endpoint cxr-a" in body["error"]
        assert headers["Retry-After"] == "1"
        assert call(live.url, "/ping", method="GET")[0] == 200
    finally:
        live.stop()


def test_cli_gateway_serves_and_stops_on_sigterm(endpoints, s3_server, tmp_path):
    port = free_port()
    body = json.dumps({"instances": [uuid.uuid4().hex]}).encode()  # a request moto has not seen: scripted
    script_invocations(s3_server, canned("cli"))
    token_file = tmp_path / "token"
    token_file.write_text("a-token-the-operator-chose-0123456789\n")
    command = [sys.executable, "-m", "cxr.cli", "gateway", "--endpoint", f"A={endpoints['A']}",
               "--endpoint", f"B={endpoints['B']}", "--weights", "A=0,B=1", "--port", str(port),
               "--admin-token-file", str(token_file)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if call(url, "/ping", method="GET")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the gateway did not answer /ping"
                time.sleep(0.1)
        status, answer, headers = call(url, "/invocations", body, {"Content-Type": JSON})
        assert status == 200 and answer == {"served_by": "cli"} and headers[VARIANT] == "B"
        assert headers["X-Cxr-Endpoint"] == endpoints["B"]
        assert call(url, "/admin/weights", method="GET")[0] == 401
        right = admin_headers("a-token-the-operator-chose-0123456789")
        assert call(url, "/admin/weights", None, right, "GET")[1] == {"A": 0.0, "B": 1.0}
        text = call(url, "/metrics", method="GET")[1]
        assert metric(text, "cxr_gateway_rate_limit_info", limit="20 per 1 second") == 1  # the default
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert "a-token-the-operator-chose" not in process.stdout.read().decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--endpoint", "A"], "--endpoint must look like A=cxr-a"),
        (["--endpoint", "=cxr-a"], "--endpoint must look like A=cxr-a"),
        (["--endpoint", "A=cxr-a", "--endpoint", "A=cxr-b"], "names variant 'A' twice"),
        (["--endpoint", "A=not_valid!"], "not valid SageMaker endpoint names"),
        (["--endpoint", "A=cxr-a", "--endpoint", "B=cxr-b", "--weights", "A=x"], "--weights must look like"),
        (["--endpoint", "A=cxr-a", "--endpoint", "B=cxr-b", "--weights", "A=1,C=1"], "exactly the variants"),
        (["--endpoint", "A=cxr-a", "--endpoint", "B=cxr-b", "--weights", "A=-1,B=1"], "non-negative"),
        (["--endpoint", "A=cxr-a", "--rate-limit", "lots"], 'rate limit must look like "20/second"'),
        (["--endpoint", "A=cxr-a", "--rate-limit", "0/second"], "must allow at least one request"),
        (["--endpoint", "A=cxr-a", "--trusted-proxy", "proxy.local"], "trusted proxies must be IP"),
        (["--endpoint", "A=cxr-a", "--admin-token-file", "/nonexistent/token"], "No such file"),
    ],
)
def test_cli_rejects_malformed_endpoints_and_weights(args, message, capsys):
    assert main(["gateway", *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("cxr gateway: error:") and message in error


def test_shadow_endpoint_gets_a_copy_with_the_same_inference_id(endpoints):
    """The caller gets A's answer; the shadow endpoint gets the same body and inference id, with
    `shadow_of=A` in its custom attributes, after the answer."""
    calls = []
    config = GatewayConfig({"A": endpoints["A"]}, port=free_port(), shadow_endpoint=endpoints["B"])
    client = tag_endpoint(runtime_client(config))
    client.meta.events.register("provide-client-params.sagemaker-runtime.InvokeEndpoint",
                                lambda params, **_: calls.append(dict(params)))  # fmt: skip
    live = GatewayThread(config, client)
    try:
        for headers in ({"X-Amzn-SageMaker-Inference-Id": "case-7"}, None):  # None: the gateway gives an id
            status, body, answer = live.post(headers)
            assert (status, answer[VARIANT]) == (200, "A"), body
        deadline = time.monotonic() + 30  # the copies go out after the answers: wait for both to be answered
        while True:
            text = call(live.url, "/metrics", method="GET")[1]
            if (
                "cxr_gateway_shadow_total" in text
                and metric(text, "cxr_gateway_shadow_total", outcome="answered") >= 2
            ):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        live.stop()
    by_endpoint = {name: [c for c in calls if c["EndpointName"] == name] for name in endpoints.values()}
    champion, shadow = by_endpoint[endpoints["A"]], by_endpoint[endpoints["B"]]
    assert len(champion) == len(shadow) == 2
    assert [c["InferenceId"] for c in shadow] == [c["InferenceId"] for c in champion]
    assert champion[0]["InferenceId"] == "case-7" and champion[1]["InferenceId"]
    assert all(c["Body"] == PAYLOAD and c["CustomAttributes"] == "shadow_of=A" for c in shadow)
    assert metric(text, "cxr_gateway_shadow_total", outcome="answered") == 2


def idle_client(monkeypatch):
    """A runtime client for tests whose requests never reach an endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return boto3.client("sagemaker-runtime", region_name="us-east-1")


def test_admin_routes_need_the_token_from_the_embedded_default(monkeypatch, isolated_home):
    monkeypatch.delenv("CXR_ADMIN_TOKEN", raising=False)
    live = GatewayThread(GatewayConfig({"A": "cxr-a"}, port=free_port()), idle_client(monkeypatch))
    try:
        token_file = isolated_home / "admin-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert live.admin_token == token_file.read_text().strip()
        for headers in ({}, {"Authorization": "Basic YWRtaW46YWRtaW4="}, {"Authorization": "Bearer"}):
            for method in ("GET", "POST"):
                status, body, answer = call(live.url, "/admin/weights", b'{"A": 1}', headers, method)
                assert status == 401 and answer["WWW-Authenticate"].startswith("Bearer"), body
        assert call(live.url, "/admin/other", method="GET")[0] == 401
        for wrong in ("not-the-token-0123456789", live.admin_token[:-1], live.admin_token + "x"):
            status, body, _ = live.admin(b'{"A": 1}', headers=admin_headers(wrong))
            assert status == 403 and body == {"error": "wrong admin token"}
        assert live.admin(method="GET")[:2] == (200, {"A": 1.0})
        assert (
            call(live.url, "/ping", method="GET")[0] == 200
            and call(live.url, "/metrics", method="GET")[0] == 200
        )
    finally:
        live.stop()


def forwarded(client: str) -> dict:
    return {"X-Forwarded-For": client}


def test_a_client_over_its_limit_gets_429_while_others_pass(endpoints):
    """Behind a trusted proxy (the test, on 127.0.0.1), each X-Forwarded-For client has its own budget."""
    config = GatewayConfig(endpoints, weights={"A": 1, "B": 0}, port=free_port(), rate_limit="3/day",
                           trusted_proxies=("127.0.0.1",))  # fmt: skip
    live = GatewayThread(config, tag_endpoint(runtime_client(config)))
    try:
        statuses = [live.post(forwarded("10.0.0.1"))[0] for _ in range(5)]
        # The first three pass; a day-window boundary in between may let one more through, never two.
        assert statuses[:3] == [200] * 3 and statuses[3:] in ([429, 429], [200, 429]), statuses
        status, body, headers = live.post(forwarded("10.0.0.1"))
        assert status == 429 and "rate limit 3 per 1 day exceeded" in body["error"]
        assert int(headers["Retry-After"]) >= 1
        for chain in ("10.0.0.1, 127.0.0.1", "10.9.9.9, 10.0.0.1"):  # via a second proxy; a forged first hop
            assert live.post(forwarded(chain))[0] == 429, chain
        assert live.admin(method="GET", headers=forwarded("10.0.0.1"))[0] == 429  # counted before the token
        assert call(live.url, "/ping", None, forwarded("10.0.0.1"), "GET")[0] == 200
        assert served(live, forwarded("10.0.0.2")) == "A"  # another client still passes
        assert served(live) == "A"  # and so does the proxy itself
        text = call(live.url, "/metrics", None, forwarded("10.0.0.1"), "GET")[1]
    finally:
        live.stop()
    refused = statuses.count(429) + 3
    assert metric(text, "cxr_gateway_rate_limited_total", route="/invocations") == refused
    assert metric(text, "cxr_gateway_rate_limited_total", route="/admin/weights") == 1
    assert metric(text, "cxr_gateway_requests_total", status="200", variant="A") == statuses.count(200) + 2
    assert metric(text, "cxr_gateway_rate_limit_info", limit="3 per 1 day") == 1


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(monkeypatch):
    live = GatewayThread(
        GatewayConfig({"A": "cxr-a"}, port=free_port(), rate_limit="2/day"), idle_client(monkeypatch)
    )
    unknown_variant = {
        "X-Amzn-SageMaker-Target-Variant": "Z"
    }  # answered 400 by the gateway, no endpoint call
    try:
        statuses = [live.post({**unknown_variant, **forwarded(f"10.0.1.{i}")})[0] for i in range(5)]
    finally:
        live.stop()
    assert statuses[:2] == [400, 400] and statuses[-1] == 429 and set(statuses) == {400, 429}, statuses


def test_clients_are_forgotten_once_their_windows_pass(monkeypatch):
    """Memory follows the clients of the last windows: 300 clients leave no counter behind."""
    config = GatewayConfig(
        {"A": "cxr-a"}, port=free_port(), rate_limit="1/second", trusted_proxies=("127.0.0.1",)
    )
    live = GatewayThread(config, idle_client(monkeypatch))
    unknown_variant = {"X-Amzn-SageMaker-Target-Variant": "Z"}
    counters = live.app[GATEWAY].rate_limiter.storage.storage  # limits' in-memory counters, one per window
    try:
        for i in range(300):
            assert live.post({**unknown_variant, **forwarded(f"10.1.{i // 256}.{i % 256}")})[0] == 400
        assert sum("/10.1." in key for key in list(counters)) == 300
        deadline = time.monotonic() + 60
        while any("/10.1." in key for key in list(counters)):  # each request sweeps the windows that passed
            assert time.monotonic() < deadline, len(counters)
            time.sleep(0.5)
            live.post({**unknown_variant, **forwarded("10.2.0.1")})
    finally:
        live.stop()
