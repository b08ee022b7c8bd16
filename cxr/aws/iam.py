"""Least-privilege IAM policy documents for each role of the AWS path, generated from configuration.

Roles: `flow` (a person or CI running flows and deploying them), `batch_job` (the container of a Batch
step), `step_functions` (the state machine), `eventbridge` (the schedule), `sagemaker_execution`
(training jobs and endpoints). S3 access is scoped to the project's prefixes; writes must use
server-side encryption (SSE-S3, or SSE-KMS with the given key); nothing grants `*` actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VERSION = "2012-10-17"
AWS_DLC_ACCOUNT = "763104351884"  # AWS Deep Learning Containers (the default training and inference images)


@dataclass(frozen=True)
class AwsSettings:
    """What the policies are scoped to."""

    bucket: str
    account: str
    region: str = "us-east-1"
    metaflow_prefix: str = "metaflow"
    data_prefix: str = "data"
    capture_prefix: str = "capture"
    job_queue: str = "cxr-gpu-queue"
    dynamodb_table: str = "cxr-metaflow-sfn-state"
    kms_key_arn: str | None = None
    project: str = "cxr"
    execution_role: str = "cxr-sagemaker-execution"  # the role SageMaker jobs and endpoints run as
    batch_trains_on_sagemaker: bool = False  # scheduled train flows whose train step launches SageMaker jobs


def _s3_statements(s: AwsSettings, prefixes: list[str], write: bool) -> list[dict[str, Any]]:
    objects = [f"arn:aws:s3:::{s.bucket}/{p}/*" for p in prefixes]
    statements: list[dict[str, Any]] = [
        {
            "Sid": "ListProjectPrefixes",
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": f"arn:aws:s3:::{s.bucket}",
            "Condition": {"StringLike": {"s3:prefix": [f"{p}/*" for p in prefixes]}},
        },
        {"Sid": "ReadProjectObjects", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": objects},
    ]
    if write:
        encryption = "aws:kms" if s.kms_key_arn else "AES256"
        statements.append(
            {
                "Sid": "WriteEncryptedObjects",
                "Effect": "Allow",
                "Action": ["s3:PutObject"],
                "Resource": objects,
                "Condition": {"StringEquals": {"s3:x-amz-server-side-encryption": encryption}},
            }
        )
    if s.kms_key_arn:
        statements.append(
            {
                "Sid": "UseProjectKey",
                "Effect": "Allow",
                "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
                "Resource": s.kms_key_arn,
            }
        )
    return statements


def _document(statements: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Version": VERSION, "Statement": statements}


def policies(s: AwsSettings) -> dict[str, dict[str, Any]]:
    """Policy document per role."""
    all_prefixes = [s.metaflow_prefix, s.data_prefix, s.capture_prefix]
    queue = f"arn:aws:batch:{s.region}:{s.account}:job-queue/{s.job_queue}"
    job_definitions = f"arn:aws:batch:{s.region}:{s.account}:job-definition/metaflow_*"
    table = f"arn:aws:dynamodb:{s.region}:{s.account}:table/{s.dynamodb_table}"
    machines = f"arn:aws:states:{s.region}:{s.account}:stateMachine:CXR*"
    logs = f"arn:aws:logs:{s.region}:{s.account}"
    events = f"arn:aws:events:{s.region}:{s.account}"
    batch_jobs = {
        "Sid": "RunBatchJobs",
        "Effect": "Allow",
        "Action": ["batch:SubmitJob", "batch:DescribeJobs", "batch:TerminateJob"],
        "Resource": [queue, job_definitions],
    }
    return {
        "batch_job": _document(
            _s3_statements(s, [s.metaflow_prefix, s.data_prefix], write=True)
            + (_sagemaker_training(s) if s.batch_trains_on_sagemaker else [])
        ),
        "step_functions": _document(
            [
                batch_jobs,
                {
                    "Sid": "TrackBatchJobs",
                    "Effect": "Allow",
                    "Action": ["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                    "Resource": f"{events}:rule/StepFunctionsGetEventsForBatchJobsRule",
                },
                {
                    "Sid": "ForeachState",
                    "Effect": "Allow",
                    "Action": ["dynamodb:PutItem", "dynamodb:GetItem", "dynamodb:UpdateItem"],
                    "Resource": table,
                },
            ]
        ),
        "eventbridge": _document(
            [
                {
                    "Sid": "StartScheduledFlows",
                    "Effect": "Allow",
                    "Action": ["states:StartExecution"],
                    "Resource": machines,
                }
            ]
        ),
        "sagemaker_execution": _document(
            [
                *_s3_statements(s, [s.data_prefix, s.capture_prefix], write=True),
                {
                    "Sid": "Logs",
                    "Effect": "Allow",
                    "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                    "Resource": f"{logs}:log-group:/aws/sagemaker/*",
                },
                {
                    "Sid": "PullImages",  # the project's image, and AWS's PyTorch training/inference images
                    "Effect": "Allow",
                    "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
                    "Resource": [
                        f"arn:aws:ecr:{s.region}:{s.account}:repository/{s.project}*",
                        f"arn:aws:ecr:{s.region}:{AWS_DLC_ACCOUNT}:repository/pytorch-*",
                    ],
                },
                {
                    "Sid": "RegistryLogin",  # GetAuthorizationToken has no resource-level permissions
                    "Effect": "Allow",
                    "Action": ["ecr:GetAuthorizationToken"],
                    "Resource": "*",
                },
                {
                    "Sid": "TrainingMetrics",  # the job's metric definitions, held to SageMaker's namespace
                    "Effect": "Allow",
                    "Action": ["cloudwatch:PutMetricData"],
                    "Resource": "*",
                    "Condition": {"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}},
                },
            ]
        ),
        "flow": _document(
            [
                *_s3_statements(s, all_prefixes, write=True),
                batch_jobs,
                {
                    "Sid": "DeployFlows",
                    "Effect": "Allow",
                    "Action": [
                        "states:CreateStateMachine",
                        "states:UpdateStateMachine",
                        "states:DescribeStateMachine",
                        "states:StartExecution",
                    ],
                    "Resource": machines,
                },
                {
                    "Sid": "Schedules",
                    "Effect": "Allow",
                    "Action": ["events:PutRule", "events:PutTargets", "events:DescribeRule"],
                    "Resource": f"{events}:rule/CXR*",
                },
                {
                    "Sid": "RegisterJobDefinitions",
                    "Effect": "Allow",
                    "Action": ["batch:RegisterJobDefinition", "batch:DescribeJobDefinitions"],
                    "Resource": "*",
                },
                *_sagemaker_training(s),
                *_sagemaker_deployment(s),
            ]
        ),
    }


def _sagemaker_arn(s: AwsSettings, kind: str) -> str:
    return f"arn:aws:sagemaker:{s.region}:{s.account}:{kind}/{s.project}*"


def _pass_execution_role(s: AwsSettings) -> dict[str, Any]:
    return {
        "Sid": "PassExecutionRoleToSageMaker",
        "Effect": "Allow",
        "Action": ["iam:PassRole"],
        "Resource": f"arn:aws:iam::{s.account}:role/{s.execution_role}",
        "Condition": {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
    }


def _sagemaker_training(s: AwsSettings) -> list[dict[str, Any]]:
    """Launch, follow and stop this project's training jobs (cxr.aws.training_job)."""
    return [
        {
            "Sid": "SageMakerTrainingJobs",
            "Effect": "Allow",
            "Action": [
                "sagemaker:CreateTrainingJob",
                "sagemaker:DescribeTrainingJob",
                "sagemaker:StopTrainingJob",
                "sagemaker:AddTags",
            ],
            "Resource": _sagemaker_arn(s, "training-job"),
        },
        {
            "Sid": "FindTrainingJobs",  # List actions have no resource-level permissions
            "Effect": "Allow",
            "Action": ["sagemaker:ListTrainingJobs"],
            "Resource": "*",
        },
        _pass_execution_role(s),
    ]


