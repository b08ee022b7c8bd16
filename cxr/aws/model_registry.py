"""The model registry on SageMaker: `cxr.registry.Registry`'s interface over a model package group.

A group holds one model package per version (its ModelPackageVersion is the version number). A version's
files live under `<s3_prefix>/<group>/<version>/`, server-side encrypted, with `registry.json` (metrics,
lineage, decision); they are uploaded before the package is created, so no package points at missing
files. The cxr status is the package's `cxr:status` property beside its approval status (candidate →
PendingManualApproval, approved and production → Approved, archived → Rejected); an approval changed in
the SageMaker console wins over a stale `cxr:status`. Property values only allow letters, digits, spaces
and `_.:/=+-@` (≤256 characters), so they carry readable projections; the exact values stay in S3.
Files are downloaded on read into `$CXR_HOME/sagemaker-registry/<group>/<version>/`, refreshed when their
ETag changes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from cxr.config import cxr_home
from cxr.model_card import INTENDED_USE
from cxr.registry import DEFAULT_GROUP, ModelVersion, RegistryError, _check_status, check_group
from cxr.s3sync import encryption, put

# AWS Deep Learning Container for PyTorch inference (CPU), see
# https://docs.aws.amazon.com/deep-learning-containers/latest/devguide/deep-learning-containers-images.html
DEFAULT_IMAGE = (
    "763104351884.dkr.ecr.{region}.amazonaws.com/pytorch-inference:2.5.1-cpu-py311-ubuntu22.04-sagemaker"
)
CONTENT_TYPES = ["image/png", "image/jpeg", "application/dicom", "application/x-npy", "application/json"]
RESPONSE_TYPES = ["application/json"]
REALTIME_INSTANCE_TYPES = ["ml.m5.large", "ml.m5.xlarge", "ml.c5.xlarge", "ml.g4dn.xlarge"]
APPROVAL = {
    "candidate": "PendingManualApproval",
    "approved": "Approved",
    "production": "Approved",
    "archived": "Rejected",
}
RECORD = "registry.json"  # metrics, lineage and decision of a version, beside its files
ETAGS = ".etags.json"  # in a cache folder: the ETag of each file downloaded
MAX_LINEAGE_PROPERTIES = 40  # SageMaker allows 50 properties per package
_S3_PREFIX = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,62}(/[A-Za-z0-9_.=+@-]+)*/?")


class SageMakerRegistry:
    """One model package group of the SageMaker Model Registry, with files under an S3 prefix."""

    def __init__(
        self,
        s3_prefix: str,
        group: str = DEFAULT_GROUP,
        image_uri: str = DEFAULT_IMAGE,
        kms_key_id: str | None = None,
        sagemaker: Any = None,
        s3: Any = None,
    ):
        self.group = check_group(group)
        if not _S3_PREFIX.fullmatch(s3_prefix) or len(s3_prefix) > 160:
            raise RegistryError(
                f"invalid s3_prefix {s3_prefix!r}: s3://bucket/prefix of letters, digits and '_.=+@-'"
            )
        self.bucket, _, key = s3_prefix.removeprefix("s3://").partition("/")
        self.key_prefix = f"{key.strip('/')}/{group}/".lstrip("/")
        self.sagemaker = sagemaker or boto3.client("sagemaker")
        self.s3 = s3 or boto3.client("s3")
        self.image_uri = image_uri.format(region=self.sagemaker.meta.region_name)
        self.kms_key_id = kms_key_id
        self.location = f"SageMaker model package group {group}"
        self._ensure_group()

    def _ensure_group(self) -> None:
        try:
            self.sagemaker.describe_model_package_group(ModelPackageGroupName=self.group)
            return
        except ClientError as error:
            if "does not exist" not in str(error):
                raise
        try:
            self.sagemaker.create_model_package_group(
                ModelPackageGroupName=self.group,
                ModelPackageGroupDescription=f"cxr chest X-ray classifiers, group {self.group}",
                Tags=[{"Key": "project", "Value": "cxr"}],
            )
        except ClientError as error:  # created meanwhile by another process
            if "already exists" not in str(error):
                raise

    def register(
        self,
        files: dict[str, str | Path | bytes],
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        status: str = "candidate",
        decision: str = "",
    ) -> ModelVersion:
        """Add a version: upload `files` (name → path or bytes) and its record, then create the package."""
        _check_status(status)
        _check_files(files)
        record = {"metrics": metrics, "lineage": lineage, "decision": decision}
        prefix = self._claim_folder(json.dumps(record).encode())
        for name, content in files.items():
            self._upload(prefix + name, content)
        created = self.sagemaker.create_model_package(**self._package_request(prefix, files, record))
        version = int(self._describe_arn(created["ModelPackageArn"])["ModelPackageVersion"])
        if status != "candidate":
            return self.set_status(version, status, decision)
        return self.get(version)

    def get(self, version: int) -> ModelVersion:
        """One version, its files cached locally; RegistryError if it does not exist."""
        return self._version(self._describe(version))

    def versions(self) -> list[ModelVersion]:
        """All versions, newest first."""
        summaries = sorted(self._summaries(), key=lambda s: -int(s["ModelPackageVersion"]))
        return [self._version(self._describe_arn(s["ModelPackageArn"])) for s in summaries]

    def production(self) -> ModelVersion | None:
        """The version in production, if any (the newest, should a promotion have been interrupted)."""
        found = self._production_packages()
        return self._version(found[0]) if found else None

    def set_status(self, version: int, status: str, decision: str | None = None) -> ModelVersion:
        """Move a version to `status`; promoting to production archives the previous production version."""
        _check_status(status)
        package = self._describe(version)
        if decision is not None:
            self._write_record(package, decision)
        self._update(package, status, decision)
        if status == "production":
            for other in self._production_packages():
                if int(other["ModelPackageVersion"]) != int(version):
                    self._update(other, "archived", None)
        return self.get(version)

    def approve(self, version: int) -> ModelVersion:
        """Manual approval: the version goes to production (the previous one is archived)."""
        current = self.get(version)
        if current.status == "archived":
            raise RegistryError(f"version {version} is archived; register it again to redeploy")
        return self.set_status(version, "production", f"{current.decision}\nApproved manually.".strip())

    def put_files(self, version: int, files: dict[str, str | Path | bytes]) -> ModelVersion:
        """Add or replace files of an existing version in S3 (encrypted); the local cache follows."""
        _check_files(files)
        prefix = self._files_prefix(self._describe(version))
        for name, content in files.items():
            self._upload(prefix + name, content)
        return self.get(version)

    # --- S3 -----------------------------------------------------------------------------------------

    def _encryption(self) -> dict[str, str]:
        return encryption(self.kms_key_id)

    def _upload(self, key: str, content: str | Path | bytes) -> None:
        put(self._uri(key), content, self.kms_key_id, self.s3)

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _files_prefix(self, package: dict[str, Any]) -> str:
        """Key prefix of a version's files, from its `cxr:files` property (default `<group>/<version>/`)."""
        uri = str(package.get("CustomerMetadataProperties", {}).get("cxr:files", ""))
        if not uri:
            return f"{self.key_prefix}{package['ModelPackageVersion']}/"
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if bucket != self.bucket:
            raise RegistryError(
                f"version {package['ModelPackageVersion']} keeps its files in bucket {bucket}, "
                f"this registry is set to {self.bucket}"
            )
        return key

    def _claim_folder(self, record: bytes) -> str:
        """Key prefix of a fresh `<group>/<n>/` folder (n = the next version), taken by creating its record
        only if absent, so concurrent registrations never share a folder."""
        number = max((int(s["ModelPackageVersion"]) for s in self._summaries()), default=0) + 1
        while True:
            prefix = f"{self.key_prefix}{number}/"
            try:
                self.s3.put_object(
                    Bucket=self.bucket,
                    Key=prefix + RECORD,
                    Body=record,
                    IfNoneMatch="*",
                    **self._encryption(),
                )
                return prefix
            except ClientError as error:
                if error.response["Error"]["Code"] not in (
                    "PreconditionFailed",
                    "ConditionalRequestConflict",
                ):
                    raise
            number += 1

    def _record(self, package: dict[str, Any]) -> dict[str, Any]:
        key = self._files_prefix(package) + RECORD
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as error:
            if error.response["Error"]["Code"] not in ("NoSuchKey", "404"):
                raise
            return {"metrics": {}, "lineage": {}, "decision": package.get("ApprovalDescription", "")}
        return dict(json.loads(body))

    def _write_record(self, package: dict[str, Any], decision: str) -> None:
        record = {**self._record(package), "decision": decision}
        key = self._files_prefix(package) + RECORD
        self._upload(key, json.dumps(record).encode())

    def _sync(self, package: dict[str, Any], directory: Path) -> None:
        """Download the version's files not yet cached, or changed since (by ETag)."""
        prefix = self._files_prefix(package)
        directory.mkdir(parents=True, exist_ok=True)
        etags_path = directory / ETAGS
        etags = json.loads(etags_path.read_text()) if etags_path.is_file() else {}
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for item in (item for page in pages for item in page.get("Contents", [])):
            name = item["Key"][len(prefix) :]
            if name in ("", RECORD) or "/" in name:
                continue
            if etags.get(name) != item["ETag"] or not (directory / name).is_file():
                _atomic_download(self.s3, self.bucket, item["Key"], directory / name)
                etags[name] = item["ETag"]
        _atomic_write(etags_path, json.dumps(etags).encode())

    # --- SageMaker ----------------------------------------------------------------------------------

    def _summaries(self, **filters: str) -> list[dict[str, Any]]:
        pages = self.sagemaker.get_paginator("list_model_packages").paginate(
            ModelPackageGroupName=self.group, **filters
        )
        return [summary for page in pages for summary in page["ModelPackageSummaryList"]]

    def _describe_arn(self, arn: str) -> dict[str, Any]:
        return dict(self.sagemaker.describe_model_package(ModelPackageName=arn))

    def _describe(self, version: int) -> dict[str, Any]:
        for summary in self._summaries():
            if int(summary["ModelPackageVersion"]) == int(version):
                return self._describe_arn(summary["ModelPackageArn"])
        raise RegistryError(f"no model version {version} in {self.location}")

    def _production_packages(self) -> list[dict[str, Any]]:
        """Packages whose cxr status is production, newest first."""
        approved = [
            self._describe_arn(s["ModelPackageArn"]) for s in self._summaries(ModelApprovalStatus="Approved")
        ]
        found = [p for p in approved if _status(p) == "production"]
        return sorted(found, key=lambda p: -int(p["ModelPackageVersion"]))

    def _package_request(self, prefix: str, files: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        auroc = record["metrics"].get("mean_auroc")
        request: dict[str, Any] = {
            "ModelPackageGroupName": self.group,
            "ModelPackageDescription": f"cxr chest X-ray classifier, group {self.group}"
            + (f", mean AUROC {auroc:.4f}" if isinstance(auroc, float | int) else ""),
            "ModelApprovalStatus": APPROVAL["candidate"],
            "CustomerMetadataProperties": _properties(self._uri(prefix), record),
            "Domain": "COMPUTER_VISION",
            "Task": "IMAGE_CLASSIFICATION",
            "ModelCard": {
                "ModelCardContent": json.dumps(model_card_content(self.group, record, self._uri(prefix))),
                "ModelCardStatus": "Draft",
            },
        }
        if "model.tar.gz" in files:
            request["InferenceSpecification"] = {
                "Containers": [{"Image": self.image_uri, "ModelDataUrl": self._uri(prefix + "model.tar.gz")}],
                "SupportedContentTypes": CONTENT_TYPES,
                "SupportedResponseMIMETypes": RESPONSE_TYPES,
                "SupportedRealtimeInferenceInstanceTypes": REALTIME_INSTANCE_TYPES,
            }
        if "metrics.json" in files:
            statistics = {"ContentType": "application/json", "S3Uri": self._uri(prefix + "metrics.json")}
            request["ModelMetrics"] = {"ModelQuality": {"Statistics": statistics}}
        return request

    def _update(self, package: dict[str, Any], status: str, decision: str | None) -> None:
        """Set status (and decision) on a package, sending every field: UpdateModelPackage merges the
        properties on AWS but replaces them (and clears omitted fields) on some emulators."""
        properties = {**package.get("CustomerMetadataProperties", {}), "cxr:status": status}
        request: dict[str, Any] = {"ApprovalDescription": package.get("ApprovalDescription", "")}
        if decision is not None:
            request["ApprovalDescription"] = " ".join(decision.split())[:1024]
            properties.pop("cxr:decision", None)
            properties.update(_decision_property(decision))
            if "cxr:decision" not in properties:
                request["CustomerMetadataPropertiesToRemove"] = ["cxr:decision"]
        self.sagemaker.update_model_package(
            ModelPackageArn=package["ModelPackageArn"],
            ModelApprovalStatus=APPROVAL[status],
            CustomerMetadataProperties=properties,
            **request,
        )

    def _version(self, package: dict[str, Any]) -> ModelVersion:
        number = int(package["ModelPackageVersion"])
        directory = cxr_home() / "sagemaker-registry" / self.group / str(number)
        self._sync(package, directory)
        record = self._record(package)
        containers = package.get("InferenceSpecification", {}).get("Containers", [])
        return ModelVersion(
            version=number,
            created=package["CreationTime"].timestamp(),
            status=_status(package),
            mean_auroc=record["metrics"].get("mean_auroc"),
            metrics=record["metrics"],
            lineage=record["lineage"],
            decision=record["decision"],
            directory=directory,
            arn=package["ModelPackageArn"],
            model_data_url=containers[0].get("ModelDataUrl") if containers else None,
        )


def _check_files(files: dict[str, str | Path | bytes]) -> None:
    """Names must be plain file names (not the reserved record); paths must exist before anything is
    uploaded."""
    for name, content in files.items():
        if not name or "/" in name or name in (".", "..", RECORD, ETAGS):
            raise RegistryError(f"invalid registry file name {name!r}")
        if not isinstance(content, bytes) and not Path(content).is_file():
            raise FileNotFoundError(f"no such file: {content}")


def _status(package: dict[str, Any]) -> str:
    """The cxr status, unless the approval status was changed outside cxr since."""
    approval = package.get("ModelApprovalStatus", APPROVAL["candidate"])
    recorded = package.get("CustomerMetadataProperties", {}).get("cxr:status")
    if recorded in APPROVAL and APPROVAL[recorded] == approval:
        return str(recorded)
    return {"Approved": "approved", "Rejected": "archived"}.get(approval, "candidate")


def _property_value(value: Any) -> str:
    """`value` as a valid property value: allowed characters only, one line, at most 256 characters."""
    text = "".join(c if c.isalnum() or c in "_.:/=+-@" else " " for c in str(value))
    return " ".join(text.split())[:256]


def _decision_property(decision: str) -> dict[str, str]:
    value = _property_value(decision)
    return {"cxr:decision": value} if value else {}


def _properties(files_uri: str, record: dict[str, Any]) -> dict[str, str]:
    """Properties of a new package: status, where its files are, mean AUROC, decision, scalar lineage."""
    properties = {"cxr:status": "candidate", "cxr:files": files_uri}
    if record["metrics"].get("mean_auroc") is not None:
        properties["cxr:mean_auroc"] = _property_value(record["metrics"]["mean_auroc"])
    properties.update(_decision_property(record["decision"]))
    scalars = [(k, v) for k, v in record["lineage"].items() if isinstance(v, str | int | float | bool)]
    for key, value in scalars[:MAX_LINEAGE_PROPERTIES]:
        name, text = _property_value(f"cxr:lineage.{key}")[:128], _property_value(value)
        if text and " " not in name:
            properties[name] = text
    return properties


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


def _atomic_download(s3: Any, bucket: str, key: str, target: Path) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        s3.download_file(bucket, key, temporary)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def model_card_content(group: str, record: dict[str, Any], files_uri: str) -> dict[str, Any]:
    """The package's SageMaker model card (model card JSON schema): overview, intended use, test AUROC.

    The full Markdown card (CIs, calibration, subgroups, gate decision) sits beside the model in S3.
    """
    auroc = record["metrics"].get("auroc") or {}
    metric_data = [{"name": f"AUROC {finding}", "type": "number", "value": float(value)}
                   for finding, value in auroc.items() if isinstance(value, int | float)]  # fmt: skip
    if isinstance(record["metrics"].get("mean_auroc"), int | float):
        metric_data.insert(
            0, {"name": "mean AUROC", "type": "number", "value": float(record["metrics"]["mean_auroc"])}
        )
    content: dict[str, Any] = {
        "model_overview": {
            "model_description": "Multi-label chest X-ray classifier for the 14 NIH ChestX-ray14 findings: "
            "DenseNet121 (ImageNet) -> global average pooling -> 1024-512 ReLU dropout 0.3 -> 14 sigmoids.",
            "problem_type": "Multi-label image classification",
            "algorithm_type": "Convolutional neural network (DenseNet121)",
            "model_name": f"cxr-{group}",
        },
        "intended_uses": {
            "purpose_of_model": "Research and triage support on frontal chest radiographs.",
            "intended_uses": " ".join(INTENDED_USE.replace("**", "").split()),  # the Markdown card's text
            "factors_affecting_model_efficiency": "NIH labels are text-mined and noisy; scanners, views and "
            "populations unlike NIH's shift performance (see the subgroup table in the full card).",
            "risk_rating": "High",
            "explanations_for_risk_rating": "Clinical images; errors may delay care if used without review.",
        },
        "additional_information": {"custom_details": {"full_model_card": f"{files_uri}model_card.md"}},
    }
    if metric_data:
        content["evaluation_details"] = [
            {"name": "held-out test split", "metric_groups": [{"name": "test", "metric_data": metric_data}]}
        ]
    return content
