"""Releasing a registered model to SageMaker: staging → smoke test → approval or gate → production.

Real-time endpoints carry A/B as production variants with weights (shifted live with
`update_endpoint_weights_and_capacities`) and are updated blue/green with canary or linear traffic
shifting and alarm-driven auto-rollback. Serverless endpoints support neither several variants nor Data
Capture, so there A/B is two endpoints (`<name>` and `<name>-b`) behind `cxr gateway`, and each
container captures its own traffic to S3. `rollback` returns an endpoint to the config it served before.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any

from cxr.aws import endpoints as ep
from cxr.aws.smoke import SmokeResult, smoke_image, smoke_test
from cxr.registry import ModelVersion
from cxr.s3sync import put

log = logging.getLogger(__name__)
APPROVED = ("approved", "production")
_VERSION = re.compile(r"-v(\d+)-")


@dataclass
class Clients:
    """The boto3 clients a deployment uses."""

    sagemaker: Any
    runtime: Any
    autoscaling: Any
    cloudwatch: Any
    s3: Any

    @classmethod
    def create(cls, region: str | None = None) -> Clients:
        """Clients from the environment (credentials, AWS_ENDPOINT_URL) for `region`."""
        import boto3

        def make(service: str) -> Any:
            return boto3.client(service, region_name=region)

        return cls(
            make("sagemaker"), make("sagemaker-runtime"), make("application-autoscaling"),
            make("cloudwatch"), make("s3"),
        )  # fmt: skip


@dataclass
class Deployment:
    """One endpoint after a deploy: what it serves and what the deploy did."""

    endpoint: str
    action: str  # created | updated | unchanged | rolled back
    config: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    alarms: list[str] = field(default_factory=list)


@dataclass
class ReleaseReport:
    """The whole release: staging, smoke tests, approval, production."""

    version: int
    staging: Deployment
    smoke: SmokeResult
    approved: bool
    production: list[Deployment] = field(default_factory=list)
    production_smoke: SmokeResult | None = None
    message: str = ""


def artifact_url(
    version: ModelVersion, s3_prefix: str, group: str, s3: Any, kms_key_id: str | None = None
) -> str:
    """Where SageMaker reads the model.tar.gz: the registry's URL, or an upload of the local package."""
    if version.model_data_url:
        return version.model_data_url
    uri = f"{s3_prefix.rstrip('/')}/models/{group}/{version.version}/model.tar.gz"
    return put(uri, version.package, kms_key_id, s3)


def deploy(
    clients: Clients,
    settings: ep.EndpointSettings,
    endpoint: str,
    models: dict[str, tuple[str, str, float]],
) -> list[Deployment]:
    """Deploy variants (name → (label, model_data_url, weight)): one real-time endpoint with all of them,
    or one serverless endpoint per variant (`endpoint`, then `endpoint-<variant>`)."""
    if settings.mode == "serverless" and settings.capture and not settings.image_uri:
        log.warning(
            "serverless endpoints have no Data Capture and AWS's PyTorch image does not capture: "
            "set endpoint.image_uri to the cxr image (docker/Dockerfile) to capture to %s",
            settings.capture,
        )
    return [
        _deploy_endpoint(clients, settings, name, subset)
        for name, subset in layout(settings, endpoint, models)
    ]


def layout(
    settings: ep.EndpointSettings, endpoint: str, models: dict[str, tuple[str, str, float]]
) -> list[tuple[str, dict[str, tuple[str, str, float]]]]:
    """Which endpoint serves which variants: real-time, one endpoint with all of them; serverless, one
    endpoint per variant (`endpoint`, then `endpoint-<variant>`)."""
    if settings.mode == "realtime":
        return [(endpoint, models)]
    return [(endpoint if i == 0 else f"{endpoint}-{v.lower()}", {v: models[v]}) for i, v in enumerate(models)]


