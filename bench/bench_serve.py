"""P3 and P4: serving speed on CPU (the serverless target), real NIH PNGs over HTTP on loopback.

P3: single-image request latency (p50/p99) of the ONNX Runtime server vs the same server with the eager
    PyTorch handler (no batching), requests interleaved one at a time.
P4: throughput with 10 concurrent clients against the ONNX server with dynamic batching vs the in-process
    bound: the best pipeline this machine runs without HTTP, decoding and inference overlapped on the same
    cores (a pool of PNG-decode threads feeding batched ONNX Runtime sessions; the fastest of a grid of
    decode threads, sessions, intra-op threads, spinning and batch sizes, re-measured for as long as the
    server). For scale it also prints the ideal: all cores busy at single-thread efficiency, no overlap
    cost (cores / (decode + inference core-seconds per image)).
The model is DenseNet121 at the NIH profile (256-px resize, 224-px crop), randomly initialised.
`--quick` runs a short smoke version (numbers not comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch
from common import IMAGES, rate

from cxr.data.cache import PreprocessSettings, build_cache
from cxr.data.catalog import load_catalog
from cxr.inference import prepare
from cxr.model import CXRNet
from cxr.package import build_package, export_and_verify_onnx, unpack
from cxr.serve.decoder import decode_one

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


@dataclass(frozen=True)
class Pipeline:
    """One in-process serving pipeline: decode threads feeding `sessions` ONNX Runtime sessions."""

    decoders: int
    sessions: int
    threads: int  # intra-op threads per session
    spinning: bool  # ONNX Runtime's intra-op threads spin while waiting for work
    batch: int

    def __str__(self) -> str:
        spin = "spinning" if self.spinning else "no spinning"
        return (f"{self.decoders} decode threads -> {self.sessions} session(s) x {self.threads} intra-op "
                f"thread(s), {spin}, batch {self.batch}")  # fmt: skip


def onnx_session(model_dir: Path, threads: int, spinning: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def pipeline_rate(
    model_dir: Path, metadata: dict, bodies: list[bytes], plan: Pipeline, seconds: float
) -> float:
    """Images/s of `plan` in steady state: decode + preprocess exactly as the server, batched inference."""
    sessions = [onnx_session(model_dir, plan.threads, plan.spinning) for _ in range(plan.sessions)]
    crops: queue.Queue = queue.Queue(maxsize=2 * plan.batch * plan.sessions)
    stop = threading.Event()
    finished: list[float] = []  # completion time of each batch

    def decode(offset: int) -> None:
        for i in itertools.count(offset, plan.decoders):
            crop = prepare(decode_one(bodies[i % len(bodies)], "image/png").pixels, metadata)
            while not stop.is_set():
                try:
                    crops.put(crop, timeout=0.05)
                    break
                except queue.Full:
                    pass
            if stop.is_set():
                return

    def infer(session: Any) -> None:
        while not stop.is_set():
            chunk: list[np.ndarray] = []
            while len(chunk) < plan.batch and not stop.is_set():
                with contextlib.suppress(queue.Empty):
                    chunk.append(crops.get(timeout=0.05))
            if len(chunk) == plan.batch:
                session.run(None, {"images": np.stack(chunk)})
                finished.append(time.perf_counter())

    workers = [threading.Thread(target=decode, args=(k,)) for k in range(plan.decoders)]
    workers += [threading.Thread(target=infer, args=(session,)) for session in sessions]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: len(finished) > plan.sessions, 600)  # warm-up: each session's first run done
        mark, start = len(finished), time.perf_counter()

        def enough() -> bool:
            return time.perf_counter() - start >= seconds and len(finished) - mark > 4

        wait_until(enough, 600 + 20 * seconds)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    inside = finished[mark:]  # batch completion times in the window (at least 5)
    return (len(inside) - 1) * plan.batch / (inside[-1] - inside[0])


def wait_until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the in-process pipeline stalled")
        time.sleep(0.05)


def best_pipeline(
    model_dir: Path, metadata: dict, bodies: list[bytes], seconds: float, batches: tuple[int, ...]
) -> tuple[Pipeline, float]:
    """The fastest pipeline of the grid on this machine, re-measured for `seconds`."""
    cores = os.cpu_count() or 1
    shapes = {(1, cores, True), (1, cores, False), (cores, 1, True), (1, 1, True)}
    grid = [
        Pipeline(decoders, sessions, threads, spinning, batch)
        for decoders in sorted({1, cores})
        for sessions, threads, spinning in sorted(shapes)
        for batch in batches
    ]
    trial = seconds / 6
    rates = {}
    for plan in grid:
        rates[plan] = pipeline_rate(model_dir, metadata, bodies, plan, trial)
        print(f"  bound candidate: {rates[plan]:6.1f} img/s  {plan}")
    best = max(rates, key=rates.__getitem__)
    return best, pipeline_rate(model_dir, metadata, bodies, best, seconds)


def ideal_rate(model_dir: Path, metadata: dict, bodies: list[bytes], seconds: float, batch: int) -> float:
    """All cores at single-thread efficiency with free overlap: cores / core-seconds per image."""
    decode_rate = rate(
        lambda: len([prepare(decode_one(b, "image/png").pixels, metadata) for b in bodies[:batch]]), seconds
    )
    session = onnx_session(model_dir, 1, True)
    crops = np.stack([prepare(decode_one(b, "image/png").pixels, metadata) for b in bodies[:batch]])
    session.run(None, {"images": crops})
    infer_rate = rate(lambda: len(session.run(None, {"images": crops})[0]), seconds)
    print(
        f"  one core: decode+preprocess {decode_rate:.1f} img/s, inference {infer_rate:.1f} img/s"
        f" (batch {batch})"
    )
    return (os.cpu_count() or 1) / (1 / decode_rate + 1 / infer_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run; its numbers mean nothing")
    quick = parser.parse_args().quick
    seconds, requests = (4.0, 20) if quick else (30.0, 150)
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
            for i in range(requests):  # interleaved, one request in flight at a time
                body = bodies[i % len(bodies)]
                onnx_times.append(post(fast_url, body))
                eager_times.append(post(eager_url, body))
            eager.terminate()
            eager.wait()
            served = asyncio.run(throughput(fast_url, bodies, seconds))
            fast.terminate()
            fast.wait()
            model_dir = unpack(package, work_dir / "unpacked")
            best, bound = best_pipeline(model_dir, metadata, bodies, seconds, (16,) if quick else (8, 16, 32))
            ideal = ideal_rate(model_dir, metadata, bodies, seconds / 4, best.batch)
        finally:
            for process in (fast, eager):
                if process.poll() is None:
                    process.terminate()
                    process.wait()
    p50 = {name: np.percentile(t, 50) * 1000 for name, t in (("onnx", onnx_times), ("eager", eager_times))}
    p99 = {name: np.percentile(t, 99) * 1000 for name, t in (("onnx", onnx_times), ("eager", eager_times))}
    print(f"single image, 1024x1024 PNG: ONNX server p50 {p50['onnx']:.1f} ms, p99 {p99['onnx']:.1f} ms;"
          f" eager PyTorch p50 {p50['eager']:.1f} ms, p99 {p99['eager']:.1f} ms")  # fmt: skip
    print(f"{CLIENTS} clients: {served:.1f} img/s served (the clients share the cores)")
    print(
        f"in-process bound: {bound:.1f} img/s ({best}); ideal {ideal:.1f} img/s ({served / ideal:.2f}x of it)"
    )
    p99_ratio = p99["onnx"] / p99["eager"]
    print(
        f"P3: {p50['onnx'] / p50['eager']:.2f}x eager-PyTorch p50 latency (p99 {p99_ratio:.2f}x)"
        " (target 0.5x)"
    )
    print(
        f"P4: {served / bound:.2f}x in-process bound (decode overlapped with batched inference, no HTTP),"
        f" {CLIENTS} concurrent clients (target 0.9x)"
    )


if __name__ == "__main__":
    main()
