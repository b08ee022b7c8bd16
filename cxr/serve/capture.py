"""Data capture in SageMaker's format, written in the background, batched, to a directory or `s3://`.

One JSON line per request:

    {"captureData": {"endpointInput":  {"observedContentType", "mode": "INPUT",  "data", "encoding"},
                     "endpointOutput": {"observedContentType", "mode": "OUTPUT", "data", "encoding"}},
     "eventMetadata": {"eventId", "inferenceId", "inferenceTime"}, "eventVersion": "0",
     "cxr": {"variant", "model_version", "status", "features": [{"image_stats", "embedding_projection"}]}}

Refused (4xx) and failed (5xx) requests are captured too, without their payload and with the error as
output, so the monitor can measure the share of rejected inputs and of server errors.

Files follow SageMaker's layout `<prefix>/<endpoint>/<variant>/yyyy/mm/dd/hh/<time>-<id>.jsonl`. DICOM
inputs are captured as the decoded 8-bit PNG, so no DICOM tag (patient data) is ever written.

Durability and memory are bounded: a batch is written once its oldest record is `max_seconds` old (or
`max_records` are waiting), as an fsynced file renamed into place or one S3 object; records waiting
take at most `max_pending_mb`, and `offer()` refuses beyond that (the server then answers 503 rather
than lose a record). A destination that keeps failing sends batches to a local spool; if that fails
too, the batch is kept and retried, and the writer reports itself unhealthy. `close()` drains and
flushes everything.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import random
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.s3sync import encryption
from cxr.serve.errors import ServiceUnavailable

log = logging.getLogger(__name__)


def capture_record(
    input_type: str,
    input_data: bytes,
    output_json: str,
    event_id: str,
    variant: str,
    model_version: Any,
    features: list[dict[str, Any]],
    when: dt.datetime | None = None,
    status: int = 200,
    custom_attributes: str | None = None,
) -> dict[str, Any]:
    """One capture line in SageMaker Data Capture's schema plus cxr's monitoring features."""
    when = when or dt.datetime.now(dt.UTC)
    metadata: dict[str, Any] = {
        "eventId": event_id,
        "inferenceId": event_id,
        "inferenceTime": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
    }
    if custom_attributes:
        metadata["customAttributes"] = [custom_attributes[:1024]]
    return {
        "captureData": {
            "endpointInput": {
                "observedContentType": input_type,
                "mode": "INPUT",
                "data": base64.b64encode(input_data).decode(),
                "encoding": "BASE64",
            },
            "endpointOutput": {
                "observedContentType": "application/json",
                "mode": "OUTPUT",
                "data": output_json,
                "encoding": "JSON",
            },
        },
        "eventMetadata": metadata,
        "eventVersion": "0",
        "cxr": {"variant": variant, "model_version": model_version, "status": status, "features": features},
    }


class CaptureUnavailable(ServiceUnavailable):
    """Capture cannot take a record now: its memory bound is reached, or its writer has stopped."""


@dataclass
class _Pending:
    record: dict[str, Any]
    size: int
    since: float


class CaptureWriter:
    """Background writer: `offer()` never blocks on I/O; records become durable within a bounded delay."""

    def __init__(
        self,
        destination: str,
        endpoint: str = "cxr-endpoint",
        sample_percent: float = 100.0,
        max_records: int = 256,
        max_seconds: float = 1.0,
        max_pending_mb: float = 128.0,
        on_written: Callable[[int], None] | None = None,
        on_lost: Callable[[int], None] | None = None,
    ):
        self.destination, self.endpoint = destination.rstrip("/"), endpoint
        self.sample_percent, self.max_records, self.max_seconds = sample_percent, max_records, max_seconds
        self.max_pending_bytes = int(max_pending_mb * 1024 * 1024)
        self.on_written, self.on_lost = on_written, on_lost
        self.written = self.lost = self.pending_bytes = 0
        self.files: list[str] = []
        self.failure: str | None = None  # why the last write failed; None while writes succeed
        self._pending: deque[_Pending] = deque()
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        """Whether records are being made durable: the writer runs and its last write succeeded."""
        return self._thread.is_alive() and self.failure is None and not self._closing

    @property
    def pending(self) -> int:
        """Records accepted and not yet durable."""
        return len(self._pending)

    def sampled(self) -> bool:
        """Whether the next request is captured, per the sampling percentage."""
        return self.sample_percent >= 100 or random.random() * 100 < self.sample_percent  # noqa: S311  # nosec B311

    def offer(self, record: dict[str, Any]) -> bool:
        """Queue a record unless that would pass the memory bound (then False; one record always fits
        an empty queue). Raises CaptureUnavailable once the writer has stopped."""
        size = _size(record)
        with self._changed:
            if not self._thread.is_alive() or self._closing:
                raise CaptureUnavailable(f"data capture has stopped: {self.failure or 'closed'}")
            if self._pending and self.pending_bytes + size > self.max_pending_bytes:
                return False
            self._pending.append(_Pending(record, size, time.monotonic()))
            self.pending_bytes += size
            self._changed.notify_all()
        return True

    def submit(self, record: dict[str, Any], timeout: float = 30.0) -> None:
        """Queue a record, waiting up to `timeout` seconds for room; CaptureUnavailable when none came."""
        deadline = time.monotonic() + timeout
        while not self.offer(record):
            with self._changed:
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise CaptureUnavailable(f"data capture is full ({self.pending} records waiting)")

    async def put(self, record: dict[str, Any], wait_seconds: float) -> None:
        """`submit()` for the event loop: waits (without blocking it) up to `wait_seconds` for room."""
        deadline = time.monotonic() + wait_seconds
        while not self.offer(record):
            if time.monotonic() >= deadline:
                raise CaptureUnavailable(
                    f"data capture is full ({self.pending} records, {self.pending_bytes:,} bytes waiting "
                    f"to be written); retry"
                )
            await asyncio.sleep(0.02)

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued and stop the writer thread (waiting at most `timeout` seconds)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("data capture: %d records not written when closing", self.pending)

    # -- the writer thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._persist(batch)
        except Exception as error:  # a bug: say so loudly (log, /ping, metrics), never stop silently
            self.failure = f"capture writer stopped: {type(error).__name__}: {error}"
            log.exception("data capture writer stopped; %d records lost", self.pending)
            self._lose(self.pending)

    def _next_batch(self) -> list[_Pending] | None:
        """Wait until the oldest record is `max_seconds` old, `max_records` wait, or closing."""
        with self._changed:
            while True:
                if not self._pending:
                    if self._closing:
                        return None
                    self._changed.wait()
                    continue
                age = time.monotonic() - self._pending[0].since
                if self._closing or len(self._pending) >= self.max_records or age >= self.max_seconds:
                    return [self._pending[i] for i in range(min(len(self._pending), self.max_records))]
                self._changed.wait(self.max_seconds - age)

    def _persist(self, batch: list[_Pending]) -> None:
        """Make a batch durable, one file per (variant, hour); a failed file is retried until written."""
        groups: dict[str, list[_Pending]] = defaultdict(list)
        for item in batch:
            groups[self._key(item.record)].append(item)
        for key, items in groups.items():
            body = "".join(json.dumps(i.record, separators=(",", ":")) + "\n" for i in items).encode()
            while not self._write_or_spool(key, body):
                if self._closing:
                    log.error("data capture: %d records of %s lost when closing: %s", len(items), key,
                              self.failure)  # fmt: skip
                    self._lose(len(items))
                    break
                time.sleep(1.0)
            else:
                self.written += len(items)
                self.files.append(key)
                if self.on_written is not None:
                    self.on_written(len(items))
        self._release(len(batch))

    def _key(self, record: dict[str, Any]) -> str:
        when = record["eventMetadata"]["inferenceTime"]
        hour = f"{when[0:4]}/{when[5:7]}/{when[8:10]}/{when[11:13]}"
        name = f"{dt.datetime.now(dt.UTC):%H-%M-%S-%f}-{uuid.uuid4().hex[:8]}.jsonl"
        return f"{self.endpoint}/{record['cxr']['variant']}/{hour}/{name}"

    def _write_or_spool(self, key: str, body: bytes) -> bool:
        """Write to the destination (3 tries), else to the local spool; False when neither worked."""
        for attempt in range(3):
            try:
                self._write(key, body)
                self.failure = None
                return True
            except OSError as error:
                log.warning("capture write %s failed (attempt %d): %s", key, attempt + 1, error)
                time.sleep(0.1 * (attempt + 1))
        try:
            self._spool(key, body)
            self.failure = None
            return True
        except OSError as error:
            self.failure = f"capture destination and local spool both failed: {error}"
            log.error("data capture: %s; %s kept in memory and retried", self.failure, key)
            return False

    def _release(self, count: int) -> None:
        with self._changed:
            for _ in range(count):
                self.pending_bytes -= self._pending.popleft().size
            self._changed.notify_all()

    def _lose(self, count: int) -> None:
        self.lost += count
        if self.on_lost is not None and count:
            self.on_lost(count)

    def _write(self, key: str, body: bytes) -> None:
        if self.destination.startswith("s3://"):
            from cxr.data.sources import s3_client, split_s3_uri

            bucket, prefix = split_s3_uri(self.destination)
            try:
                s3_client().put_object(Bucket=bucket, Key=prefix + key, Body=body, **encryption())
            except Exception as error:  # botocore errors: surface as OSError for the retry loop
                raise OSError(str(error)) from error
            return
        durable_write(Path(self.destination) / key, body)

    def _spool(self, key: str, body: bytes) -> None:
        from cxr.config import cxr_home

        path = cxr_home() / "capture-spool" / key
        durable_write(path, body)
        log.error("capture destination unavailable; %s kept in %s", key, path)


def durable_write(path: Path, body: bytes) -> None:
    """Write a file so that it is complete or absent, and on disk: temporary file, fsync, rename, fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _size(record: dict[str, Any]) -> int:
    """Memory a queued record holds, about: its input and output text plus the rest."""
    data = record["captureData"]
    return len(data["endpointInput"]["data"]) + len(data["endpointOutput"]["data"]) + 4096


def new_event_id() -> str:
    """A unique inference id."""
    return str(uuid.uuid4())
