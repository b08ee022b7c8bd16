"""The SageMaker Model Registry backend against the AWS APIs on loopback: same behaviour as the local one."""

import json
import uuid

import boto3
import pytest

from cxr.aws.model_registry import CONTENT_TYPES, SageMakerRegistry
from cxr.registry import Registry, RegistryError, open_registry

IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.5.1-cpu-py311-ubuntu22.04-sagemaker"


@pytest.fixture
def bucket(s3):
    """A fresh bucket on the loopback server (shared by the whole session, so names are unique)."""
    name = f"cxr-registry-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def unique_group() -> str:
    return f"cxr-test-{uuid.uuid4().hex[:8]}"


def packages(sagemaker, group):
    """Version → DescribeModelPackage of every package in the group."""
    summaries = sagemaker.list_model_packages(ModelPackageGroupName=group)["ModelPackageSummaryList"]
    described = [sagemaker.describe_model_package(ModelPackageName=s["ModelPackageArn"]) for s in summaries]
    return {d["ModelPackageVersion"]: d for d in described}


def test_register_promote_archive_and_cache(s3, bucket, tmp_path, isolated_home):
    sagemaker, group = boto3.client("sagemaker"), unique_group()
    registry = SageMakerRegistry(f"s3://{bucket}/registry", group)
    metrics = {"mean_auroc": 0.8, "auroc": {"Hernia": 0.9}}
    first = registry.register(
        {"model.tar.gz": b"one", "metrics.json": json.dumps(metrics).encode(), "model_card.md": b"# v1"},
        metrics,
        {"run": "TrainFlow/12", "commit": "abc123", "params": {"lr": 0.001}},
        status="production",
        decision="promote to production: no production model yet (mean AUROC 0.8000)",
    )
    (tmp_path / "model.tar.gz").write_bytes(b"two")
    second = registry.register(
        {"model.tar.gz": tmp_path / "model.tar.gz"}, {"mean_auroc": 0.85}, {"run": "r2"}
    )

    assert (first.version, first.status, second.version, second.status) == (1, "production", 2, "candidate")
    assert [v.version for v in registry.versions()] == [2, 1] and registry.production().version == 1
    assert first.metrics == metrics and first.mean_auroc == 0.8 and first.lineage["params"] == {"lr": 0.001}
    assert first.decision.startswith("promote to production") and second.decision == ""

    group_info = sagemaker.describe_model_package_group(ModelPackageGroupName=group)
    assert group_info["ModelPackageGroupStatus"] == "Completed"
    described = packages(sagemaker, group)
    assert {v: d["ModelApprovalStatus"] for v, d in described.items()} == {
        1: "Approved",
        2: "PendingManualApproval",
    }
    one = described[1]
    assert first.arn == one["ModelPackageArn"]
    container = one["InferenceSpecification"]["Containers"][0]
    files = f"s3://{bucket}/registry/{group}/1/"
    assert container == {"Image": IMAGE, "ModelDataUrl": files + "model.tar.gz"}
    assert first.model_data_url == files + "model.tar.gz"
    assert one["InferenceSpecification"]["SupportedContentTypes"] == CONTENT_TYPES
    assert one["InferenceSpecification"]["SupportedResponseMIMETypes"] == ["application/json"]
    assert one["ModelMetrics"]["ModelQuality"]["Statistics"] == {
        "ContentType": "application/json",
        "S3Uri": files + "metrics.json",
    }
    properties = one["CustomerMetadataProperties"]
    assert properties["cxr:status"] == "production" and properties["cxr:mean_auroc"] == "0.8"
    assert properties["cxr:files"] == files and properties["cxr:lineage.run"] == "TrainFlow/12"
    assert properties["cxr:decision"] == "promote to production: no production model yet mean AUROC 0.8000"
    assert "cxr:lineage.params" not in properties  # not a scalar: only in the S3 record
    assert "ModelMetrics" not in described[2]  # no metrics.json registered

    head = s3.head_object(Bucket=bucket, Key=f"registry/{group}/2/model.tar.gz")
    assert head["ServerSideEncryption"] == "AES256"
    assert second.directory == isolated_home / "sagemaker-registry" / group / "2"
    assert second.package.read_bytes() == b"two"
    assert (
        first.card.read_text() == "# v1"
        and json.loads((first.directory / "metrics.json").read_text()) == metrics
    )

    promoted = registry.approve(2)
    assert (promoted.status, promoted.decision) == ("production", "Approved manually.")
    assert registry.production().version == 2 and registry.get(1).status == "archived"
    described = packages(sagemaker, group)
    assert {v: d["ModelApprovalStatus"] for v, d in described.items()} == {1: "Rejected", 2: "Approved"}
    assert described[2]["ApprovalDescription"] == "Approved manually."
    assert described[1]["CustomerMetadataProperties"]["cxr:lineage.commit"] == "abc123"  # kept on update

    registry.set_status(2, "approved", decision="")
    assert registry.production() is None and registry.get(2).status == "approved"
    assert "cxr:decision" not in packages(sagemaker, group)[2]["CustomerMetadataProperties"]


