"""P8: the NIH-scale rehearsal: the whole train flow on a full-size NIH root, step by step.

Lays out an NIH root with all 112,120 metadata rows and every image present under its own name, in the
twelve `images_XXX/images/` folders of the real archives, made by hard links (symbolic links across
filesystems) to the real NIH images in ../shared/nih, cycling through them: no image bytes are copied.
Then runs `flows/train_flow.py run` on it with config/rehearsal.yaml (real 256/224 sizes, training capped
to a few batches) on Metaflow's local datastore in a scratch directory with a fresh CXR_HOME, and prints
per step: its wall time (its tasks' first to last line in the run's log, which the runtime writes when
it starts and reaps them), the time in the step's code (read back with the Metaflow client: task creation
to `_task_ok`), how many tasks it had and ran at once, the memory its processes held (PSS sampled every
second, card renderers and loader workers counted with their task), and the longest its tasks went
without a line reaching the run's log; then the whole run's time and the machine's memory in use before
and at its peak.

    python3 bench/bench_scale.py                 # the full rehearsal (over an hour on 2 CPU cores)
    python3 bench/bench_scale.py --rows 2000     # a smoke run over the first 2,000 metadata rows
"""

from __future__ import annotations

import argparse
import errno
import gzip
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import IMAGES, NIH

from cxr.config import cxr_home

REPO = Path(__file__).resolve().parents[1]
FLOW = REPO / "flows" / "train_flow.py"
CONFIG = REPO / "config" / "rehearsal.yaml"
METADATA = "Data_Entry_2017_v2020.csv.gz"
ARCHIVE_SIZES = (4999, *[10000] * 10, 7121)  # images per NIH archive, images_001 … images_012
LAYOUT_MARKER = ".rehearsal-layout"
TARGET_SECONDS = 45 * 60
TARGET_RISE_GB = 8.0
GB = 1e9
RUN_START = re.compile(r"Workflow starting \(run-id (?P<run>[^)\s]+)\)")
TASK_LINE = re.compile(r"\[(?P<run>[^/\]\s]+)/(?P<step>\w+)/(?P<task>\d+) \(pid \d+\)\]")


# --- the NIH root -------------------------------------------------------------------------------------


def metadata_lines() -> tuple[str, list[str]]:
    """The header and the data lines of the real NIH metadata file."""
    with gzip.open(NIH / METADATA, "rt", newline="") as file:
        header, *lines = file.read().splitlines(keepends=True)
    return header, lines


def link(source: Path, target: Path) -> None:
    """Hard-link `source` at `target`, or link symbolically where a hard link cannot be made."""
    try:
        os.link(source, target)
    except FileExistsError:
        return
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        target.symlink_to(source)


def write_metadata(root: Path, header: str, lines: list[str], whole: bool) -> None:
    """The metadata file: the real one linked when every row is wanted, else a gzip of the prefix."""
    target = root / METADATA
    if whole:
        target.unlink(missing_ok=True)
        link(NIH / METADATA, target)
        return
    partial = target.with_suffix(".part")
    with gzip.open(partial, "wt", newline="") as file:
        file.write(header)
        file.writelines(lines)
    partial.replace(target)


def lay_out(root: Path, rows: int | None) -> int:
    """A full-size NIH root at `root` (the first `rows` metadata rows); reused when already complete.

    Returns the number of images laid out.
    """
    marker = root / LAYOUT_MARKER
    header, every_line = metadata_lines()
    lines = every_line[:rows] if rows else every_line
    wanted = str(len(lines))
    if marker.is_file():
        if marker.read_text() == wanted:
            return len(lines)
        raise SystemExit(f"{root} holds a rehearsal layout of {marker.read_text()} rows, not {wanted}")
    root.mkdir(parents=True, exist_ok=True)
    write_metadata(root, header, lines, whole=len(lines) == len(every_line))
    names = [line.split(",", 1)[0] for line in lines]
    start = 0
    for archive, size in enumerate(ARCHIVE_SIZES, 1):
        positions = range(start, min(start + size, len(names)))
        folder = root / f"images_{archive:03d}" / "images"
        if positions:
            folder.mkdir(parents=True, exist_ok=True)
        for position in positions:
            link(IMAGES[position % len(IMAGES)], folder / names[position])
        start += size
    marker.write_text(wanted)
    return len(names)


