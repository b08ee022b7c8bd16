"""SageMaker managed spot training through boto3: build the job, launch it (once), wait, fetch the model.

The job runs the same trainer as every other backend (`cxr.train.sagemaker_main`) inside an AWS PyTorch
training container in script mode: the `cxr` library is shipped as the job's source archive, the shard
cache is the `training` channel (read from S3 where the flow published it), `split.json` is the `split`
channel, and `/opt/ml/checkpoints` is synced to S3 by `CheckpointConfig`, so a spot interruption resumes
from the last finished epoch. Metric definitions scrape the trainer's epoch lines into CloudWatch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cxr.data.sources import s3_client, split_s3_uri
from cxr.s3sync import put

DEFAULT_IMAGE = (
    "763104351884.dkr.ecr.{region}.amazonaws.com/pytorch-training:2.5.1-gpu-py311-cu124-ubuntu22.04-sagemaker"
)
ENTRY_POINT = "train_entry.py"
# The main guard keeps the processes a multi-GPU or multi-host run spawns from running it again.
ENTRY_SCRIPT = """from cxr.train import sagemaker_main

if __name__ == "__main__":
    raise SystemExit(sagemaker_main())
"""
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
ACTIVE, DONE, FAILED = ("InProgress", "Stopping"), ("Completed",), ("Failed", "Stopped")
# The trainer logs "epoch 3: loss 0.1612, val mean AUROC 0.8123, 410.2 img/s" and "best_val_auroc=0.8123".
METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": r"epoch \d+: loss ([0-9.eE+-]+)"},
    {"Name": "validation:mean_auroc", "Regex": r"val mean AUROC ([0-9.eE+-]+)"},
    {"Name": "train:images_per_second", "Regex": r"([0-9.]+) img/s"},
    {"Name": "validation:best_mean_auroc", "Regex": r"best_val_auroc=([0-9.eE+-]+)"},
]
# What the trainer needs beyond the PyTorch container's own packages.
REQUIREMENTS = "opencv-python-headless>=4.8\nscikit-learn>=1.3\npandas>=2.0\npyyaml>=6\ntqdm>=4.60\n"
_NAME = re.compile(r"[^a-zA-Z0-9-]+")


class TrainingJobError(RuntimeError):
    """A training job failed, was stopped, or produced no model."""


@dataclass
class SageMakerTraining:
    """Settings of the SageMaker backend (the `sagemaker:` section of the pipeline config)."""

    role_arn: str
    output: str  # s3:// prefix for sources, split files, checkpoints and model artifacts
    region: str = "us-east-1"
    image_uri: str | None = None
    instance_type: str = "ml.g5.2xlarge"
    instance_count: int = 1
    volume_gb: int = 100
    spot: bool = True
    max_run_hours: float = 24.0
    max_wait_hours: float = 48.0  # spot: how long to wait for capacity, including the run
    kms_key_id: str | None = None
    poll_seconds: float = 30.0
    tags: dict[str, str] = field(default_factory=lambda: {"project": "cxr"})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SageMakerTraining:
        """From the config section; clear message when a required setting is missing."""
        missing = [key for key in ("role_arn", "output") if not values.get(key)]
        if missing:
            raise TrainingJobError(f"sagemaker settings {missing} are required for the SageMaker backend")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})

    @property
    def image(self) -> str:
        """The training image: as configured, or AWS's PyTorch training container for the region."""
        return self.image_uri or DEFAULT_IMAGE.format(region=self.region)


def job_prefix(flow_name: str, run_id: str) -> str:
    """A valid, readable job-name prefix for one flow run (SageMaker names: ≤63 of [a-zA-Z0-9-])."""
    flow = _NAME.sub("-", flow_name.lower().removesuffix("flow"))[:20].strip("-")
    run = _NAME.sub("-", str(run_id))[-24:].strip("-")
    return f"{flow}-{run}"


def source_archive() -> bytes:
    """The job's source: the `cxr` library, the entry script and requirements, as a reproducible tar.gz."""
    from cxr.package import add_bytes, add_library

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        add_library(tar, "cxr")
        add_bytes(tar, ENTRY_POINT, ENTRY_SCRIPT.encode())
        add_bytes(tar, "requirements.txt", REQUIREMENTS.encode())
    return gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)  # same source, same bytes and digest


