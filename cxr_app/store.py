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
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    exists,
    func,
    insert,
    select,
    update,
)

from cxr.reviews import ReviewStore, open_engine, reviews

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
    Column("session_version", Integer, nullable=False, default=0),  # raised to end every session
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
    Index("cases_worklist", "priority", "created_at"),
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
            if found:  # a reset ends the account's sessions
                values["session_version"] = users.c.session_version + 1
                connection.execute(update(users).where(users.c.username == username).values(**values))
            else:
                connection.execute(insert(users).values(username=username, session_version=0, **values))

    def count_attempt(self, username: str) -> dict[str, Any] | None:
        """Count one sign-in attempt (atomically) and return the account as it is now, or None."""
        with self.engine.begin() as connection:
            connection.execute(update(users).where(users.c.username == username)
                               .values(failed_logins=users.c.failed_logins + 1))  # fmt: skip
            row = connection.execute(select(users).where(users.c.username == username)).mappings().first()
        return dict(row) if row else None

    def lock(self, username: str, until: dt.datetime) -> None:
        """Lock the account until `until`; its sessions end."""
        self.update_user(username, locked_until=until, failed_logins=0,
                         session_version=users.c.session_version + 1)  # fmt: skip

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
        order = [cases.c.priority.desc(), cases.c.created_at] if uncertain_first else [cases.c.created_at]
        columns = [c for c in cases.c if c.name != "image_png"]
        query = select(*columns).where(~self._reviewed(cases.c.inference_id)).order_by(*order).limit(limit)
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def case_counts(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            total = connection.execute(select(func.count()).select_from(cases)).scalar_one()
            reviewed = connection.execute(select(func.count()).where(self._reviewed(cases.c.inference_id)))
            return {"cases": int(total), "reviewed": int(reviewed.scalar_one())}

    def reviewed_cases(self, limit: int = 5000) -> list[dict[str, Any]]:
        """The latest `limit` reviewed cases with their answer and labels (for A/B accuracy per variant)."""
        columns = [cases.c.inference_id, cases.c.variant, cases.c.model_version, cases.c.answer]
        latest = (select(*columns).where(self._reviewed(cases.c.inference_id))
                  .order_by(cases.c.created_at.desc()).limit(limit).subquery())  # fmt: skip
        query = select(latest, reviews.c.finding, reviews.c.label).join(
            reviews, reviews.c.inference_id == latest.c.inference_id
        )
        found: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as connection:
            for row in connection.execute(query).mappings():
                fields = {k: row[k] for k in ("inference_id", "variant", "model_version", "answer")}
                case = found.setdefault(row["inference_id"], {**fields, "labels": {}})
                case["labels"][row["finding"]] = int(row["label"])
        return list(found.values())

    @staticmethod
    def _reviewed(inference_id: Any) -> Any:
        return exists().where(reviews.c.inference_id == inference_id)

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
