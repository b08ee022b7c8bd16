"""The DICOM node between a PACS and the cxr endpoint.

Studies arrive by C-STORE (the node is a Storage SCP, pynetdicom) or are pulled by DICOMweb (QIDO-RS
search, WADO-RS retrieve). A study is processed once no instance of it has arrived for `settle_seconds`:
its frontal chest radiographs, chosen by their headers (`cxr.serve.dicom.frontal_chest_problems`), go to
the endpoint's `/invocations` as `application/dicom`, and a DICOM SR (TID 1500, `cxr_dicom.sr`) with the
results goes back to the PACS by C-STORE or STOW-RS.

Reliability:
- an instance is written to the spool folder before its C-STORE is acknowledged (a full disk answers
  "out of resources", so the PACS keeps it and retries);
- a study is scored once: a study seen again with the same instances is not scored again (the state
  file keeps what was sent);
- a failure (endpoint, PACS) is retried `attempts` times, `retry_seconds` apart, then the study's files
  move to the dead-letter folder with the reason;
- logs name a study by a salted hash of its UID, never by a UID or a patient attribute.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_dicom.sr import MANUFACTURER  # what cxr_dicom writes into its own reports and overlays

log = logging.getLogger(__name__)

QUIET_LIBRARIES = ("pynetdicom", "highdicom", "pydicom", "dicomweb_client", "urllib3", "requests")
REFUSALS = (400, 413, 415, 422)  # the endpoint's answers that judge the image, not the request's route
MAX_ANSWER = 1 << 20  # bytes of an endpoint answer read
CAPTURES = ("1.2.840.10008.5.1.4.1.1.7",)  # Secondary Capture Image Storage: screenshots, overlays
RADIOGRAPHY = ("CR", "DX", "RG", "OT", "")  # modalities the header rules accept as (maybe) a radiograph

DONE_TABLE = (
    "CREATE TABLE IF NOT EXISTS done (study TEXT, instances TEXT, sr_uid TEXT, at REAL,"
    " PRIMARY KEY (study, instances))"
)


class NodeError(RuntimeError):
    """A study could not be processed this time (endpoint or PACS unreachable, refused, ...)."""


@dataclass
class NodeConfig:
    """Where the node listens, the endpoint it asks, and the PACS it answers to."""

    spool: Path
    endpoint: str = "http://127.0.0.1:8080"
    ae_title: str = "CXRNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    pacs_host: str = "127.0.0.1"
    pacs_port: int = 4242
    pacs_ae_title: str = "ORTHANC"
    dicomweb: str | None = (
        None  # e.g. http://pacs:8042/dicom-web; pulls use it, and sends when `send` is stow
    )
    dicomweb_user: str | None = None
    dicomweb_password: str | None = None
    send: str = "c-store"  # c-store | stow
    settle_seconds: float = 5.0
    attempts: int = 3
    retry_seconds: float = 2.0
    timeout: float = 60.0
    max_images: int = 16  # frontal radiographs scored per study; a study's time stays bounded
    allowed_aes: tuple[str, ...] = ()  # calling AE titles allowed to store (empty: any)
    salt: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        self.spool = Path(self.spool)
        if self.send not in ("c-store", "stow"):
            raise ValueError(f"send is c-store or stow, not {self.send!r}")
        if self.send == "stow" and not self.dicomweb:
            raise ValueError("send: stow needs a dicomweb URL")
        for url in (self.endpoint, self.dicomweb):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")

    def study_label(self, study_uid: str) -> str:
        """How logs name a study: a salted hash, not its UID."""
        return hashlib.sha256(f"{self.salt}:{study_uid}".encode()).hexdigest()[:12]


class Spool:
    """Received instances on disk, a folder per study, until their study is processed."""

    def __init__(self, root: Path):
        self.incoming, self.dead, self.processing = (
            root / "incoming",
            root / "dead-letter",
            root / "processing",
        )
        for folder in (
            root,
            self.incoming,
            self.dead,
            self.processing,
        ):  # patient data: the node's user alone reads it
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        self.state = root / "state.sqlite"
        with sqlite3.connect(self.state) as db:
            db.execute(DONE_TABLE)
        for left in self.processing.iterdir():  # claimed when the node stopped: back in line
            for path in left.glob("*.dcm"):
                target = self.incoming / left.name.rsplit("-", 1)[0]
                target.mkdir(mode=0o700, exist_ok=True)
                os.replace(path, target / path.name)
            shutil.rmtree(left, ignore_errors=True)

    def folder(self, study_uid: str) -> Path:
        return self.incoming / hashlib.sha256(study_uid.encode()).hexdigest()[:32]

    def store(self, dataset: Any) -> Path:
        """Write one instance (with its file meta) atomically; returns its path."""
        folder = self.folder(str(dataset.StudyInstanceUID))
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / (hashlib.sha256(str(dataset.SOPInstanceUID).encode()).hexdigest()[:32] + ".dcm")
        partial = path.with_suffix(".part")
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
            dataset.save_as(handle, enforce_file_format=True)
        os.replace(partial, path)
        return path

    def settled(self, seconds: float) -> list[Path]:
        """Study folders none of whose files changed for `seconds`."""
        now, ready = time.time(), []
        for folder in self.incoming.iterdir():
            stamps = [p.stat().st_mtime for p in folder.glob("*.dcm")]
            if stamps and now - max(stamps) >= seconds:
                ready.append(folder)
        return ready

    def done(self, study_uid: str, instances: str) -> str | None:
        """The SR already sent for this study with these instances, if any."""
        with sqlite3.connect(self.state) as db:
            row = db.execute(
                "SELECT sr_uid FROM done WHERE study = ? AND instances = ?", (study_uid, instances)
            ).fetchone()
        return None if row is None else str(row[0])

    def record(self, study_uid: str, instances: str, sr_uid: str) -> None:
        with sqlite3.connect(self.state) as db:
            db.execute(
                "INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?)", (study_uid, instances, sr_uid, time.time())
            )

    def claim(self, folder: Path) -> Path | None:
        """Move a study's folder out of `incoming` to work on it; None when another worker took it."""
        target = self.processing / f"{folder.name}-{time.time_ns()}"
        try:
            folder.rename(target)
        except FileNotFoundError:
            return None
        return target

    def consume(self, folder: Path, files: list[Path]) -> None:
        """Remove a processed (claimed) study's files and folder."""
        for path in files:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()

    def bury(self, folder: Path, reason: str, files: list[Path]) -> Path:
        """Move a study's files to the dead-letter folder, beside a file saying why."""
        target = self.dead / folder.name
        target.mkdir()
        for path in files:
            shutil.move(str(path), target / path.name)
        (target / "reason.txt").write_text(reason + "\n", encoding="utf-8")
        with contextlib.suppress(OSError):
            folder.rmdir()
        return target


