"""The multi-node train step as Metaflow submits it to AWS Batch, against the AWS APIs on loopback: one
multi-node parallel job whose nodes each get the step's GPU, CPUs and memory, and the flow's code."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import urllib.request

import pytest
from metaflow import Runner

from .test_aws_step_functions import provision
from .test_train_flow import REPO, write_config

# The product's multi-node flow with only its train step on AWS Batch (`--with batch` sends every step
# there); the loopback Batch API accepts jobs but runs none, so the steps before train run here.
TRAIN_ON_BATCH = '''
from metaflow import FlowMutator
from train_multinode_flow import CXRTrainMultiNodeFlow


class TrainOnBatch(FlowMutator):
    def pre_mutate(self, mutable_flow):
        mutable_flow.train.add_decorator("batch")
        retry = {"times": 1, "minutes_between_retries": 0}  # the product's one retry, without the wait
        mutable_flow.train.add_decorator("retry", deco_kwargs=retry, duplicates=mutable_flow.train.OVERRIDE)


@TrainOnBatch
class CXRTrainOnBatchFlow(CXRTrainMultiNodeFlow):
    """CXRTrainMultiNodeFlow, its train step an AWS Batch multi-node job."""


if __name__ == "__main__":
    CXRTrainOnBatchFlow()
'''


def moto_api(server: str, path: str, body: dict | None = None) -> bytes:
    """Call the loopback server's own API: POST with a body, GET without."""
    request = urllib.request.Request(
        f"{server}/moto-api/{path}", data=None if body is None else json.dumps(body).encode()
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


@pytest.fixture
def batch_accepts_jobs(s3, s3_server):
    """A fresh loopback AWS whose Batch marks submitted jobs done without running them (no Docker),
    recording the requests it gets; yields a function that returns them."""
    moto_api(s3_server, "reset", {})
    moto_api(s3_server, "config", {"batch": {"use_docker": False}})
    moto_api(s3_server, "recorder/reset-recording", {})
    moto_api(s3_server, "recorder/start-recording", {})
    try:
        yield lambda: [
            json.loads(line) for line in moto_api(s3_server, "recorder/download-recording").splitlines()
        ]
    finally:
        moto_api(s3_server, "recorder/stop-recording", {})
        moto_api(s3_server, "recorder/reset-recording", {})
        moto_api(s3_server, "config", {"batch": {"use_docker": True}})
        moto_api(s3_server, "reset", {})


def requests_to(recorded: list[dict], action: str) -> list[dict]:
    """The JSON bodies of the recorded Batch API requests for one action (e.g. `submitjob`)."""
    calls = [r for r in recorded if r["url"].rstrip("/").endswith(f"/v1/{action}")]
    return [json.loads(base64.b64decode(c["body"]) if c["body_encoded"] else c["body"]) for c in calls]


def flow_directory(tmp_path):
    """The flows folder as the product lays it out, plus the test flow beside it."""
    flows = tmp_path / "flows"
    flows.mkdir()
    for name in ("train_flow.py", "train_multinode_flow.py", "cxr"):
        (flows / name).symlink_to(REPO / "flows" / name)
    (flows / "train_on_batch_flow.py").write_text(TRAIN_ON_BATCH)
    return flows


@pytest.mark.slow
def test_the_train_step_is_one_batch_multinode_job_with_a_gpu_per_node(tmp_path, s3, batch_accepts_jobs):
    import boto3

    profile = provision("cxr-batch")
    env = {
        **os.environ,
        **profile,
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path),
        "PYTHONPATH": str(REPO / "flows"),
    }
    flow = flow_directory(tmp_path) / "train_on_batch_flow.py"
    runner = Runner(str(flow), show_output=False, env=env, cwd=str(tmp_path))
    with runner.run(config_file=str(write_config(tmp_path)), nodes=3) as running:
        stdout, stderr = running.stdout, running.stderr
    # Batch accepted each attempt's job and reported it done; as nothing ran, the step has no artifacts
    assert running.status == "failed" and "Step train (task-id" in stderr, stderr[-3000:]
    assert "No completed attempts of the task was found" in stdout, stdout[-3000:]
    assert "Sleeping 0 minutes before the next AWS Batch retry" in stdout  # @retry(times=1) resubmits

    recorded = batch_accepts_jobs()
    (definition,) = requests_to(recorded, "registerjobdefinition")  # one definition for both attempts
    nodes = definition["nodeProperties"]
    assert definition["type"] == "multinode" and nodes["numNodes"] == 3 and nodes["mainNode"] == 0
    assert [r["targetNodes"] for r in nodes["nodeRangeProperties"]] == ["0:0", "1:2"]
    for node_range in nodes["nodeRangeProperties"]:
        assert node_range["container"]["image"] == profile["METAFLOW_BATCH_CONTAINER_IMAGE"]
        assert node_range["container"]["jobRoleArn"] == profile["METAFLOW_ECS_S3_ACCESS_IAM_ROLE"]

    submitted = requests_to(recorded, "submitjob")
    assert len(submitted) == 2 and {s["jobQueue"] for s in submitted} == {"cxr-gpu-queue"}
    for job in submitted:
        main, others = job["nodeOverrides"]["nodePropertyOverrides"]
        assert (main["targetNodes"], others["targetNodes"]) == ("0:0", "1:2")
        for node in (main, others):
            overrides = node["containerOverrides"]
            requirements = {r["type"]: r["value"] for r in overrides["resourceRequirements"]}
            assert requirements == {"GPU": "1", "VCPU": "8", "MEMORY": "32000"}, requirements  # @resources
        command = main["containerOverrides"]["command"][-1]
        assert "train_on_batch_flow.py" in command and " step train " in command
        assert "--split-index 0" in command and "ubf_control" in command  # node 0 is the control task
        command = others["containerOverrides"]["command"][-1]
        assert "--split-index $AWS_BATCH_JOB_NODE_INDEX" in command and "ubf_task" in command
    listed = boto3.client("batch").list_jobs(jobQueue="cxr-gpu-queue", jobStatus="SUCCEEDED")[
        "jobSummaryList"
    ]
    assert len(listed) == 2 and all(f"[{j['jobId']}] Task is starting" in stdout for j in listed)

    environment = {e["name"]: e["value"] for e in submitted[0]["nodeOverrides"]["nodePropertyOverrides"][0][
        "containerOverrides"]["environment"]}  # fmt: skip
    bucket, key = environment["METAFLOW_CODE_URL"].removeprefix("s3://").split("/", 1)
    body = io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    with tarfile.open(fileobj=body) as archive:
        names = set(archive.getnames())
    assert {"train_multinode_flow.py", "train_flow.py", "cxr/distributed.py", "cxr/train.py"} <= names
