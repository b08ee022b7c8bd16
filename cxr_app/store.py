"""The application's tables: accounts, the cases it has read, and the audit log.

Reviews live beside them in `cxr.reviews` (the table MonitorFlow reads). Nothing here identifies a
patient: a case is its inference id, the endpoint's answer and the image's pixels re-encoded as PNG
(no DICOM tags, no file name, no PNG/JPEG metadata).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)

from cxr.reviews import ReviewStore, open_engine

ROLES = ("viewer", "reviewer", "admin")

metadata = MetaData()
users = Table(
    "users",
    metadata,
    Column("username", String(64), primary_key=True),
    Column("password_hash", String(256), nullable=False),
    Column("role", String(16), nullable=False),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked_until", DateTime(timezone=True)),
)
cases = Table(
    "cases",
    metadata,
    Column("inference_id", String(64), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("created_by", String(64), nullable=False),
    Column("variant", String(64)),
    Column("model_version", String(32)),
    Column("answer", JSON, nullable=False),  # the endpoint's answer for this image
    Column("priority", Integer, nullable=False, default=0),  # higher: more uncertain, reviewed first
    Column("image_png", LargeBinary, nullable=False),
)
audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("username", String(64)),
    Column("action", String(64), nullable=False),
    Column("detail", Text, nullable=False),
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Store:
    """The application's database: its own tables and the review store, on one engine."""

    def __init__(self, url: str):
        self.engine: Engine = open_engine(url)
        metadata.create_all(self.engine)
        self.reviews = ReviewStore(self.engine)

    # accounts
    def user(self, username: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(users).where(users.c.username == username)).mappings().first()
        return dict(row) if row else None

    def users(self) -> list[dict[str, Any]]:
        query = select(users.c.username, users.c.role, users.c.locked_until).order_by(users.c.username)
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def put_user(self, username: str, password_hash: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        values = {"password_hash": password_hash, "role": role, "failed_logins": 0, "locked_until": None}
        with self.engine.begin() as connection:
            found = connection.execute(select(users.c.username).where(users.c.username == username)).first()
            if found:
                connection.execute(update(users).where(users.c.username == username).values(**values))
            else:
                connection.execute(insert(users).values(username=username, **values))

    def update_user(self, username: str, **values: Any) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(users).where(users.c.username == username).values(**values))

    # cases
    def add_case(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(cases).values(created_at=now(), **row))

    def case(self, inference_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(cases).where(cases.c.inference_id == inference_id)).mappings()
            found = row.first()
        return dict(found) if found else None

    def worklist(self, uncertain_first: bool, limit: int = 100) -> list[dict[str, Any]]:
        """Cases awaiting review: oldest first, or the most uncertain first."""
        reviewed = self.reviews.reviewed()
        order = [cases.c.priority.desc(), cases.c.created_at] if uncertain_first else [cases.c.created_at]
        columns = [c for c in cases.c if c.name != "image_png"]
        waiting: list[dict[str, Any]] = []
        with self.engine.connect() as connection:
            for row in connection.execute(select(*columns).order_by(*order)).mappings():
                if row["inference_id"] not in reviewed:
                    waiting.append(dict(row))
                if len(waiting) >= limit:
                    break
        return waiting

    def case_counts(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            total = connection.execute(select(func.count()).select_from(cases)).scalar_one()
        return {"cases": int(total), "reviewed": len(self.reviews.reviewed())}

    def reviewed_cases(self) -> list[dict[str, Any]]:
        """Every reviewed case with its answer and labels (for A/B accuracy per variant)."""
        truth = self.reviews.table().set_index("inference_id")
        columns = [cases.c.inference_id, cases.c.variant, cases.c.model_version, cases.c.answer]
        query = select(*columns).where(cases.c.inference_id.in_(list(truth.index)))
        with self.engine.connect() as connection:
            rows = [dict(r) for r in connection.execute(query).mappings()]
        return [{**row, "labels": truth.loc[row["inference_id"]].to_dict()} for row in rows]

    # audit
    def log(self, actor: str | None, action: str, **detail: Any) -> None:
        """Append one line to the audit log: who (`actor`, None when unknown) did what."""
        with self.engine.begin() as connection:
            connection.execute(insert(audit).values(at=now(), username=actor, action=action,
                                                    detail=json.dumps(detail, sort_keys=True)))  # fmt: skip

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        query = select(audit).order_by(audit.c.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]
