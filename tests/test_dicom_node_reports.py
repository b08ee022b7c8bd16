"""One report per study, kept before it is sent, against a real PACS (Orthanc on loopback) and the real
server: new images of a study get the next version of its report, a lost acknowledgement never leaves two
reports, a report owed is sent again after a dead letter is replayed, and the spool names nothing."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_dicom.cli import pacs_address
from cxr_dicom.node import DicomNode, NodeConfig, NodeError, stored, wanted
from cxr_dicom.spool import Spool, SpoolBusy

from .conftest import free_port
from .dicom_node_support import (  # noqa: F401
    FILMS,
    endpoint_fixture,
    judged_answer,
    node_config,
    referenced,
    refused_answer,
    srs_of,
    wait_for,
)
from .dicom_support import dciodvfy_errors, dicom_file, nih_study
from .pacs import instances, pacs_fixture, store_scu  # noqa: F401 - the `pacs` fixture


def counting(node: DicomNode) -> list:
    """Record each image the node sends to the endpoint."""
    scored, score = [], node._score

    def count(path):
        scored.append(path)
        return score(path)

    node._score = count
    return scored


def test_new_images_of_a_study_get_the_next_version_of_its_report(pacs, endpoint, nih_root, tmp_path):
    """A second frontal film arrives after the study was answered: only it is scored, and the new report
    covers both films, in the first report's series, as its next version (Predecessor Documents)."""
    server, _ = endpoint
    first, second = nih_study(nih_root, list(FILMS))
    node = DicomNode(node_config(pacs, server, tmp_path / "spool"))
    scored = counting(node)
    node.spool.store(first)
    one = node.process(node.spool.folder(first.StudyInstanceUID))
    node.spool.store(second)
    node.spool.store(first)  # sent again with it: not scored twice
    two = node.process(node.spool.folder(first.StudyInstanceUID))
    assert (one.status, one.scored, two.status, two.scored) == ("sent", 1, "sent", 1) and len(scored) == 2

    reports = {sr.SOPInstanceUID: sr for sr in srs_of(pacs, first.StudyInstanceUID)}
    old, new = reports[one.sr_uid], reports[two.sr_uid]
    assert referenced(old) == [first.SOPInstanceUID]
    assert sorted(referenced(new)) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    assert new.SeriesInstanceUID == old.SeriesInstanceUID and (old.InstanceNumber, new.InstanceNumber) == (
        1,
        2,
    )
    (predecessor,) = new.PredecessorDocumentsSequence
    (series,) = predecessor.ReferencedSeriesSequence
    assert predecessor.StudyInstanceUID == first.StudyInstanceUID
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert dciodvfy_errors(dicom_file(new), tmp_path) == []


def test_a_lost_acknowledgement_sends_the_same_report_again(pacs, endpoint, nih_root, tmp_path):
    """The PACS stores the report but its answer is lost: the node tries again with the same instance, so
    the PACS still holds one report, and the image was scored once."""
    server, _ = endpoint
    (film,) = nih_study(nih_root, FILMS[:1])
    node = DicomNode(node_config(pacs, server, tmp_path / "spool"))
    scored, c_store, sent = counting(node), node._c_store, []

    def lost(outbox):
        c_store(outbox)
        sent.append(outbox[0].SOPInstanceUID)
        if len(sent) == 1:
            raise NodeError("the PACS did not answer C-STORE")

    node._c_store = lost
    node.spool.store(film)
    outcome = node.process(node.spool.folder(film.StudyInstanceUID))
    assert outcome.status == "sent" and sent == [outcome.sr_uid] * 2 and len(scored) == 1
    assert [sr.SOPInstanceUID for sr in srs_of(pacs, film.StudyInstanceUID)] == [outcome.sr_uid]


