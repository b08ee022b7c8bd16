"""Generated IAM policies: accepted by the IAM API (on loopback) and least-privilege by construction."""

import json

import pytest

from cxr.aws.iam import AwsSettings, policies

SETTINGS = AwsSettings(bucket="cxr-bucket", account="123456789012")


def all_statements(document):
    return document["Statement"]


@pytest.mark.parametrize("kms", [None, "arn:aws:kms:us-east-1:123456789012:key/abc"])
def test_policies_are_scoped_and_encrypt_writes(kms):
    settings = AwsSettings(bucket="cxr-bucket", account="123456789012", kms_key_arn=kms)
    documents = policies(settings)
    assert set(documents) == {"flow", "batch_job", "step_functions", "eventbridge", "sagemaker_execution"}
    for role, document in documents.items():
        for statement in all_statements(document):
            actions = statement["Action"]
            assert all(a != "*" and not a.endswith(":*") for a in actions), (role, statement["Sid"])
            resources = (
                statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            )
            if any(a.startswith("s3:") for a in actions):
                assert all(r.startswith("arn:aws:s3:::cxr-bucket") for r in resources)
                assert all(r != "arn:aws:s3:::*" for r in resources)
            if "s3:PutObject" in actions:
                expected = "aws:kms" if kms else "AES256"
                assert statement["Condition"]["StringEquals"]["s3:x-amz-server-side-encryption"] == expected
    wildcard = [s["Sid"] for d in documents.values() for s in d["Statement"] if s["Resource"] == "*"]
    # actions without resource-level permissions in AWS (autoscaling is held to SageMaker by a condition)
    assert wildcard == ["RegistryLogin", "TrainingMetrics", "RegisterJobDefinitions",
                        "FindTrainingJobs", "EndpointAutoscaling"]  # fmt: skip
    batch = json.dumps(documents["batch_job"])
    assert "capture/" not in batch and "sagemaker" not in batch  # a training step never touches capture
    flow = json.dumps(documents["flow"])
    for action in ("CreateTrainingJob", "CreateModelPackage", "UpdateEndpoint", "PutMetricAlarm", "PassRole"):
        assert action in flow
    passing = next(s for s in documents["flow"]["Statement"] if s["Sid"] == "PassExecutionRoleToSageMaker")
    assert passing["Resource"] == "arn:aws:iam::123456789012:role/cxr-sagemaker-execution"
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}


def test_scheduled_training_on_sagemaker_lets_batch_launch_jobs_only():
    documents = policies(AwsSettings(bucket="b", account="123456789012", batch_trains_on_sagemaker=True))
    batch = json.dumps(documents["batch_job"])
    assert "sagemaker:CreateTrainingJob" in batch and "iam:PassRole" in batch
    assert "CreateEndpoint" not in batch and "CreateModelPackage" not in batch


def test_iam_api_accepts_every_document(s3):
    import boto3

    iam = boto3.client("iam")
    for role, document in policies(SETTINGS).items():
        response = iam.create_policy(PolicyName=f"cxr-{role}", PolicyDocument=json.dumps(document))
        assert response["Policy"]["Arn"].endswith(f"policy/cxr-{role}")


def test_kms_key_setting_encrypts_project_writes(s3, tmp_path, monkeypatch):
    import boto3

    from cxr import s3sync

    key = boto3.client("kms").create_key(Description="cxr")["KeyMetadata"]["Arn"]
    s3.create_bucket(Bucket="cxr-kms")
    (tmp_path / "last.pt").write_bytes(b"checkpoint")
    s3sync.upload(tmp_path, "s3://cxr-kms/plain/", ["last.pt"])
    assert s3.head_object(Bucket="cxr-kms", Key="plain/last.pt")["ServerSideEncryption"] == "AES256"
    monkeypatch.setenv(s3sync.KMS_KEY_ENV, key)
    s3sync.upload(tmp_path, "s3://cxr-kms/kms/", ["last.pt"])
    s3sync.put("s3://cxr-kms/kms/split.json", b"{}")
    for name in ("kms/last.pt", "kms/split.json"):
        head = s3.head_object(Bucket="cxr-kms", Key=name)
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == key
