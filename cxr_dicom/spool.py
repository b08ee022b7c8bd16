"""The DICOM node's spool: received instances until their study is processed, what each study's report
said, and the dead letters.

Layout (the folders 0700, the files 0600: they hold patient data):
- `incoming/<study key>/<instance key>.dcm`: received instances, a folder per study;
- `processing/`: studies being worked on (claimed by moving their folder here);
- `dead-letter/<study key>/`: the files of a study given up on, and `reason.txt`;
- `reports/<study key>/`: per scored instance, its header without pixels and the endpoint's answer
  (`<instance key>.json`), from which a replacement report is built when more images of the study
  arrive, and in `outbox/` the study's latest report and overlays until the PACS acknowledged them;
  kept `keep_days` after the study's last report;
- `state.sqlite`: which instances were scored and which report is each study's latest, by key only;
- `salt`: the secret behind the keys.

Studies and instances are named by keys (a keyed hash of their UIDs), never by the UIDs themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS scored (study TEXT, instance TEXT, at REAL, PRIMARY KEY (study, instance))",
    "CREATE TABLE IF NOT EXISTS reports (study TEXT PRIMARY KEY, sop_uid TEXT, series_uid TEXT,"
    " version INTEGER, sent INTEGER, at REAL)",
)
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass(frozen=True)
class Report:
    """A study's latest report: its own UIDs (made by cxr), and whether the PACS acknowledged it."""

    sop_uid: str
    series_uid: str
    version: int  # 1 for a study's first report, then one more for each replacement
    sent: bool


