"""SageMaker endpoints through boto3: models, endpoint configs, create/update with guardrails, scaling.

Everything is named from its content (model from its artifact, endpoint config from its request), so
re-running a deployment with the same model and settings finds everything in place and changes nothing.
Updates of a live endpoint are blue/green: SageMaker keeps the old fleet serving until the new one is
healthy, shifts traffic canary/linear/all-at-once, and rolls back on its own when a CloudWatch alarm
fires; `wait_for_endpoint` reports such a rollback as a failed deploy with the old config still serving.
Each endpoint keeps its deployment history in a tag, which is what one-command rollback reads.

Capture never stores a request as sent (a DICOM carries its patient's tags; a PNG can carry text chunks).
The cxr image captures in the container (`CXR_CAPTURE`): the decoded image re-encoded as PNG, the output,
the monitoring features and the status, on serverless and real-time endpoints alike, with SageMaker's
own Data Capture off (it would record every request twice). With AWS's image, which cannot capture,
real-time endpoints use SageMaker's Data Capture for the output only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from cxr.s3sync import KMS_KEY_ENV

log = logging.getLogger(__name__)

DEFAULT_IMAGE = (
    "763104351884.dkr.ecr.{region}.amazonaws.com/pytorch-inference:2.5.1-cpu-py311-ubuntu22.04-sagemaker"
)
HISTORY_TAG = "cxr:history"
HISTORY_LENGTH = 4  # 4 names of ≤63 characters fit a tag value (256)
_NAME = re.compile(r"[^a-zA-Z0-9-]+")


class DeployError(RuntimeError):
    """A deployment did not reach the desired state; the message says what is serving now."""


@dataclass
class EndpointSettings:
    """How endpoints are deployed (the `endpoint:` section of config/deploy.yaml)."""

    name: str = "cxr"
    mode: str = "serverless"  # serverless | realtime
    role_arn: str = ""
    region: str = "us-east-1"
    image_uri: str | None = None  # the cxr serving image, or AWS's PyTorch inference container
    # serverless
    memory_mb: int = 4096
    max_concurrency: int = 10
    provisioned_concurrency: int | None = None
    # real-time
    instance_type: str = "ml.g4dn.xlarge"
    instance_count: int = 1
    min_instances: int = 1
    max_instances: int = 4
    invocations_per_instance: float = 200.0  # target of the scaling policy (per minute)
    scale_in_cooldown: int = 300
    scale_out_cooldown: int = 60
    # guardrails for updates
    traffic: str = "canary"  # canary | linear | all_at_once
    canary_percent: int = 10
    linear_percent: int = 25
    wait_seconds: int = 300  # between traffic steps
    bake_seconds: int = 600  # old fleet kept after the full shift, for a fast rollback
    latency_alarm_ms: float = 2000.0  # p99 model latency that trips the rollback alarm
    # capture and encryption
    capture: str | None = None  # s3:// prefix
    capture_percent: int = 100
    kms_key_id: str | None = None
    poll_seconds: float = 15.0
    timeout_minutes: float = 90.0
    tags: dict[str, str] = field(default_factory=lambda: {"project": "cxr"})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EndpointSettings:
        """From a config mapping; unknown keys and bad modes are rejected with a clear message."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise DeployError(f"unknown endpoint settings {unknown}")
        settings = cls(**{k: v for k, v in values.items() if v is not None})
        if settings.mode not in ("serverless", "realtime"):
            raise DeployError(f"endpoint mode must be serverless or realtime, not {settings.mode!r}")
        if settings.traffic not in ("canary", "linear", "all_at_once"):
            raise DeployError(f"traffic must be canary, linear or all_at_once, not {settings.traffic!r}")
        if not settings.role_arn:
            raise DeployError("endpoint.role_arn (the SageMaker execution role) is required")
        return settings

    @property
    def image(self) -> str:
        """The serving image."""
        return self.image_uri or DEFAULT_IMAGE.format(region=self.region)

    @property
    def container_captures(self) -> bool:
        """Whether the container captures its traffic: the cxr image (`image_uri`) does, on any endpoint.
        Serverless endpoints have no other capture, so there it is asked of any image."""
        return bool(self.capture) and (bool(self.image_uri) or self.mode == "serverless")


