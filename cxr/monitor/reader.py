"""Read captured traffic for a time window: SageMaker's capture layout, in a directory or under `s3://`.

Only the hour folders that overlap the window are listed. Files are parsed in parallel processes; lines
that are not valid capture records are counted as malformed, never fatal. Each served image yields one
row of features (image statistics, embedding projection) and its predicted probabilities.

Records of the cxr server carry their features in a `cxr` block. SageMaker's own Data Capture records
(real-time endpoints) have none: given the package of the model version that served them, their captured
input is decoded (and cropped) in the parsing workers, then featurized in one batched pass per version
(`cxr.monitor.featurize`); without one, or when the input cannot be decoded, they count as served without
features. Every row keeps the model version that served it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cxr.data.findings import FINDINGS
from cxr.inference import prepare
from cxr.monitor.baseline import IMAGE_FEATURES
from cxr.monitor.featurize import Featurizer
from cxr.serve.decoder import decode_request

EMBEDDING_DIM = 32
ANY_VERSION = "*"  # settings or featurizer for records of any model version
Row = tuple[list[float] | None, list[float] | None, list[float], np.ndarray | None]  # stats, proj, p, crop


@dataclass
class Traffic:
    """Everything captured for one variant in the window."""

    variant: str
    records: int = 0
    malformed: int = 0
    statuses: Counter = field(default_factory=Counter)
    missing_features: int = 0
    image: np.ndarray = field(default_factory=lambda: np.zeros((0, len(IMAGE_FEATURES))))
    embedding: np.ndarray = field(default_factory=lambda: np.zeros((0, EMBEDDING_DIM)))
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FINDINGS))))
    inference_ids: list[str] = field(default_factory=list)
    image_ids: list[str | None] = field(default_factory=list)
    times: list[str] = field(default_factory=list)
    model_versions: Counter = field(default_factory=Counter)  # served records per model version
    row_versions: list[str] = field(default_factory=list)  # the model version of each row
    files: int = 0
    featurized: int = 0  # rows whose features the monitor computed (SageMaker-native records)
    gate_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per row; NaN where none
    gate_verdicts: list[str] = field(default_factory=list)  # per row; "unchecked" where none
    gate_refused: int = 0  # requests the input gate refused (422)
    uncertainty: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FINDINGS))))  # NaN where none
    acquisition: list[dict[str, Any] | None] = field(default_factory=list)  # DICOM attributes per row
    decisions: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FINDINGS))))  # 1/0; NaN where none

    def __post_init__(self) -> None:
        """Rows made without the trust fields (no gate, no uncertainty, no DICOM, no decisions) get them
        as missing, so every per-row field has a value for every row."""
        n = len(self.probabilities)
        if n and not len(self.gate_scores):
            self.gate_scores = np.full(n, np.nan)
        if n and not self.gate_verdicts:
            self.gate_verdicts = ["unchecked"] * n
        if n and not len(self.uncertainty):
            self.uncertainty = np.full((n, len(FINDINGS)), np.nan)
        if n and not self.acquisition:
            self.acquisition = [None] * n
        if n and not len(self.decisions):
            self.decisions = np.full((n, len(FINDINGS)), np.nan)

    @property
    def served(self) -> int:
        """Requests answered with 200."""
        return int(self.statuses.get(200, 0))

    @property
    def rejected(self) -> int:
        """Requests answered with a 4xx."""
        return int(sum(n for s, n in self.statuses.items() if 400 <= s < 500))

    @property
    def out_of_distribution(self) -> int:
        """Images the input gate judged out of distribution: refused requests plus flagged answers."""
        return self.gate_refused + sum(v == "out_of_distribution" for v in self.gate_verdicts)

    def of_version(self, version: str) -> Traffic:
        """The rows this model version served (its served records as the record counts)."""
        pick = [i for i, v in enumerate(self.row_versions) if v == version]
        served = int(self.model_versions.get(version, 0))
        return self.rows(pick, records=served, statuses=Counter({200: served}),
                         model_versions=Counter({version: served}))  # fmt: skip

    def first_answers(self) -> Traffic:
        """One row per inference id: its first answer. A case asked again under its id (a heatmap fetched
        later, a client's retry) is neither a new case nor a second label match."""
        first: dict[str, int] = {}
        pick = [i for i, key in enumerate(self.inference_ids) if first.setdefault(key, i) == i]
        if len(pick) == len(self.inference_ids):
            return self
        counts = {"records": self.records, "statuses": self.statuses, "model_versions": self.model_versions}
        return self.rows(pick, malformed=self.malformed, missing_features=self.missing_features,
                         featurized=self.featurized, gate_refused=self.gate_refused, **counts)  # fmt: skip

    def rows(self, pick: list[int], **counts: Any) -> Traffic:
        """The rows `pick` of this traffic, with the record counts given."""
        return Traffic(
            self.variant,
            image=self.image[pick],
            embedding=self.embedding[pick],
            probabilities=self.probabilities[pick],
            inference_ids=[self.inference_ids[i] for i in pick],
            image_ids=[self.image_ids[i] for i in pick],
            times=[self.times[i] for i in pick],
            row_versions=[self.row_versions[i] for i in pick],
            files=self.files,
            gate_scores=self.gate_scores[pick],
            gate_verdicts=[self.gate_verdicts[i] for i in pick],
            uncertainty=self.uncertainty[pick],
            acquisition=[self.acquisition[i] for i in pick],
            decisions=self.decisions[pick],
            **counts,
        )

    def summary(self) -> dict[str, Any]:
        """Counts for reports and cards."""
        return {
            "variant": self.variant,
            "files": self.files,
            "records": self.records,
            "served": self.served,
            "rejected": self.rejected,
            "malformed": self.malformed,
            "images": len(self.image),
            "featurized": self.featurized,
            "model_versions": dict(self.model_versions),
            "out_of_distribution": self.out_of_distribution,
        }


def hours(start: dt.datetime, end: dt.datetime) -> list[str]:
    """The `yyyy/mm/dd/hh` folders that overlap [start, end)."""
    current = start.replace(minute=0, second=0, microsecond=0)
    out = []
    while current < end:
        out.append(current.strftime("%Y/%m/%d/%H"))
        current += dt.timedelta(hours=1)
    return out


def list_capture_files(
    uri: str, endpoint: str, variant: str, start: dt.datetime, end: dt.datetime
) -> list[str]:
    """Capture files of one variant whose hour folder overlaps the window."""
    files: list[str] = []
    if uri.startswith("s3://"):
        from cxr.data.sources import s3_client, split_s3_uri

        bucket, prefix = split_s3_uri(uri)
        paginator = s3_client().get_paginator("list_objects_v2")
        for hour in hours(start, end):
            for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}{endpoint}/{variant}/{hour}/"):
                files += [
                    f"s3://{bucket}/{o['Key']}"
                    for o in page.get("Contents", [])
                    if o["Key"].endswith(".jsonl")
                ]
        return files
    for hour in hours(start, end):
        folder = Path(uri) / endpoint / variant / hour
        if folder.is_dir():
            files += sorted(str(p) for p in folder.glob("*.jsonl"))
    return files


