"""A local model registry: versions with metrics, lineage, model card and status, in SQLite under $CXR_HOME.

Models are kept in groups (like SageMaker model package groups): one per dataset or project, so a
model trained on the demo set is never compared with one trained on NIH. Layout of a group:
`<root>/<group>/registry.db` (one row per version) and `<root>/<group>/models/<version>/` (model.tar.gz,
model card, metrics). Registration copies the files into a staging folder, renames it into place, then
commits the row in one transaction, so a crash leaves either a complete version or none. Status moves
candidate → approved → production → archived; at most one version is in production. `open_registry`
picks this backend or the SageMaker Model Registry (`cxr.aws.model_registry`), which share one interface.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cxr.config import cxr_home

STATUSES = ("candidate", "approved", "production", "archived")
DEFAULT_GROUP = "chestx-ray14"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    mean_auroc REAL,
    metrics TEXT NOT NULL,
    lineage TEXT NOT NULL,
    decision TEXT NOT NULL DEFAULT ''
)
"""


class RegistryError(ValueError):
    """A registry operation is not possible (unknown version, bad status, ...)."""


@dataclass
class ModelVersion:
    """One registered model."""

    version: int
    created: float
    status: str
    mean_auroc: float | None
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    decision: str
    directory: Path
    arn: str | None = None  # the SageMaker model package (None in the local registry)
    model_data_url: str | None = None  # where SageMaker reads model.tar.gz from

    @property
    def package(self) -> Path:
        """The deployable `model.tar.gz`."""
        return self.directory / "model.tar.gz"

    @property
    def card(self) -> Path:
        """The model card (Markdown)."""
        return self.directory / "model_card.md"


class ModelRegistry(Protocol):
    """What the local registry and `cxr.aws.model_registry.SageMakerRegistry` both offer."""

    group: str

    def register(
        self,
        files: dict[str, str | Path | bytes],
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        status: str = "candidate",
        decision: str = "",
    ) -> ModelVersion: ...

    def get(self, version: int) -> ModelVersion: ...

    def versions(self) -> list[ModelVersion]: ...

    def production(self) -> ModelVersion | None: ...

    def set_status(self, version: int, status: str, decision: str | None = None) -> ModelVersion: ...

    def approve(self, version: int) -> ModelVersion: ...

    def put_files(self, version: int, files: dict[str, str | Path | bytes]) -> ModelVersion: ...


def default_registry_root() -> Path:
    """`$CXR_HOME/registry`."""
    return cxr_home() / "registry"


GROUP_NAME = re.compile(r"[A-Za-z0-9](-*[A-Za-z0-9]){0,62}")  # SageMaker's model package group names


def check_group(group: str) -> str:
    """The group name if valid for every backend and as a folder name; RegistryError otherwise."""
    if not isinstance(group, str) or not GROUP_NAME.fullmatch(group):
        raise RegistryError(
            f"invalid model group name {group!r}: 1-63 ASCII letters and digits, '-' between them"
        )
    return group


def open_registry(
    group: str, backend: str = "local", root: str | Path | None = None, **aws_settings: Any
) -> ModelRegistry:
    """The registry for a configured backend: "local" (SQLite under `root`) or "sagemaker" (model package
    group; `aws_settings` are SageMakerRegistry's: s3_prefix, image_uri, kms_key_id, clients)."""
    if backend == "local":
        if aws_settings:
            raise RegistryError(f"the local registry takes no AWS settings (got {sorted(aws_settings)})")
        return Registry(root, group)
    if backend == "sagemaker":
        if root is not None:
            raise RegistryError("the sagemaker registry keeps its files in S3: pass s3_prefix, not root")
        if not aws_settings.get("s3_prefix"):
            raise RegistryError("the sagemaker registry needs s3_prefix (s3://bucket/prefix for model files)")
        from cxr.aws.model_registry import SageMakerRegistry

        return SageMakerRegistry(**aws_settings, group=group)
    raise RegistryError(f"unknown registry backend {backend!r}; one of local, sagemaker")


