"""P6: MonitorFlow's core (read the capture window + run every check against the served version's baseline)
on 100k capture records, 2 cores.

Records are written exactly as the server writes them (SageMaker capture JSONL with a 64×64 PNG input,
the JSON response and cxr's features), 1,000 per file in the hourly layout. The same work is timed on
10k, 50k and 100k records to show how the cost grows.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from common import IMAGES

from cxr.data.findings import FINDINGS
from cxr.features import image_stats
from cxr.monitor.baseline import Baseline
from cxr.monitor.checks import MonitorConfig, check_variant
from cxr.monitor.reader import read_traffic
from cxr.serve.capture import capture_record

START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
PER_FILE = 1000


def write_records(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    image = cv2.resize(
        cv2.imread(str(IMAGES[0]), cv2.IMREAD_GRAYSCALE), (64, 64), interpolation=cv2.INTER_AREA
    )
    png = cv2.imencode(".png", image)[1].tobytes()
    stats = image_stats(image)
    for start in range(0, count, PER_FILE):
        lines = []
        for i in range(start, min(start + PER_FILE, count)):
            when = START + dt.timedelta(seconds=i * 0.5)
            probs = dict(zip(FINDINGS, rng.random(14).round(6).tolist(), strict=True))
            output = json.dumps({"inference_id": str(i), "predictions": [{"probabilities": probs}]})
            features = [
                {"image_stats": stats, "embedding_projection": rng.normal(0, 1, 32).round(5).tolist()}
            ]
            record = capture_record("image/png", png, output, f"event-{i}", "A", 1, features, when=when)
            lines.append(json.dumps(record, separators=(",", ":")))
        hour = (START + dt.timedelta(seconds=start * 0.5)).strftime("%Y/%m/%d/%H")
        folder = root / "ep" / "A" / hour
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{start:09d}.jsonl").write_text("\n".join(lines) + "\n")


def timed(root: Path, baseline: Baseline, count: int) -> tuple[float, float]:
    """(seconds reading the window, seconds running the checks), best of two."""
    end = START + dt.timedelta(seconds=count * 0.5 + 1)
    best = (float("inf"), float("inf"))
    for _ in range(2):
        begin = time.perf_counter()
        traffic = read_traffic(str(root), "ep", START, end)["A"]
        read = time.perf_counter() - begin
        check_variant(traffic, {"1": baseline}, MonitorConfig())  # every record is version 1's
        best = (min(best[0], read), min(best[1], time.perf_counter() - begin - read))
        assert traffic.served == count, (traffic.served, count)
    return best


def main() -> None:
    rng = np.random.default_rng(1)
    baseline = Baseline(rng.normal(100, 10, (2000, 7)), rng.normal(0, 1, (2000, 32)), rng.random((2000, 14)))
    times, reads = {}, {}
    with tempfile.TemporaryDirectory() as work:
        write_records(Path(work) / "warmup", 2_000)
        timed(Path(work) / "warmup", baseline, 2_000)  # imports and first-call costs stay out of the figures
        for count in (10_000, 50_000, 100_000):
            root = Path(work) / str(count)
            write_records(root, count)
            size = sum(p.stat().st_size for p in root.rglob("*.jsonl")) / 1e6
            read, checks = timed(root, baseline, count)
            times[count], reads[count] = read + checks, read
            print(f"{count:>7,} records ({size:,.0f} MB): read {read:.2f} s + checks {checks:.2f} s")
    budget = 60.0 / times[100_000]
    growth = (reads[100_000] / 100_000) / (
        reads[10_000] / 10_000
    )  # the checks cost about the same at any size
    print(f"P6: {budget:.2f}x faster than the 60 s budget for 100k records on 2 cores (target 1x)")
    print(f"P6: {growth:.2f}x the per-record read cost at 100k vs 10k records; linear = 1 (target <=1.2x)")


if __name__ == "__main__":
    main()
