"""A local model registry: versions with metrics, lineage, model card and status, in SQLite under $CXR_HOME.

Models are kept in groups (like SageMaker model package groups): one per dataset or project, so a
model trained on the demo set is never compared with one trained on NIH. Layout of a group:
`<root>/<group>/registry.db` (one row per version) and `<root>/<group>/models/<version>/` (model.tar.gz,
model card, metrics). Registration copies the files into a staging folder, renames it into place, then
commits the row in one transaction, so a crash leaves either a complete version or none. Status moves
candidate → approved → production → archived; at most one version is in production.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    @property
    def package(self) -> Path:
        """The deployable `model.tar.gz`."""
        return self.directory / "model.tar.gz"

    @property
    def card(self) -> Path:
        """The model card (Markdown)."""
        return self.directory / "model_card.md"


def default_registry_root() -> Path:
    """`$CXR_HOME/registry`."""
    return cxr_home() / "registry"


class Registry:
    """One model group of the registry rooted at a directory (default `$CXR_HOME/registry`)."""

    def __init__(self, root: str | Path | None = None, group: str = DEFAULT_GROUP):
        if not group or not all(c.isalnum() or c in "-_." for c in group):
            raise RegistryError(f"invalid model group name {group!r}: use letters, digits, '-', '_' or '.'")
        self.group = group
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
                target = staging / name
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    shutil.copyfile(content, target)
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


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise RegistryError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