def resource_name(*parts: str, digest_of: Any = None) -> str:
    """A valid SageMaker name (≤63 of [a-zA-Z0-9-]) from parts, plus a content digest when given."""
    name = "-".join(_NAME.sub("-", str(p)).strip("-") for p in parts if p)
    if digest_of is None:
        return name[:63].strip("-")
    digest = hashlib.sha256(json.dumps(digest_of, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{name[: 62 - len(digest)].strip('-')}-{digest}"


def _exists(call: Any, **kwargs: Any) -> bool:
    from botocore.exceptions import ClientError

    try:
        call(**kwargs)
        return True
    except ClientError as error:
        if error.response["Error"]["Code"] in ("ValidationException", "ResourceNotFound"):
            return False
        raise


def model_request(
    settings: EndpointSettings, model_data_url: str, label: str, endpoint: str
) -> dict[str, Any]:
    """The CreateModel request for an artifact, named from its content (image, artifact, environment)."""
    environment = {
        "SAGEMAKER_PROGRAM": "inference.py",
        "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
        "CXR_ENDPOINT_NAME": endpoint,
    }
    if settings.container_captures:
        environment["CXR_CAPTURE"] = str(settings.capture)
        if settings.kms_key_id:
            environment[KMS_KEY_ENV] = settings.kms_key_id
    container = {"Image": settings.image, "ModelDataUrl": model_data_url, "Environment": environment}
    return {
        "ModelName": resource_name("cxr", label, digest_of=container),
        "PrimaryContainer": container,
        "ExecutionRoleArn": settings.role_arn,
        "Tags": _tags(settings),
    }


def ensure_model(sm: Any, request: dict[str, Any]) -> str:
    """Create the model unless one with this (content-derived) name exists."""
    name = str(request["ModelName"])
    if not _exists(sm.describe_model, ModelName=name):
        sm.create_model(**request)
    return name


def production_variant(settings: EndpointSettings, variant: str, model: str, weight: float) -> dict[str, Any]:
    """One production variant: serverless (memory, concurrency) or instances (type, count, weight)."""
    spec: dict[str, Any] = {"VariantName": variant, "ModelName": model, "InitialVariantWeight": float(weight)}
    if settings.mode == "serverless":
        serverless: dict[str, Any] = {
            "MemorySizeInMB": settings.memory_mb,
            "MaxConcurrency": settings.max_concurrency,
        }
        if settings.provisioned_concurrency:
            serverless["ProvisionedConcurrency"] = settings.provisioned_concurrency
        spec["ServerlessConfig"] = serverless
    else:
        spec.update(InstanceType=settings.instance_type, InitialInstanceCount=settings.instance_count)
    return spec


def endpoint_config_request(
    settings: EndpointSettings, endpoint: str, variants: list[dict[str, Any]]
) -> dict[str, Any]:
    """The CreateEndpointConfig request, named from its content (capture and KMS on real-time)."""
    request: dict[str, Any] = {"ProductionVariants": variants}
    if settings.mode == "realtime":
        capture = native_capture(settings)
        if capture:
            request["DataCaptureConfig"] = capture
        if settings.kms_key_id:
            request["KmsKeyId"] = settings.kms_key_id
    request["EndpointConfigName"] = resource_name(endpoint, digest_of=request)
    request["Tags"] = _tags(settings)
    return request


def native_capture(settings: EndpointSettings) -> dict[str, Any] | None:
    """SageMaker's Data Capture for a real-time endpoint, or None: output only, and only for AWS's image.

    It stores request bodies as sent, patient tags and all, so it never captures input; the cxr image
    captures de-identified input itself (see the module's docstring)."""
    if not settings.capture or settings.mode != "realtime" or settings.container_captures:
        return None
    log.warning(
        "AWS's inference image cannot capture de-identified inputs: capturing outputs only to %s (no input "
        "features for the monitor); set endpoint.image_uri to the cxr image to capture inputs too",
        settings.capture,
    )
    capture: dict[str, Any] = {
        "EnableCapture": True,
        "InitialSamplingPercentage": settings.capture_percent,
        "DestinationS3Uri": settings.capture,
        "CaptureOptions": [{"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
    }
    if settings.kms_key_id:
        capture["KmsKeyId"] = settings.kms_key_id
    return capture


def ensure_endpoint_config(sm: Any, request: dict[str, Any]) -> str:
    """Create the endpoint config unless one with this (content-derived) name exists."""
    name = str(request["EndpointConfigName"])
    if not _exists(sm.describe_endpoint_config, EndpointConfigName=name):
        sm.create_endpoint_config(**request)
    return name


def deployment_config(settings: EndpointSettings, alarms: list[str]) -> dict[str, Any]:
    """Blue/green update policy: canary, linear or all at once, baking, auto-rollback on the alarms."""
    routing: dict[str, Any] = {
        "Type": settings.traffic.upper(),
        "WaitIntervalInSeconds": settings.wait_seconds,
    }
    if settings.traffic == "canary":
        routing["CanarySize"] = {"Type": "CAPACITY_PERCENT", "Value": settings.canary_percent}
    elif settings.traffic == "linear":
        routing["LinearStepSize"] = {"Type": "CAPACITY_PERCENT", "Value": settings.linear_percent}
    else:
        routing = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    policy = {"TrafficRoutingConfiguration": routing, "TerminationWaitInSeconds": settings.bake_seconds}
    config: dict[str, Any] = {"BlueGreenUpdatePolicy": policy}
    if alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in alarms]}
    return config


def ensure_alarms(
    cloudwatch: Any, settings: EndpointSettings, endpoint: str, variants: list[str]
) -> list[str]:
    """CloudWatch alarms that roll an update back: any 5xx from the model, or p99 latency over budget."""
    names = []
    for variant in variants:
        dimensions = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]
        common = {
            "Namespace": "AWS/SageMaker",
            "Dimensions": dimensions,
            "Period": 60,
            "TreatMissingData": "notBreaching",
        }
        errors = f"{endpoint}-{variant}-5xx"
        cloudwatch.put_metric_alarm(
            AlarmName=errors, MetricName="Invocation5XXErrors", Statistic="Sum", Threshold=1.0,
            ComparisonOperator="GreaterThanOrEqualToThreshold", EvaluationPeriods=1, **common,
        )  # fmt: skip
        latency = f"{endpoint}-{variant}-latency"
        cloudwatch.put_metric_alarm(
            AlarmName=latency, MetricName="ModelLatency", ExtendedStatistic="p99",
            Threshold=settings.latency_alarm_ms * 1000.0,  # ModelLatency is in microseconds
            ComparisonOperator="GreaterThanThreshold", EvaluationPeriods=3, DatapointsToAlarm=2, **common,
        )  # fmt: skip
        names += [errors, latency]
    return names


def describe(sm: Any, endpoint: str) -> dict[str, Any] | None:
    """DescribeEndpoint, or None when the endpoint does not exist."""
    from botocore.exceptions import ClientError

    try:
        return dict(sm.describe_endpoint(EndpointName=endpoint))
    except ClientError as error:
        if error.response["Error"]["Code"] == "ValidationException":
            return None
        raise


def apply_endpoint(sm: Any, endpoint: str, config_name: str, deployment: dict[str, Any] | None) -> str:
    """Create the endpoint, update it (blue/green), or leave it; returns created|updated|unchanged."""
    current = describe(sm, endpoint)
    if current is None:
        sm.create_endpoint(EndpointName=endpoint, EndpointConfigName=config_name, Tags=[])
        return "created"
    if current["EndpointConfigName"] == config_name and current["EndpointStatus"] == "InService":
        return "unchanged"
    if current["EndpointStatus"] == "Failed":  # SageMaker cannot update a failed endpoint
        raise DeployError(
            f"endpoint {endpoint} failed ({current.get('FailureReason', 'no reason given')}); delete it "
            f"(aws sagemaker delete-endpoint --endpoint-name {endpoint}) and deploy again"
        )
    if current["EndpointStatus"] != "InService":
        raise DeployError(
            f"endpoint {endpoint} is {current['EndpointStatus']}; wait for it, then deploy again"
        )
    same_variants = _variant_names(sm, current["EndpointConfigName"]) == _variant_names(sm, config_name)
    extra = {"DeploymentConfig": deployment} if deployment and same_variants else {}
    sm.update_endpoint(EndpointName=endpoint, EndpointConfigName=config_name, **extra)
    return "updated"


def _variant_names(sm: Any, config_name: str) -> list[str]:
    config = sm.describe_endpoint_config(EndpointConfigName=config_name)
    return sorted(v["VariantName"] for v in config["ProductionVariants"])


def wait_for_endpoint(
    sm: Any, endpoint: str, config_name: str, poll_seconds: float = 15.0, timeout_minutes: float = 90.0
) -> dict[str, Any]:
    """Wait until the endpoint serves `config_name`; a rollback or failure raises DeployError."""
    deadline = time.monotonic() + timeout_minutes * 60
    with tqdm(desc=endpoint, bar_format="{desc} [{elapsed}]") as bar:
        while True:
            state = sm.describe_endpoint(EndpointName=endpoint)
            status = state["EndpointStatus"]
            bar.set_description_str(f"{endpoint}: {status}")
            if status in ("InService", "Failed", "UpdateRollbackFailed"):
                break
            if time.monotonic() > deadline:
                raise DeployError(f"endpoint {endpoint} still {status} after {timeout_minutes} minutes")
            time.sleep(poll_seconds)
    reason = state.get("FailureReason", "no reason given")
    if status != "InService":
        raise DeployError(f"endpoint {endpoint} is {status}: {reason}")
    if state["EndpointConfigName"] != config_name:
        raise DeployError(
            f"update of {endpoint} to {config_name} was rolled back ({reason}); "
            f"{state['EndpointConfigName']} is still serving"
        )
    return dict(state)


def configure_autoscaling(
    autoscaling: Any, settings: EndpointSettings, endpoint: str, variants: list[str]
) -> None:
    """Target tracking on invocations per instance, per real-time variant (idempotent)."""
    for variant in variants:
        resource = f"endpoint/{endpoint}/variant/{variant}"
        dimension = "sagemaker:variant:DesiredInstanceCount"
        autoscaling.register_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=dimension,
            MinCapacity=settings.min_instances, MaxCapacity=settings.max_instances,
        )  # fmt: skip
        autoscaling.put_scaling_policy(
            PolicyName=f"{endpoint}-{variant}-invocations", ServiceNamespace="sagemaker",
            ResourceId=resource, ScalableDimension=dimension, PolicyType="TargetTrackingScaling",
            TargetTrackingScalingPolicyConfiguration={
                "TargetValue": settings.invocations_per_instance,
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
                },
                "ScaleInCooldown": settings.scale_in_cooldown,
                "ScaleOutCooldown": settings.scale_out_cooldown,
            },
        )  # fmt: skip


