"""Load test on loopback: 10 concurrent clients × 1,000 requests; no 5xx, and captured == served."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import cv2
import pytest

from .conftest import free_port
from .serving_support import LiveServer, make_package

CLIENTS, REQUESTS_PER_CLIENT, TIME_LIMIT_S = 10, 1000, 600


async def client(url: str, body: bytes, count: int, deadline: float, statuses: list[int]) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            if time.monotonic() > deadline:
                return
            headers = {"Content-Type": "image/png", "X-Cxr-Route-Key": f"{id(statuses)}-{i}"}
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                statuses.append(response.status)


@pytest.mark.slow
def test_ten_clients_thousand_requests_each(tmp_path, nih_root):
    package, _, _ = make_package(tmp_path / "pkg", nih_root)
    capture = tmp_path / "capture"
    live = LiveServer(free_port(), "--model", str(package), "--capture", str(capture))
    image = cv2.imread(str(next((nih_root / "images_001" / "images").glob("*.png"))), cv2.IMREAD_GRAYSCALE)
    body = cv2.imencode(".png", cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA))[1].tobytes()
    per_client: list[list[int]] = [[] for _ in range(CLIENTS)]
    start = time.monotonic()

    async def main() -> None:
        deadline = start + TIME_LIMIT_S
        url = live.url + "/invocations"
        await asyncio.gather(*(client(url, body, REQUESTS_PER_CLIENT, deadline, s) for s in per_client))

    try:
        asyncio.run(main())
    finally:
        elapsed = time.monotonic() - start
        metrics = live.get("/metrics")[1].decode()
        log = live.stop()  # SIGTERM flushes the capture buffer
    statuses = [s for client_statuses in per_client for s in client_statuses]
    served = statuses.count(200)
    print(f"\n{len(statuses)} requests in {elapsed:.1f} s ({len(statuses) / elapsed:.0f} req/s)")
    assert len(statuses) == CLIENTS * REQUESTS_PER_CLIENT, "the load test ran out of time"
    assert not [s for s in statuses if s >= 500], log[-2000:]
    assert served == len(statuses)
    captured = sum(len(p.read_text().splitlines()) for p in capture.rglob("*.jsonl"))
    assert captured == served
    events = {json.loads(line)["eventMetadata"]["eventId"] for p in capture.rglob("*.jsonl")
              for line in p.read_text().splitlines()}  # fmt: skip
    assert len(events) == served
    assert f'cxr_requests_total{{status="200",variant="A"}} {float(served)}' in metrics
