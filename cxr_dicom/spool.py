"""The DICOM node's spool: received instances until their study is processed, what each study's report
said, and the dead letters.

Layout (the folders 0700, the files 0600: they hold patient data):
- `incoming/<study key>/<instance key>.dcm`: received instances, a folder per study (written under `tmp/`
  and moved into place once complete);
- `processing/<study key>-<pid>-<time>/`: studies being worked on, claimed by moving their folder here;
- `dead-letter/<study key>-…/`: the files of a study given up on, and `reason.txt`;
- `reports/<study key>/`: per scored instance, its header without pixels and the endpoint's answer
  (`<instance key>.json`), from which a replacement report is built when more images of the study
  arrive, and in `outbox-<generation>-<version>/` the study's latest report and overlays until the PACS
  acknowledges them; removed `keep_days` after the study's last report was sent;
- `state.sqlite`: which instances were scored and the version of each study's latest report, by key;
- `locks/`, `node.lock`: a study's reports are worked on by one process at a time, and one node runs
  on a spool;
- `salt`: the secret behind the keys and behind the UIDs of the node's reports.

Studies and instances are named by keys (a keyed hash of their UIDs), never by the UIDs themselves. The
UIDs of a study's reports and overlays are derived from the salt, the study and the report's version, so
a report rebuilt after a crash is the same instance, and nothing but the version needs keeping.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_dicom.sr import without_pixels

log = logging.getLogger(__name__)

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS scored (study TEXT, instance TEXT, at REAL, PRIMARY KEY (study, instance))",
    "CREATE TABLE IF NOT EXISTS reports (study TEXT PRIMARY KEY, generation INTEGER, version INTEGER,"
    " sent INTEGER, at REAL)",
)
STALE_PART_S = 3600.0  # a half-written file this old belongs to no store in progress


class SpoolBusy(RuntimeError):
    """Another node works on this spool."""


class KeptReportLost(RuntimeError):
    """A report kept as not yet sent cannot be read back (its files were lost or damaged)."""


@dataclass(frozen=True)
class Report:
    """A study's latest report: its version (1, 2, … within a generation; a new generation starts once the
    study's kept answers were pruned) and whether the PACS acknowledged it."""

    generation: int
    version: int
    sent: bool

    def following(self) -> Report:
        return Report(self.generation, self.version + 1, False)


FIRST = Report(0, 1, False)


