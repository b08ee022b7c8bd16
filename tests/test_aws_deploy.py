"""SageMaker deployment: staging → smoke test → approval → production, A/B, guardrails, rollback.

Endpoints, configs, models, alarms, scaling and weights run against the AWS API server on loopback.
The server implements neither UpdateEndpoint nor real invocations, so those two paths use botocore's
Stubber, which checks every request and response against the real API model.
"""

import base64
import datetime as dt
import io
import json
import os
import subprocess
import sys
import time

import boto3
import cv2
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from cxr.aws import deploy as dp
from cxr.aws import endpoints as ep
from cxr.data.findings import FINDINGS
from cxr.registry import Registry

from .conftest import free_port, script_invocations
from .serving_support import LiveServer, dicom_bytes, make_package

BUCKET = "cxr-deploy"
ROLE = "arn:aws:iam::123456789012:role/cxr-sagemaker-execution"
CREDENTIALS = dict(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")


def answer(probability=0.2, content_type="application/json"):
    """An invoke_endpoint response in the cxr server's schema."""
    body = json.dumps({"predictions": [{"probabilities": dict.fromkeys(FINDINGS, probability)}]}).encode()
    return {"Body": StreamingBody(io.BytesIO(body), len(body)), "ContentType": content_type}


@pytest.fixture
def setup(s3, tmp_path):
    """Moto clients, a stubbed runtime client, a bucket, and a registry with versions 1 (production) and 2."""
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    runtime = boto3.client("sagemaker-runtime", **CREDENTIALS)
    clients = dp.Clients(
        boto3.client("sagemaker"), runtime, boto3.client("application-autoscaling"),
        boto3.client("cloudwatch"), s3,
    )  # fmt: skip
    registry = Registry(tmp_path / "registry", group="demo")
    for n in (1, 2):
        registry.register({"model.tar.gz": f"model {n}".encode()}, {"mean_auroc": 0.8 + n / 100}, {"run": n})
    registry.approve(1)
    name = f"cxr-{time.time_ns() % 10**9}"  # endpoints live on the shared server: unique per test
    return clients, registry, name


def settings(name, **overrides):
    return ep.EndpointSettings.from_dict({"name": name, "role_arn": ROLE, "poll_seconds": 0, **overrides})


def test_serverless_release_through_staging_is_idempotent(setup):
    clients, registry, name = setup
    with Stubber(clients.runtime) as runtime:
        expected = {"EndpointName": f"{name}-staging", "ContentType": "image/png",
                    "Accept": "application/json", "Body": dp.smoke_image()}  # fmt: skip
        runtime.add_response("invoke_endpoint", answer(), expected)
        runtime.add_response("invoke_endpoint", answer(), None)
        report = dp.release(
            clients, settings(name, capture=f"s3://{BUCKET}/capture"), registry, 1, f"s3://{BUCKET}/deploy"
        )
        runtime.assert_no_pending_responses()
    assert report.smoke.passed and report.production_smoke.passed and report.approved
    assert report.staging.action == "created" and [d.action for d in report.production] == ["created"]
    sm = clients.sagemaker
    endpoint = sm.describe_endpoint(EndpointName=name)
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 4096, "MaxConcurrency": 10}
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == f"s3://{BUCKET}/deploy/models/demo/1/model.tar.gz"
    assert (
        model["PrimaryContainer"]["Environment"]["CXR_CAPTURE"] == f"s3://{BUCKET}/capture"
    )  # container capture
    head = clients.s3.head_object(Bucket=BUCKET, Key="deploy/models/demo/1/model.tar.gz")
    assert head["ServerSideEncryption"] == "AES256"
    with pytest.raises(Exception, match="Could not find endpoint"):
        sm.describe_endpoint(EndpointName=f"{name}-staging")  # staging torn down after the release
    assert ep.history(sm, endpoint["EndpointArn"]) == [endpoint["EndpointConfigName"]]
    assert registry.get(1).status == "production"

    configs_before = len(sm.list_endpoint_configs(MaxResults=100)["EndpointConfigs"])
    with Stubber(clients.runtime):  # no invocation expected: nothing is redeployed
        again = dp.release(
            clients, settings(name, capture=f"s3://{BUCKET}/capture"), registry, 1, f"s3://{BUCKET}/deploy"
        )
    assert [d.action for d in again.production] == ["unchanged"] and "nothing changed" in again.message
    assert len(sm.list_endpoint_configs(MaxResults=100)["EndpointConfigs"]) == configs_before
    assert sm.describe_endpoint(EndpointName=name)["EndpointConfigName"] == endpoint["EndpointConfigName"]