def set_weights(sm: Any, endpoint: str, weights: dict[str, float]) -> dict[str, float]:
    """Shift A/B traffic between production variants without a redeploy; returns the weights now set."""
    sm.update_endpoint_weights_and_capacities(
        EndpointName=endpoint,
        DesiredWeightsAndCapacities=[
            {"VariantName": v, "DesiredWeight": float(w)} for v, w in weights.items()
        ],
    )
    state = sm.describe_endpoint(EndpointName=endpoint)
    return {
        v["VariantName"]: float(v.get("DesiredWeight", v.get("CurrentWeight", 0)))
        for v in state["ProductionVariants"]
    }


def history(sm: Any, endpoint_arn: str) -> list[str]:
    """Endpoint configs this endpoint served, oldest first (from its history tag)."""
    tags = sm.list_tags(ResourceArn=endpoint_arn).get("Tags", [])
    value = next((t["Value"] for t in tags if t["Key"] == HISTORY_TAG), "")
    return value.split()


def record_history(sm: Any, endpoint_arn: str, config_name: str) -> list[str]:
    """Append `config_name` to the endpoint's history tag (last few kept)."""
    entries = [c for c in history(sm, endpoint_arn) if c != config_name] + [config_name]
    return write_history(sm, endpoint_arn, entries)


def write_history(sm: Any, endpoint_arn: str, entries: list[str]) -> list[str]:
    """Replace the endpoint's history tag."""
    entries = entries[-HISTORY_LENGTH:]
    sm.add_tags(ResourceArn=endpoint_arn, Tags=[{"Key": HISTORY_TAG, "Value": " ".join(entries)}])
    return entries


def _tags(settings: EndpointSettings) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in settings.tags.items()]
