"""P3 and P4: serving speed on CPU (the serverless target), real NIH PNGs over HTTP on loopback.

P3: single-image request latency (p50/p99) of the server with each CPU backend (ONNX Runtime, OpenVINO
    FP32, BF16 and INT8), all as shipped (dynamic batching on), vs the same server with the eager PyTorch
    handler (no batching); requests interleaved one at a time over all servers. The backend `auto` adopts
    is the first of `AUTO_ORDER` here.
P4: throughput with 10 concurrent clients against the adopted backend's server vs the in-process bound:
    the best pipeline this machine runs without HTTP, decoding and inference overlapped on the same cores
    (a pool of PNG-decode threads feeding batched sessions of that backend; the fastest of a grid of decode
    threads, sessions, threads, ONNX Runtime's spinning and batch sizes, re-measured for as long as the
    server). For scale it also prints the ideal: all cores busy at single-thread efficiency, no overlap
    cost (cores / (decode + inference core-seconds per image)), and ONNX Runtime's server throughput.
The model is DenseNet121 at the NIH profile (256-px resize, 224-px crop), randomly initialised: the
backends' accuracy checks are printed, but each package here offers its backend whatever they say, since
a random network's ranking is not what registration verifies. `--quick` runs a short smoke version
(numbers not comparable).
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
from cxr.package import build_package, export_and_verify, unpack
from cxr.serve.backends import AUTO_ORDER, SOURCES
from cxr.serve.decoder import decode_one
from cxr.serve.openvino_backend import OpenVinoPredictor, cpu_supports
from cxr.serve.predictor import onnx_session

CLIENTS = 10
BACKENDS = ("onnx", "openvino-fp32", "openvino-bf16", "openvino-int8")


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
    """One in-process serving pipeline: decode threads feeding `sessions` sessions of a backend."""

    backend: str
    decoders: int
    sessions: int
    threads: int  # threads per session
    spinning: bool  # ONNX Runtime's intra-op threads spin while waiting for work
    batch: int

    def __str__(self) -> str:
        spin = (", spinning" if self.spinning else ", no spinning") if self.backend == "onnx" else ""
        return (f"{self.decoders} decode threads -> {self.sessions} {self.backend} session(s) x "
                f"{self.threads} thread(s){spin}, batch {self.batch}")  # fmt: skip


def session(model_dir: Path, backend: str, threads: int, spinning: bool = True) -> Any:
    """One session of `backend` over a package's files: uint8 batch → outputs."""
    if backend == "onnx":
        onnx = onnx_session(model_dir / SOURCES[backend], threads, spinning)
        return lambda batch: onnx.run(None, {"images": batch})
    return OpenVinoPredictor(model_dir / SOURCES[backend], backend.removeprefix("openvino-"), threads).predict