def test_unapproved_or_failing_versions_never_reach_production(setup):
    clients, registry, name = setup
    with Stubber(clients.runtime) as runtime:
        runtime.add_response("invoke_endpoint", answer(), None)
        report = dp.release(clients, settings(name), registry, 2, f"s3://{BUCKET}/deploy")
    assert report.smoke.passed and not report.approved and not report.production
    assert "approve" in report.message and registry.get(2).status == "candidate"
    assert ep.describe(clients.sagemaker, name) is None  # production was never touched

    with Stubber(clients.runtime) as runtime:  # the model answers garbage: the smoke test catches it
        runtime.add_response("invoke_endpoint", answer(probability=1.7), None)
        with pytest.raises(ep.DeployError, match=r"smoke test .* outside \[0, 1\].*production unchanged"):
            dp.release(clients, settings(name), registry, 2, f"s3://{BUCKET}/deploy", approve=True)
    assert ep.describe(clients.sagemaker, name) is None and registry.get(2).status == "candidate"

    # staging fine, production answers garbage: the new endpoint is removed
    with Stubber(clients.runtime) as runtime:
        runtime.add_response("invoke_endpoint", answer(), None)
        runtime.add_response("invoke_endpoint", answer(content_type="text/html"), None)
        with pytest.raises(ep.DeployError, match=f"content type 'text/html'.*new endpoint {name} removed"):
            dp.release(clients, settings(name), registry, 2, f"s3://{BUCKET}/deploy", approve=True)
    assert ep.describe(clients.sagemaker, name) is None and registry.get(2).status == "candidate"
    assert not clients.cloudwatch.describe_alarms(AlarmNamePrefix=f"{name}-A-")["MetricAlarms"]


def test_realtime_ab_variants_scaling_alarms_capture_and_weights(setup):
    clients, registry, name = setup
    options = dict(
        mode="realtime",
        capture=f"s3://{BUCKET}/capture",
        kms_key_id="alias/cxr",
        instance_type="ml.g4dn.xlarge",
    )
    with Stubber(clients.runtime) as runtime:
        runtime.add_response("invoke_endpoint", answer(), None)
        expected = {"EndpointName": name, "ContentType": "image/png", "Accept": "application/json",
                    "Body": dp.smoke_image(), "TargetVariant": "A"}  # fmt: skip
        runtime.add_response("invoke_endpoint", answer(), expected)
        report = dp.release(
            clients, settings(name, **options), registry, 1, f"s3://{BUCKET}/deploy",
            challenger=2, weights={"A": 0.9, "B": 0.1},
        )  # fmt: skip
    sm = clients.sagemaker
    config = sm.describe_endpoint_config(EndpointConfigName=report.production[0].config)
    variants = {v["VariantName"]: v for v in config["ProductionVariants"]}
    assert {v: variants[v]["InitialVariantWeight"] for v in variants} == {"A": 0.9, "B": 0.1}
    assert variants["A"]["InstanceType"] == "ml.g4dn.xlarge" and variants["B"]["InitialInstanceCount"] == 1
    assert "-v1-" in variants["A"]["ModelName"] and "-v2-" in variants["B"]["ModelName"]
    capture = config["DataCaptureConfig"]  # AWS's image: SageMaker captures, but never a request body
    assert capture["DestinationS3Uri"] == f"s3://{BUCKET}/capture" and capture["KmsKeyId"] == "alias/cxr"
    assert capture["CaptureOptions"] == [{"CaptureMode": "Output"}]
    assert config["KmsKeyId"] == "alias/cxr"

    targets = clients.autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    mine = {
        t["ResourceId"]: (t["MinCapacity"], t["MaxCapacity"])
        for t in targets
        if name + "/" in t["ResourceId"]
    }
    assert mine == {f"endpoint/{name}/variant/A": (1, 4), f"endpoint/{name}/variant/B": (1, 4)}
    policies = clients.autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    tracking = [
        p["TargetTrackingScalingPolicyConfiguration"] for p in policies if name + "/" in p["ResourceId"]
    ]
    assert len(tracking) == 2 and tracking[0]["TargetValue"] == 200.0
    assert (
        tracking[0]["PredefinedMetricSpecification"]["PredefinedMetricType"]
        == "SageMakerVariantInvocationsPerInstance"
    )
    alarms = clients.cloudwatch.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"]
    assert sorted(a["AlarmName"] for a in alarms) == sorted(report.production[0].alarms) and len(alarms) == 4
    latency = next(a for a in alarms if a["AlarmName"] == f"{name}-B-latency")
    assert latency["ExtendedStatistic"] == "p99" and latency["Threshold"] == 2_000_000.0

    assert ep.set_weights(sm, name, {"A": 0.5, "B": 0.5}) == {"A": 0.5, "B": 0.5}
    described = sm.describe_endpoint(EndpointName=name)["ProductionVariants"]
    assert {v["VariantName"]: v["CurrentWeight"] for v in described} == {"A": 0.5, "B": 0.5}