def stage_inputs(
    settings: SageMakerTraining, prefix: str, split: dict[str, list[int]], s3: Any = None
) -> dict[str, str]:
    """Upload the source archive (content-addressed) and the split; returns their S3 URIs."""
    base = settings.output.rstrip("/")
    source = source_archive()
    digest = hashlib.sha256(source).hexdigest()[:16]
    source_uri = put(f"{base}/source/{digest}/sourcedir.tar.gz", source, settings.kms_key_id, s3)
    split_uri = f"{base}/{prefix}/split/"
    put(split_uri + "split.json", json.dumps(split).encode(), settings.kms_key_id, s3)
    return {"source": source_uri, "split": split_uri, "checkpoints": f"{base}/{prefix}/checkpoints/"}


def training_job_request(
    name: str,
    settings: SageMakerTraining,
    cache_uri: str,
    staged: dict[str, str],
    hyperparameters: dict[str, Any],
) -> dict[str, Any]:
    """The CreateTrainingJob request: spot, max wait, checkpoints to S3, shard and split channels, metrics."""
    if settings.spot and settings.max_wait_hours < settings.max_run_hours:
        raise TrainingJobError("sagemaker.max_wait_hours must be at least max_run_hours for spot training")
    hyper = {key: json.dumps(value) for key, value in hyperparameters.items()}
    hyper["sagemaker_program"] = json.dumps(ENTRY_POINT)
    hyper["sagemaker_submit_directory"] = json.dumps(staged["source"])
    hyper["sagemaker_region"] = json.dumps(settings.region)
    stopping = {"MaxRuntimeInSeconds": int(settings.max_run_hours * 3600)}
    if settings.spot:
        stopping["MaxWaitTimeInSeconds"] = int(settings.max_wait_hours * 3600)
    output: dict[str, str] = {"S3OutputPath": f"{settings.output.rstrip('/')}/models/"}
    resources: dict[str, Any] = {
        "InstanceType": settings.instance_type,
        "InstanceCount": settings.instance_count,
        "VolumeSizeInGB": settings.volume_gb,
    }
    if settings.kms_key_id:
        output["KmsKeyId"] = settings.kms_key_id
        resources["VolumeKmsKeyId"] = settings.kms_key_id
    return {
        "TrainingJobName": name,
        "HyperParameters": hyper,
        "AlgorithmSpecification": {
            "TrainingImage": settings.image,
            "TrainingInputMode": "File",
            "MetricDefinitions": METRIC_DEFINITIONS,
        },
        "RoleArn": settings.role_arn,
        "InputDataConfig": [_channel("training", cache_uri), _channel("split", staged["split"])],
        "OutputDataConfig": output,
        "ResourceConfig": resources,
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": settings.spot,
        "CheckpointConfig": {"S3Uri": staged["checkpoints"], "LocalPath": CHECKPOINT_LOCAL_PATH},
        "Tags": [{"Key": k, "Value": v} for k, v in settings.tags.items()],
    }


def _channel(name: str, uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": uri.rstrip("/") + "/",
                "S3DataDistributionType": "FullyReplicated",
            }
        },
        "InputMode": "File",
    }


def start_or_attach(client: Any, prefix: str, request_for: Any) -> str:
    """Attach to this run's job if one is running or finished; else launch `prefix-<n+1>`.

    `request_for(name)` builds the request. A resumed or retried flow step therefore never launches a
    second job while the first is alive, and a replacement for a failed job resumes from its checkpoints.
    """
    jobs = _jobs_named(client, prefix)
    for job in jobs:
        if job["TrainingJobStatus"] in ACTIVE + DONE:
            return str(job["TrainingJobName"])
    name = f"{prefix}-{len(jobs) + 1}"
    client.create_training_job(**request_for(name))
    return name


def _jobs_named(client: Any, prefix: str) -> list[dict[str, Any]]:
    pages = client.get_paginator("list_training_jobs").paginate(NameContains=prefix)
    jobs = [job for page in pages for job in page["TrainingJobSummaries"]]
    pattern = re.compile(rf"^{re.escape(prefix)}-\d+$")
    mine = [job for job in jobs if pattern.match(job["TrainingJobName"])]
    return sorted(mine, key=lambda job: int(job["TrainingJobName"].rsplit("-", 1)[1]), reverse=True)


