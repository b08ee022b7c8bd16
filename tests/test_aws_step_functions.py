"""`step-functions create` for both flows against the AWS APIs on loopback, from the documented profile."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from .conftest import REPO

PROFILE = REPO / "config" / "metaflow" / "config_aws.json"
VALIDATOR = os.environ.get(
    "CXR_ASL_VALIDATOR", str(REPO / ".cache" / "node" / "node_modules" / "asl-validator")
)
TRUST = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "batch.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }
)


def provision(bucket: str) -> dict[str, str]:
    """The AWS resources the profile names: bucket, IAM roles, a GPU Batch queue, the SFN state table."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=bucket)
    iam = boto3.client("iam")
    arn = {
        n: iam.create_role(RoleName=n, AssumeRolePolicyDocument=TRUST)["Role"]["Arn"]
        for n in ("cxr-batch-service", "cxr-batch-job", "cxr-step-functions", "cxr-eventbridge")
    }
    profile = iam.create_instance_profile(InstanceProfileName="cxr-ecs")["InstanceProfile"]["Arn"]
    iam.add_role_to_instance_profile(InstanceProfileName="cxr-ecs", RoleName="cxr-batch-job")
    ec2 = boto3.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="cxr-batch", Description="batch", VpcId=vpc)["GroupId"]
    batch = boto3.client("batch")
    resources = {
        "type": "EC2",
        "minvCpus": 0,
        "maxvCpus": 64,
        "instanceTypes": ["g5.2xlarge"],
        "subnets": [subnet],
        "securityGroupIds": [group],
        "instanceRole": profile,
    }
    environment = batch.create_compute_environment(
        computeEnvironmentName="cxr-gpu",
        type="MANAGED",
        state="ENABLED",
        serviceRole=arn["cxr-batch-service"],
        computeResources=resources,
    )["computeEnvironmentArn"]
    batch.create_job_queue(
        jobQueueName="cxr-gpu-queue",
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment}],
    )
    boto3.client("dynamodb").create_table(
        TableName="cxr-metaflow-sfn-state",
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pathspec", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pathspec", "AttributeType": "S"}],
    )
    config = json.loads(PROFILE.read_text())
    account = arn["cxr-batch-job"].split(":")[4]
    text = json.dumps(config).replace("YOUR-BUCKET", bucket).replace("ACCOUNT", account)
    values = {k: str(v) for k, v in json.loads(text).items()}
    for name in ("METAFLOW_SERVICE_URL", "METAFLOW_SERVICE_INTERNAL_URL"):  # no metadata service in tests:
        values[name] = f"http://127.0.0.1:9/{name.lower()}/"  # on loopback, and never called (see below)
    return values


def validate_asl(definition: dict) -> dict:
    if not os.path.isdir(VALIDATOR) or shutil.which("node") is None:
        message = f"asl-validator not installed at {VALIDATOR} (.ci/run installs it with npm)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    # Metaflow's OutputPath unions ($.['JobId', ...]) are valid for AWS but outside the validator's
    # restricted path grammar, so path expressions are not checked; everything else is.
    script = (
        "const v=require(process.argv[1]);"
        "const d=JSON.parse(require('fs').readFileSync(0,'utf8'));"
        "const r=(v.default||v)(d,{checkPaths:false,checkArn:true});"
        "console.log(JSON.stringify({valid:r.isValid,errors:r.errorsText()}))"
    )
    result = subprocess.run(
        ["node", "-e", script, VALIDATOR],
        input=json.dumps(definition),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_both_flows_deploy_to_step_functions(s3, tmp_path):
    import boto3

    profile = provision("cxr-sfn")  # deploying needs no metadata service once its version check is off
    env = {**os.environ, **profile, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path),
           "METAFLOW_SERVICE_VERSION_CHECK": "0"}  # fmt: skip
    for flow in ("train_flow.py", "monitor_flow.py"):
        result = subprocess.run(
            [sys.executable, str(REPO / "flows" / flow), "--no-pylint", "step-functions", "create"],
            env={**env, "CXR_TRAIN_SCHEDULE": "0 3 ? * SUN *", "CXR_CAPTURE": "s3://cxr-sfn/capture"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    sfn = boto3.client("stepfunctions")
    machines = {m["name"]: m["stateMachineArn"] for m in sfn.list_state_machines()["stateMachines"]}
    assert {"CXRTrainFlow", "CXRMonitorFlow"} <= set(machines)
    definitions = {
        n: json.loads(sfn.describe_state_machine(stateMachineArn=a)["definition"])
        for n, a in machines.items()
    }
    train = definitions["CXRTrainFlow"]["States"]["train"]["Parameters"]
    requirements = {r["Type"]: r["Value"] for r in train["ContainerOverrides"]["ResourceRequirements"]}
    assert requirements["GPU"] == "1" and requirements["VCPU"] == "8" and train["JobQueue"] == "cxr-gpu-queue"
    assert "#preprocess" in definitions["CXRTrainFlow"]["States"]  # the foreach over shards is a Map state
    for name, definition in definitions.items():
        verdict = validate_asl(definition)
        assert verdict["valid"], (name, verdict["errors"])

    events = boto3.client("events")
    rule = events.describe_rule(Name="CXRMonitorFlow")
    assert (
        rule["ScheduleExpression"] == "cron(0 0 * * ? *)" and rule["State"] == "ENABLED"
    )  # @schedule(daily=True)
    targets = events.list_targets_by_rule(Rule="CXRMonitorFlow")["Targets"]
    assert targets and targets[0]["Arn"] == machines["CXRMonitorFlow"]
    assert events.describe_rule(Name="CXRTrainFlow")["ScheduleExpression"] == "cron(0 3 ? * SUN *)"  # weekly
    # the scheduled monitor reads the capture prefix given at deploy time
    assert "s3://cxr-sfn/capture" in json.dumps(definitions["CXRMonitorFlow"])
    assert events.list_targets_by_rule(Rule="CXRTrainFlow")["Targets"][0]["Arn"] == machines["CXRTrainFlow"]

    environment = {e["Name"]: e.get("Value") for e in train["ContainerOverrides"]["Environment"]}
    assert environment["METAFLOW_DEFAULT_METADATA"] == "service"  # scheduled runs show in the Metaflow UI
    assert environment["METAFLOW_SERVICE_URL"] == profile["METAFLOW_SERVICE_INTERNAL_URL"]  # from the VPC
    bucket, key = environment["METAFLOW_CODE_URL"].removeprefix("s3://").split("/", 1)
    body = io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    with tarfile.open(fileobj=body) as package:
        names = set(package.getnames())
    assert {"train_flow.py", "cxr/model.py", "cxr/serve/app.py", "cxr/monitor/checks.py"} <= names, sorted(
        names
    )[:20]