def plan(
    settings: ep.EndpointSettings, endpoint: str, models: dict[str, tuple[str, str, float]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The CreateModel requests and the CreateEndpointConfig request for one endpoint (no AWS call)."""
    model_requests = [ep.model_request(settings, url, label, endpoint) for label, url, _ in models.values()]
    specs = [
        ep.production_variant(settings, variant, request["ModelName"], weight)
        for (variant, (_, _, weight)), request in zip(models.items(), model_requests, strict=True)
    ]
    return model_requests, ep.endpoint_config_request(settings, endpoint, specs)


def _deploy_endpoint(
    clients: Clients, settings: ep.EndpointSettings, endpoint: str, models: dict[str, tuple[str, str, float]]
) -> Deployment:
    sm = clients.sagemaker
    unchanged = _unchanged(clients, settings, endpoint, models)
    if unchanged is not None:
        return unchanged
    model_requests, request = plan(settings, endpoint, models)
    variants = _variants(models, model_requests)
    config = request["EndpointConfigName"]
    for model in model_requests:
        ep.ensure_model(sm, model)
    ep.ensure_endpoint_config(sm, request)
    alarms = ep.ensure_alarms(clients.cloudwatch, settings, endpoint, list(variants))
    action = ep.apply_endpoint(sm, endpoint, config, ep.deployment_config(settings, alarms))
    state = ep.wait_for_endpoint(sm, endpoint, config, settings.poll_seconds, settings.timeout_minutes)
    if settings.mode == "realtime":
        ep.configure_autoscaling(clients.autoscaling, settings, endpoint, list(variants))
    ep.record_history(sm, state["EndpointArn"], config)
    return Deployment(endpoint, action, config, variants, alarms)


def _variants(
    models: dict[str, tuple[str, str, float]], model_requests: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    return {
        variant: {"model": model["ModelName"], "label": label, "weight": weight}
        for (variant, (label, _, weight)), model in zip(models.items(), model_requests, strict=True)
    }


def _unchanged(
    clients: Clients, settings: ep.EndpointSettings, endpoint: str, models: dict[str, tuple[str, str, float]]
) -> Deployment | None:
    """An "unchanged" Deployment when `endpoint` already serves exactly this plan, else None."""
    model_requests, request = plan(settings, endpoint, models)
    config = request["EndpointConfigName"]
    state = ep.describe(clients.sagemaker, endpoint)
    if state is None or state["EndpointConfigName"] != config or state["EndpointStatus"] != "InService":
        return None
    return Deployment(endpoint, "unchanged", config, _variants(models, model_requests))


def _serving(
    clients: Clients, settings: ep.EndpointSettings, models: dict[str, tuple[str, str, float]]
) -> list[Deployment] | None:
    """Production's deployments when it already serves exactly these models with these settings."""
    found = [
        _unchanged(clients, settings, n, subset) for n, subset in layout(settings, settings.name, models)
    ]
    return None if any(d is None for d in found) else [d for d in found if d is not None]


def release(
    clients: Clients,
    settings: ep.EndpointSettings,
    registry: Any,
    version: int,
    s3_prefix: str,
    approve: bool = False,
    challenger: int | None = None,
    weights: dict[str, float] | None = None,
    image: bytes | None = None,
    latency_budget_ms: float = 5000.0,
    keep_staging: bool = False,
    content_type: str = "image/png",
) -> ReleaseReport:
    """Staging → smoke test → approval (registry status, or `approve`) → production → smoke test.

    A failed staging smoke test stops before production; a failed production smoke test rolls the
    endpoint back. `challenger` adds a B variant (or a `-b` serverless endpoint) at `weights`.
    """
    chosen = registry.get(version)
    image = image or smoke_image()
    label = f"{registry.group}-v{chosen.version}"
    url = artifact_url(chosen, s3_prefix, registry.group, clients.s3, settings.kms_key_id)
    models = {"A": (label, url, (weights or {}).get("A", 1.0))}
    if challenger is not None:
        other = registry.get(challenger)
        other_url = artifact_url(other, s3_prefix, registry.group, clients.s3, settings.kms_key_id)
        models["B"] = (f"{registry.group}-v{other.version}", other_url, (weights or {}).get("B", 0.1))
    production = _serving(clients, settings, models)
    if production is not None:  # idempotent: the same release again changes nothing but the registry
        _mark_production(registry, chosen, settings.name)  # where an earlier release stopped short of it
        unchanged = Deployment(f"{settings.name}-staging", "unchanged", "")
        message = f"version {version} already serving on {settings.name}; nothing changed"
        return ReleaseReport(
            chosen.version, unchanged, SmokeResult("", 0.0), True, production, message=message
        )
    staging_settings = replace(settings, mode="serverless", capture=None)
    staging_name = f"{settings.name}-staging"
    staging = deploy(clients, staging_settings, staging_name, {"A": (label, url, 1.0)})[0]
    smoke = smoke_test(clients.runtime, staging_name, image, latency_budget_ms, None, content_type)
    report = ReleaseReport(chosen.version, staging, smoke, approve or chosen.status in APPROVED)
    if not smoke.passed:
        raise ep.DeployError(
            f"version {version} failed its smoke test on {staging_name} (kept for inspection): "
            f"{smoke.problems}; production unchanged"
        )
    if not report.approved:
        report.message = (
            f"version {version} passed staging but is {chosen.status}: approve it "
            f"(`cxr registry approve {version}`, or deploy with --approve) to go to production"
        )
        return report
    report.production = deploy(clients, settings, settings.name, models)
    report.production_smoke = smoke_test(
        clients.runtime, settings.name, image, latency_budget_ms, _first_variant(settings), content_type
    )
    if not report.production_smoke.passed:
        undone = _undo(clients, settings, report.production)
        raise ep.DeployError(
            f"production smoke test failed after deploying version {version}: "
            f"{report.production_smoke.problems}; {undone}"
        )
    _mark_production(registry, chosen, settings.name)
    if not keep_staging:
        clients.sagemaker.delete_endpoint(EndpointName=staging_name)
        if staging.alarms:
            clients.cloudwatch.delete_alarms(AlarmNames=staging.alarms)
    report.message = _summary(report, settings)
    return report


def _mark_production(registry: Any, version: ModelVersion, endpoint: str) -> None:
    """The registry names as production what serves on the production endpoint."""
    if version.status != "production":
        decision = f"{version.decision}\nDeployed to {endpoint}.".strip()
        registry.set_status(version.version, "production", decision)


def _undo(clients: Clients, settings: ep.EndpointSettings, deployments: list[Deployment]) -> str:
    """Take back a production deploy: roll updated endpoints back, remove endpoints it created."""
    done = []
    for deployment in deployments:
        if deployment.action == "updated":
            back = rollback(clients, settings, deployment.endpoint)
            done.append(f"{deployment.endpoint} rolled back to {back.config}")
        elif deployment.action == "created":
            clients.sagemaker.delete_endpoint(EndpointName=deployment.endpoint)
            if deployment.alarms:
                clients.cloudwatch.delete_alarms(AlarmNames=deployment.alarms)
            done.append(f"new endpoint {deployment.endpoint} removed")
    return "; ".join(done) or "nothing was changed"


def _first_variant(settings: ep.EndpointSettings) -> str | None:
    return "A" if settings.mode == "realtime" else None


def _summary(report: ReleaseReport, settings: ep.EndpointSettings) -> str:
    lines = [
        f"version {report.version} in production: "
        + ", ".join(f"{d.endpoint} {d.action}" for d in report.production)
    ]
    if settings.mode == "serverless" and len(report.production) > 1:
        endpoints = " ".join(f"--endpoint {v}={d.endpoint}" for d in report.production for v in d.variants)
        weights = ",".join(
            f"{v}={spec['weight']}" for d in report.production for v, spec in d.variants.items()
        )
        lines.append(f"A/B on serverless: run `cxr gateway {endpoints} --weights {weights}`")
    return "\n".join(lines)


def rollback(
    clients: Clients, settings: ep.EndpointSettings, endpoint: str, registry: Any = None
) -> Deployment:
    """Return `endpoint` to the config it served before the current one (all at once, then wait).

    With a registry, the version served again becomes production there.
    """
    sm = clients.sagemaker
    state = ep.describe(sm, endpoint)
    if state is None:
        raise ep.DeployError(f"no endpoint {endpoint}")
    served = ep.history(sm, state["EndpointArn"])
    if len(served) < 2 or served[-1] != state["EndpointConfigName"]:
        raise ep.DeployError(
            f"{endpoint} has no earlier deployment recorded to roll back to (history: {served})"
        )
    target = served[-2]
    fast = ep.deployment_config(replace(settings, traffic="all_at_once", bake_seconds=0), [])
    sm.update_endpoint(EndpointName=endpoint, EndpointConfigName=target, DeploymentConfig=fast)
    ep.wait_for_endpoint(sm, endpoint, target, settings.poll_seconds, settings.timeout_minutes)
    ep.write_history(sm, state["EndpointArn"], served[:-1])
    config = sm.describe_endpoint_config(EndpointConfigName=target)
    variants = {v["VariantName"]: {"model": v["ModelName"]} for v in config["ProductionVariants"]}
    if registry is not None:
        match = _VERSION.search(variants.get("A", next(iter(variants.values())))["model"])
        if match:
            registry.set_status(
                int(match.group(1)), "production", f"Serving again on {endpoint} after a rollback."
            )
    return Deployment(endpoint, "rolled back", target, variants)


def release_configured(
    section: dict[str, Any],
    registry: Any,
    version: int,
    approve: bool = False,
    challenger: int | None = None,
    weights: dict[str, float] | None = None,
    keep_staging: bool = False,
) -> ReleaseReport:
    """`release` with the settings of a config mapping (`endpoint`, `artifacts`, `smoke`, as deploy.yaml)."""
    settings = ep.EndpointSettings.from_dict(section["endpoint"])
    if not section.get("artifacts"):
        raise ep.DeployError("deployment settings need `artifacts`, an s3:// prefix for model artifacts")
    smoke = section.get("smoke") or {}
    return release(
        Clients.create(settings.region), settings, registry, version, section["artifacts"], approve=approve,
        challenger=challenger, weights=weights, image=smoke_image(smoke.get("image")),
        latency_budget_ms=float(smoke.get("latency_budget_ms", 5000)), keep_staging=keep_staging,
        content_type=smoke.get("content_type", "image/png"),
    )  # fmt: skip