def test_errors_and_reopening(s3, bucket):
    group = unique_group()
    registry = SageMakerRegistry(f"s3://{bucket}/models", group)
    registry.register({"model.tar.gz": b"x"}, {"mean_auroc": 0.7}, {})
    archived = registry.set_status(1, "archived", "superseded")
    assert (archived.status, archived.decision) == ("archived", "superseded")
    with pytest.raises(RegistryError, match=f"no model version 9 in SageMaker model package group {group}"):
        registry.get(9)
    with pytest.raises(RegistryError, match="archived; register it again"):
        registry.approve(1)
    with pytest.raises(RegistryError, match="unknown status 'retired'"):
        registry.set_status(1, "retired")
    with pytest.raises(RegistryError, match=r"invalid registry file name 'registry\.json'"):
        registry.register({"registry.json": b"{}"}, {}, {})
    with pytest.raises(FileNotFoundError):
        registry.register({"model.tar.gz": "/nonexistent/model.tar.gz"}, {"mean_auroc": 0.8}, {})
    with pytest.raises(RegistryError, match=r"invalid model group name '\.\./escape'"):
        SageMakerRegistry(f"s3://{bucket}/models", "../escape")
    with pytest.raises(RegistryError, match="invalid model group name 'chest_xray'"):
        SageMakerRegistry(f"s3://{bucket}/models", "chest_xray")
    with pytest.raises(RegistryError, match="invalid s3_prefix"):
        SageMakerRegistry(f"/local/{bucket}", group)

    again = SageMakerRegistry(f"s3://{bucket}/models", group)  # the group exists: reused, not recreated
    assert [(v.version, v.status) for v in again.versions()] == [(1, "archived")]
    groups = boto3.client("sagemaker").list_model_package_groups(NameContains=group)[
        "ModelPackageGroupSummaryList"
    ]
    assert [g["ModelPackageGroupName"] for g in groups] == [group]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == [f"models/{group}/1/model.tar.gz", f"models/{group}/1/registry.json"]


def test_open_registry_backends(s3, bucket, tmp_path):
    assert isinstance(open_registry("demo", root=tmp_path), Registry)
    sagemaker = open_registry("demo", "sagemaker", s3_prefix=f"s3://{bucket}/r")
    assert isinstance(sagemaker, SageMakerRegistry) and sagemaker.group == "demo"
    with pytest.raises(RegistryError, match="unknown registry backend 'mlflow'"):
        open_registry("demo", "mlflow")
    with pytest.raises(RegistryError, match="needs s3_prefix"):
        open_registry("demo", "sagemaker")
    with pytest.raises(RegistryError, match="takes no AWS settings"):
        open_registry("demo", root=tmp_path, s3_prefix=f"s3://{bucket}/r")


@pytest.mark.parametrize("backend", ["local", "sagemaker"])
def test_release_style_put_files_round_trip(backend, s3, bucket, tmp_path):
    """What `release_model` does: register a draft package, then stamp it and add the card."""
    kms, group = boto3.client("kms").create_key()["KeyMetadata"]["Arn"], unique_group()
    if backend == "local":
        registry = open_registry(group, root=tmp_path / "registry")
    else:
        registry = open_registry(group, "sagemaker", s3_prefix=f"s3://{bucket}/reg", kms_key_id=kms)
    draft = registry.register(
        {"model.tar.gz": b"draft"}, {"mean_auroc": 0.75}, {"run": "r"}, "production", "ok"
    )
    assert draft.package.read_bytes() == b"draft" and not draft.card.exists()
    (tmp_path / "stamped.tar.gz").write_bytes(b"stamped v1")
    stamped = registry.put_files(
        draft.version, {"model_card.md": b"# version 1", "model.tar.gz": tmp_path / "stamped.tar.gz"}
    )
    assert stamped.package.read_bytes() == b"stamped v1" and stamped.card.read_text() == "# version 1"
    assert (stamped.version, stamped.status, stamped.decision) == (draft.version, "production", "ok")
    assert registry.production().package.read_bytes() == b"stamped v1"
    with pytest.raises(RegistryError, match="no model version 7"):
        registry.put_files(7, {"model_card.md": b"x"})
    if backend == "sagemaker":
        for name in ("model.tar.gz", "model_card.md", "registry.json"):
            head = s3.head_object(Bucket=bucket, Key=f"reg/{group}/{draft.version}/{name}")
            assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", kms)
        assert stamped.model_data_url == f"s3://{bucket}/reg/{group}/{draft.version}/model.tar.gz"


