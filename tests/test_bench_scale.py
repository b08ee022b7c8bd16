"""The NIH-scale rehearsal's own parts: the linked full-size root, memory attribution, the log watch."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxr.data.catalog import load_catalog

BENCH = Path(__file__).resolve().parent.parent / "bench"

# A task process as Metaflow starts it (`… train_flow.py … step <name>`), with a child holding 200 MB.
TASK = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c",
    "import sys; held = b'x' * 200_000_000; print('ready', flush=True); sys.stdin.read()"],
    stdout=subprocess.PIPE, text=True)
print(child.stdout.readline(), end="", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_scale")
    finally:
        sys.path.remove(str(BENCH))


def identities(paths) -> set[tuple[int, int]]:
    return {(path.stat().st_dev, path.stat().st_ino) for path in paths}


def test_full_layout_links_every_row_to_the_real_images(scale, nih_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "nih"
    assert scale.lay_out(root, None) == 112_120
    folders = sorted(root.glob("images_*/images"))
    assert [len(list(folder.iterdir())) for folder in folders] == list(scale.ARCHIVE_SIZES)
    real = identities((nih_root / "images_001" / "images").glob("*.png"))
    assert identities(folders[-1].iterdir()) <= real  # links, no copied bytes
    assert identities([root / scale.METADATA]) == identities([nih_root / scale.METADATA])
    _, report = load_catalog(root)
    assert (report.metadata_rows, report.images_in_source, report.matched) == (112_120, 112_120, 112_120)


def test_prefix_layout_is_reused_and_completes_an_interrupted_one(
    scale, nih_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "nih"
    assert scale.lay_out(root, 6000) == 6000
    first = root / "images_001" / "images" / "00000001_000.png"
    first.unlink()
    assert scale.lay_out(root, 6000) == 6000 and not first.exists()  # a complete layout is reused as is
    (root / scale.LAYOUT_MARKER).unlink()  # as if interrupted before it finished
    assert scale.lay_out(root, 6000) == 6000 and first.exists()
    assert [len(list(f.iterdir())) for f in sorted(root.glob("images_*/images"))] == [4999, 1001]
    _, report = load_catalog(root)
    assert (report.metadata_rows, report.matched) == (6000, 6000)
    with pytest.raises(SystemExit, match="6000 rows, not 300"):
        scale.lay_out(root, 300)


def test_memory_of_a_task_includes_its_children(scale) -> None:
    task = subprocess.Popen(
        [sys.executable, "-c", TASK, "train_flow.py", "step", "preprocess"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    sampler = scale.MemorySampler(period=0.1)
    try:
        assert task.stdout.readline() == "ready\n"
        sampler.start(os.getpid())
        for _ in range(200):
            if "preprocess" in sampler.steps:
                break
            time.sleep(0.1)
    finally:
        sampler.stop()
        task.stdin.close()
        task.wait(timeout=60)
    seen = sampler.steps["preprocess"]
    assert seen.tasks == 1 and seen.total == seen.task > 200_000_000
    assert set(sampler.steps) == {"preprocess"}
    assert sampler.peak >= sampler.baseline > 0


def test_log_watch_times_tasks_and_their_silences(scale) -> None:
    watch = scale.LogWatch()
    lines = [
        (0.0, "2026-01-01 00:00:00.000 Workflow starting (run-id 7):"),
        (1.0, "2026-01-01 00:00:01.000 [7/preprocess/3 (pid 11)] Task is starting."),
        (2.0, "2026-01-01 00:00:02.000 [7/preprocess/4 (pid 12)] Task is starting."),
        (9.0, "2026-01-01 00:00:09.000 [7/preprocess/4 (pid 12)] Task finished successfully."),
        (31.0, "2026-01-01 00:00:31.000 [7/preprocess/3 (pid 11)] Task finished successfully."),
    ]
    for now, line in lines:
        watch.feed(line, now)
    assert watch.run_id == "7"
    assert sorted(watch.intervals("preprocess")) == [(1.0, 31.0), (2.0, 9.0)]
    assert watch.silence["preprocess"] == 30.0 and watch.run_silence == 22.0
    assert scale.timing(watch.intervals("preprocess")) == "30 s (37 s summed)"
    assert scale.duration(3725) == "1 h 2 min" and scale.duration(1094) == "18 min 14 s"