def _sagemaker_deployment(s: AwsSettings) -> list[dict[str, Any]]:
    """Registry, endpoints, guardrail alarms and scaling of this project (cxr.aws.deploy)."""
    alarms = f"arn:aws:cloudwatch:{s.region}:{s.account}:alarm:{s.project}*"
    return [
        {
            "Sid": "SageMakerModelsAndEndpoints",
            "Effect": "Allow",
            "Action": [
                "sagemaker:CreateModel",
                "sagemaker:DescribeModel",
                "sagemaker:CreateEndpointConfig",
                "sagemaker:DescribeEndpointConfig",
                "sagemaker:CreateEndpoint",
                "sagemaker:UpdateEndpoint",
                "sagemaker:DeleteEndpoint",
                "sagemaker:DescribeEndpoint",
                "sagemaker:UpdateEndpointWeightsAndCapacities",
                "sagemaker:InvokeEndpoint",
                "sagemaker:AddTags",
                "sagemaker:ListTags",
            ],
            "Resource": [
                _sagemaker_arn(s, "model"),
                _sagemaker_arn(s, "endpoint-config"),
                _sagemaker_arn(s, "endpoint"),
            ],
        },
        {
            "Sid": "SageMakerModelRegistry",
            "Effect": "Allow",
            "Action": [
                "sagemaker:CreateModelPackageGroup",
                "sagemaker:DescribeModelPackageGroup",
                "sagemaker:CreateModelPackage",
                "sagemaker:DescribeModelPackage",
                "sagemaker:UpdateModelPackage",
                "sagemaker:ListModelPackages",
            ],
            "Resource": [_sagemaker_arn(s, "model-package-group"), _sagemaker_arn(s, "model-package")],
        },
        {
            "Sid": "GuardrailAlarms",
            "Effect": "Allow",
            "Action": ["cloudwatch:PutMetricAlarm", "cloudwatch:DeleteAlarms", "cloudwatch:DescribeAlarms"],
            "Resource": alarms,
        },
        {
            "Sid": "EndpointAutoscaling",  # Application Auto Scaling has no resource-level permissions
            "Effect": "Allow",
            "Action": [
                "application-autoscaling:RegisterScalableTarget",
                "application-autoscaling:PutScalingPolicy",
                "application-autoscaling:DescribeScalableTargets",
                "application-autoscaling:DescribeScalingPolicies",
            ],
            "Resource": "*",
            "Condition": {"StringEquals": {"application-autoscaling:service-namespace": "sagemaker"}},
        },
    ]