# --- memory ----------------------------------------------------------------------------------------


def memory_in_use() -> int:
    """Bytes of memory in use on the machine: MemTotal − MemAvailable."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


def parent_pids() -> dict[int, int]:
    """Every process's parent: pid → ppid."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def step_name(pid: int) -> str | None:
    """The flow step a process runs (`… train_flow.py … step <name> …`), or None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(arg.endswith(FLOW.name) for arg in argv) or "step" not in argv:
        return None
    position = argv.index("step") + 1
    return argv[position] if position < len(argv) else None


def proportional_memory(pid: int) -> int:
    """A process's proportional set size in bytes (shared pages split between their users); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def task_memory(root_pid: int) -> dict[str, list[int]]:
    """Memory of each running task under `root_pid`, by step; a task's own children count with it."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, parent in parent_pids().items():
        children[parent].append(pid)
    usage: dict[int, int] = defaultdict(int)
    steps: dict[int, str] = {}
    pending: list[tuple[int, int | None]] = [(root_pid, None)]
    while pending:
        pid, owner = pending.pop()
        if owner is None and (step := step_name(pid)):
            owner, steps[pid] = pid, step
        if owner is not None:
            usage[owner] += proportional_memory(pid)
        pending.extend((child, owner) for child in children[pid])
    by_step: dict[str, list[int]] = defaultdict(list)
    for task, step in steps.items():
        by_step[step].append(usage[task])
    return by_step


@dataclass
class StepMemory:
    """The most one step's processes held at one sample."""

    total: int = 0  # all its tasks together
    task: int = 0  # its largest task, with that task's children (loader workers)
    tasks: int = 0  # tasks alive at once


class MemorySampler:
    """Samples the machine's memory in use and each step's processes every `period` seconds."""

    def __init__(self, period: float = 1.0) -> None:
        self.period, self.root_pid = period, 0
        self.baseline = self.peak = memory_in_use()
        self.steps: dict[str, StepMemory] = defaultdict(StepMemory)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, memory_in_use())
            for step, tasks in task_memory(self.root_pid).items():
                seen = self.steps[step]
                seen.total, seen.task = max(seen.total, sum(tasks)), max(seen.task, *tasks)
                seen.tasks = max(seen.tasks, len(tasks))


# --- the run's log -----------------------------------------------------------------------------------


@dataclass
class LogWatch:
    """When each task's lines reached the run's log: each task's first and last line (the runtime's
    "Task is starting." and "Task finished successfully."), the longest silence per step and overall."""

    tasks: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    silence: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    run_silence: float = 0.0
    previous: float | None = None
    run_id: str | None = None

    def feed(self, line: str, now: float) -> None:
        if started := RUN_START.search(line):
            self.run_id = started["run"]
        if self.previous is not None:
            self.run_silence = max(self.run_silence, now - self.previous)
        self.previous = now
        match = TASK_LINE.search(line)
        if match:
            seen = self.tasks.setdefault((match["step"], match["task"]), [now, now])
            self.silence[match["step"]] = max(self.silence[match["step"]], now - seen[1])
            seen[1] = now

    def intervals(self, step: str) -> list[tuple[float, float]]:
        """(first line, last line) of each of the step's tasks."""
        return [(first, last) for (name, _), (first, last) in self.tasks.items() if name == step]


@dataclass
class FlowRun:
    """What the rehearsal measured around the flow's process."""

    status: int
    seconds: float
    memory: MemorySampler
    log: LogWatch


