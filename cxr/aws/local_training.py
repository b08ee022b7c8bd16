"""Run a CreateTrainingJob request on this machine, the way SageMaker runs it (like the SDK's local mode).

For debugging a job before paying for it, and for checking the container contract without AWS compute:
the source archive is fetched from `sagemaker_submit_directory` and its entry script run as the
container would (SM_* environment, channels downloaded from S3 under `input/data/<channel>`,
`SM_MODEL_DIR`), checkpoints are restored from and synced to `CheckpointConfig.S3Uri` while it trains,
the metric definitions are applied to its log, and `model.tar.gz` lands where SageMaker would put it.
With `InstanceCount` > 1 every host (`algo-1`, `algo-2`, …) runs the entry script in its own process
with its own model and checkpoint folders, and they meet on loopback (MASTER_ADDR/MASTER_PORT) where
SageMaker's hosts would resolve `algo-1`; the model and the metrics come from `algo-1`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess  # nosec B404
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from cxr import s3sync
from cxr.aws.training_job import TrainingJobError
from cxr.data.sources import s3_client, split_s3_uri


class LocalTrainingJob:
    """One local execution of a training job request, in `workdir`."""

    def __init__(self, request: dict[str, Any], workdir: str | Path, sync_seconds: float = 1.0):
        self.request = request
        self.name = request["TrainingJobName"]
        self.root = Path(workdir)
        self.sync_seconds = sync_seconds
        count = int(request.get("ResourceConfig", {}).get("InstanceCount", 1))
        self.hosts = [f"algo-{i + 1}" for i in range(count)]
        self.checkpoints = self.root / "checkpoints"  # algo-1's; the others' under hosts/<host>/
        self.model_dir = self.root / "model"
        self.log_path = self.root / "output" / "training.log"
        self.processes: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._started = 0.0

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The first host's process (the only one with one instance)."""
        return self.processes[0] if self.processes else None

    def folders(self, host: str) -> dict[str, Path]:
        """A host's model directory, checkpoint directory and log."""
        if host == self.hosts[0]:
            return {"model": self.model_dir, "checkpoints": self.checkpoints, "log": self.log_path}
        base = self.root / "hosts" / host
        return {"model": base / "model", "checkpoints": base / "checkpoints", "log": base / "training.log"}

    def start(self) -> subprocess.Popen[bytes]:
        """Stage channels, source and checkpoints, then start the entry script on every host in the
        background; returns the first host's process."""
        hyper = {k: json.loads(v) for k, v in self.request.get("HyperParameters", {}).items()}
        code = self.root / "code"
        _extract_source(hyper.pop("sagemaker_submit_directory"), code)
        channels = {}
        for channel in self.request["InputDataConfig"]:
            name = channel["ChannelName"]
            channels[name] = self.root / "input" / "data" / name
            _download_prefix(channel["DataSource"]["S3DataSource"]["S3Uri"], channels[name])
        checkpoint_uri = self.request.get("CheckpointConfig", {}).get("S3Uri")
        program = hyper.pop("sagemaker_program")
        port = _free_port()
        self._started = time.time()
        for host in self.hosts:
            folders = self.folders(host)
            if checkpoint_uri:  # every host starts from what S3 holds, as SageMaker restores it
                s3sync.download(checkpoint_uri, folders["checkpoints"])
            for folder in (folders["model"], folders["log"].parent, folders["checkpoints"]):
                folder.mkdir(parents=True, exist_ok=True)
            env = self._environment(hyper, channels, host, folders, port)
            with folders["log"].open("wb") as log:
                self.processes.append(
                    subprocess.Popen(  # noqa: S603  # nosec B603
                        [sys.executable, program], cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                )
        if checkpoint_uri:
            self._syncer = threading.Thread(target=self._sync_loop, args=(checkpoint_uri,), daemon=True)
            self._syncer.start()
        return self.processes[0]

    def _environment(
        self, hyper: dict[str, Any], channels: dict[str, Path], host: str, folders: dict[str, Path], port: int
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
        env.update(
            {
                "SM_HPS": json.dumps({k: v for k, v in hyper.items() if not k.startswith("sagemaker_")}),
                "SM_MODEL_DIR": str(folders["model"]),
                "SM_OUTPUT_DATA_DIR": str(folders["log"].parent),
                "SM_CHANNELS": json.dumps(sorted(channels)),
                "SM_CURRENT_HOST": host,
                "SM_HOSTS": json.dumps(self.hosts),
                "CXR_CHECKPOINT_DIR": str(folders["checkpoints"]),
                "PYTHONPATH": str(self.root / "code"),
            }
        )
        if len(self.hosts) > 1:  # where SageMaker's hosts resolve algo-1, these share loopback
            env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        env.update({f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()})
        return env

    def _sync_loop(self, uri: str) -> None:
        seen: dict[str, float] = {}
        while not self._stop.wait(self.sync_seconds):
            self.sync_checkpoints(uri, seen)

    def sync_checkpoints(self, uri: str, seen: dict[str, float] | None = None) -> None:
        """Upload checkpoint files that changed since the last sync (as SageMaker does during training)."""
        seen = {} if seen is None else seen
        changed = [
            p.name
            for p in self.checkpoints.glob("*")
            if p.is_file() and not p.name.startswith(".") and seen.get(p.name) != p.stat().st_mtime
        ]
        for name in changed:
            seen[name] = (self.checkpoints / name).stat().st_mtime
        if changed:
            s3sync.upload(self.checkpoints, uri, changed)

    def wait(self) -> dict[str, Any]:
        """Wait for every host, sync the last checkpoints, upload the model; returns a job description.
        The job fails when any host's script fails."""
        if not self.processes:
            raise TrainingJobError(f"local job {self.name} was not started")
        code = self._wait_for_hosts()
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
            self.sync_checkpoints(self.request["CheckpointConfig"]["S3Uri"])
        elapsed = round(time.time() - self._started)
        log = self.log_path.read_text(errors="replace")
        job: dict[str, Any] = {
            "TrainingJobName": self.name,
            "TrainingJobStatus": "Completed" if code == 0 else "Failed",
            "SecondaryStatus": "Completed" if code == 0 else "Failed",
            "EnableManagedSpotTraining": False,
            "TrainingTimeInSeconds": elapsed,
            "BillableTimeInSeconds": elapsed,
            "FinalMetricDataList": final_metrics(log, self.request),
        }
        if code != 0:
            host = next(h for h, p in zip(self.hosts, self.processes, strict=True) if p.returncode == code)
            failed = self.folders(host)["log"].read_text(errors="replace")
            job["FailureReason"] = f"entry script exited with {code} on {host}: {failed[-2000:]}"
            return job
        job["ModelArtifacts"] = {"S3ModelArtifacts": self._upload_model()}
        return job

    def _wait_for_hosts(self, poll_seconds: float = 0.2) -> int:
        """The first non-zero exit code, or 0; when one host fails the others are stopped, as SageMaker
        ends a job whose host failed (they would otherwise wait for it at their next collective)."""
        while True:
            codes = [process.poll() for process in self.processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                for process in self.processes:
                    if process.poll() is None:
                        process.kill()
                    process.wait()
                return failed[0] if failed else 0
            time.sleep(poll_seconds)

    def run(self) -> dict[str, Any]:
        """Start and wait; raise TrainingJobError when the entry script fails."""
        self.start()
        job = self.wait()
        if job["TrainingJobStatus"] != "Completed":
            raise TrainingJobError(f"local training job {self.name} failed: {job['FailureReason']}")
        return job

    def _upload_model(self) -> str:
        archive = self.root / "output" / "model.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(self.model_dir.iterdir()):
                tar.add(path, arcname=path.name)
        output = self.request["OutputDataConfig"]
        uri = f"{output['S3OutputPath'].rstrip('/')}/{self.name}/output/model.tar.gz"
        return s3sync.put(uri, archive, output.get("KmsKeyId"))


def final_metrics(log: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The last value each metric definition's regex finds in the log (what SageMaker reports as final)."""
    found = []
    for metric in request["AlgorithmSpecification"].get("MetricDefinitions", []):
        values = re.findall(metric["Regex"], log)
        if values:
            found.append({"MetricName": metric["Name"], "Value": float(values[-1])})
    return found


def _extract_source(uri: str, directory: Path) -> None:
    bucket, key = split_s3_uri(uri)
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory.parent / "sourcedir.tar.gz"
    s3_client().download_file(bucket, key.rstrip("/"), str(archive))
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")


def _download_prefix(uri: str, directory: Path) -> None:
    """Every object under the prefix, keeping sub-folders (SageMaker's File mode)."""
    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for item in (item for page in pages for item in page.get("Contents", [])):
        target = directory / item["Key"][len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, item["Key"], str(target))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
