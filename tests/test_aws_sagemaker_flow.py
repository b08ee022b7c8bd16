"""The train flow with the SageMaker backend, against the AWS APIs on loopback.

The loopback server accepts and records training jobs but runs nothing, so the test plays SageMaker's
compute: the first run launches the job and stops at train (no model yet), the recorded job is executed
through the container contract, and `resume` attaches to the same job instead of launching another.
"""

from __future__ import annotations

import gzip
import json
import uuid
import zlib

import boto3
import pytest
from metaflow import Runner

from cxr.aws.local_training import LocalTrainingJob
from cxr.data.findings import FINDINGS

from .conftest import script_invocations
from .test_aws_metaflow import s3_env
from .test_train_flow import FLOW, write_config

BUCKET = "cxr-metaflow"
ROLE = "arn:aws:iam::123456789012:role/cxr-sagemaker-execution"
ENDPOINT = f"cxr-flow-{uuid.uuid4().hex[:8]}"
REQUEST_FIELDS = ("TrainingJobName", "HyperParameters", "AlgorithmSpecification", "InputDataConfig",
                  "OutputDataConfig", "CheckpointConfig")  # fmt: skip


@pytest.mark.slow
def test_flow_trains_as_a_sagemaker_spot_job_and_resumes_onto_it(tmp_path, s3, s3_server, monkeypatch):
    secret = f"cxr-secret-{uuid.uuid4().hex}"  # the loopback server accepts any key; none may leak
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    config = write_config(tmp_path, remote="auto", epochs=2)
    text = config.read_text().replace(
        "registry: {group: auto,", "registry: {group: auto, backend: sagemaker,"
    )
    config.write_text(
        text
        + "compute: {train: sagemaker}\n"
        + f"sagemaker: {{role_arn: '{ROLE}', output: auto, poll_seconds: 0,"
        + " max_run_hours: 1, max_wait_hours: 2}\n"
        + "deploy:\n  enabled: true\n  artifacts: auto\n"
        + f"  endpoint: {{name: {ENDPOINT}, mode: serverless, role_arn: '{ROLE}', poll_seconds: 0}}\n"
        + "  smoke: {latency_budget_ms: 60000, content_type: application/json}\n"
    )
    runner = Runner(str(FLOW), show_output=False, env=s3_env(tmp_path), cwd=str(tmp_path))
    with runner.run(config_file=str(config)) as running:
        assert running.status == "failed"
        origin = running.run.id
        # the job "completed" on the server, but nothing ran it, so there is no model yet
        assert "not readable" in running.run["train"].task.stderr
    sagemaker = boto3.client("sagemaker")
    jobs = sagemaker.list_training_jobs(NameContains=f"cxrtrain-{origin}")["TrainingJobSummaries"]
    assert [j["TrainingJobName"] for j in jobs] == [f"cxrtrain-{origin}-1"]  # the retry attached to it
    described = sagemaker.describe_training_job(TrainingJobName=jobs[0]["TrainingJobName"])
    assert described["EnableManagedSpotTraining"] is True and described["RoleArn"] == ROLE
    assert described["StoppingCondition"]["MaxWaitTimeInSeconds"] == 7200
    request = {key: described[key] for key in REQUEST_FIELDS}
    LocalTrainingJob(request, tmp_path / "sagemaker-compute").run()
    body = {"predictions": [{"probabilities": dict.fromkeys(FINDINGS, 0.1)}]}
    answer = {"Body": json.dumps(body), "ContentType": "application/json", "InvokedProductionVariant": "A",
              "CustomAttributes": ""}  # fmt: skip
    script_invocations(s3_server, answer, answer)  # the staging and production smoke tests of the deploy step

    with runner.resume(origin_run_id=origin) as running:
        assert running.status == "successful", running.stderr
        run = running.run
    train = run["train"].task
    job = train["training_job"].data
    assert job["name"] == f"cxrtrain-{origin}-1" and job["spot"] is True
    assert job["checkpoints"] == f"s3://{BUCKET}/data/cxr-sagemaker/cxrtrain-{origin}/checkpoints/"
    assert "saving_fraction" in job  # None here: the loopback server reports no billable time
    assert [h["epoch"] for h in train["history"].data] == [0, 1]
    assert train["train_device"].data.startswith("sagemaker:")
    assert len(sagemaker.list_training_jobs(NameContains=f"cxrtrain-{origin}")["TrainingJobSummaries"]) == 1
    assert run["end"].task["metrics"].data["mean_auroc"] > 0

    # registered in SageMaker Model Registry, with the monitoring baseline beside the model
    end = run["end"].task
    packages = sagemaker.list_model_packages(ModelPackageGroupName="demo")["ModelPackageSummaryList"]
    assert end["model_version"].data == 1 and len(packages) == 1
    assert packages[0]["ModelApprovalStatus"] == "Approved"  # the gate promoted it: nothing was in production
    files = [
        o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="data/cxr-registry/demo/")["Contents"]
    ]
    assert {"model.tar.gz", "model_card.md", "metrics.json", "baseline.npz", "constraints.json"} <= {
        key.rsplit("/", 1)[1] for key in files
    }

    # deployed from the flow: serverless endpoint serving the registered version
    deployment = run["deploy"].task["deployment"].data
    assert deployment["endpoints"] == [ENDPOINT] and deployment["actions"] == ["created"]
    endpoint = sagemaker.describe_endpoint(EndpointName=ENDPOINT)
    config_ = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model = sagemaker.describe_model(ModelName=config_["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"].startswith(f"s3://{BUCKET}/data/cxr-registry/demo/")

    # no credential in any artifact, log, job input or job request
    stored = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
              for o in page.get("Contents", [])]  # fmt: skip
    for key in stored:
        assert secret.encode() not in _plain(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()), key
    assert secret not in json.dumps(described, default=str)


def _plain(body: bytes) -> bytes:
    """Object bytes, decompressed when Metaflow stored them gzip- or zlib-compressed."""
    for decompress in (gzip.decompress, zlib.decompress):
        try:
            return decompress(body)
        except (OSError, zlib.error, EOFError):
            continue
    return body