class Spool:
    """Received instances on disk, a folder per study, until their study is processed (see the module)."""

    def __init__(self, root: Path, keep_days: float = 30.0):
        self.root, self.keep_days = Path(root), keep_days
        self.incoming, self.processing = self.root / "incoming", self.root / "processing"
        self.dead, self.reports = self.root / "dead-letter", self.root / "reports"
        self.tmp, self.locks = self.root / "tmp", self.root / "locks"
        folders = (self.incoming, self.processing, self.dead, self.reports, self.tmp, self.locks)
        for folder in (self.root, *folders):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        self.salt = _salt(self.root / "salt")
        self.state = self.root / "state.sqlite"
        with self._db() as db:
            for statement in SCHEMA:
                db.execute(statement)
        self.state.chmod(0o600)

    # -- names -----------------------------------------------------------------------------------
    def key(self, uid: str) -> str:
        """A UID's name in the spool: a keyed hash (HMAC-SHA256 with the spool's salt)."""
        return hmac.new(self.salt, uid.encode(), hashlib.sha256).hexdigest()[:32]

    def label(self, uid: str) -> str:
        """How logs name a study: the start of its key."""
        return self.key(uid)[:12]

    def folder(self, study_uid: str) -> Path:
        return self.incoming / self.key(study_uid)

    def uid(self, study_uid: str, *parts: object) -> str:
        """A UID the node makes for a study (its reports, overlays, their series): the same for the same
        parts, unguessable without the salt (2.25 and 128 bits of HMAC-SHA256)."""
        text = "\0".join([study_uid, *map(str, parts)])
        digest = hmac.new(self.salt, text.encode(), hashlib.sha256).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"

    # -- received instances ----------------------------------------------------------------------
    def store(self, dataset: Any, into: Path | None = None) -> Path:
        """Write one instance (with its file meta) under `tmp/`, then move it into its study's folder (or
        `into`); returns its path. A study claimed meanwhile gets a new folder for it."""
        study = into or self.folder(str(dataset.StudyInstanceUID))
        name = self.key(str(dataset.SOPInstanceUID)) + ".dcm"
        staged = self.tmp / f"{name}-{secrets.token_hex(4)}"
        with _written(staged) as handle:
            dataset.save_as(handle, enforce_file_format=True)
        for _ in range(10):
            study.mkdir(mode=0o700, exist_ok=True)
            try:
                os.replace(staged, study / name)
                return study / name
            except FileNotFoundError:  # the folder was claimed between mkdir and the move
                continue
        staged.unlink(missing_ok=True)
        raise OSError(f"could not place an instance in {study}")

    def settled(self, seconds: float) -> list[Path]:
        """Study folders none of whose files changed for `seconds`."""
        now, ready = time.time(), []
        for folder in self.incoming.iterdir():
            try:
                stamps = [p.stat().st_mtime for p in folder.glob("*.dcm")]
            except FileNotFoundError:  # claimed by another worker this instant
                continue
            if stamps and now - max(stamps) >= seconds:
                ready.append(folder)
        return ready

    def claim(self, folder: Path) -> Path | None:
        """Move a study's folder out of `incoming` to work on it; None when another worker took it."""
        target = self.processing / f"{folder.name}-{os.getpid()}-{time.time_ns()}"
        try:
            folder.rename(target)
        except FileNotFoundError:
            return None
        return target

    def claimed(self, study_uid: str) -> Path:
        """A new folder for a study, claimed by this process from the start (a pull fills it)."""
        folder = self.processing / f"{self.key(study_uid)}-{os.getpid()}-{time.time_ns()}"
        folder.mkdir(mode=0o700)
        return folder

    def unclaim(self, folder: Path) -> None:
        """Put a claimed study's files back in line (the node stopped before it was done)."""
        target = self.incoming / folder.name.split("-")[0]
        target.mkdir(mode=0o700, exist_ok=True)
        for path in folder.glob("*.dcm"):
            os.replace(path, target / path.name)
        shutil.rmtree(folder, ignore_errors=True)

    def consume(self, folder: Path, files: list[Path]) -> None:
        """Remove a processed (claimed) study's files and folder."""
        for path in files:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Held by the node for as long as it runs: one node per spool. On entry, studies claimed by a
        process that is gone are back in line and stale half-written files are removed."""
        lock = os.open(self.root / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise SpoolBusy(f"another cxr dicom-node runs on {self.root}") from error
            self._recover()
            yield
        finally:
            os.close(lock)

    def _recover(self) -> None:
        for left in self.processing.iterdir():
            parts = left.name.split("-")
            if len(parts) < 3 or not parts[1].isdigit() or not _alive(int(parts[1])):
                self.unclaim(left)
        cutoff = time.time() - STALE_PART_S
        for partial in [
            *self.tmp.iterdir(),
            *self.reports.glob("*/*.part"),
            *self.reports.glob("*/*/*.part"),
        ]:
            with contextlib.suppress(FileNotFoundError):
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()

    # -- dead letters ----------------------------------------------------------------------------
    def bury(self, folder: Path, reason: str, files: list[Path]) -> Path:
        """Move a study's files to the dead-letter folder, beside a file saying why."""
        target = self.dead / folder.name
        target.mkdir(mode=0o700, exist_ok=True)
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                shutil.move(str(path), target / path.name)
        (target / "reason.txt").write_text(reason + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        return target

    def dead_letters(self) -> list[tuple[str, str, int]]:
        """Each dead letter: its name, the reason it was given up on, and how many files it holds."""
        letters = []
        for folder in sorted(self.dead.iterdir()):
            reason = folder / "reason.txt"
            text = reason.read_text(encoding="utf-8").strip() if reason.exists() else "?"
            letters.append((folder.name, text, len(list(folder.glob("*.dcm")))))
        return letters

    def replay(self, name: str) -> int:
        """Put a dead letter's files back in line (the node processes them once they settle); returns how
        many files went back."""
        folder = self.dead / Path(name).name
        if not folder.is_dir():
            raise FileNotFoundError(f"no dead letter {name!r} in {self.dead}")
        study = self.incoming / folder.name.split("-")[0]
        study.mkdir(mode=0o700, exist_ok=True)
        files = list(folder.glob("*.dcm"))
        for path in files:
            os.replace(path, study / path.name)
            os.utime(study / path.name)  # settles from now
        shutil.rmtree(folder)
        return len(files)

    # -- what was reported -----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, study_uid: str) -> Iterator[None]:
        """Exclusive hold on a study's reports, across processes (a pull and a push of one study wait
        for each other), from reading what was scored to marking the report sent. Studies share 256 lock
        files by the start of their key, so the locks stay few."""
        with self._stripe(self.key(study_uid)):
            yield

    @contextlib.contextmanager
    def _stripe(self, key: str) -> Iterator[None]:
        lock = os.open(self.locks / f"{key[:2]}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)

    def scored(self, study_uid: str) -> set[str]:
        """The keys of the study's instances already scored and reported."""
        with self._db() as db:
            rows = db.execute("SELECT instance FROM scored WHERE study = ?", (self.key(study_uid),))
            return {str(row[0]) for row in rows}

    def report(self, study_uid: str) -> Report | None:
        """The study's latest report, if any."""
        with self._db() as db:
            row = db.execute(
                "SELECT generation, version, sent FROM reports WHERE study = ?", (self.key(study_uid),)
            ).fetchone()
        return None if row is None else Report(int(row[0]), int(row[1]), bool(row[2]))

    def history(self, study_uid: str) -> list[tuple[Any, dict[str, Any]]]:
        """The headers and answers of the study's scored instances, as kept for its next report (empty once
        pruned); records the state file does not know (a report that was never kept) are left out."""
        from pydicom import Dataset

        known, kept = self.scored(study_uid), []
        for path in sorted((self.reports / self.key(study_uid)).glob("*.json")):
            if path.stem in known:
                try:
                    record = json.loads(path.read_bytes())
                    kept.append((Dataset.from_json(record["header"]), record["answer"]))
                except (OSError, ValueError, LookupError, TypeError):  # damaged: its image drops out
                    log.warning("a kept answer is unreadable and left out of the next report")
        return kept

    def keep(
        self, study_uid: str, scored: list[tuple[Any, dict[str, Any]]], report: Report, outbox: list[Any]
    ) -> None:
        """Record a report before it is sent: the newly scored instances' headers and answers and what is
        to go to the PACS (the report, then any overlays) are written first; the state file then makes
        them the study's latest, not yet sent, in one transaction; older outboxes go last."""
        folder = self.reports / self.key(study_uid)
        box = self._outbox(study_uid, report)
        folder.mkdir(mode=0o700, exist_ok=True)
        box.mkdir(mode=0o700, exist_ok=True)
        for header, answer in scored:
            record = {"header": without_pixels(header).to_json_dict(), "answer": answer}
            with _written(folder / f"{self.key(str(header.SOPInstanceUID))}.json") as handle:
                handle.write(json.dumps(record).encode())
        for number, instance in enumerate(outbox):
            with _written(box / f"{number:04d}.dcm") as handle:
                instance.save_as(handle, enforce_file_format=True)
        study, now = self.key(study_uid), time.time()
        with self._db() as db:
            db.executemany(
                "INSERT OR REPLACE INTO scored VALUES (?, ?, ?)",
                [(study, self.key(str(header.SOPInstanceUID)), now) for header, _ in scored],
            )
            db.execute(
                "INSERT OR REPLACE INTO reports VALUES (?, ?, ?, 0, ?)",
                (study, report.generation, report.version, now),
            )
        for old in folder.glob("outbox-*"):
            if old != box:
                shutil.rmtree(old, ignore_errors=True)

    def unsent(self, study_uid: str) -> list[Any]:
        """The study's latest report and overlays when the PACS has not acknowledged them yet (to send them
        again, the same instances: a lost acknowledgement never makes a second report). Raises
        `KeptReportLost` when they cannot be read back."""
        import pydicom
        import pydicom.errors

        report = self.report(study_uid)
        if report is None or report.sent:
            return []
        files = sorted(self._outbox(study_uid, report).glob("*.dcm"))
        try:
            if not files:
                raise FileNotFoundError("no outbox")
            return [pydicom.dcmread(path) for path in files]
        except (OSError, pydicom.errors.InvalidDicomError) as error:
            raise KeptReportLost(f"the kept report is unreadable ({type(error).__name__})") from error

    def sent(self, study_uid: str, report: Report) -> None:
        """The PACS acknowledged the report (and its overlays)."""
        with self._db() as db:
            done = db.execute(
                "UPDATE reports SET sent = 1, at = ? WHERE study = ? AND generation = ? AND version = ?",
                (time.time(), self.key(study_uid), report.generation, report.version),
            ).rowcount
        if done == 1:
            shutil.rmtree(self._outbox(study_uid, report), ignore_errors=True)

    def prune(self, now: float | None = None) -> int:
        """Delete the kept headers, answers and reports of studies whose latest report was sent more than
        `keep_days` ago (their instances stay known, so they are still not scored twice; a later image
        starts a new report, a new generation); returns how many studies were pruned."""
        cutoff = (now or time.time()) - self.keep_days * 86400
        query = "SELECT study FROM reports WHERE sent = 1 AND version > 0 AND at < ?"
        with self._db() as db:
            studies = [str(row[0]) for row in db.execute(query, (cutoff,))]
        pruned = 0
        for study in studies:
            with self._stripe(study), self._db() as db:  # the study may have moved on meanwhile
                done = db.execute(
                    "UPDATE reports SET generation = generation + 1, version = 0"
                    " WHERE study = ? AND sent = 1 AND version > 0 AND at < ?",
                    (study, cutoff),
                ).rowcount
            if done:  # a new generation: the files are no one's any more
                shutil.rmtree(self.reports / study, ignore_errors=True)
                pruned += 1
        return pruned

    def _outbox(self, study_uid: str, report: Report) -> Path:
        return self.reports / self.key(study_uid) / f"outbox-{report.generation}-{report.version}"

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.state, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()


@contextlib.contextmanager
def _written(path: Path) -> Iterator[Any]:
    """A 0600 file written under a `.part` name, synced, and renamed into place once complete (removed if
    the writing fails, so a full disk does not stay full)."""
    partial = path.with_name(path.name + ".part")
    try:
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # on the disk, not in the cache, before anything relies on it
        os.replace(partial, path)
        _sync_folder(path.parent)
    finally:
        partial.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """Make a folder's entries (a file renamed into it) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process starts its node: nothing of it is in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _salt(path: Path) -> bytes:
    """The spool's secret salt, made once (0600) and kept, so keys and log labels survive restarts."""
    with (
        contextlib.suppress(FileExistsError),
        os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle,
    ):
        handle.write(secrets.token_hex(32))
    for _ in range(50):  # another process may be writing it this instant
        text = path.read_text(encoding="utf-8").strip()
        if len(text) == 64:
            return bytes.fromhex(text)
        time.sleep(0.01)
    raise RuntimeError(f"{path} does not hold a salt")