class Spool:
    """Received instances on disk, a folder per study, until their study is processed (see the module)."""

    def __init__(self, root: Path, keep_days: float = 30.0):
        self.root, self.keep_days = Path(root), keep_days
        self.incoming, self.processing = self.root / "incoming", self.root / "processing"
        self.dead, self.reports = self.root / "dead-letter", self.root / "reports"
        for folder in (self.root, self.incoming, self.processing, self.dead, self.reports):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        self.salt = _salt(self.root / "salt")
        self.state = self.root / "state.sqlite"
        with self._db() as db:
            for statement in SCHEMA:
                db.execute(statement)
        self.state.chmod(0o600)
        self._requeue()

    # -- names -----------------------------------------------------------------------------------
    def key(self, uid: str) -> str:
        """A UID's name in the spool: a keyed hash (HMAC-SHA256 with the spool's salt)."""
        return hmac.new(self.salt, uid.encode(), hashlib.sha256).hexdigest()[:32]

    def label(self, uid: str) -> str:
        """How logs name a study: the start of its key."""
        return self.key(uid)[:12]

    def folder(self, study_uid: str) -> Path:
        return self.incoming / self.key(study_uid)

    # -- received instances ----------------------------------------------------------------------
    def store(self, dataset: Any) -> Path:
        """Write one instance (with its file meta) atomically; returns its path."""
        folder = self.folder(str(dataset.StudyInstanceUID))
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / (self.key(str(dataset.SOPInstanceUID)) + ".dcm")
        with _written(path) as handle:
            dataset.save_as(handle, enforce_file_format=True)
        return path

    def settled(self, seconds: float) -> list[Path]:
        """Study folders none of whose files changed for `seconds`."""
        now, ready = time.time(), []
        for folder in self.incoming.iterdir():
            stamps = [p.stat().st_mtime for p in folder.glob("*.dcm")]
            if stamps and now - max(stamps) >= seconds:
                ready.append(folder)
        return ready

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

    # -- dead letters ----------------------------------------------------------------------------
    def bury(self, folder: Path, reason: str, files: list[Path]) -> Path:
        """Move a study's files to the dead-letter folder, beside a file saying why."""
        target = self.dead / folder.name
        target.mkdir(mode=0o700)
        for path in files:
            shutil.move(str(path), target / path.name)
        (target / "reason.txt").write_text(reason + "\n", encoding="utf-8")
        with contextlib.suppress(OSError):
            folder.rmdir()
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
        study = self.incoming / folder.name.rsplit("-", 1)[0]
        study.mkdir(mode=0o700, exist_ok=True)
        files = list(folder.glob("*.dcm"))
        for path in files:
            os.replace(path, study / path.name)
            os.utime(study / path.name)  # settles from now
        shutil.rmtree(folder)
        return len(files)

    # -- what was reported -----------------------------------------------------------------------
    def scored(self, study_uid: str) -> set[str]:
        """The keys of the study's instances already scored and reported."""
        with self._db() as db:
            rows = db.execute("SELECT instance FROM scored WHERE study = ?", (self.key(study_uid),))
            return {str(row[0]) for row in rows}

    def report(self, study_uid: str) -> Report | None:
        """The study's latest report, if any."""
        with self._db() as db:
            row = db.execute(
                "SELECT sop_uid, series_uid, version, sent FROM reports WHERE study = ?",
                (self.key(study_uid),),
            ).fetchone()
        return None if row is None else Report(str(row[0]), str(row[1]), int(row[2]), bool(row[3]))

    def history(self, study_uid: str) -> list[tuple[Any, dict[str, Any]]]:
        """The headers and answers of the study's scored instances, as kept for its next report (empty once
        `keep_days` have passed)."""
        from pydicom import Dataset

        kept = []
        for path in sorted((self.reports / self.key(study_uid)).glob("*.json")):
            record = json.loads(path.read_bytes())
            kept.append((Dataset.from_json(record["header"]), record["answer"]))
        return kept

    def keep(self, study_uid: str, scored: list[tuple[Any, dict[str, Any]]], outbox: list[Any]) -> None:
        """Record a report before it is sent: the newly scored instances' headers and answers, what is to
        go to the PACS (the report first, then any overlays), and in the state file the instances and the
        report as the study's latest, not yet sent."""
        folder = self.reports / self.key(study_uid)
        (folder / "outbox").mkdir(mode=0o700, parents=True, exist_ok=True)
        for header, answer in scored:
            record = {"header": _without_pixels(header).to_json_dict(), "answer": answer}
            with _written(folder / f"{self.key(str(header.SOPInstanceUID))}.json") as handle:
                handle.write(json.dumps(record).encode())
        for old in (folder / "outbox").glob("*.dcm"):  # a replaced report that never went out
            old.unlink()
        for number, instance in enumerate(outbox):
            with _written(folder / "outbox" / f"{number:04d}.dcm") as handle:
                instance.save_as(handle, enforce_file_format=True)
        report, study, now = outbox[0], self.key(study_uid), time.time()
        with self._db() as db:
            db.executemany(
                "INSERT OR REPLACE INTO scored VALUES (?, ?, ?)",
                [(study, self.key(str(header.SOPInstanceUID)), now) for header, _ in scored],
            )
            db.execute(
                "INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?, 0, ?)",
                (
                    study,
                    str(report.SOPInstanceUID),
                    str(report.SeriesInstanceUID),
                    int(report.InstanceNumber),
                    now,
                ),
            )

    def unsent(self, study_uid: str) -> list[Any]:
        """The study's latest report and overlays when the PACS has not acknowledged them yet (to send them
        again, the same instances: a lost acknowledgement never makes a second report)."""
        import pydicom

        report = self.report(study_uid)
        if report is None or report.sent:
            return []
        return [
            pydicom.dcmread(path)
            for path in sorted((self.reports / self.key(study_uid) / "outbox").glob("*.dcm"))
        ]

    def sent(self, study_uid: str, sop_uid: str) -> None:
        """The PACS acknowledged the report (and its overlays)."""
        with self._db() as db:
            db.execute(
                "UPDATE reports SET sent = 1 WHERE study = ? AND sop_uid = ?", (self.key(study_uid), sop_uid)
            )
        shutil.rmtree(self.reports / self.key(study_uid) / "outbox", ignore_errors=True)

    def prune(self, now: float | None = None) -> int:
        """Delete the kept headers, answers and reports of studies whose latest report was sent more than
        `keep_days` ago (the state file keeps their keys, so their images are still not scored twice);
        returns how many studies were pruned."""
        cutoff = (now or time.time()) - self.keep_days * 86400
        with self._db() as db:
            old = [
                str(r[0])
                for r in db.execute("SELECT study FROM reports WHERE sent = 1 AND at < ?", (cutoff,))
            ]
        pruned = 0
        for study in old:
            folder = self.reports / study
            if folder.exists():
                shutil.rmtree(folder)
                pruned += 1
        return pruned

    # -- housekeeping ----------------------------------------------------------------------------
    def _requeue(self) -> None:
        """After a stop: studies claimed then are back in line, and half-written files are removed."""
        for left in self.processing.iterdir():
            target = self.incoming / left.name.rsplit("-", 1)[0]
            target.mkdir(mode=0o700, exist_ok=True)
            for path in left.glob("*.dcm"):
                os.replace(path, target / path.name)
            shutil.rmtree(left, ignore_errors=True)
        for partial in [
            *self.incoming.glob("*/*.part"),
            *self.reports.glob("*/*.part"),
            *self.reports.glob("*/*/*.part"),
        ]:
            partial.unlink(missing_ok=True)

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
    """A 0600 file written under a `.part` name and renamed into place once complete."""
    partial = path.with_name(path.name + ".part")
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        yield handle
    os.replace(partial, path)


def _without_pixels(header: Any) -> Any:
    from pydicom import Dataset

    kept = Dataset()
    for element in header:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            kept.add(element)
    return kept


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
