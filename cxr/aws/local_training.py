"""Run a CreateTrainingJob request on this machine, the way SageMaker runs it (like the SDK's local mode).

For debugging a job before paying for it, and for checking the container contract without AWS compute:
the source archive is fetched from `sagemaker_submit_directory` and its entry script run as the
container would (SM_* environment, channels downloaded from S3 under `input/data/<channel>`,
`SM_MODEL_DIR`), checkpoints are restored from and synced to `CheckpointConfig.S3Uri` while it trains,
the metric definitions are applied to its log, and `model.tar.gz` lands where SageMaker would put it.
"""

from __future__ import annotations

import json
import os
import re
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
        self.checkpoints = self.root / "checkpoints"
        self.model_dir = self.root / "model"
        self.log_path = self.root / "output" / "training.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> subprocess.Popen[bytes]:
        """Stage channels, source and checkpoints, then start the entry script in the background."""
        hyper = {k: json.loads(v) for k, v in self.request.get("HyperParameters", {}).items()}
        code = self.root / "code"
        _extract_source(hyper.pop("sagemaker_submit_directory"), code)
        channels = {}
        for channel in self.request["InputDataConfig"]:
            name = channel["ChannelName"]
            channels[name] = self.root / "input" / "data" / name
            _download_prefix(channel["DataSource"]["S3DataSource"]["S3Uri"], channels[name])
        checkpoint_uri = self.request.get("CheckpointConfig", {}).get("S3Uri")
        if checkpoint_uri:
            s3sync.download(checkpoint_uri, self.checkpoints)
        for folder in (self.model_dir, self.log_path.parent, self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)
        env = self._environment(hyper, channels)
        program = hyper.pop("sagemaker_program")
        self._started = time.time()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603  # nosec B603
                [sys.executable, program], cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if checkpoint_uri:
            self._syncer = threading.Thread(target=self._sync_loop, args=(checkpoint_uri,), daemon=True)
            self._syncer.start()
        return self.process

    def _environment(self, hyper: dict[str, Any], channels: dict[str, Path]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
        env.update(
            {
                "SM_HPS": json.dumps({k: v for k, v in hyper.items() if not k.startswith("sagemaker_")}),
                "SM_MODEL_DIR": str(self.model_dir),
                "SM_OUTPUT_DATA_DIR": str(self.log_path.parent),
                "SM_CHANNELS": json.dumps(sorted(channels)),
                "SM_CURRENT_HOST": "algo-1",
                "SM_HOSTS": json.dumps(["algo-1"]),
                "CXR_CHECKPOINT_DIR": str(self.checkpoints),
                "PYTHONPATH": str(self.root / "code"),
            }
        )
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
        """Wait for the script, sync the last checkpoints, upload the model; returns a job description."""
        if self.process is None:
            raise TrainingJobError(f"local job {self.name} was not started")
        code = self.process.wait()
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
            job["FailureReason"] = f"entry script exited with {code}: {log[-2000:]}"
            return job
        job["ModelArtifacts"] = {"S3ModelArtifacts": self._upload_model()}
        return job

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
