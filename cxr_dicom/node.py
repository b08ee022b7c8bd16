"""The DICOM node between a PACS and the cxr endpoint.

Studies arrive by C-STORE (the node is a Storage SCP, pynetdicom) or are pulled by DICOMweb (QIDO-RS
search, WADO-RS retrieve). A study is processed once no instance of it has arrived for `settle_seconds`:
its frontal chest radiographs, chosen by their headers (`cxr.serve.dicom.frontal_chest_problems`), go to
the endpoint's `/invocations` as `application/dicom`, and a DICOM SR (TID 1500, `cxr_dicom.sr`) with the
results goes back to the PACS by C-STORE or STOW-RS.

Reliability (the spool, `cxr_dicom.spool`):
- an instance is written to the spool folder before its C-STORE is acknowledged (a full disk answers
  "out of resources", so the PACS keeps it and retries);
- one report per study: an image is scored once; a study seen again with no new image gets no new
  report; new images of a study get a replacement report on all its images, the next version of the
  previous one (same series, Predecessor Documents Sequence);
- a report is kept before it is sent, and a failed send sends the same instance again, so a lost
  acknowledgement never leaves two reports in the PACS;
- a failure (endpoint, PACS) is retried `attempts` times, `retry_seconds` apart and doubling, then the
  study's files move to the dead-letter folder with the reason (`cxr dicom-node replay` puts them back);
  a node asked to stop puts the study in hand back in line instead;
- one node runs on a spool, and a study's reports are worked on by one process at a time (a pull beside
  the node included);
- logs and the state file name a study by a keyed hash of its UID, never by a UID or a patient attribute.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_dicom.spool import FIRST, KeptReportLost, Report, Spool
from cxr_dicom.sr import MANUFACTURER  # what cxr_dicom writes into its own reports and overlays

log = logging.getLogger(__name__)

QUIET_LIBRARIES = ("pynetdicom", "highdicom", "pydicom", "dicomweb_client", "urllib3", "requests")
REFUSALS = (400, 413, 415, 422)  # the endpoint's answers that judge the image, not the request's route
OUTCOMES_KEPT = 1000  # the latest outcomes kept in memory (`DicomNode.outcomes`)
PRUNE_EVERY_S = 3600.0
MAX_ANSWER = 1 << 20  # bytes of an endpoint answer read
CAPTURES = ("1.2.840.10008.5.1.4.1.1.7",)  # Secondary Capture Image Storage: screenshots, overlays
RADIOGRAPHY = ("CR", "DX", "RG", "OT", "")  # modalities the header rules accept as (maybe) a radiograph
MODALITY_TAG = "00080060"


class NodeError(RuntimeError):
    """A study could not be processed this time (endpoint or PACS unreachable, refused, ...)."""


class Stopping(Exception):
    """The node stops: the study in hand goes back in line."""


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
    attempts: int = 5  # with retry_seconds 5: 5 + 10 + 20 + 40 s, a PACS or endpoint restart outlasted
    retry_seconds: float = 5.0
    timeout: float = 60.0
    max_images: int = 16  # frontal radiographs scored per study; a study's time stays bounded
    allowed_aes: tuple[str, ...] = ()  # calling AE titles allowed to store (empty: any)
    keep_days: float = 30.0  # how long a study's scored headers and answers are kept for a replacement
    overlays: bool = False  # also send a Grad-CAM overlay (Secondary Capture) of each positive finding

    def __post_init__(self) -> None:
        self.spool = Path(self.spool)
        if self.send not in ("c-store", "stow"):
            raise ValueError(f"send is c-store or stow, not {self.send!r}")
        if self.send == "stow" and not self.dicomweb:
            raise ValueError("send: stow needs a dicomweb URL")
        for url in (self.endpoint, self.dicomweb):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")


@dataclass
class Outcome:
    """What became of one study: `sent` (a report went to the PACS), `seen` (no new image since its
    report), `nothing` (no frontal chest radiograph), `dead` (given up, in the dead-letter folder), or
    `taken` (another worker on the spool claimed it first)."""

    study: str  # the study's label (`Spool.label`), never the UID
    status: str
    sr_uid: str | None = None
    scored: int = 0
    skipped: int = 0
    reason: str | None = None
    overlays: int = 0


class DicomNode:
    """A Storage SCP that scores settled studies at the endpoint and sends an SR back (see the module)."""

    def __init__(self, config: NodeConfig):
        self.config = config
        for library in QUIET_LIBRARIES:  # their INFO and DEBUG lines carry UIDs and patient attributes
            logging.getLogger(library).setLevel(logging.WARNING)
        self.spool = Spool(config.spool, config.keep_days)
        self._server: Any = None
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.outcomes: deque[Outcome] = deque(maxlen=OUTCOMES_KEPT)
        self._pruned = -PRUNE_EVERY_S  # the first round prunes
        self._running: contextlib.ExitStack | None = None

    # -- receiving -------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen for C-STORE and process settled studies in the background. One node per spool: a second
        one raises `SpoolBusy`."""
        if self._worker is not None:
            raise RuntimeError("a node starts once; make a new one to start again")
        self._running = contextlib.ExitStack()
        self._running.enter_context(self.spool.running())
        try:
            self._listen()
        except BaseException:
            self._running.close()
            raise
        self._worker = threading.Thread(target=self._run, name="cxr-dicom-node", daemon=True)
        self._worker.start()
        log.info("DICOM node %s listening on %s:%d", self.config.ae_title, self.config.host, self.config.port)

    def _listen(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts, evt

        ae = AE(ae_title=self.config.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts + VerificationPresentationContexts
        if self.config.allowed_aes:
            ae.require_calling_aet = list(self.config.allowed_aes)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store)]
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )

    def stop(self) -> None:
        """Stop listening; a study being processed goes back in line for the next start."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._worker is not None:
            self._worker.join(timeout=self.config.timeout)
            if self._worker.is_alive():  # mid-request: the spool stays this node's until the worker ends
                log.warning("the node's worker is still finishing a study; the spool is released after it")
                return
        if self._running is not None:
            self._running.close()

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
        try:
            self._rounds()
        finally:  # stopped: the spool is released once the study in hand is done
            if self._running is not None:
                self._running.close()

    def _rounds(self) -> None:
        while not self._stop.wait(0.5):
            try:
                if time.monotonic() - self._pruned > PRUNE_EVERY_S:
                    self._pruned = time.monotonic()
                    self.spool.prune()
                self.process_settled()
            except Exception as error:  # the node goes on: what failed stays spooled for the next round
                log.error("processing round failed: %s", type(error).__name__)
                self._stop.wait(self.config.retry_seconds)

    def process_settled(self) -> list[Outcome]:
        """Process every study that has settled (until the node stops); returns their outcomes."""
        outcomes = []
        for folder in self.spool.settled(self.config.settle_seconds):
            if self._stop.is_set():
                break
            outcomes.append(self.process(folder))
        return outcomes

    # -- pulling ---------------------------------------------------------------------------------
    def pull(self, study_uid: str) -> Outcome:
        """Fetch a study from the DICOMweb server and process it now. QIDO-RS lists its instances; WADO-RS
        retrieves, one at a time, those not scored before whose modality may be a radiograph (reports, CT
        and other objects are not downloaded)."""
        client = self._dicomweb()
        try:
            listed = client.search_for_instances(
                study_instance_uid=study_uid, fields=[MODALITY_TAG], get_remaining=True
            )
        except Exception as error:  # HTTP, connection or retry errors: their text names the study
            raise NodeError(f"QIDO-RS search failed ({_http_failure(error)})") from error
        label = self.spool.label(study_uid)
        if not listed:
            raise NodeError(f"study {label}: the DICOMweb server lists no instance")
        known, fetched = self.spool.scored(study_uid), 0
        staged = self.spool.claimed(study_uid)  # out of `incoming`: the node does not take it half pulled
        for series_uid, sop_uid in wanted(listed):
            if self.spool.key(sop_uid) in known:
                continue
            try:
                instance = client.retrieve_instance(study_uid, series_uid, sop_uid)
            except Exception as error:  # HTTP, connection or retry errors: their text names the study
                raise NodeError(f"WADO-RS retrieve failed ({_http_failure(error)})") from error
            self.spool.store(instance, into=staged)
            fetched += 1
        if fetched:
            return self._handle(staged)
        staged.rmdir()
        with self.spool.locked(study_uid):  # nothing new: is a report still owed?
            return self._note(self._deliver(study_uid, {}, len(listed)))

    # -- processing ------------------------------------------------------------------------------
    def process(self, folder: Path) -> Outcome:
        """Score a spooled study's new images and send its report, retrying; a study that keeps failing is
        buried. The study is claimed first (its folder moved aside at once), so instances arriving meanwhile,
        a re-sent one included, start a new round, and no other worker on the spool takes the same files;
        its reports are held (`Spool.locked`) so that two processes never report on one study at once."""
        claimed = self.spool.claim(folder)
        if claimed is None:
            return self._note(Outcome(folder.name[:12], "taken"))
        return self._handle(claimed)

    def _handle(self, folder: Path) -> Outcome:
        """Process a claimed study's files: put back if the node stops, buried if they cannot be read."""
        files, label = sorted(folder.glob("*.dcm")), folder.name[:12]  # the key starts with the label
        try:
            return self._process(folder, files)
        except Stopping:
            self.spool.unclaim(folder)
            return self._note(Outcome(label, "stopped"))
        except Exception as error:  # a study that cannot be read must not stop the node
            reason = f"unexpected {type(error).__name__}"  # its message may quote the data: not logged
            log.error("study %s: %s", label, reason)
            self.spool.bury(folder, reason, files)
            return self._note(Outcome(label, "dead", reason=reason))

    def _process(self, folder: Path, files: list[Path]) -> Outcome:
        import pydicom

        headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in files}  # never the pixels
        study_uid = str(next(iter(headers.values())).StudyInstanceUID)
        with self.spool.locked(study_uid):
            known, room = (
                self.spool.scored(study_uid),
                self.config.max_images - len(self.spool.history(study_uid)),
            )
            key = self.spool.key
            new = {path: header for path, header in headers.items()
                   if scorable(header) and key(str(header.SOPInstanceUID)) not in known}  # fmt: skip
            new = dict(list(new.items())[: max(0, room)])
            try:
                outcome = self._deliver(study_uid, new, len(headers) - len(new))
            except NodeError as error:
                self.spool.bury(folder, str(error), files)
                return self._note(Outcome(self.spool.label(study_uid), "dead", reason=str(error)))
        self.spool.consume(folder, files)
        return self._note(outcome)

    def _deliver(self, study_uid: str, new: dict[Path, Any], skipped: int) -> Outcome:
        """Send what the PACS has not acknowledged yet, then score the study's new images, keep their
        report (and overlays) and send it. What is kept is sent again as the same instances after a
        failure, and an image is scored once across attempts. Raises NodeError once `attempts` tries
        failed, `retry_seconds` apart and doubling, and `Stopping` when the node stops meanwhile."""
        label, error, sent = self.spool.label(study_uid), "", None
        answers: dict[Path, dict[str, Any]] = {}
        for attempt in range(self.config.attempts):
            if self._stop.is_set():
                raise Stopping
            try:
                try:
                    owed = self.spool.unsent(study_uid)
                except KeptReportLost as lost:
                    log.warning("study %s: %s; rebuilt", label, lost)
                    owed = self._rebuild(study_uid)
                if owed:
                    sent = self._send_kept(study_uid, owed)
                known = self.spool.scored(study_uid)
                fresh = {p: h for p, h in new.items() if self.spool.key(str(h.SOPInstanceUID)) not in known}
                if fresh:
                    sent = self._send_kept(study_uid, self._report(study_uid, fresh, answers))
                if sent is None:
                    status = "seen" if self.spool.report(study_uid) else "nothing"
                    return Outcome(label, status, skipped=skipped)
                return Outcome(
                    label, "sent", str(sent[0].SOPInstanceUID), len(new), skipped, overlays=len(sent) - 1
                )
            except NodeError as problem:
                error = str(problem)
                log.warning(
                    "study %s: attempt %d of %d failed: %s", label, attempt + 1, self.config.attempts, error
                )
                if attempt + 1 < self.config.attempts:
                    self._stop.wait(self.config.retry_seconds * 2**attempt)
        if self._stop.is_set():
            raise Stopping
        raise NodeError(error)

    def _rebuild(self, study_uid: str) -> list[Any]:
        """The study's unsent report again, from its kept answers: the same version, so the same instance
        (its overlays, if any, are not made again)."""
        version, earlier = self.spool.report(study_uid), self.spool.history(study_uid)
        if version is None or not earlier:
            raise NodeError("the kept report is lost, and so are its answers")
        answers = [answer for _, answer in earlier]
        model = None if any("model" in answer for answer in answers) else self._served_model()
        report = build_report(
            self.spool, study_uid, [header for header, _ in earlier], answers, model, version
        )
        self.spool.keep(study_uid, [], version, [report])
        return [report]

    def _send_kept(self, study_uid: str, outbox: list[Any]) -> list[Any]:
        """Send a kept report and its overlays, and record that the PACS acknowledged them."""
        report = self.spool.report(study_uid)
        self._send(outbox)
        if report is not None:
            self.spool.sent(study_uid, report)
        return outbox

    def _report(self, study_uid: str, new: dict[Path, Any], answers: dict[Path, dict[str, Any]]) -> list[Any]:
        """Score the new images (one at a time from their files; `answers` keeps them across attempts) and
        build the study's report on them and on the images scored before: the next version of its previous
        report, or, for a study never reported or whose answers were pruned, a first one. Overlays follow
        when asked for. All is kept before it is sent; returns the report, then the overlays."""
        for path in new:
            if self._stop.is_set():
                raise Stopping
            if path not in answers:
                answers[path] = self._score(path)
        results = [answers[path] for path in new]
        earlier = self.spool.history(study_uid)
        previous = self.spool.report(study_uid)
        if previous is None:
            version = FIRST
        elif previous.version == 0:  # pruned: a new generation, a report of its own
            version = Report(previous.generation, 1, False)
        else:
            version = previous.following()
        sources = [header for header, _ in earlier] + list(new.values())
        answered = [answer for _, answer in earlier] + results
        model = None if any("model" in answer for answer in answered) else self._served_model()
        report = build_report(self.spool, study_uid, sources, answered, model, version)
        overlays = self._overlays(study_uid, version, new, results) if self.config.overlays else []
        self.spool.keep(
            study_uid, list(zip(new.values(), results, strict=True)), version, [report, *overlays]
        )
        return [report, *overlays]

    def _overlays(
        self, study_uid: str, version: Report, new: dict[Path, Any], results: list[dict[str, Any]]
    ) -> list[Any]:
        """A Grad-CAM overlay (Secondary Capture, `cxr_dicom.overlay`) of each positive finding of each new
        judged image, asked of the variant that judged it, in one series per report; none when they cannot
        be made (the report goes without them)."""
        from cxr_dicom.overlay import build_overlay
        from cxr_dicom.sr import ModelInfo, image_answers

        overlays: list[Any] = []
        series = self.spool.uid(study_uid, "overlays", version.generation, version.version)
        try:
            for (path, header), result in zip(new.items(), results, strict=True):
                (answer,) = image_answers(result, 1)
                positives = [f for f, yes in (answer.decisions or {}).items() if yes] if answer.judged else []
                if not positives:
                    continue
                model = ModelInfo.from_answer(result["model"])
                for finding, png in self._heatmaps(path, result, positives).items():
                    number = len(overlays) + 1
                    sop = self.spool.uid(study_uid, "overlay", version.generation, version.version, number)
                    overlays.append(build_overlay(header, png, finding, model, series_uid=series, sop_uid=sop,
                                                  instance_number=number))  # fmt: skip
        except Exception as error:  # optional: the report goes without them
            log.warning("study %s: overlays left out (%s)", self.spool.label(study_uid), type(error).__name__)
            return []
        return overlays

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

    def _heatmaps(self, path: Path, result: dict[str, Any], findings: list[str]) -> dict[str, bytes]:
        """The endpoint's Grad-CAM overlays (PNG) of `findings` on one image, asked of the variant that
        answered `result` under its inference id (so the capture counts the case once)."""
        from cxr.serve.headers import INFERENCE_ID, TARGET_VARIANT

        headers = {INFERENCE_ID: str(result.get("inference_id", ""))}
        variant = (result.get("model") or {}).get("variant")
        if variant:
            headers[TARGET_VARIANT] = str(variant)
        answer = self._score(path, explain=findings, headers=headers, limit=MAX_ANSWER * (1 + len(findings)))
        try:
            maps = answer["predictions"][0]["heatmaps"]
            return {finding: base64.b64decode(maps[finding]) for finding in findings}
        except (LookupError, TypeError, ValueError) as error:
            raise NodeError(f"endpoint answered no heatmap ({type(error).__name__})") from error

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

    def _score(
        self,
        path: Path,
        explain: list[str] | None = None,
        headers: dict[str, str] | None = None,
        limit: int = MAX_ANSWER,
    ) -> dict[str, Any]:
        """The endpoint's answer for one spooled instance (with Grad-CAM overlays of `explain`); the image's
        own refusal (400, 413, 415, 422) is a result too, anything else (unreachable, 5xx, a wrong URL or
        credentials) a failure."""
        query = "?" + urllib.parse.urlencode({"explain": ",".join(explain)}) if explain else ""
        request = urllib.request.Request(  # noqa: S310 - http(s) checked in NodeConfig
            f"{self.config.endpoint.rstrip('/')}/invocations{query}", data=path.read_bytes(), method="POST",
            headers={"Content-Type": "application/dicom", "Accept": "application/json", **(headers or {})},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:  # noqa: S310  # nosec B310
                answer = json.loads(response.read(limit))
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
    def _send(self, instances: list[Any]) -> None:
        if self.config.send == "stow":
            self._stow(instances)
        else:
            self._c_store(instances)

    def _c_store(self, instances: list[Any]) -> None:
        """C-STORE the instances to the PACS over one association."""
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=self.config.ae_title)
        for sop_class in dict.fromkeys(str(instance.SOPClassUID) for instance in instances):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        try:
            association = ae.associate(
                self.config.pacs_host, self.config.pacs_port, ae_title=self.config.pacs_ae_title
            )
            if not association.is_established:
                raise NodeError("the PACS refused or did not answer the association")
            try:
                statuses = [association.send_c_store(instance) for instance in instances]
            finally:
                association.release()
        except (OSError, ValueError, RuntimeError) as error:  # unresolvable host, no accepted context, ...
            if isinstance(error, NodeError):
                raise
            raise NodeError(f"C-STORE to the PACS failed ({type(error).__name__})") from error
        for status in statuses:
            code = int(status.Status) if status and "Status" in status else None
            if not stored(code):
                raise NodeError(f"the PACS answered C-STORE with status {code!r}")

    def _stow(self, instances: list[Any]) -> None:
        """STOW-RS the instances to the DICOMweb server in one request."""
        import pydicom

        files = []
        for instance in instances:
            buffer = io.BytesIO()
            instance.save_as(buffer, enforce_file_format=True)  # with its preamble, as STOW-RS stores files
            buffer.seek(0)
            files.append(pydicom.dcmread(buffer))
        try:
            answer = self._dicomweb().store_instances(files)
        except Exception as error:  # HTTP, connection or retry errors: their text names the study
            raise NodeError(f"STOW-RS failed ({_http_failure(error)})") from error
        stored_uids = {
            str(item.get("ReferencedSOPInstanceUID", ""))
            for item in (answer or {}).get("ReferencedSOPSequence", [])
        }
        missing = sum(str(instance.SOPInstanceUID) not in stored_uids for instance in files)
        if missing:  # refused (FailedSOPSequence), or an answer that does not say it stored them
            raise NodeError(f"STOW-RS: the server refused {missing} of {len(files)} instances")

    def _dicomweb(self) -> Any:
        """A DICOMweb client (dicomweb-client) of the configured server, with its credentials."""
        import requests
        from dicomweb_client import DICOMwebClient

        if not self.config.dicomweb:
            raise NodeError("DICOMweb needs a dicomweb URL")
        session = requests.Session()
        if self.config.dicomweb_user is not None:
            session.auth = (self.config.dicomweb_user, self.config.dicomweb_password or "")
        client = DICOMwebClient(self.config.dicomweb, session=session, timeout=self.config.timeout)
        client.set_http_retry_params(retry=False)  # the node retries, with its own backoff
        return client


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