@dataclass
class Outcome:
    """What became of one study: `sent` (an SR went to the PACS), `seen` (already sent for these
    instances), `nothing` (no frontal chest radiograph), `dead` (given up, in the dead-letter folder), or
    `taken` (another worker on the spool claimed it first)."""

    study: str  # the salted label, never the UID
    status: str
    sr_uid: str | None = None
    scored: int = 0
    skipped: int = 0
    reason: str | None = None


class DicomNode:
    """A Storage SCP that scores settled studies at the endpoint and sends an SR back (see the module)."""

    def __init__(self, config: NodeConfig):
        self.config = config
        for library in QUIET_LIBRARIES:  # their INFO and DEBUG lines carry UIDs and patient attributes
            logging.getLogger(library).setLevel(logging.WARNING)
        self.spool = Spool(config.spool)
        self._server: Any = None
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.outcomes: list[Outcome] = []

    # -- receiving -------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen for C-STORE and process settled studies in the background."""
        from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts, evt

        ae = AE(ae_title=self.config.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts + VerificationPresentationContexts
        if self.config.allowed_aes:
            ae.require_calling_aet = list(self.config.allowed_aes)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store)]
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        self._worker = threading.Thread(target=self._run, name="cxr-dicom-node", daemon=True)
        self._worker.start()
        log.info("DICOM node %s listening on %s:%d", self.config.ae_title, self.config.host, self.config.port)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._worker is not None:
            self._worker.join(timeout=self.config.timeout)

    def _on_store(self, event: Any) -> int:
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            self.spool.store(dataset)
        except OSError:
            log.exception("could not spool a received instance")
            return 0xA700  # out of resources: the sender keeps the instance and may retry
        except Exception:  # a malformed data set is refused, never crashes the node
            log.warning("refused a received instance that could not be read")
            return 0xC000
        return 0x0000

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.process_settled()
            except Exception as error:  # the node goes on: what failed stays spooled for the next round
                log.error("processing round failed: %s", type(error).__name__)
                self._stop.wait(self.config.retry_seconds)

    def process_settled(self) -> list[Outcome]:
        """Process every study that has settled; returns their outcomes."""
        return [self.process(folder) for folder in self.spool.settled(self.config.settle_seconds)]

    # -- pulling ---------------------------------------------------------------------------------
    def pull(self, study_uid: str) -> Outcome:
        """Fetch a study from the DICOMweb server (WADO-RS) and process it now."""
        try:
            datasets = self._dicomweb().retrieve_study(study_uid)
        except (OSError, ValueError) as error:  # requests' errors are OSErrors; their text names the study
            raise NodeError(f"WADO-RS retrieve failed ({_http_failure(error)})") from error
        if not datasets:
            raise NodeError(
                f"study {self.config.study_label(study_uid)}: the DICOMweb server returned no instance"
            )
        for dataset in datasets:
            self.spool.store(dataset)
        return self.process(self.spool.folder(study_uid))

    # -- processing ------------------------------------------------------------------------------
    def process(self, folder: Path) -> Outcome:
        """Score a spooled study and send its SR, retrying; a study that keeps failing is buried. The study
        is claimed first (its folder moved aside at once), so instances arriving meanwhile, a re-sent one
        included, start a new round, and no other worker on the spool takes the same files."""
        claimed = self.spool.claim(folder)
        if claimed is None:
            return self._note(Outcome(self.config.study_label(folder.name), "taken"))
        folder, files = claimed, sorted(claimed.glob("*.dcm"))
        try:
            return self._process(folder, files)
        except Exception as error:  # a study that cannot be read must not stop the node
            reason = f"unexpected {type(error).__name__}"  # its message may quote the data: not logged
            label = self.config.study_label(folder.name)
            log.error("study %s: %s", label, reason)
            self.spool.bury(folder, reason, files)
            return self._note(Outcome(label, "dead", reason=reason))

    def _process(self, folder: Path, files: list[Path]) -> Outcome:
        import pydicom

        headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in files}  # never the pixels
        datasets = list(headers.values())
        study_uid = str(datasets[0].StudyInstanceUID)
        label = self.config.study_label(study_uid)
        chosen = sorted(str(d.SOPInstanceUID) for d in datasets if scorable(d))  # not the SRs sent back
        instances = hashlib.sha256("\0".join(chosen).encode()).hexdigest()
        sent = self.spool.done(study_uid, instances)
        if sent is not None:
            self.spool.consume(folder, files)
            return self._note(Outcome(label, "seen", sent or None))
        error = ""
        for attempt in range(self.config.attempts):
            try:
                outcome = self._score_and_send(label, headers)
                self.spool.record(study_uid, instances, outcome.sr_uid or "")
                self.spool.consume(folder, files)
                return self._note(outcome)
            except NodeError as problem:
                error = str(problem)
                log.warning(
                    "study %s: attempt %d of %d failed: %s", label, attempt + 1, self.config.attempts, error
                )
                if attempt + 1 < self.config.attempts:
                    time.sleep(self.config.retry_seconds)
        self.spool.bury(folder, error, files)
        return self._note(Outcome(label, "dead", reason=error))

    def _note(self, outcome: Outcome) -> Outcome:
        log.info(
            "study %s: %s (scored %d, skipped %d)",
            outcome.study,
            outcome.status,
            outcome.scored,
            outcome.skipped,
        )
        self.outcomes.append(outcome)
        return outcome

    def _score_and_send(self, label: str, headers: dict[Path, Any]) -> Outcome:
        """Score a study's frontal chest radiographs (at most `max_images`, one at a time from their files)
        and send the SR of their answers."""
        chosen = [path for path, header in headers.items() if scorable(header)][: self.config.max_images]
        if not chosen:
            return Outcome(label, "nothing", skipped=len(headers))
        results = [self._score(path) for path in chosen]
        model = None if any("model" in r for r in results) else self._served_model()
        report = build_report([headers[path] for path in chosen], results, model)
        self._send(report)
        return Outcome(label, "sent", str(report.SOPInstanceUID), len(chosen), len(headers) - len(chosen))

    def _served_model(self) -> Any:
        """The model the endpoint serves first (`/models`), for a report whose every image was refused
        before any model answered."""
        from cxr_dicom.sr import ModelInfo

        request = urllib.request.Request(f"{self.config.endpoint.rstrip('/')}/models")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:  # noqa: S310  # nosec B310
                variants = json.loads(response.read(MAX_ANSWER))
            return ModelInfo.from_answer(variants[sorted(variants)[0]])
        except (urllib.error.URLError, OSError, ValueError, LookupError, TypeError, AttributeError) as error:
            raise NodeError(f"endpoint's /models unreadable ({type(error).__name__})") from error

    def _score(self, path: Path) -> dict[str, Any]:
        """The endpoint's answer for one spooled instance; the image's own refusal (400, 413, 415, 422) is
        a result too, anything else (unreachable, 5xx, a wrong URL or credentials) a failure."""
        request = urllib.request.Request(  # noqa: S310 - http(s) checked in NodeConfig
            f"{self.config.endpoint.rstrip('/')}/invocations", data=path.read_bytes(), method="POST",
            headers={"Content-Type": "application/dicom", "Accept": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:  # noqa: S310  # nosec B310
                answer = json.loads(response.read(MAX_ANSWER))
        except urllib.error.HTTPError as error:
            if error.code in REFUSALS:
                return refusal(error.read(MAX_ANSWER))
            raise NodeError(f"endpoint answered {error.code}") from error
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise NodeError(f"endpoint unreachable ({type(error).__name__})") from error
        if not isinstance(answer, dict):
            raise NodeError("endpoint answered something other than a JSON object")
        return answer

    # -- sending ---------------------------------------------------------------------------------
    def _send(self, report: Any) -> None:
        if self.config.send == "stow":
            self._stow(report)
        else:
            self._c_store(report)

    def _c_store(self, report: Any) -> None:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=self.config.ae_title)
        ae.add_requested_context(report.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        association = ae.associate(
            self.config.pacs_host, self.config.pacs_port, ae_title=self.config.pacs_ae_title
        )
        if not association.is_established:
            raise NodeError("the PACS refused or did not answer the association")
        try:
            status = association.send_c_store(report)
        finally:
            association.release()
        if not status or int(status.Status) != 0x0000:
            raise NodeError(f"the PACS answered C-STORE with status {getattr(status, 'Status', None)!r}")

    def _stow(self, report: Any) -> None:
        import pydicom

        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)  # with its preamble, as STOW-RS stores files
        buffer.seek(0)
        try:
            self._dicomweb().store_instances([pydicom.dcmread(buffer)])
        except (OSError, ValueError) as error:
            raise NodeError(f"STOW-RS failed ({_http_failure(error)})") from error

    def _dicomweb(self) -> Any:
        """A DICOMweb client (dicomweb-client) of the configured server, with its credentials."""
        import requests
        from dicomweb_client import DICOMwebClient

        if not self.config.dicomweb:
            raise NodeError("DICOMweb needs a dicomweb URL")
        session = requests.Session()
        if self.config.dicomweb_user is not None:
            session.auth = (self.config.dicomweb_user, self.config.dicomweb_password or "")
        return DICOMwebClient(self.config.dicomweb, session=session, timeout=self.config.timeout)


def _http_failure(error: BaseException) -> str:
    """An HTTP client error without its text (which quotes URLs holding UIDs): its type and status."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    return type(error).__name__ + (f", status {status}" if status else "")


def scorable(header: Any) -> bool:
    """Whether an instance is a frontal chest radiograph by its header (`frontal_chest_problems`): an
    image (rows and columns), original (not DERIVED, not a secondary capture, not cxr's own output);
    reports, presentation states, overlays and other views are not sent to the endpoint."""
    from cxr.serve.dicom import frontal_chest_problems

    modality = str(header.get("Modality", "")).upper()
    derived = "DERIVED" in [str(v).upper() for v in (header.get("ImageType") or [])]
    ours = str(header.get("Manufacturer", "")) == MANUFACTURER
    image = "Rows" in header and "Columns" in header and str(header.get("SOPClassUID", "")) not in CAPTURES
    return image and modality in RADIOGRAPHY and not (derived or ours) and not frontal_chest_problems(header)


def refusal(body: bytes) -> dict[str, Any]:
    """The endpoint's refusal of one image as a result for the report: the input gate's own (422), or
    any other refusal (an image it cannot read) as an image not judged, with the endpoint's message."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {}
    if isinstance(answer, dict) and "input_gate" in answer:
        return answer
    message = str(answer.get("error") if isinstance(answer, dict) else "") or body[:200].decode(
        "utf-8", "replace"
    )
    return {"error": message, "input_gate": [{"verdict": "out_of_distribution", "reasons": [message[:200]]}]}


def build_report(sources: list[Any], results: list[dict[str, Any]], model: Any = None) -> Any:
    """The SR for a study's scored instances (see `cxr_dicom.sr`); `model` when no answer names one."""
    from cxr_dicom.sr import build_sr

    return build_sr(sources, results, model)
