"""P3 and P4: serving speed on CPU (the serverless target), real NIH PNGs over HTTP on loopback.

P3: single-image request latency (p50/p99) of the ONNX Runtime server vs the same server with the eager
    PyTorch handler (no batching), requests interleaved one at a time.
P4: throughput with 10 concurrent clients against the ONNX server with dynamic batching vs the batched
    in-process ceiling (decode + preprocess + batches of 16 through the same predictor, no HTTP),
    measured in the same run.
The model is DenseNet121 at the NIH profile (256-px resize, 224-px crop), randomly initialised.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import torch
from common import IMAGES

from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.inference import prepare
from cxr.model import CXRNet
from cxr.package import build_package, export_and_verify_onnx, unpack
from cxr.serve.decoder import decode_one
from cxr.serve.predictor import load_predictor

CLIENTS = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(package: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "cxr.cli", "serve", "--model", str(package), "--port", str(port), *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2):  # loopback only
                return process, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def post(url: str, body: bytes) -> float:
    request = urllib.request.Request(url + "/invocations", body, {"Content-Type": "image/png"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:  # loopback only
        response.read()
    return time.perf_counter() - start


async def throughput(url: str, bodies: list[bytes], seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        async with aiohttp.ClientSession() as session:
            i = offset
            while time.monotonic() < deadline:
                async with session.post(url + "/invocations", data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "image/png"}) as response:  # fmt: skip
                    await response.read()
                    assert response.status == 200
                done += 1
                i += CLIENTS

    start = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(CLIENTS)))
    return done / (time.monotonic() - start)


def in_process_ceiling(model_dir: Path, bodies: list[bytes], seconds: float, batch: int = 16) -> float:
    predictor = load_predictor(model_dir, "onnx")
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [bodies[(done + k) % len(bodies)] for k in range(batch)]
        crops = np.stack([prepare(decode_one(b, "image/png").pixels, predictor.metadata) for b in chunk])
        predictor.predict(crops)
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    bodies = [path.read_bytes() for path in IMAGES[:40]]
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        os.environ.setdefault("CXR_HOME", str(work_dir / "home"))
        catalog, _ = load_catalog(IMAGES[0].parents[2])
        cache = build_cache(catalog, PreprocessSettings(size=256), root=work_dir / "cache", progress=False)
        torch.manual_seed(0)
        model = CXRNet(pretrained=False).eval()
        check = export_and_verify_onnx(model, 224, cache, np.arange(len(cache)), work_dir / "model.onnx")
        metadata = {
            "image_size": 256,
            "crop": 224,
            "dropout": 0.3,
            "onnx": check,
            "version": 0,
            "name": "bench",
        }
        package = build_package(
            model.state_dict(), metadata, work_dir / "model.tar.gz", "", work_dir / "model.onnx"
        )
        print(f"ONNX export check: {check}")
        fast, fast_url = start_server(package, "--backend", "onnx")
        eager, eager_url = start_server(
            package, "--backend", "torch", "--max-batch", "1", "--max-wait-ms", "0"
        )
        try:
            for url in (fast_url, eager_url):
                for body in bodies[:10]:
                    post(url, body)
            onnx_times, eager_times = [], []
            for i in range(150):  # interleaved, one request in flight at a time
                body = bodies[i % len(bodies)]
                onnx_times.append(post(fast_url, body))
                eager_times.append(post(eager_url, body))
            eager.terminate()
            eager.wait()
            served = asyncio.run(throughput(fast_url, bodies, 30.0))
            ceiling = in_process_ceiling(unpack(package, work_dir / "unpacked"), bodies, 30.0)
        finally:
            for process in (fast, eager):
                if process.poll() is None:
                    process.terminate()
                    process.wait()
    p50 = {name: np.percentile(t, 50) * 1000 for name, t in (("onnx", onnx_times), ("eager", eager_times))}
    p99 = {name: np.percentile(t, 99) * 1000 for name, t in (("onnx", onnx_times), ("eager", eager_times))}
    print(f"single image, 1024x1024 PNG: ONNX server p50 {p50['onnx']:.1f} ms, p99 {p99['onnx']:.1f} ms;"
          f" eager PyTorch p50 {p50['eager']:.1f} ms, p99 {p99['eager']:.1f} ms")  # fmt: skip
    print(f"10 clients: {served:.1f} img/s served; in-process batched ceiling {ceiling:.1f} img/s")
    p99_ratio = p99["onnx"] / p99["eager"]
    print(
        f"P3: {p50['onnx'] / p50['eager']:.2f}x eager-PyTorch p50 latency (p99 {p99_ratio:.2f}x)"
        " (target 0.5x)"
    )
    print(f"P4: {served / ceiling:.2f}x batched in-process ceiling, 10 concurrent clients (target 0.9x)")


if __name__ == "__main__":
    main()