def build_report(
    spool: Spool,
    study_uid: str,
    sources: list[Any],
    results: list[dict[str, Any]],
    model: Any,
    version: Report,
) -> Any:
    """The SR for a study's scored instances (see `cxr_dicom.sr`); `model` when no answer names one. Its
    UIDs derive from the spool, the study and its version; a version after the first is in the first's
    series and names the one before it as predecessor."""
    from pydicom import Dataset
    from pydicom.uid import ComprehensiveSRStorage

    from cxr_dicom.sr import build_sr

    series = spool.uid(study_uid, "series", version.generation)
    previous = []
    if version.version > 1:
        predecessor = Dataset()
        predecessor.StudyInstanceUID, predecessor.SeriesInstanceUID = study_uid, series
        predecessor.SOPInstanceUID = spool.uid(study_uid, "report", version.generation, version.version - 1)
        predecessor.SOPClassUID = ComprehensiveSRStorage
        previous.append(predecessor)
    return build_sr(
        sources, results, model, series_uid=series, instance_number=version.version,
        sop_uid=spool.uid(study_uid, "report", version.generation, version.version),
        previous=previous or None,
    )  # fmt: skip


def stored(status: int | None) -> bool:
    """Whether a C-STORE status means the PACS keeps the instance: success, or a warning (coercion of
    data elements, elements discarded, data set does not match the SOP class, ...)."""
    return status is not None and (status in (0x0000, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF)


def wanted(listed: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (series, instance) UIDs of a QIDO-RS listing worth retrieving: those whose modality, when the
    listing gives it, may be a radiograph, and that are not secondary captures."""
    chosen = []
    for item in listed:
        series, sop = _value(item, "0020000E"), _value(item, "00080018")
        modality, sop_class = _value(item, MODALITY_TAG), _value(item, "00080016")
        if (
            series
            and sop
            and (modality is None or modality.upper() in RADIOGRAPHY)
            and sop_class not in CAPTURES
        ):
            chosen.append((series, sop))
    return chosen


def _value(item: dict[str, Any], tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or [None]
    return None if values[0] is None else str(values[0])