def run_flow(root: Path, log_path: Path, env: dict[str, str], max_workers: int | None) -> FlowRun:
    """Run the train flow on `root`, echoing its log (also saved at `log_path`) and sampling memory."""
    command = [sys.executable, str(FLOW), "run", "--data", str(root), "--config_file", str(CONFIG)]
    if max_workers:
        command += ["--max-workers", str(max_workers)]
    sampler, watch = MemorySampler(), LogWatch()
    begin = time.monotonic()
    with (
        log_path.open("w", encoding="utf-8") as log,
        subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as process,
    ):
        sampler.start(process.pid)
        assert process.stdout is not None
        # Lines end at "\n" only, as in the run's log: a carriage-return progress bar is no log line.
        for line in io.TextIOWrapper(process.stdout, encoding="utf-8", errors="replace", newline="\n"):
            watch.feed(line, time.monotonic())
            log.write(line)
            print(line, end="", flush=True)
    sampler.stop()
    return FlowRun(process.returncode, time.monotonic() - begin, sampler, watch)


# --- the report --------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """`1 h 2 min`, `18 min 14 s` or `12 s`."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


def step_notes(name: str, task: Any, tasks: int) -> str:
    """What a step did at this scale, from its artifacts ("" for a step that left none of them)."""
    try:
        return _notes(name, task, tasks)
    except KeyError:
        return ""


def _notes(name: str, task: Any, tasks: int) -> str:
    if name == "ingest":
        report = task["ingest_report"].data
        return f"{report['metadata_rows']:,} rows matched to {report['matched']:,} files"
    if name == "split":
        counts = ", ".join(f"{row['split']} {row['images']:,}" for row in task["split_summary"].data)
        return f"{task['split_method'].data}: {counts} images"
    if name == "plan_preprocess":
        groups = task["shard_groups"].data
        return f"{sum(len(g) for g in groups)} shards for {len(groups)} tasks"
    if name == "preprocess":
        return f"{tasks} shard tasks"
    if name == "train":
        epochs, val = task["history"].data, len(task["cache_rows"].data["val"])
        rate = epochs[-1]["img_per_s"]
        device = task["train_device"].data
        return f"{device}: {len(epochs)} epoch(s) at {rate:.1f} img/s, each then scoring {val:,} val images"
    if name == "evaluate":
        rows, baseline = task["cache_rows"].data, len(task["baseline"].data.probabilities)
        scoring = task["scoring"].data
        return (f"test {len(rows['test']):,} images scored with {scoring['backend']} on {scoring['device']} "
                f"(val probabilities from training), baseline {baseline:,} more")  # fmt: skip
    if name == "register":
        onnx, compared = task["onnx_check"].data, task["production_auroc"].data is not None
        production = (
            "production re-scored on the test images" if compared else "no production model to re-score"
        )
        return (
            f"version {task['model_version'].data} ({task['model_status'].data}); ONNX "
            f"{'verified' if onnx.get('verified') else 'not verified'} on "
            f"{onnx.get('images', 0):,} test images (PyTorch and ONNX Runtime); {production}"
        )
    return ""


def timing(intervals: list[tuple[float, float]]) -> str:
    """The span from the first start to the last end; with several intervals, also their summed length."""
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    if len(intervals) == 1:
        return duration(span)
    return f"{duration(span)} ({duration(sum(end - start for start, end in intervals))} summed)"


def step_rows(run: Any, watch: LogWatch) -> list[dict[str, Any]]:
    """Per step, in the order they ran: the tasks' whole lives as the runtime logged them (wall time), the
    time in the step's code (Metaflow client: task creation to `_task_ok`), task count and notes."""
    rows = []
    for step in run:
        tasks = list(step)
        code = [(t.created_at.timestamp(), (t.finished_at or t.created_at).timestamp()) for t in tasks]
        rows.append(
            {
                "step": step.id,
                "start": min(start for start, _ in code),
                "wall": timing(watch.intervals(step.id) or code),
                "code": timing(code),
                "tasks": len(tasks),
                "notes": step_notes(step.id, tasks[0], len(tasks)),
            }
        )
    return sorted(rows, key=lambda row: row["start"])


