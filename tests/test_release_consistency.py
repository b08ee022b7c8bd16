"""The registry's production version is what serves, whatever fails between the gate and the deploy."""

from __future__ import annotations

import json
import uuid

import pytest
from metaflow import Runner

from cxr.data.findings import FINDINGS
from cxr.registry import Registry

from .conftest import script_invocations
from .test_train_flow import FLOW, flow_env, write_config

ROLE = "arn:aws:iam::123456789012:role/cxr-sagemaker-execution"


def answer(body: dict) -> dict:
    return {"Body": json.dumps(body), "ContentType": "application/json", "InvokedProductionVariant": "A",
            "CustomAttributes": ""}  # fmt: skip


@pytest.mark.slow
def test_a_failed_deploy_leaves_no_production_version_and_resume_completes_it(
    tmp_path, s3, s3_server, nih_root
):
    bucket = f"cxr-deploy-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    endpoint = f"cxr-{uuid.uuid4().hex[:8]}"
    images = sorted((nih_root / "images_001" / "images").glob("*.png"))
    smoke = tmp_path / "smoke.png"  # the loopback server answers a repeated request as before: vary it
    smoke.write_bytes(images[0].read_bytes())
    config = write_config(tmp_path, epochs=1)
    config.write_text(
        config.read_text()
        + f"deploy:\n  enabled: true\n  artifacts: s3://{bucket}/deploy\n"
        + f"  endpoint: {{name: {endpoint}, mode: serverless, role_arn: '{ROLE}', poll_seconds: 0}}\n"
        + f"  smoke: {{latency_budget_ms: 60000, content_type: application/json, image: '{smoke}'}}\n"
    )
    script_invocations(s3_server, answer({"error": "model failed to load"}))  # staging smoke test fails
    runner = Runner(str(FLOW), show_output=False, env=flow_env(tmp_path), cwd=str(tmp_path))
    with runner.run(config_file=str(config)) as running:
        assert running.status == "failed"
        origin = running.run
        assert "failed its smoke test" in origin["deploy"].task.stderr
    registry = Registry(group="demo")
    assert registry.production() is None  # nothing serves, so nothing is production
    assert origin["register"].task["model_status"].data == "approved"
    assert registry.get(1).status == "approved" and (registry.get(1).directory / "baseline.npz").is_file()

    good = answer({"predictions": [{"probabilities": dict.fromkeys(FINDINGS, 0.1)}]})
    script_invocations(s3_server, good, good)  # staging and production smoke tests pass
    smoke.write_bytes(images[1].read_bytes())
    with runner.resume(origin_run_id=origin.id) as running:
        assert running.status == "successful", running.stderr
        run = running.run
    assert run["deploy"].task["deployment"].data["endpoints"] == [endpoint]
    assert run["deploy"].task["model_status"].data == "production"
    assert registry.production().version == 1