def list_variants(uri: str, endpoint: str) -> list[str]:
    """Variant folders under an endpoint's capture prefix."""
    if uri.startswith("s3://"):
        from cxr.data.sources import s3_client, split_s3_uri

        bucket, prefix = split_s3_uri(uri)
        response = s3_client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}{endpoint}/", Delimiter="/")
        return sorted(p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in response.get("CommonPrefixes", []))
    root = Path(uri) / endpoint
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _read(path: str) -> bytes:
    if path.startswith("s3://"):
        from cxr.data.sources import s3_client, split_s3_uri

        bucket, key = split_s3_uri(path)
        return bytes(s3_client().get_object(Bucket=bucket, Key=key.rstrip("/"))["Body"].read())
    return Path(path).read_bytes()


def _image_id(metadata: dict[str, Any]) -> str | None:
    for attributes in metadata.get("customAttributes") or []:
        for part in str(attributes).split(","):
            name, _, value = part.partition("=")
            if name.strip() == "image_id":
                return value.strip()
    return None


def parse_file(
    path: str,
    start_text: str,
    end_text: str,
    settings: dict[str, dict[str, Any]] | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """Parse one capture file into plain lists (picklable across processes).

    `settings` maps a model version (or ANY_VERSION) to its package's `image_size` and `crop`: records of
    that version without features get their captured input decoded and cropped (`crops` holds the crops,
    `pending` their row indices); `unfeatured` counts, per version, those left without. `version` is the
    model version of records that name none.
    """
    out: dict[str, Any] = {"records": 0, "malformed": 0, "statuses": Counter(), "missing": 0, "image": [],
                           "embedding": [], "probabilities": [], "ids": [], "image_ids": [], "times": [],
                           "versions": Counter(), "row_versions": [], "crops": [], "pending": [],
                           "unfeatured": Counter(), "gate": [], "gate_refused": 0,
                           "decisions": []}  # fmt: skip
    for line in _read(path).splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            metadata = record["eventMetadata"]
            when = _timestamp(metadata["inferenceTime"])
            extra = record.get("cxr", {})
            status = int(extra.get("status", 200))  # SageMaker captures successful invocations only
            event_id = str(metadata["eventId"])
        except (ValueError, KeyError, TypeError, AttributeError):
            out["malformed"] += 1
            continue
        if not (start_text <= when < end_text):
            continue
        out["records"] += 1
        out["statuses"][status] += 1
        if status == 200:
            _add_served(out, record, extra, event_id, when, settings or {}, version)
        elif status == 422 and isinstance(output := _output(record), dict) and output.get("input_gate"):
            out["gate_refused"] += 1
    return out


def _add_served(
    out: dict[str, Any],
    record: dict[str, Any],
    extra: dict[str, Any],
    event_id: str,
    when: str,
    settings: dict[str, dict[str, Any]],
    default_version: str | None,
) -> None:
    output = _output(record)
    served_by = output.get("model") if isinstance(output, dict) else None  # the cxr server's response
    named = extra.get("model_version", served_by.get("version") if isinstance(served_by, dict) else None)
    version = str(named if named is not None else default_version)
    out["versions"][version] += 1
    package_settings = settings.get(version, settings.get(ANY_VERSION))
    if "features" not in extra and package_settings is None:
        out["unfeatured"][version] += 1
    try:
        rows = _rows(record, extra, output, package_settings)
    except (ValueError, KeyError, TypeError, AttributeError, cv2.error):
        out["missing"] += 1
        return
    metadata = record["eventMetadata"]
    if "features" not in extra:  # native: the response's id (the one clients key ground truth by)
        event_id = str(output.get("inference_id") or metadata.get("inferenceId") or event_id)
    image_id = _image_id(metadata)
    features = extra.get("features") or [{} for _ in rows]
    answers = output["predictions"] if isinstance(output["predictions"], list) else [{}]
    for index, (image, embedding, probabilities, crop) in enumerate(rows):
        out["gate"].append(_trust_fields(features[index] if index < len(features) else {}))
        out["decisions"].append(_decisions(answers[index] if index < len(answers) else {}))
        if crop is not None:
            out["pending"].append(len(out["image"]))
            out["crops"].append(crop)
        out["image"].append(image)
        out["embedding"].append(embedding)
        out["probabilities"].append(probabilities)
        out["ids"].append(event_id if len(rows) == 1 else f"{event_id}#{index}")
        out["image_ids"].append(image_id if len(rows) == 1 else None)
        out["times"].append(when)
        out["row_versions"].append(version)


def _rows(
    record: dict[str, Any], extra: dict[str, Any], output: Any, settings: dict[str, Any] | None
) -> list[Row]:
    """(image stats, projection, probabilities, crop) per image; features None where a crop is pending."""
    if not isinstance(output, dict):
        raise ValueError("unreadable endpoint output")
    probabilities = _probabilities(output["predictions"])
    if "features" in extra or settings is None:
        return [
            (
                [float(f["image_stats"][k]) for k in IMAGE_FEATURES],
                [float(v) for v in f["embedding_projection"]],
                p,
                None,
            )
            for f, p in zip(extra["features"], probabilities, strict=True)
        ]
    crops = _captured_crops(record["captureData"]["endpointInput"], settings)
    return [(None, None, p, crop) for p, crop in zip(probabilities, crops, strict=True)]


def _trust_fields(feature: dict[str, Any]) -> tuple[float, str, list[float] | None, dict[str, Any] | None]:
    """(gate score or NaN, verdict, uncertainty per finding or None, DICOM acquisition attributes or None)."""
    gate = feature.get("input_gate") or {}
    score = gate.get("score")
    uncertainty = feature.get("uncertainty")
    return (float("nan") if score is None else float(score), str(gate.get("verdict", "unchecked")),
            [float(v) for v in uncertainty] if uncertainty else None, feature.get("acquisition"))  # fmt: skip


def _decisions(answer: Any) -> list[float]:
    """The server's per-finding decisions of one image as 1/0 (NaN where the answer has none)."""
    decided = answer.get("decisions") if isinstance(answer, dict) else None
    if not isinstance(decided, dict):
        return [float("nan")] * len(FINDINGS)
    return [float(bool(decided[f])) if f in decided else float("nan") for f in FINDINGS]


def _probabilities(predictions: Any) -> list[list[float]]:
    """The server's `[{"probabilities": {finding: p}}, ...]` or the package handlers' `{finding: p}`."""
    if isinstance(predictions, dict):
        return [[float(predictions[name]) for name in FINDINGS]]
    return [[float(p["probabilities"][name]) for name in FINDINGS] for p in predictions]


def _payload(captured: dict[str, Any]) -> bytes:
    """A captured `endpointInput`/`endpointOutput` body: BASE64 decoded, JSON or CSV as text."""
    data = captured["data"]
    if str(captured.get("encoding", "")).upper() == "BASE64":
        return base64.b64decode(data, validate=True)
    return data.encode() if isinstance(data, str) else json.dumps(data).encode()


def _output(record: dict[str, Any]) -> Any:
    """The endpoint's JSON response, or None when there is none to read."""
    try:
        return json.loads(_payload(record["captureData"]["endpointOutput"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _captured_crops(captured: dict[str, Any], settings: dict[str, Any]) -> list[np.ndarray]:
    """The captured request's images, decoded as the server decodes them, as model input crops."""
    images = decode_request(_payload(captured), captured.get("observedContentType"))
    return [prepare(image.pixels, settings) for image in images]  # pixels only: DICOM tags are dropped


def _timestamp(text: str) -> str:
    """`…T10:15:00Z` (SageMaker, whole seconds) → `…T10:15:00.000Z`, so windows compare as text."""
    text = str(text)
    return text[:19] + ".000Z" if len(text) == 20 and text.endswith("Z") else text


def _iso(moment: dt.datetime) -> str:
    moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


Packages = Callable[[str], str | Path | None]


def read_traffic(
    uri: str,
    endpoint: str,
    start: dt.datetime,
    end: dt.datetime,
    variants: list[str] | None = None,
    workers: int | None = None,
    model: str | Path | Packages | None = None,
    versions: Mapping[str, str] | None = None,
) -> dict[str, Traffic]:
    """Captured traffic per variant in [start, end).

    `model` featurizes records that carry no features (SageMaker Data Capture): one package (or unpacked
    directory) for every record, or a function giving a model version's package (None when it has none),
    so that each record is featurized by the model that served it; records left without count as missing
    features. `versions` names the model version each variant serves, for records that name none.
    """
    variants = variants or list_variants(uri, endpoint)
    featurizers = _Featurizers(model)
    result = {}
    for variant in variants:
        files = list_capture_files(uri, endpoint, variant, start, end)
        traffic = Traffic(variant, files=len(files))
        version = (versions or {}).get(variant)
        parts = _parse_all(files, _iso(start), _iso(end), workers, featurizers.first_pass(), version)
        wanted = featurizers.settings({v for part in parts for v in part["unfeatured"]})
        again = [i for i, part in enumerate(parts) if wanted.keys() & part["unfeatured"].keys()]
        if again:  # now that their versions' packages are known, decode the records left without features
            reparsed = _parse_all([files[i] for i in again], _iso(start), _iso(end), workers, wanted, version)
            for i, part in zip(again, reparsed, strict=True):
                parts[i] = part
        traffic.featurized = _featurize(parts, featurizers)
        _merge(traffic, parts)
        result[variant] = traffic.first_answers()
    return result


class _Featurizers:
    """The featurizer of each model version: one package for all, or each version's own (loaded once)."""

    def __init__(self, model: str | Path | Packages | None):
        self.shared = Featurizer(model) if isinstance(model, str | Path) else None
        self.lookup = model if callable(model) else None
        self.loaded: dict[str, Featurizer | None] = {}

    def get(self, version: str) -> Featurizer | None:
        """The featurizer for records of `version`, or None."""
        if self.lookup is None:
            return self.shared
        if version not in self.loaded:
            package = self.lookup(version)
            self.loaded[version] = Featurizer(package) if package is not None else None
        return self.loaded[version]

    def first_pass(self) -> dict[str, dict[str, Any]]:
        """Parsing settings before any version is known: the shared package's, for every version."""
        return {ANY_VERSION: self.shared.settings} if self.shared is not None else {}

    def settings(self, versions: set[str]) -> dict[str, dict[str, Any]]:
        """Parsing settings of those `versions` that have their own package."""
        found = {v: self.get(v) for v in versions} if self.lookup is not None else {}
        return {v: f.settings for v, f in found.items() if f is not None}


def _parse_all(
    files: list[str],
    start: str,
    end: str,
    workers: int | None,
    settings: dict[str, dict[str, Any]],
    version: str | None,
) -> list[dict[str, Any]]:
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(files) < 4:
        return [parse_file(f, start, end, settings, version) for f in files]
    n = len(files)
    with ProcessPoolExecutor(workers) as pool:
        every = ([start] * n, [end] * n, [settings] * n, [version] * n)
        return list(pool.map(parse_file, files, *every, chunksize=4))


def _featurize(parts: list[dict[str, Any]], featurizers: _Featurizers) -> int:
    """Fill in the pending rows of every part, one batched pass per model version; returns their count."""
    pending: dict[str, list[tuple[dict[str, Any], int, np.ndarray]]] = {}
    for part in parts:
        for index, crop in zip(part["pending"], part["crops"], strict=True):
            pending.setdefault(part["row_versions"][index], []).append((part, index, crop))
        part["crops"] = []
    for version, rows in pending.items():
        featurizer = featurizers.get(version)
        if featurizer is None:  # cannot happen: crops are only made for versions with a package
            raise RuntimeError(f"no model package for version {version}")
        stats, projections = featurizer.features(np.stack([crop for _, _, crop in rows]))
        for (part, index, _), image, embedding in zip(rows, stats, projections, strict=True):
            part["image"][index] = image.tolist()
            part["embedding"][index] = embedding.tolist()
    return sum(len(rows) for rows in pending.values())


def _merge(traffic: Traffic, parts: list[dict[str, Any]]) -> None:
    images, embeddings, probabilities, trust, decisions = [], [], [], [], []
    for part in parts:
        trust += part["gate"]
        decisions += part["decisions"]
        traffic.gate_refused += part["gate_refused"]
        traffic.records += part["records"]
        traffic.malformed += part["malformed"]
        traffic.statuses.update(part["statuses"])
        traffic.missing_features += part["missing"]
        traffic.model_versions.update(part["versions"])
        traffic.row_versions += part["row_versions"]
        images += part["image"]
        embeddings += part["embedding"]
        probabilities += part["probabilities"]
        traffic.inference_ids += part["ids"]
        traffic.image_ids += part["image_ids"]
        traffic.times += part["times"]
    nan_row = [float("nan")] * len(FINDINGS)
    traffic.gate_scores = np.asarray([t[0] for t in trust], dtype=np.float64)
    traffic.gate_verdicts = [t[1] for t in trust]
    traffic.uncertainty = np.asarray([t[2] or nan_row for t in trust], dtype=np.float64).reshape(
        -1, len(FINDINGS)
    )
    traffic.acquisition = [t[3] for t in trust]
    traffic.decisions = np.asarray(decisions, dtype=np.float64).reshape(-1, len(FINDINGS))
    if images:
        traffic.image = np.asarray(images, dtype=np.float64)
        traffic.embedding = np.asarray(embeddings, dtype=np.float64)
        traffic.probabilities = np.asarray(probabilities, dtype=np.float64)