def pipeline_rate(
    model_dir: Path, metadata: dict, bodies: list[bytes], plan: Pipeline, seconds: float
) -> float:
    """Images/s of `plan` in steady state: decode + preprocess exactly as the server, batched inference."""
    sessions = [session(model_dir, plan.backend, plan.threads, plan.spinning) for _ in range(plan.sessions)]
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

    def infer(run: Any) -> None:
        while not stop.is_set():
            chunk: list[np.ndarray] = []
            while len(chunk) < plan.batch and not stop.is_set():
                with contextlib.suppress(queue.Empty):
                    chunk.append(crops.get(timeout=0.05))
            if len(chunk) == plan.batch:
                run(np.stack(chunk))
                finished.append(time.perf_counter())

    workers = [threading.Thread(target=decode, args=(k,)) for k in range(plan.decoders)]
    workers += [threading.Thread(target=infer, args=(run,)) for run in sessions]
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
    model_dir: Path,
    backend: str,
    metadata: dict,
    bodies: list[bytes],
    seconds: float,
    batches: tuple[int, ...],
) -> tuple[Pipeline, float]:
    """The fastest pipeline of the grid for `backend` on this machine, re-measured for `seconds`."""
    cores = os.cpu_count() or 1
    shapes = {(1, cores, True), (cores, 1, True), (1, 1, True)}
    if backend == "onnx":
        shapes.add((1, cores, False))
    grid = [
        Pipeline(backend, decoders, sessions, threads, spinning, batch)
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


def ideal_rate(
    model_dir: Path, backend: str, metadata: dict, bodies: list[bytes], seconds: float, batch: int
) -> float:
    """All cores at single-thread efficiency with free overlap: cores / core-seconds per image."""
    decode_rate = rate(
        lambda: len([prepare(decode_one(b, "image/png").pixels, metadata) for b in bodies[:batch]]), seconds
    )
    run = session(model_dir, backend, 1)
    crops = np.stack([prepare(decode_one(b, "image/png").pixels, metadata) for b in bodies[:batch]])
    run(crops)
    infer_rate = rate(lambda: len(run(crops)[0]), seconds)
    print(
        f"  one core: decode+preprocess {decode_rate:.1f} img/s, inference {infer_rate:.1f} img/s"
        f" (batch {batch})"
    )
    return (os.cpu_count() or 1) / (1 / decode_rate + 1 / infer_rate)


def backend_packages(work_dir: Path, model: CXRNet, cache: Any) -> dict[str, Path]:
    """One package per backend this CPU runs natively, each offering only that backend (so `auto` serves
    it); the accuracy checks, made as registration makes them, are printed."""
    rows = np.arange(len(cache))
    checks = export_and_verify(model, 224, cache, rows, work_dir, calibration_rows=rows)
    settings = {"image_size": 256, "crop": 224, "dropout": 0.3, "version": 0, "name": "bench"}
    int8 = work_dir / SOURCES["openvino-int8"]
    packages = {}
    for backend in BACKENDS:
        precision = backend.removeprefix("openvino-")
        check = checks.onnx if backend == "onnx" else checks.openvino[precision]
        print(f"{backend} check (speed is measured whatever it says): {check}")
        if backend != "onnx" and not cpu_supports(precision):
            continue
        offered = {**check, "verified": True}
        metadata = (
            {**settings, "onnx": offered}
            if backend == "onnx"
            else {**settings, "openvino": {precision: offered}}
        )
        files = (
            {int8.name: int8, int8.with_suffix(".bin").name: int8.with_suffix(".bin")}
            if precision == "int8"
            else {}
        )
        files["model.onnx"] = work_dir / "model.onnx"
        packages[backend] = build_package(
            model.state_dict(), metadata, work_dir / backend / "model.tar.gz", "", files=files
        )
    return packages


def model_time(model_dirs: dict[str, Path], crops: np.ndarray, rounds: int) -> dict[str, float]:
    """Median ms per image of each backend's model on the batch `crops` (all cores, one session; ONNX
    Runtime's threads not spinning, as the server's two sessions run), the backends interleaved."""
    cores = os.cpu_count() or 1
    runs = {backend: session(directory, backend, cores, False) for backend, directory in model_dirs.items()}
    times: dict[str, list[float]] = {backend: [] for backend in runs}
    repeats = max(1, 10 // len(crops))
    for _ in range(rounds):
        for backend, run in runs.items():
            run(crops)
            start = time.perf_counter()
            for _ in range(repeats):
                run(crops)
            times[backend].append((time.perf_counter() - start) / repeats / len(crops))
    return {backend: float(np.median(t)) * 1000 for backend, t in times.items()}


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait()


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
        packages = backend_packages(work_dir, model, cache)
        model_dirs = {b: unpack(package, work_dir / "unpacked" / b) for b, package in packages.items()}
        metadata = {"image_size": 256, "crop": 224}
        crops = np.stack([prepare(decode_one(b, "image/png").pixels, metadata) for b in bodies])
        inference = model_time(model_dirs, crops[:1], 3 if quick else 10)
        scoring = model_time(model_dirs, np.concatenate([crops, crops[:24]]), 2 if quick else 5)
        adopted = next(b for b in AUTO_ORDER if b in packages)
        servers = {
            "eager": start_server(
                packages["onnx"], "--backend", "torch", "--max-batch", "1", "--max-wait-ms", "0"
            )
        }
        servers.update({b: start_server(package) for b, package in packages.items()})
        try:
            for _, url in servers.values():
                for body in bodies[:10]:
                    post(url, body)
            times: dict[str, list[float]] = {name: [] for name in servers}
            for i in range(requests):  # interleaved, one request in flight at a time
                for name, (_, url) in servers.items():
                    times[name].append(post(url, bodies[i % len(bodies)]))
            served = {}
            for name in dict.fromkeys(("onnx", adopted)):
                for other, (process, _) in servers.items():
                    if other not in ("onnx", adopted):
                        stop(process)
                served[name] = asyncio.run(throughput(servers[name][1], bodies, seconds))
                stop(servers[name][0])
            best, bound = best_pipeline(
                model_dirs[adopted], adopted, metadata, bodies, seconds, (16,) if quick else (8, 16, 32)
            )
            ideal = ideal_rate(model_dirs[adopted], adopted, metadata, bodies, seconds / 4, best.batch)
        finally:
            for process, _ in servers.values():
                stop(process)
    p50 = {name: float(np.percentile(t, 50)) * 1000 for name, t in times.items()}
    p99 = {name: float(np.percentile(t, 99)) * 1000 for name, t in times.items()}
    print("single image, 1024x1024 PNG over HTTP, p50 / p99 ms; the model alone, batch 1, all cores:")
    for name in servers:
        alone = f"   model {inference[name]:5.1f} ms" if name in inference else ""
        ratio = p50[name] / p50["eager"]
        print(f"  {name:34s} {p50[name]:6.1f} / {p99[name]:6.1f}  ({ratio:.2f}x eager){alone}")
    print("offline scoring, batch 64, all cores: "
          + ", ".join(f"{b} {1000 / ms:.1f} img/s" for b, ms in scoring.items()))  # fmt: skip
    fastest = min(packages, key=p50.__getitem__)
    print(f"fastest server measured: {fastest}; auto adopts {adopted}")
    print(f"{CLIENTS} clients: {served[adopted]:.1f} img/s served by {adopted}, {served['onnx']:.1f} by onnx"
          " (the clients share the cores)")  # fmt: skip
    print(f"in-process bound: {bound:.1f} img/s ({best}); ideal {ideal:.1f} img/s"
          f" ({served[adopted] / ideal:.2f}x of it)")  # fmt: skip
    eager, fast, onnx = p50["eager"], p50[adopted], p50["onnx"]
    print(f"P3: {fast / eager:.2f}x eager-PyTorch p50 latency with {adopted} ({fast:.1f} vs {eager:.1f} ms;"
          f" p99 {p99[adopted] / p99['eager']:.2f}x); onnx {onnx / eager:.2f}x ({onnx:.1f} ms)"
          " (target 0.5x, and p50 <= 25 ms)")  # fmt: skip
    print(f"P4: {served[adopted] / bound:.2f}x in-process bound (decode overlapped with batched inference, no"
          f" HTTP), {CLIENTS} concurrent clients, {adopted} (target 0.9x)")  # fmt: skip


if __name__ == "__main__":
    main()