def test_leftover_folder_is_never_reused(s3, bucket):
    """A registration that died before creating its package leaves a folder no later version shares."""
    group, sagemaker = unique_group(), boto3.client("sagemaker")
    s3.put_object(Bucket=bucket, Key=f"m/{group}/1/registry.json", Body=b"{}", ServerSideEncryption="AES256")
    s3.put_object(
        Bucket=bucket, Key=f"m/{group}/1/model.tar.gz", Body=b"orphan", ServerSideEncryption="AES256"
    )
    registry = SageMakerRegistry(f"s3://{bucket}/m", group)
    version = registry.register({"model.tar.gz": b"real"}, {"mean_auroc": 0.6}, {"run": "r"})
    assert version.version == 1 and version.package.read_bytes() == b"real"
    assert version.model_data_url == f"s3://{bucket}/m/{group}/2/model.tar.gz"
    assert (
        packages(sagemaker, group)[1]["CustomerMetadataProperties"]["cxr:files"]
        == f"s3://{bucket}/m/{group}/2/"
    )
    with pytest.raises(s3.exceptions.NoSuchBucket):
        SageMakerRegistry(f"s3://{bucket}-missing/m", group).register({"model.tar.gz": b"x"}, {}, {})
    assert sorted(packages(sagemaker, group)) == [1]  # the failed registration created no package


def test_cli_lists_and_approves_in_the_sagemaker_registry(s3, bucket):
    import subprocess
    import sys

    group = unique_group()
    SageMakerRegistry(f"s3://{bucket}/registry", group).register(
        {"model.tar.gz": b"one"}, {"mean_auroc": 0.81}, {"run": "r1"}
    )
    base = [sys.executable, "-m", "cxr.cli", "registry"]
    options = ["--group", group, "--s3-prefix", f"s3://{bucket}/registry"]
    listed = subprocess.run([*base, "list", *options], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "candidate" in listed.stdout and "0.8100" in listed.stdout
    approved = subprocess.run([*base, "approve", "1", *options], capture_output=True, text=True, timeout=120)
    assert approved.returncode == 0 and "now production" in approved.stdout, approved.stderr
    assert packages(boto3.client("sagemaker"), group)[1]["ModelApprovalStatus"] == "Approved"


def test_package_carries_a_model_card_with_the_test_auroc(s3, bucket):
    registry = SageMakerRegistry(f"s3://{bucket}/registry", unique_group())
    sent = []
    registry.sagemaker.meta.events.register(
        "provide-client-params.sagemaker.CreateModelPackage", lambda params, **_: sent.append(params)
    )
    metrics = {"mean_auroc": 0.82, "auroc": {"Hernia": 0.9, "Mass": 0.74}}
    registry.register({"model.tar.gz": b"m"}, metrics, {"run": "r"})
    request = sent[0]
    assert (request["Domain"], request["Task"]) == ("COMPUTER_VISION", "IMAGE_CLASSIFICATION")
    assert request["ModelCard"]["ModelCardStatus"] == "Draft"
    card = json.loads(request["ModelCard"]["ModelCardContent"])
    data = card["evaluation_details"][0]["metric_groups"][0]["metric_data"]
    assert [(d["name"], d["value"]) for d in data] == [
        ("mean AUROC", 0.82),
        ("AUROC Hernia", 0.9),
        ("AUROC Mass", 0.74),
    ]
    assert card["intended_uses"]["risk_rating"] == "High"
    assert card["additional_information"]["custom_details"]["full_model_card"].endswith("/1/model_card.md")