def test_a_replayed_dead_letter_sends_the_report_it_owes(pacs, endpoint, nih_root, tmp_path):
    """The PACS down: the study is scored, its report kept, its files dead-lettered. `cxr dicom-node replay`
    lists the letter and puts it back; the node then sends the kept report, scoring nothing again."""
    server, _ = endpoint
    (film,) = nih_study(nih_root, FILMS[:1])
    spool = tmp_path / "spool"
    config = node_config(pacs, server, spool)
    config.pacs_port = free_port()  # nothing listens there
    down = DicomNode(config)
    down.spool.store(film)
    dead = down.process(down.spool.folder(film.StudyInstanceUID))
    assert dead.status == "dead" and "PACS" in dead.reason and srs_of(pacs, film.StudyInstanceUID) == []

    replay = [sys.executable, "-m", "cxr.cli", "dicom-node", "replay", "--spool", str(spool)]
    listed = subprocess.run(replay, capture_output=True, text=True, timeout=120, check=True)
    (line,) = listed.stdout.splitlines()
    assert "1 file(s)" in line and "PACS" in line
    name = line.split()[0]
    moved = subprocess.run([*replay, name], capture_output=True, text=True, timeout=120, check=True)
    assert moved.stdout.strip() == f"{name}: 1 file(s) back in line"
    assert not list(down.spool.dead.iterdir())

    node = DicomNode(node_config(pacs, server, spool))
    scored = counting(node)
    (outcome,) = wait_for(node.process_settled, 30)
    kept = node.spool.uid(film.StudyInstanceUID, "report", 0, 1)  # the first report's UID
    assert (outcome.status, outcome.scored, outcome.sr_uid, scored) == ("sent", 0, kept, [])
    (sr,) = srs_of(pacs, film.StudyInstanceUID)
    assert sr.SOPInstanceUID == outcome.sr_uid and referenced(sr) == [film.SOPInstanceUID]


def test_the_spool_names_no_study_and_keeps_its_labels_across_restarts(nih_root, tmp_path, caplog):
    """Keys, log labels and the UIDs of the node's reports come from a salt kept in the spool (0600): the
    same after a restart, different in another spool. No UID (the study's or the report's) or patient
    attribute appears in file names, the state file or the logs."""
    caplog.set_level(logging.DEBUG)
    (film,) = nih_study(nih_root, FILMS[:1])
    node = DicomNode(node_config_offline(tmp_path / "spool"))
    node._score, node._send = refused_answer, lambda outbox: None
    node.spool.store(film)
    outcome = node.process(node.spool.folder(film.StudyInstanceUID))
    assert outcome.status == "sent" and outcome.study == node.spool.label(film.StudyInstanceUID)
    again = Spool(tmp_path / "spool")
    assert again.label(film.StudyInstanceUID) == outcome.study
    assert again.uid(film.StudyInstanceUID, "report", 0, 1) == outcome.sr_uid
    assert Spool(tmp_path / "other").label(film.StudyInstanceUID) != outcome.study
    assert (tmp_path / "spool" / "salt").stat().st_mode & 0o777 == 0o600

    state = (tmp_path / "spool" / "state.sqlite").read_bytes()
    names = " ".join(str(path) for path in (tmp_path / "spool").rglob("*"))
    identifying = [film.StudyInstanceUID, film.SOPInstanceUID, film.SeriesInstanceUID, film.PatientID]
    for value in [*identifying, outcome.sr_uid]:
        assert str(value).encode() not in state and str(value) not in names and str(value) not in caplog.text
    assert again.scored(film.StudyInstanceUID) == {again.key(film.SOPInstanceUID)}


def test_a_study_kept_past_its_days_is_pruned_and_its_next_image_starts_a_new_report(nih_root, tmp_path):
    """Pruned: the kept answers go, the images stay known (not scored again); a new image then gets a
    first report of its own (a new series, no predecessor), since the earlier answers are gone."""
    first, second = nih_study(nih_root, list(FILMS))
    node = DicomNode(node_config_offline(tmp_path / "spool", keep_days=1))
    sent = []
    node._score, node._send = refused_answer, sent.append
    node.spool.store(first)
    assert node.process(node.spool.folder(first.StudyInstanceUID)).status == "sent"
    assert node.spool.prune() == 0 and len(node.spool.history(first.StudyInstanceUID)) == 1
    assert node.spool.prune(now=time.time() + 2 * 86400) == 1
    assert node.spool.history(first.StudyInstanceUID) == [] and not list(node.spool.reports.iterdir())
    node.spool.store(first)
    assert node.process(node.spool.folder(first.StudyInstanceUID)).status == "seen"
    node.spool.store(second)
    assert node.process(node.spool.folder(first.StudyInstanceUID)).status == "sent"
    (old,), (new,) = sent
    assert referenced(new) == [second.SOPInstanceUID] and "PredecessorDocumentsSequence" not in new
    assert new.SeriesInstanceUID != old.SeriesInstanceUID and new.InstanceNumber == 1


