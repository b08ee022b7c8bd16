"""SageMaker managed spot training: the request against the loopback AWS API, the container contract run
locally with a spot-style interruption, and the wait/savings path through botocore's Stubber."""

import datetime as dt
import io
import json
import tarfile
import time

import boto3
import pytest
import torch
from botocore.stub import Stubber

from cxr.aws import training_job as tj
from cxr.aws.local_training import LocalTrainingJob
from cxr.data import cache_store
from cxr.data.cache import PreprocessSettings, build_cache, cache_rows
from cxr.data.catalog import load_catalog
from cxr.data.split import patient_split
from cxr.data.synthetic import make_demo_dataset

BUCKET = "cxr-train-test"
HYPER = dict(epochs=4, batch_size=16, crop=32, pretrained=False, workers=0, lr=3e-3, channels_last=False)


@pytest.fixture
def staged(s3, tmp_path_factory):
    """A tiny shard cache published to S3, the job's inputs staged, and the request built."""
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    root = make_demo_dataset(
        tmp_path_factory.mktemp("demo"), n_patients=40, max_images_per_patient=3, size=48, progress=False
    )
    catalog, _ = load_catalog(root)
    cache = build_cache(
        catalog, PreprocessSettings(size=40), root=tmp_path_factory.mktemp("c"), progress=False
    )
    split = patient_split(catalog.meta["patient_id"].to_numpy(), catalog.labels, (0.6, 0.2, 0.2))
    rows = cache_rows(cache, catalog.meta["image_id"], split)
    cache_uri = f"s3://{BUCKET}/data/cxr-cache/{cache.key}/"
    cache_store.publish(cache.directory, cache_uri)
    settings = tj.SageMakerTraining(
        role_arn="arn:aws:iam::123456789012:role/cxr-sagemaker-execution", output=f"s3://{BUCKET}/sagemaker"
    )
    prefix = tj.job_prefix("CXRTrainFlow", f"{time.time_ns()}")
    inputs = tj.stage_inputs(settings, prefix, {k: v.tolist() for k, v in rows.items()})
    request_for = lambda name: tj.training_job_request(name, settings, cache_uri, inputs, HYPER)  # noqa: E731
    return settings, prefix, inputs, request_for