def print_table(rows: list[dict[str, Any]], sampler: MemorySampler, watch: LogWatch) -> None:
    print(
        "| step | wall time | in the step's code | tasks (at once) | peak memory: step / one task "
        "| longest log silence | notes |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        memory = sampler.steps.get(row["step"], StepMemory())
        print(
            f"| {row['step']} | {row['wall']} | {row['code']} | {row['tasks']} ({memory.tasks}) "
            f"| {memory.total / GB:.2f} / {memory.task / GB:.2f} GB "
            f"| {duration(watch.silence.get(row['step'], 0.0))} | {row['notes']} |"
        )


def report(env: dict[str, str], flow_run: FlowRun, title: str) -> None:
    """One run's step table and its whole-run time and memory."""
    os.environ.update(env)  # the client reads the rehearsal's datastore
    from metaflow import Run, namespace

    namespace(None)
    sampler, watch = flow_run.memory, flow_run.log
    outcome = "ok" if flow_run.status == 0 else "FAILED"
    print(f"\n## {title}: run {watch.run_id} ({outcome})\n")
    if watch.run_id:
        print_table(step_rows(Run(f"CXRTrainFlow/{watch.run_id}"), watch), sampler, watch)
    print(
        f"\nwhole run: {duration(flow_run.seconds)}; memory in use {sampler.baseline / GB:.2f} GB before, "
        f"{sampler.peak / GB:.2f} GB at the peak (machine-wide: other work on the machine counts too); "
        f"longest silence in the log {duration(watch.run_silence)}"
    )


def print_figures(flow_run: FlowRun, images: int) -> None:
    """P8: the rehearsal's time against the 45-minute target and its memory rise against 8 GB."""
    rise = (flow_run.memory.peak - flow_run.memory.baseline) / GB
    total = sum(ARCHIVE_SIZES)
    scope = "" if images == total else f" — {images:,} of {total:,} rows, a smoke run"
    ratio = flow_run.seconds / TARGET_SECONDS
    print(f"P8: {ratio:.2f}x rehearsal time vs the 45 min target (target ≤1x){scope}")
    print(f"P8m: {rise:.2f} GB memory rise (target ≤{TARGET_RISE_GB:.0f} GB){scope}")


def rehearsal_env(scratch: Path) -> dict[str, str]:
    """The flow's environment: Metaflow's local datastore and metadata in `scratch`, a fresh CXR_HOME."""
    return {
        **os.environ,
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(scratch),
        "METAFLOW_USER": os.environ.get("METAFLOW_USER") or os.environ.get("USER") or "rehearsal",
        "CXR_HOME": str(scratch / "cxr-home"),
        "PYTHONUNBUFFERED": "1",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", type=int, default=None, help="rehearse the first N metadata rows (default all)"
    )
    parser.add_argument("--root", type=Path, default=None, help="where to lay out the NIH root")
    parser.add_argument(
        "--scratch", type=Path, default=None, help="datastore and CXR_HOME (default: a new temp dir)"
    )
    parser.add_argument(
        "--max-workers", type=int, default=None, help="Metaflow's --max-workers (default its own)"
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="2: run again with the first run's model in production and its cache (the gate re-scores it)",
    )
    parser.add_argument("--layout-only", action="store_true", help="lay out the root and stop")
    args = parser.parse_args()
    root = args.root or cxr_home() / "rehearsal" / f"nih-{args.rows or 'all'}"
    begin = time.monotonic()
    images = lay_out(root.resolve(), args.rows)
    print(f"{root}: {images:,} images laid out ({time.monotonic() - begin:.1f} s)", flush=True)
    if args.layout_only:
        return
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="cxr-rehearsal-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    env = rehearsal_env(scratch)
    runs = []
    for number in range(1, args.runs + 1):
        runs.append(run_flow(root.resolve(), scratch / f"run-{number}.log", env, args.max_workers))
        if runs[-1].status:
            break
    for number, flow_run in enumerate(runs, 1):
        again = " again, with the first run's model in production and its cache" if number > 1 else ""
        report(env, flow_run, f"NIH-scale rehearsal{again}: {images:,} images")
    print()
    print_figures(runs[0], images)
    print(f"logs, datastore and CXR_HOME: {scratch}")
    sys.exit(runs[-1].status)


if __name__ == "__main__":
    main()