def test_a_report_never_acknowledged_goes_out_before_its_replacement(nih_root, tmp_path):
    """The PACS down: the first report is kept, unsent. A second film then arrives with the PACS back: the
    first report goes out first, then its replacement naming it, with the first film's answer kept."""
    first, second = nih_study(nih_root, list(FILMS))
    node = DicomNode(node_config_offline(tmp_path / "spool"))
    node._score = refused_answer

    def down(outbox):
        raise NodeError("the PACS refused or did not answer the association")

    node._send = down
    node.spool.store(first)
    assert node.process(node.spool.folder(first.StudyInstanceUID)).status == "dead"
    sent = []
    node._send = sent.extend
    node.spool.store(second)
    outcome = node.process(node.spool.folder(first.StudyInstanceUID))
    assert (outcome.status, outcome.scored) == ("sent", 1)
    one, two = sent
    assert (one.InstanceNumber, two.InstanceNumber) == (1, 2) and two.SOPInstanceUID == outcome.sr_uid
    assert two.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[
        0].ReferencedSOPInstanceUID == one.SOPInstanceUID  # fmt: skip
    assert sorted(referenced(two)) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])


def test_a_report_that_could_not_be_kept_is_rebuilt_whole(nih_root, tmp_path, monkeypatch):
    """The disk fills while a report is kept: the study is dead-lettered; replayed, its film is scored
    again and the report holds it once, under the same UID as the report that was never kept."""
    import cxr_dicom.spool as spool_module

    (film,) = nih_study(nih_root, FILMS[:1])
    node = DicomNode(node_config_offline(tmp_path / "spool"))
    sent = []
    node._score, node._send = refused_answer, sent.extend
    written = spool_module._written

    def full(path):
        if "outbox" in str(path):
            raise OSError(28, "No space left on device")
        return written(path)

    monkeypatch.setattr(spool_module, "_written", full)
    node.spool.store(film)
    dead = node.process(node.spool.folder(film.StudyInstanceUID))
    assert dead.status == "dead" and dead.reason == "unexpected OSError" and sent == []
    assert not list((tmp_path / "spool").rglob("*.part"))  # nothing half-written left to fill the disk
    monkeypatch.setattr(spool_module, "_written", written)
    ((name, _, _),) = node.spool.dead_letters()
    node.spool.replay(name)
    outcome = node.process(node.spool.folder(film.StudyInstanceUID))
    (report,) = sent
    assert outcome.status == "sent" and referenced(report) == [film.SOPInstanceUID]
    assert report.SOPInstanceUID == node.spool.uid(film.StudyInstanceUID, "report", 0, 1)
    assert report.InstanceNumber == 1 and "PredecessorDocumentsSequence" not in report


def test_two_processes_on_one_study_make_one_report(nih_root, tmp_path):
    """A pull and a push of one study at once (two nodes on one spool, the same film in both): one waits
    for the other's report and finds its film scored. One report, the film scored once."""
    (film,) = nih_study(nih_root, FILMS[:1])
    sent, scored, scoring = [], [], threading.Event()

    def slow(path):
        scored.append(path)
        scoring.set()
        time.sleep(1.0)
        return refused_answer(path)

    first, second = (DicomNode(node_config_offline(tmp_path / "spool")) for _ in range(2))
    for node in (first, second):
        node._score, node._send = slow, sent.extend
    first.spool.store(film)
    outcomes = []
    worker = threading.Thread(
        target=lambda: outcomes.append(first.process(first.spool.folder(film.StudyInstanceUID)))
    )
    worker.start()
    assert scoring.wait(30)
    second.spool.store(film)  # arrives again while the first is being scored
    late = second.process(second.spool.folder(film.StudyInstanceUID))
    worker.join(60)
    assert [o.status for o in outcomes] == ["sent"] and late.status == "seen"
    assert len(sent) == 1 and len(scored) == 1