class Registry:
    """One model group of the registry rooted at a directory (default `$CXR_HOME/registry`)."""

    def __init__(self, root: str | Path | None = None, group: str = DEFAULT_GROUP):
        self.group = check_group(group)
        self.root = Path(root or default_registry_root()) / group
        (self.root / "models").mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.root / "registry.db", timeout=30, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()

    def _row(self, row: tuple) -> ModelVersion:
        version, created, status, auroc, metrics, lineage, decision = row
        return ModelVersion(
            version,
            created,
            status,
            auroc,
            json.loads(metrics),
            json.loads(lineage),
            decision,
            self.root / "models" / str(version),
        )

    def register(
        self,
        files: dict[str, str | Path | bytes],
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        status: str = "candidate",
        decision: str = "",
    ) -> ModelVersion:
        """Add a version: copy `files` (name → path or bytes) in, record metrics and lineage atomically."""
        _check_status(status)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root / "models"))
        try:
            for name, content in files.items():
                _copy_in(content, staging / name)
            with self._db() as db:
                (latest,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()
                version = int(latest) + 1
                staging.rename(self.root / "models" / str(version))
                db.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        version,
                        time.time(),
                        "candidate",
                        metrics.get("mean_auroc"),
                        json.dumps(metrics),
                        json.dumps(lineage),
                        decision,
                    ),
                )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if status != "candidate":
            self.set_status(version, status, decision)
        return self.get(version)

    def get(self, version: int) -> ModelVersion:
        """One version; RegistryError if it does not exist."""
        with self._db() as db:
            row = db.execute("SELECT * FROM versions WHERE version = ?", (int(version),)).fetchone()
        if row is None:
            raise RegistryError(f"no model version {version} in {self.root}")
        return self._row(row)

    def versions(self) -> list[ModelVersion]:
        """All versions, newest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM versions ORDER BY version DESC").fetchall()
        return [self._row(r) for r in rows]

    def production(self) -> ModelVersion | None:
        """The version in production, if any."""
        with self._db() as db:
            row = db.execute("SELECT * FROM versions WHERE status = 'production'").fetchone()
        return self._row(row) if row else None

    def set_status(self, version: int, status: str, decision: str | None = None) -> ModelVersion:
        """Move a version to `status`; promoting to production archives the previous production version."""
        _check_status(status)
        with self._db() as db:
            if db.execute("SELECT 1 FROM versions WHERE version = ?", (int(version),)).fetchone() is None:
                raise RegistryError(f"no model version {version} in {self.root}")
            if status == "production":
                db.execute("UPDATE versions SET status = 'archived' WHERE status = 'production'")
            db.execute("UPDATE versions SET status = ? WHERE version = ?", (status, int(version)))
            if decision is not None:
                db.execute("UPDATE versions SET decision = ? WHERE version = ?", (decision, int(version)))
        return self.get(version)

    def approve(self, version: int) -> ModelVersion:
        """Manual approval: the version goes to production (the previous one is archived)."""
        current = self.get(version)
        if current.status == "archived":
            raise RegistryError(f"version {version} is archived; register it again to redeploy")
        return self.set_status(version, "production", f"{current.decision}\nApproved manually.".strip())

    def put_files(self, version: int, files: dict[str, str | Path | bytes]) -> ModelVersion:
        """Add or replace files of an existing version; each file is replaced atomically."""
        directory = self.get(version).directory
        for name, content in files.items():
            handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
            os.close(handle)
            try:
                _copy_in(content, Path(temporary))
                os.replace(temporary, directory / name)
            finally:
                Path(temporary).unlink(missing_ok=True)
        return self.get(version)


def _copy_in(content: str | Path | bytes, target: Path) -> None:
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        shutil.copyfile(content, target)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise RegistryError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
