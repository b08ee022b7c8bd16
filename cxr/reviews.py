"""Reviewed ground truth: a reader's 0/1 answer per finding of a served case, keyed by its inference id.

The web application writes reviews here and MonitorFlow's performance check reads them (`--labels` with a
database URL, by default the same local database the application uses), so ground truth needs no file
assembled by hand. The store is one SQL table (SQLite by default, any SQLAlchemy URL such as PostgreSQL
in production) and holds no patient identifier: the inference id, the finding, the label, who reviewed
it and when.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping

import pandas as pd
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    select,
)

from cxr.config import cxr_home
from cxr.data.findings import FINDINGS

DATABASE_ENV = "CXR_APP_DATABASE"
SCHEMES = ("sqlite:", "postgresql:", "postgresql+", "mysql:", "mysql+")

metadata = MetaData()
reviews = Table(
    "reviews",
    metadata,
    Column("inference_id", String(64), primary_key=True),
    Column("finding", String(40), primary_key=True),
    Column("label", Integer, nullable=False),
    Column("reviewer", String(64), nullable=False),
    Column("reviewed_at", DateTime(timezone=True), nullable=False),
)


def default_database_url() -> str:
    """`$CXR_APP_DATABASE`, else the local SQLite file `~/.cxr/app.db` (shared by the app and the monitor)."""
    return os.environ.get(DATABASE_ENV) or f"sqlite:///{cxr_home() / 'app.db'}"


def is_database_url(text: str) -> bool:
    """Whether `text` names a database (rather than a CSV/JSONL file)."""
    return text.startswith(SCHEMES)


def open_engine(url: str) -> Engine:
    """An engine for `url`; a local SQLite file gets its folder created."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        os.makedirs(os.path.dirname(os.path.abspath(url.removeprefix("sqlite:///"))), exist_ok=True)
    return create_engine(url)


class ReviewStore:
    """Reviews in a SQL database: save a case's answers, read them back as MonitorFlow's ground truth."""

    def __init__(self, url_or_engine: str | Engine):
        engine = open_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        self.engine = engine
        metadata.create_all(engine)

    def save(self, inference_id: str, labels: Mapping[str, int], reviewer: str) -> None:
        """Store (or replace) the review of one case: a 0/1 label for each of the 14 findings."""
        missing = [f for f in FINDINGS if f not in labels]
        unknown = [f for f in labels if f not in FINDINGS]
        if missing or unknown:
            raise ValueError(
                f"a review answers each of the 14 findings (missing {missing}, unknown {unknown})"
            )
        if any(int(value) not in (0, 1) for value in labels.values()):
            raise ValueError("review labels are 0 or 1")
        now = dt.datetime.now(dt.UTC)
        rows = [
            {"inference_id": inference_id, "finding": f, "label": int(labels[f]), "reviewer": reviewer,
             "reviewed_at": now}
            for f in FINDINGS
        ]  # fmt: skip
        with self.engine.begin() as connection:
            connection.execute(delete(reviews).where(reviews.c.inference_id == inference_id))
            connection.execute(insert(reviews), rows)

    def get(self, inference_id: str) -> dict[str, int]:
        """One case's labels by finding ({} when it is not reviewed)."""
        query = select(reviews.c.finding, reviews.c.label).where(reviews.c.inference_id == inference_id)
        with self.engine.connect() as connection:
            return {finding: int(label) for finding, label in connection.execute(query)}

    def reviewed(self) -> set[str]:
        """The inference ids that have a review."""
        with self.engine.connect() as connection:
            return set(connection.execute(select(reviews.c.inference_id).distinct()).scalars())

    def table(self) -> pd.DataFrame:
        """Ground truth as MonitorFlow reads it: one row per reviewed case, `inference_id` and 14 columns."""
        with self.engine.connect() as connection:
            answers = pd.DataFrame(
                connection.execute(select(reviews.c.inference_id, reviews.c.finding, reviews.c.label)).all(),
                columns=["inference_id", "finding", "label"],
            )
        if answers.empty:
            return pd.DataFrame(columns=["inference_id", *FINDINGS])
        wide = answers.pivot(index="inference_id", columns="finding", values="label")
        wide = wide.reindex(columns=FINDINGS)
        return wide.dropna().astype(int).reset_index().rename_axis(columns=None)


def read_reviews(url: str) -> pd.DataFrame:
    """The reviewed ground truth stored at database `url`."""
    return ReviewStore(url).table()