def test_one_node_per_spool_and_the_spool_is_free_again_once_it_stops(tmp_path):
    """A second node on a spool is refused (`cxr dicom-node` exits 2 saying so); a node that could not
    start (its port taken) or that stopped leaves the spool to the next."""
    spool = tmp_path / "spool"
    node = DicomNode(NodeConfig(spool=spool, port=free_port()))
    node.start()
    try:
        with pytest.raises(SpoolBusy, match="another cxr dicom-node"):
            DicomNode(NodeConfig(spool=spool, port=free_port())).start()
        command = [
            sys.executable,
            "-m",
            "cxr.cli",
            "dicom-node",
            "--spool",
            str(spool),
            "--port",
            str(free_port()),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "another cxr dicom-node runs on" in result.stderr
        with pytest.raises(OSError):  # the first node's port
            DicomNode(NodeConfig(spool=tmp_path / "other", port=node.config.port)).start()
        with pytest.raises(RuntimeError, match="starts once"):
            node.start()
    finally:
        node.stop()
    for folder in (spool, tmp_path / "other"):
        after = DicomNode(NodeConfig(spool=folder, port=free_port()))
        after.start()
        after.stop()


def test_a_kept_report_that_was_lost_is_rebuilt_as_the_same_instance(nih_root, tmp_path):
    """The PACS down, the report kept; its files then lost (a damaged disk): replayed, the report is built
    again from the kept answers, the same instance, and sent without scoring again."""
    (film,) = nih_study(nih_root, FILMS[:1])
    node = DicomNode(node_config_offline(tmp_path / "spool"))
    node._score = refused_answer
    scored = counting(node)
    node._send = lambda outbox: (_ for _ in ()).throw(NodeError("PACS down"))
    node.spool.store(film)
    assert node.process(node.spool.folder(film.StudyInstanceUID)).status == "dead"
    for kept in node.spool.reports.glob("*/outbox-*/*.dcm"):
        kept.write_bytes(b"damaged")
    ((name, _, _),) = node.spool.dead_letters()
    node.spool.replay(name)
    sent = []
    node._send = sent.extend
    outcome = node.process(node.spool.folder(film.StudyInstanceUID))
    (report,) = sent
    assert (outcome.status, outcome.scored, len(scored)) == ("sent", 0, 1)
    assert report.SOPInstanceUID == outcome.sr_uid == node.spool.uid(film.StudyInstanceUID, "report", 0, 1)
    assert referenced(report) == [film.SOPInstanceUID]


def test_a_node_stopping_during_retries_puts_the_study_back_in_line(nih_root, tmp_path):
    """The PACS down and the node asked to stop while it waits to retry: the study is not dead-lettered
    but back in line, and the node stops well before its retries would have ended."""
    (film,) = nih_study(nih_root, FILMS[:1])
    node = DicomNode(NodeConfig(spool=tmp_path / "spool", settle_seconds=0, attempts=5, retry_seconds=30))

    def down(outbox):
        node._stop.set()  # SIGTERM arrives during the first attempt
        raise NodeError("the PACS refused or did not answer the association")

    node._score, node._send = refused_answer, down
    node.spool.store(film)
    started = time.monotonic()
    outcome = node.process(node.spool.folder(film.StudyInstanceUID))
    assert outcome.status == "stopped" and time.monotonic() - started < 30
    assert (
        not list(node.spool.dead.iterdir())
        and len(list(node.spool.folder(film.StudyInstanceUID).glob("*.dcm"))) == 1
    )


def test_the_retries_wait_longer_each_time(nih_root, tmp_path):
    """With the command's defaults: 5 tries, 5 s before the second and doubling, 75 s outlasted in all."""
    from cxr_dicom.cli import _parser, config_from

    (film,) = nih_study(nih_root, FILMS[:1])
    config = config_from(_parser(pull=False).parse_args(["--spool", str(tmp_path / "spool")]))
    defaults = NodeConfig(spool=tmp_path)
    assert (config.attempts, config.retry_seconds) == (defaults.attempts, defaults.retry_seconds) == (5, 5.0)
    config.settle_seconds = 0
    node = DicomNode(config)
    waits = []
    node._stop.wait = lambda seconds: waits.append(seconds)  # recorded, not waited
    node._score = refused_answer
    node._send = lambda outbox: (_ for _ in ()).throw(NodeError("PACS down"))
    node.spool.store(film)
    assert node.process(node.spool.folder(film.StudyInstanceUID)).status == "dead"
    assert waits == [5.0, 10.0, 20.0, 40.0] and sum(waits) == 75.0


@pytest.mark.parametrize(
    ("status", "kept"),
    [(0x0000, True), (0xB000, True), (0xB007, True), (0x0107, True), (0x0116, True), (0xA700, False),
     (0xC000, False), (0x0122, False), (None, False)],
)  # fmt: skip
def test_c_store_warnings_mean_the_pacs_kept_the_report(status, kept):
    assert stored(status) is kept


def test_a_stow_partly_refused_is_a_failure(nih_root, tmp_path):
    """A STOW-RS answer listing failed instances (202 Accepted) is not an acknowledgement."""
    from pydicom import Dataset

    (film,) = nih_study(nih_root, FILMS[:1])
    config = NodeConfig(spool=tmp_path / "spool", dicomweb="http://127.0.0.1:1/dicom-web", send="stow")
    node = DicomNode(config)
    answer = Dataset()
    answer.FailedSOPSequence = [Dataset()]

    class Refusing:
        def store_instances(self, datasets):
            return answer

    node._dicomweb = Refusing
    with pytest.raises(NodeError, match="refused 1 of 1"):
        node._stow([film])


def test_an_overlay_that_cannot_be_made_leaves_the_report_to_go_alone(nih_root, tmp_path, caplog):
    (film,) = nih_study(nih_root, FILMS[:1])
    node = DicomNode(node_config_offline(tmp_path / "spool", overlays=True))
    sent = []
    node._score, node._send = judged_answer, sent.extend

    def failing(path, result, findings):
        raise NodeError("endpoint answered 503")

    node._heatmaps = failing
    node.spool.store(film)
    outcome = node.process(node.spool.folder(film.StudyInstanceUID))
    assert (outcome.status, outcome.overlays) == ("sent", 0) and [d.Modality for d in sent] == ["SR"]
    assert "overlays left out (NodeError)" in caplog.text


def test_replay_all_puts_every_dead_letter_back(nih_root, tmp_path):
    films = nih_study(nih_root, list(FILMS))
    node = DicomNode(node_config_offline(tmp_path / "spool"))
    node._score = refused_answer
    node._send = lambda outbox: (_ for _ in ()).throw(NodeError("PACS down"))
    for film in films:  # two studies
        film.StudyInstanceUID = generate_uid()
        node.spool.store(film)
        assert node.process(node.spool.folder(film.StudyInstanceUID)).status == "dead"
    command = [
        sys.executable,
        "-m",
        "cxr.cli",
        "dicom-node",
        "replay",
        "--all",
        "--spool",
        str(tmp_path / "spool"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.count("1 file(s) back in line") == 2 and node.spool.dead_letters() == []
    assert all(len(list(node.spool.folder(f.StudyInstanceUID).glob("*.dcm"))) == 1 for f in films)


def test_a_starting_node_takes_back_only_what_no_live_process_holds(tmp_path):
    """Opening a spool (`replay`, `pull`) changes nothing; a node starting takes back the studies claimed
    by processes that are gone, not those of a live one (a pull running beside it), and removes only
    stale half-written files."""
    spool = Spool(tmp_path / "spool")
    stale, fresh = spool.tmp / "a.dcm-1.part", spool.tmp / "b.dcm-2.part"
    for partial in (stale, fresh):
        partial.write_bytes(b"half")
    os.utime(stale, (0, 0))
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        for key, pid in (("a" * 32, gone.pid), ("b" * 32, live.pid)):
            (spool.processing / f"{key}-{pid}-1").mkdir()
            (spool.processing / f"{key}-{pid}-1" / "x.dcm").write_bytes(b"DICM")
        Spool(tmp_path / "spool")
        assert len(list(spool.processing.iterdir())) == 2 and stale.exists()
        with spool.running():
            pass
        assert (spool.incoming / ("a" * 32) / "x.dcm").exists()
        assert [p.name for p in spool.processing.iterdir()] == [f"{'b' * 32}-{live.pid}-1"]
        assert not stale.exists() and fresh.exists()
    finally:
        live.kill()


def test_a_pull_retrieves_only_new_radiographs(pacs, endpoint, nih_root, tmp_path):
    """QIDO-RS lists the study; WADO-RS retrieves the films not scored before, never the reports, into a
    folder of the pull's own (a running node does not take a study half pulled). Pulled
    again with nothing new, nothing is retrieved or sent; with a new film, it alone is scored."""
    server, _ = endpoint
    first, second = nih_study(nih_root, list(FILMS))
    assert store_scu(pacs, [first]) == [0]
    node = DicomNode(node_config(pacs, server, tmp_path / "spool"))
    scored, retrieved = counting(node), []
    client = node._dicomweb

    def recording():
        dicomweb = client()
        retrieve = dicomweb.retrieve_instance

        def retrieving(*uids, **kw):
            retrieved.append(uids[-1])
            assert not list(node.spool.incoming.rglob("*.dcm"))  # staged aside: no node takes it half pulled
            return retrieve(*uids, **kw)

        dicomweb.retrieve_instance = retrieving
        return dicomweb

    node._dicomweb = recording
    assert node.pull(first.StudyInstanceUID).status == "sent"
    assert node.pull(first.StudyInstanceUID).status == "seen"  # its report is in the study now
    assert store_scu(pacs, [second]) == [0]
    assert node.pull(first.StudyInstanceUID).status == "sent"
    assert retrieved == [first.SOPInstanceUID, second.SOPInstanceUID] and len(scored) == 2
    assert len(srs_of(pacs, first.StudyInstanceUID)) == 2


def test_a_listing_keeps_what_may_be_a_radiograph():
    """Radiographs, and instances whose modality the listing does not give; never reports or secondary
    captures (the node's own overlays), nor entries without their UIDs."""
    sc = {"00080016": {"Value": ["1.2.840.10008.5.1.4.1.1.7"]}}
    listing = [
        {"0020000E": {"Value": ["1.1"]}, "00080018": {"Value": ["1.1.1"]}, "00080060": {"Value": ["DX"]}},
        {"0020000E": {"Value": ["1.2"]}, "00080018": {"Value": ["1.2.1"]}, "00080060": {"Value": ["SR"]}},
        {"0020000E": {"Value": ["1.3"]}, "00080018": {"Value": ["1.3.1"]}},
        {"00080018": {"Value": ["1.4.1"]}},
        {
            "0020000E": {"Value": ["1.5"]},
            "00080018": {"Value": ["1.5.1"]},
            "00080060": {"Value": ["OT"]},
            **sc,
        },
    ]
    assert wanted(listing) == [("1.1", "1.1.1"), ("1.3", "1.3.1")]


@pytest.mark.parametrize("text", ["pacs.hospital", "pacs.hospital:", ":104", "pacs:99999", "pacs:x"])
def test_a_pacs_address_without_a_port_is_a_clear_error(text, tmp_path):
    with pytest.raises(Exception, match="is not HOST:PORT"):
        pacs_address(text)
    command = [sys.executable, "-m", "cxr.cli", "dicom-node", "--pacs", text, "--spool", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not HOST:PORT" in result.stderr and "Traceback" not in result.stderr


def test_pacs_address_reads_host_and_port():
    assert pacs_address("pacs.hospital:104") == ("pacs.hospital", 104)
    assert pacs_address("[::1]:11112") == ("::1", 11112)


def node_config_offline(spool, **settings):
    return NodeConfig(spool=spool, settle_seconds=0, attempts=1, **settings)


def test_a_copy_of_an_instance_is_one_instance(nih_root, tmp_path):
    """The spool names an instance by its SOP Instance UID: a copy sent twice is one file."""
    (film,) = nih_study(nih_root, FILMS[:1])
    spool = Spool(tmp_path / "spool")
    assert spool.store(film) == spool.store(copy.deepcopy(film))
    other = copy.deepcopy(film)
    other.SOPInstanceUID = generate_uid()
    assert spool.store(other) != spool.store(film)
    assert pydicom.dcmread(spool.store(other)).SOPInstanceUID == other.SOPInstanceUID


def test_overlays_of_the_positive_findings_go_with_the_report(pacs, endpoint, nih_root, tmp_path):
    """With overlays asked for, each positive finding of a judged film comes back as a Secondary Capture
    of the endpoint's own Grad-CAM overlay, referencing the film, in one series of the study; the case is
    captured once (the heatmaps are asked under the first answer's inference id)."""
    server, capture = endpoint
    (film,) = nih_study(nih_root, FILMS[:1])
    status, body, _ = server.post(dicom_file(film), "application/dicom")
    positives = sorted(f for f, yes in json.loads(body)["predictions"][0]["decisions"].items() if yes)
    assert status == 200 and positives  # the seeded model calls some findings positive
    node = DicomNode(node_config(pacs, server, tmp_path / "spool", overlays=True))
    node.spool.store(film)
    outcome = node.process(node.spool.folder(film.StudyInstanceUID))
    assert outcome.status == "sent" and outcome.overlays == len(positives)

    stored = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(pacs.get(f"/instances/{r['ID']}/file").content))
              for r in instances(pacs, film.StudyInstanceUID)]  # fmt: skip
    overlays = [d for d in stored if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
    assert sorted(d.SeriesDescription.split()[2] for d in overlays) == positives
    assert len({d.SeriesInstanceUID for d in overlays}) == 1 and len(srs_of(pacs, film.StudyInstanceUID)) == 1
    for overlay in overlays:
        assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
    assert dciodvfy_errors(dicom_file(overlays[0]), tmp_path) == []
    ids = [json.loads(line)["eventMetadata"]["inferenceId"] for path in capture.rglob("*.jsonl")
           for line in path.read_text().splitlines()]  # fmt: skip
    assert len(ids) == len(set(ids)) + 1  # the heatmap request is the same case, under the same id