def test_serverless_ab_is_two_endpoints_behind_the_gateway(setup):
    clients, registry, name = setup
    with Stubber(clients.runtime) as runtime:
        runtime.add_response("invoke_endpoint", answer(), None)
        runtime.add_response("invoke_endpoint", answer(), None)
        report = dp.release(clients, settings(name), registry, 1, f"s3://{BUCKET}/deploy", challenger=2,
                            weights={"A": 0.8, "B": 0.2})  # fmt: skip
    assert [d.endpoint for d in report.production] == [name, f"{name}-b"]
    assert f"cxr gateway --endpoint A={name} --endpoint B={name}-b --weights A=0.8,B=0.2" in report.message
    for endpoint, version in ((name, 1), (f"{name}-b", 2)):
        config = clients.sagemaker.describe_endpoint_config(
            EndpointConfigName=clients.sagemaker.describe_endpoint(EndpointName=endpoint)[
                "EndpointConfigName"
            ]
        )
        assert (
            len(config["ProductionVariants"]) == 1
            and f"-v{version}-" in config["ProductionVariants"][0]["ModelName"]
        )


NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ARN = "arn:aws:sagemaker:us-east-1:123456789012:endpoint/cxr"


def endpoint_state(status, config, reason=None):
    state = {"EndpointName": "cxr", "EndpointArn": ARN, "EndpointConfigName": config,
             "EndpointStatus": status, "CreationTime": NOW, "LastModifiedTime": NOW}  # fmt: skip
    return {**state, "FailureReason": reason} if reason else state


def config_state(name, model):
    variant = {
        "VariantName": "A",
        "ModelName": model,
        "InstanceType": "ml.g4dn.xlarge",
        "InitialInstanceCount": 1,
    }
    return {"EndpointConfigName": name, "EndpointConfigArn": f"{ARN}-config/{name}",
            "ProductionVariants": [variant], "CreationTime": NOW}  # fmt: skip