def test_spot_job_request_is_accepted_and_launched_once(staged, s3):
    _, prefix, inputs, request_for = staged
    client = boto3.client("sagemaker")
    name = tj.start_or_attach(client, prefix, request_for)
    assert name == f"{prefix}-1"
    job = client.describe_training_job(TrainingJobName=name)
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 24 * 3600, "MaxWaitTimeInSeconds": 48 * 3600}
    assert job["CheckpointConfig"] == {"S3Uri": inputs["checkpoints"], "LocalPath": "/opt/ml/checkpoints"}
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
    assert (
        channels["training"].startswith(f"s3://{BUCKET}/data/cxr-cache/")
        and channels["split"] == inputs["split"]
    )
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    assert json.loads(job["HyperParameters"]["sagemaker_program"]) == "train_entry.py"
    assert json.loads(job["HyperParameters"]["epochs"]) == 4
    # attaching again (a resumed or retried flow step) does not launch a second job
    assert tj.start_or_attach(client, prefix, request_for) == name
    assert len(client.list_training_jobs(NameContains=prefix)["TrainingJobSummaries"]) == 1
    # the source archive carries the library and the entry script, encrypted at rest
    bucket, key = tj.split_s3_uri(inputs["source"])
    head = s3.head_object(Bucket=bucket, Key=key.rstrip("/"))
    assert head["ServerSideEncryption"] == "AES256"
    body = s3.get_object(Bucket=bucket, Key=key.rstrip("/"))["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = tar.getnames()
    assert {"train_entry.py", "requirements.txt", "cxr/train.py", "cxr/data/cache.py"} <= set(names)


def test_request_rules():
    settings = tj.SageMakerTraining(role_arn="r", output="s3://b/p", max_run_hours=10, max_wait_hours=5)
    staged = {"source": "s3://b/s.tar.gz", "split": "s3://b/split/", "checkpoints": "s3://b/c/"}
    with pytest.raises(tj.TrainingJobError, match="max_wait_hours"):
        tj.training_job_request("n", settings, "s3://b/cache/", staged, {})
    kms = tj.SageMakerTraining(role_arn="r", output="s3://b/p", kms_key_id="alias/cxr")
    request = tj.training_job_request("n", kms, "s3://b/cache/", staged, {})
    assert request["OutputDataConfig"]["KmsKeyId"] == "alias/cxr"
    assert request["ResourceConfig"]["VolumeKmsKeyId"] == "alias/cxr"
    with pytest.raises(tj.TrainingJobError, match="role_arn"):
        tj.SageMakerTraining.from_dict({"output": "s3://b/p"})
    name = tj.job_prefix("CXRTrainFlow", "sfn-" + "x" * 80) + "-12"
    assert len(name) <= 63 and name.replace("-", "").isalnum()


@pytest.mark.slow
def test_container_contract_resumes_after_spot_interruption(staged, s3, tmp_path):
    _, prefix, inputs, request_for = staged
    request = request_for(f"{prefix}-1")
    first = LocalTrainingJob(request, tmp_path / "first", sync_seconds=0.2)
    process = first.start()
    bucket, key = tj.split_s3_uri(inputs["checkpoints"])
    deadline = time.time() + 300
    while (
        "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=key + "last.pt") and time.time() < deadline
    ):
        time.sleep(0.1)
    process.kill()  # the spot instance is reclaimed
    interrupted = first.wait()
    assert interrupted["TrainingJobStatus"] == "Failed"
    saved = torch.load(
        io.BytesIO(s3.get_object(Bucket=bucket, Key=key + "last.pt")["Body"].read()), weights_only=False
    )
    assert saved["epoch"] + 1 < HYPER["epochs"]  # it really stopped mid-run

    job = LocalTrainingJob(request, tmp_path / "second").run()  # a fresh instance, same checkpoint URI
    model = tj.fetch_model(job)
    assert model["resumed_from_epoch"] == saved["epoch"] + 1
    assert [h["epoch"] for h in model["history"]] == list(range(HYPER["epochs"]))
    assert model["state"]["head.3.weight"].shape == (14, 512)
    assert (
        job["ModelArtifacts"]["S3ModelArtifacts"]
        == f"s3://{BUCKET}/sagemaker/models/{prefix}-1/output/model.tar.gz"
    )
    metrics = {m["MetricName"]: m["Value"] for m in job["FinalMetricDataList"]}
    assert metrics["validation:best_mean_auroc"] == pytest.approx(model["best_val_auroc"], abs=1e-6)
    assert metrics["validation:mean_auroc"] == pytest.approx(model["history"][-1]["val_mean_auroc"], abs=1e-4)
    assert metrics["train:loss"] == pytest.approx(model["history"][-1]["train_loss"], abs=1e-4)


@pytest.mark.slow
def test_two_instances_train_the_same_model_as_one(staged, s3, tmp_path):
    """instance_count 2: each host launches its share of the processes, they meet at algo-1, and the
    global batches, hence the losses, are those of one instance."""
    _, prefix, _, request_for = staged

    def request(name: str, instances: int) -> dict:
        built = request_for(f"{prefix}-{name}")
        # SGD without dropout, to compare step by step; 17 divides the 51 training images: a last batch of
        # 3 split 2/1 at these 32-px crops normalises 1x1 maps over 3 values, where float64 (global) and
        # float32 (one process) statistics part by 2e-3
        comparable = {"dropout": 0.0, "optimizer": "sgd", "batch_size": 17}
        built["HyperParameters"].update({k: json.dumps(v) for k, v in comparable.items()})
        built["ResourceConfig"]["InstanceCount"] = instances
        built["CheckpointConfig"]["S3Uri"] += f"{name}/"  # each job its own checkpoints
        return built

    one = tj.fetch_model(LocalTrainingJob(request("one", 1), tmp_path / "one").run())
    job = LocalTrainingJob(request("two", 2), tmp_path / "two")
    two = tj.fetch_model(job.run())
    assert two["device"] == "cpu × 2" and [h["epoch"] for h in two["history"]] == list(range(HYPER["epochs"]))
    losses = [(h["train_loss"], g["train_loss"]) for h, g in zip(one["history"], two["history"], strict=True)]
    assert all(abs(a - b) < 1e-4 for a, b in losses), losses
    second = job.folders("algo-2")
    assert "epoch 0: loss" in job.log_path.read_text() and "epoch 0: loss" not in second["log"].read_text()
    assert not any(second["model"].iterdir())  # the model comes from algo-1 alone


def _description(status, secondary, **extra):
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return {
        "TrainingJobName": "cxr-train-1",
        "TrainingJobArn": "arn:aws:sagemaker:us-east-1:123456789012:training-job/cxr-train-1",
        "ModelArtifacts": {"S3ModelArtifacts": "s3://b/models/cxr-train-1/output/model.tar.gz"},
        "TrainingJobStatus": status,
        "SecondaryStatus": secondary,
        "AlgorithmSpecification": {"TrainingImage": "img", "TrainingInputMode": "File"},
        "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200},
        "CreationTime": now,
        "EnableManagedSpotTraining": True,
        **extra,
    }


def test_wait_reports_progress_and_spot_saving():
    client = boto3.client(
        "sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    metric = {"MetricName": "validation:mean_auroc", "Value": 0.81, "Timestamp": dt.datetime(2026, 1, 1)}
    with Stubber(client) as stub:
        for status, secondary, extra in [
            ("InProgress", "Starting", {}),
            ("InProgress", "Interrupted", {}),
            ("InProgress", "Training", {"FinalMetricDataList": [metric]}),
            ("Completed", "Completed", {"TrainingTimeInSeconds": 1000, "BillableTimeInSeconds": 300}),
        ]:
            stub.add_response(
                "describe_training_job",
                _description(status, secondary, **extra),
                {"TrainingJobName": "cxr-train-1"},
            )
        job = tj.wait_for_job(client, "cxr-train-1", poll_seconds=0, progress=False)
        stub.assert_no_pending_responses()
    assert tj.spot_savings(job) == {
        "spot": True,
        "training_seconds": 1000,
        "billable_seconds": 300,
        "saving_fraction": 0.7,
    }
    with Stubber(client) as stub:
        failed = _description("Failed", "Failed", FailureReason="CapacityError: spot capacity not available")
        stub.add_response("describe_training_job", failed, {"TrainingJobName": "cxr-train-1"})
        with pytest.raises(tj.TrainingJobError, match="failed: CapacityError"):
            tj.wait_for_job(client, "cxr-train-1", poll_seconds=0, progress=False)
