"""Data capture in SageMaker's format, written in the background, batched, to a directory or `s3://`.

One JSON line per request:

    {"captureData": {"endpointInput":  {"observedContentType", "mode": "INPUT",  "data", "encoding"},
                     "endpointOutput": {"observedContentType", "mode": "OUTPUT", "data", "encoding"}},
     "eventMetadata": {"eventId", "inferenceId", "inferenceTime"}, "eventVersion": "0",
     "cxr": {"variant", "model_version", "status", "features": [{"image_stats", "embedding_projection"}]}}

Rejected requests (4xx) are captured too, without their payload and with the error as output, so the
monitor can measure the share of rejected inputs.

Files follow SageMaker's layout `<prefix>/<endpoint>/<variant>/yyyy/mm/dd/hh/<time>-<id>.jsonl`. DICOM
inputs are captured as the decoded 8-bit PNG, so no DICOM tag (patient data) is ever written. `close()`
drains and flushes everything; nothing accepted is dropped.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import queue
import random
import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from cxr.s3sync import encryption

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


class CaptureWriter:
    """Background writer: `submit()` never blocks on I/O; records are flushed in batches."""

    def __init__(
        self,
        destination: str,
        endpoint: str = "cxr-endpoint",
        sample_percent: float = 100.0,
        max_records: int = 256,
        max_seconds: float = 2.0,
    ):
        self.destination, self.endpoint = destination.rstrip("/"), endpoint
        self.sample_percent, self.max_records, self.max_seconds = sample_percent, max_records, max_seconds
        self.written = 0
        self.files: list[str] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        """Whether the next request is captured, per the sampling percentage."""
        return self.sample_percent >= 100 or random.random() * 100 < self.sample_percent  # noqa: S311  # nosec B311

    def submit(self, record: dict[str, Any]) -> None:
        """Queue a record for writing."""
        self._queue.put(record)

    def close(self) -> None:
        """Flush everything queued and stop the writer thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        pending: list[dict[str, Any]] = []
        while True:
            try:
                record = self._queue.get(timeout=self.max_seconds)
            except queue.Empty:
                record = {}
            if record is None:
                self._flush(pending)
                return
            if record:
                pending.append(record)
            if pending and (len(pending) >= self.max_records or not record):
                self._flush(pending)
                pending = []

    def _flush(self, records: list[dict[str, Any]]) -> None:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            when = record["eventMetadata"]["inferenceTime"]
            hour = f"{when[0:4]}/{when[5:7]}/{when[8:10]}/{when[11:13]}"
            groups[(record["cxr"]["variant"], hour)].append(record)
        for (variant, hour), group in groups.items():
            name = f"{dt.datetime.now(dt.UTC):%H-%M-%S-%f}-{uuid.uuid4().hex[:8]}.jsonl"
            key = f"{self.endpoint}/{variant}/{hour}/{name}"
            body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in group).encode()
            for attempt in range(5):
                try:
                    self._write(key, body)
                    break
                except OSError as error:  # keep the records: retry, then keep them in a local spool
                    log.warning("capture write %s failed (attempt %d): %s", key, attempt + 1, error)
            else:
                self._spool(key, body)
            self.written += len(group)
            self.files.append(key)

    def _write(self, key: str, body: bytes) -> None:
        if self.destination.startswith("s3://"):
            from cxr.data.sources import s3_client, split_s3_uri

            bucket, prefix = split_s3_uri(self.destination)
            try:
                s3_client().put_object(Bucket=bucket, Key=prefix + key, Body=body, **encryption())
            except Exception as error:  # botocore errors: surface as OSError for the retry loop
                raise OSError(str(error)) from error
            return
        path = Path(self.destination) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(body)
        tmp.replace(path)

    def _spool(self, key: str, body: bytes) -> None:
        from cxr.config import cxr_home

        path = cxr_home() / "capture-spool" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        log.error("capture destination unavailable; %s kept in %s", key, path)


def new_event_id() -> str:
    """A unique inference id."""
    return str(uuid.uuid4())