def test_blue_green_update_with_canary_and_alarm_rollback():
    sm = boto3.client("sagemaker", **CREDENTIALS)
    canary = ep.deployment_config(settings("cxr", mode="realtime"), ["cxr-A-5xx", "cxr-A-latency"])
    with Stubber(sm) as stub:
        stub.add_response("describe_endpoint", endpoint_state("InService", "old"), {"EndpointName": "cxr"})
        stub.add_response(
            "describe_endpoint_config", config_state("old", "m1"), {"EndpointConfigName": "old"}
        )
        stub.add_response(
            "describe_endpoint_config", config_state("new", "m2"), {"EndpointConfigName": "new"}
        )
        update = {"EndpointName": "cxr", "EndpointConfigName": "new", "DeploymentConfig": canary}
        stub.add_response("update_endpoint", {"EndpointArn": ARN}, update)
        stub.add_response("describe_endpoint", endpoint_state("Updating", "old"), {"EndpointName": "cxr"})
        stub.add_response("describe_endpoint", endpoint_state("InService", "new"), {"EndpointName": "cxr"})
        assert ep.apply_endpoint(sm, "cxr", "new", canary) == "updated"
        assert ep.wait_for_endpoint(sm, "cxr", "new", poll_seconds=0)["EndpointConfigName"] == "new"
        stub.assert_no_pending_responses()
    routing = canary["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert routing == {
        "Type": "CANARY",
        "WaitIntervalInSeconds": 300,
        "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10},
    }
    assert canary["AutoRollbackConfiguration"]["Alarms"] == [
        {"AlarmName": "cxr-A-5xx"},
        {"AlarmName": "cxr-A-latency"},
    ]
    linear = ep.deployment_config(settings("cxr", mode="realtime", traffic="linear"), [])
    assert linear["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["LinearStepSize"]["Value"] == 25

    with Stubber(sm) as stub:  # the canary trips an alarm: SageMaker rolls back, the old fleet keeps serving
        stub.add_response("describe_endpoint", endpoint_state("RollingBack", "old"), {"EndpointName": "cxr"})
        rolled_back = endpoint_state("InService", "old", "Alarm cxr-A-5xx in ALARM state")
        stub.add_response("describe_endpoint", rolled_back, {"EndpointName": "cxr"})
        with pytest.raises(ep.DeployError, match=r"rolled back .*cxr-A-5xx.*old is still serving"):
            ep.wait_for_endpoint(sm, "cxr", "new", poll_seconds=0)


def test_rollback_is_one_call_to_the_previous_config(tmp_path):
    sm = boto3.client("sagemaker", **CREDENTIALS)
    clients = dp.Clients(sm, None, None, None, None)
    registry = Registry(tmp_path, group="demo")
    for _ in (1, 2):
        registry.register({"model.tar.gz": b"m"}, {"mean_auroc": 0.8}, {})
    registry.approve(2)
    routing = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    fast = {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": routing, "TerminationWaitInSeconds": 0}}
    with Stubber(sm) as stub:
        stub.add_response("describe_endpoint", endpoint_state("InService", "cfg-v2"), {"EndpointName": "cxr"})
        stub.add_response(
            "list_tags", {"Tags": [{"Key": "cxr:history", "Value": "cfg-v1 cfg-v2"}]}, {"ResourceArn": ARN}
        )
        update = {"EndpointName": "cxr", "EndpointConfigName": "cfg-v1", "DeploymentConfig": fast}
        stub.add_response("update_endpoint", {"EndpointArn": ARN}, update)
        stub.add_response("describe_endpoint", endpoint_state("InService", "cfg-v1"), {"EndpointName": "cxr"})
        stub.add_response(
            "add_tags",
            {"Tags": []},
            {"ResourceArn": ARN, "Tags": [{"Key": "cxr:history", "Value": "cfg-v1"}]},
        )
        stub.add_response("describe_endpoint_config", config_state("cfg-v1", "cxr-demo-v1-0123456789"),
                          {"EndpointConfigName": "cfg-v1"})  # fmt: skip
        done = dp.rollback(clients, settings("cxr", mode="realtime"), "cxr", registry)
        stub.assert_no_pending_responses()
    assert done.action == "rolled back" and done.config == "cfg-v1"
    assert registry.production().version == 1 and registry.get(2).status == "archived"

    with Stubber(sm) as stub:  # nothing earlier to go back to: a clear error, nothing touched
        stub.add_response("describe_endpoint", endpoint_state("InService", "cfg-v1"), {"EndpointName": "cxr"})
        stub.add_response(
            "list_tags", {"Tags": [{"Key": "cxr:history", "Value": "cfg-v1"}]}, {"ResourceArn": ARN}
        )
        with pytest.raises(ep.DeployError, match="no earlier deployment"):
            dp.rollback(clients, settings("cxr"), "cxr")


def test_settings_are_validated():
    with pytest.raises(ep.DeployError, match="serverless or realtime"):
        settings("cxr", mode="batch")
    with pytest.raises(ep.DeployError, match="role_arn"):
        ep.EndpointSettings.from_dict({"name": "cxr"})
    with pytest.raises(ep.DeployError, match="unknown endpoint settings"):
        settings("cxr", memory=4096)
    name = ep.resource_name("cxr", "chestx-ray14-v12", digest_of={"a": 1})
    assert len(name) <= 63 and name.startswith("cxr-chestx-ray14-v12-")


def test_cli_release_shift_weights_and_status(s3, s3_server, tmp_path):
    """`cxr deploy` end to end on the loopback server; its scripted InvokeEndpoint answers the smoke tests."""
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    registry = Registry(group="demo")  # under $CXR_HOME, where the command looks
    for n in (1, 2):
        registry.register({"model.tar.gz": f"model {n}".encode()}, {"mean_auroc": 0.8}, {"run": n})
    name = f"cxr-cli-{time.time_ns() % 10**9}"
    config = tmp_path / "deploy.yaml"
    config.write_text(
        "registry: {backend: local, group: demo}\n"
        f"artifacts: s3://{BUCKET}/deploy\n"
        f"endpoint: {{name: {name}, mode: realtime, role_arn: '{ROLE}', poll_seconds: 0}}\n"
        # JSON: the loopback server's InvokeEndpoint cannot take binary bodies
        "smoke: {latency_budget_ms: 60000, content_type: application/json}\n"
    )
    body = json.loads(answer()["Body"].read())
    result = {"Body": json.dumps(body), "ContentType": "application/json", "InvokedProductionVariant": "A",
              "CustomAttributes": ""}  # fmt: skip
    script_invocations(s3_server, result, result)  # staging, production

    def cxr(*args):
        done = subprocess.run([sys.executable, "-m", "cxr.cli", "deploy", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = cxr("release", "--version", "1", "--challenger", "2", "--weights", "A=0.9,B=0.1", "--approve")
    assert f"version 1 in production: {name} created" in out
    assert json.loads(cxr("weights", "--weights", "A=0.5,B=0.5")) == {"A": 0.5, "B": 0.5}
    status = json.loads(cxr("status"))
    assert status["status"] == "InService" and len(status["history"]) == 1
    assert {v["VariantName"]: v["CurrentWeight"] for v in status["variants"]} == {"A": 0.5, "B": 0.5}
    assert registry.production().version == 1


def test_busy_or_failed_endpoints_are_not_updated():
    sm = boto3.client("sagemaker", **CREDENTIALS)
    with Stubber(sm) as stub:  # no UpdateEndpoint is queued: calling it would fail the test
        stub.add_response("describe_endpoint", endpoint_state("Updating", "old"), {"EndpointName": "cxr"})
        with pytest.raises(ep.DeployError, match="is Updating; wait for it"):
            ep.apply_endpoint(sm, "cxr", "new", None)
        failed = endpoint_state("Failed", "old", "CannotStartContainerError")
        stub.add_response("describe_endpoint", failed, {"EndpointName": "cxr"})
        with pytest.raises(ep.DeployError, match=r"CannotStartContainerError.*delete-endpoint"):
            ep.apply_endpoint(sm, "cxr", "new", None)


def test_realtime_capture_with_the_cxr_image_holds_no_patient_data(setup, nih_root, tmp_path):
    """Real-time with the cxr image: no SageMaker-native capture (it stores raw requests); the container,
    run with the environment the deploy gave its model, captures a DICOM request without any patient tag."""
    clients, registry, name = setup
    key = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
    options = dict(mode="realtime", capture=f"s3://{BUCKET}/capture-{name}", kms_key_id=key,
                   image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/cxr:latest")  # fmt: skip
    with Stubber(clients.runtime) as runtime:
        runtime.add_response("invoke_endpoint", answer(), None)
        runtime.add_response("invoke_endpoint", answer(), None)
        report = dp.release(clients, settings(name, **options), registry, 1, f"s3://{BUCKET}/deploy",
                            challenger=2, weights={"A": 0.9, "B": 0.1})  # fmt: skip
    sm = clients.sagemaker
    config = sm.describe_endpoint_config(EndpointConfigName=report.production[0].config)
    assert not config.get("DataCaptureConfig")  # the server answers {} for none
    models = [sm.describe_model(ModelName=v["ModelName"]) for v in config["ProductionVariants"]]
    environments = [m["PrimaryContainer"]["Environment"] for m in models]
    assert len(environments) == 2 and all(
        e["CXR_CAPTURE"] == options["capture"]
        and e["CXR_KMS_KEY_ID"] == key
        and e["CXR_ENDPOINT_NAME"] == name
        for e in environments
    )

    package, _, _ = make_package(tmp_path / "package", nih_root)
    aws = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    live = LiveServer(free_port(), "--model", str(package), env={**aws, "AWS_DEFAULT_REGION": "us-east-1",
                                                                 **environments[0]})  # fmt: skip
    pixels = cv2.imread(
        str(sorted((nih_root / "images_001" / "images").glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE
    )
    status = live.post(dicom_bytes(pixels), "application/dicom")[0]
    live.stop()
    assert status == 200
    listed = clients.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"capture-{name}/{name}/")["Contents"]
    objects = [clients.s3.get_object(Bucket=BUCKET, Key=o["Key"]) for o in listed]
    assert objects and all(
        o["ServerSideEncryption"] == "aws:kms" and o["SSEKMSKeyId"] == key for o in objects
    )
    records = [json.loads(line) for o in objects for line in o["Body"].read().splitlines()]
    assert len(records) == 1
    captured = records[0]["captureData"]["endpointInput"]
    assert captured["observedContentType"] == "image/png"
    everything = json.dumps(records).encode() + base64.b64decode(captured["data"])
    for secret in (b"PID-SECRET-4242", b"Doe^Jane"):
        assert secret not in everything