def wait_for_job(client: Any, name: str, poll_seconds: float = 30.0, progress: bool = True) -> dict[str, Any]:
    """Poll until the job ends, showing its status and latest metrics; raise if it did not complete."""
    bar = tqdm(desc=name, unit="poll", disable=not progress, bar_format="{desc} [{elapsed}]")
    try:
        while True:
            job = client.describe_training_job(TrainingJobName=name)
            bar.set_description_str(f"{name}: {_status_line(job)}")
            bar.update()
            if job["TrainingJobStatus"] not in ACTIVE:
                break
            time.sleep(poll_seconds)
    finally:
        bar.close()
    if job["TrainingJobStatus"] in FAILED:
        reason = job.get("FailureReason", "no reason given")
        raise TrainingJobError(f"training job {name} {job['TrainingJobStatus'].lower()}: {reason}")
    return dict(job)


def _status_line(job: dict[str, Any]) -> str:
    metrics = {m["MetricName"]: m["Value"] for m in job.get("FinalMetricDataList", [])}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    return f"{job['TrainingJobStatus']}/{job.get('SecondaryStatus', '?')}" + (f" ({shown})" if shown else "")


def spot_savings(job: dict[str, Any]) -> dict[str, Any]:
    """What spot saved, as the job reports it: 1 - billable seconds / training seconds."""
    trained, billed = job.get("TrainingTimeInSeconds"), job.get("BillableTimeInSeconds")
    saving = None
    if trained and billed is not None:
        saving = round(1.0 - float(billed) / float(trained), 4)
    return {
        "spot": bool(job.get("EnableManagedSpotTraining")),
        "training_seconds": trained,
        "billable_seconds": billed,
        "saving_fraction": saving,
    }


def fetch_model(job: dict[str, Any], s3: Any = None) -> dict[str, Any]:
    """Download and open the job's `model.tar.gz`: the best weights (`model.pt`) and `history.json`."""
    import torch
    from botocore.exceptions import BotoCoreError, ClientError

    uri = job["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = split_s3_uri(uri)
    client = s3 or s3_client()
    with tempfile.TemporaryDirectory() as work:
        archive = Path(work) / "model.tar.gz"
        try:
            client.download_file(bucket, key.rstrip("/"), str(archive))
        except (BotoCoreError, ClientError) as error:
            raise TrainingJobError(
                f"model artifact of {job['TrainingJobName']} not readable at {uri}: {error}"
            ) from error
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        state = torch.load(Path(work) / "model.pt", map_location="cpu", weights_only=True)
        summary = json.loads((Path(work) / "history.json").read_text())
    return {"state": state, **summary, "model_uri": uri}


def train_on_sagemaker(
    section: dict[str, Any],
    cache_uri: str,
    split: dict[str, list[int]],
    hyperparameters: dict[str, Any],
    flow_name: str,
    run_id: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage inputs, launch (or attach to) this run's spot job, wait, and return its model and costs.

    `section` is the config's `sagemaker:` mapping; with `local: true` the job runs on this machine
    through the container contract instead (nothing is launched on AWS).
    """
    from cxr.aws.local_training import LocalTrainingJob

    settings = SageMakerTraining.from_dict(section)
    prefix = job_prefix(flow_name, run_id)
    staged = stage_inputs(settings, prefix, split)

    def request_for(name: str) -> dict[str, Any]:
        return training_job_request(name, settings, cache_uri, staged, hyperparameters)

    if section.get("local"):
        with tempfile.TemporaryDirectory(prefix="cxr-sagemaker-") as work:
            job = LocalTrainingJob(request_for(f"{prefix}-local"), work).run()
    else:
        import boto3

        client = boto3.client("sagemaker", region_name=settings.region)
        name = start_or_attach(client, prefix, request_for)
        job = wait_for_job(client, name, settings.poll_seconds, progress)
    model = fetch_model(job)
    model["job"] = {
        "name": job["TrainingJobName"],
        "arn": job.get("TrainingJobArn"),
        "checkpoints": staged["checkpoints"],
        "metrics": {m["MetricName"]: m["Value"] for m in job.get("FinalMetricDataList", [])},
        **spot_savings(job),
    }
    return model
