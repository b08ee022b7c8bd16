"""One report per study, kept before it is sent, against a real PACS (Orthanc on loopback) and the real
server: new images of a study get the next version of its report, a lost acknowledgement never leaves two
reports, a report owed is sent again after a dead letter is replayed, and the spool names nothing."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_dicom.cli import pacs_address
from cxr_dicom.node import DicomNode, NodeError, wanted
from cxr_dicom.spool import Spool

from .conftest import free_port
from .dicom_node_support import (  # noqa: F401
    FILMS,
    endpoint_fixture,
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
    assert (outcome.status, outcome.scored, outcome.sr_uid, scored) == ("sent", 0, node.spool.report(
        film.StudyInstanceUID).sop_uid, [])  # fmt: skip
    (sr,) = srs_of(pacs, film.StudyInstanceUID)
    assert sr.SOPInstanceUID == outcome.sr_uid and referenced(sr) == [film.SOPInstanceUID]


def test_the_spool_names_no_study_and_keeps_its_labels_across_restarts(nih_root, tmp_path, caplog):
    """Keys and log labels come from a salt kept in the spool (0600): the same after a restart, different
    in another spool. No UID or patient attribute appears in file names or the state file."""
    (film,) = nih_study(nih_root, FILMS[:1])
    node = DicomNode(node_config_offline(tmp_path / "spool"))
    node._score, node._send = refused_answer, lambda outbox: None
    node.spool.store(film)
    outcome = node.process(node.spool.folder(film.StudyInstanceUID))
    assert outcome.status == "sent" and outcome.study == node.spool.label(film.StudyInstanceUID)
    again = Spool(tmp_path / "spool")
    assert again.label(film.StudyInstanceUID) == outcome.study
    assert Spool(tmp_path / "other").label(film.StudyInstanceUID) != outcome.study
    assert (tmp_path / "spool" / "salt").stat().st_mode & 0o777 == 0o600

    state = (tmp_path / "spool" / "state.sqlite").read_bytes()
    names = " ".join(str(path) for path in (tmp_path / "spool").rglob("*"))
    for identifying in (film.StudyInstanceUID, film.SOPInstanceUID, film.SeriesInstanceUID, film.PatientID):
        assert str(identifying).encode() not in state and str(identifying) not in names
    assert again.scored(film.StudyInstanceUID) == {again.key(film.SOPInstanceUID)}


def test_a_study_kept_past_its_days_is_pruned_and_still_not_scored_twice(nih_root, tmp_path):
    (film,) = nih_study(nih_root, FILMS[:1])
    node = DicomNode(node_config_offline(tmp_path / "spool", keep_days=1))
    node._score, node._send = refused_answer, lambda outbox: None
    node.spool.store(film)
    assert node.process(node.spool.folder(film.StudyInstanceUID)).status == "sent"
    assert node.spool.prune() == 0 and len(node.spool.history(film.StudyInstanceUID)) == 1
    assert node.spool.prune(now=time.time() + 2 * 86400) == 1
    assert node.spool.history(film.StudyInstanceUID) == [] and not list(node.spool.reports.iterdir())
    node.spool.store(film)
    assert node.process(node.spool.folder(film.StudyInstanceUID)).status == "seen"


def test_half_written_files_are_removed_at_start(tmp_path):
    spool = Spool(tmp_path / "spool")
    (spool.incoming / "abc").mkdir()
    (spool.incoming / "abc" / "x.dcm.part").write_bytes(b"half")
    Spool(tmp_path / "spool")
    assert not list(spool.incoming.rglob("*.part"))


def test_a_pull_retrieves_only_new_radiographs(pacs, endpoint, nih_root, tmp_path):
    """QIDO-RS lists the study; WADO-RS retrieves the films not scored before, never the reports. Pulled
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
        dicomweb.retrieve_instance = lambda *uids, **kw: retrieved.append(uids[-1]) or retrieve(*uids, **kw)
        return dicomweb

    node._dicomweb = recording
    assert node.pull(first.StudyInstanceUID).status == "sent"
    assert node.pull(first.StudyInstanceUID).status == "seen"  # its report is in the study now
    assert store_scu(pacs, [second]) == [0]
    assert node.pull(first.StudyInstanceUID).status == "sent"
    assert retrieved == [first.SOPInstanceUID, second.SOPInstanceUID] and len(scored) == 2
    assert len(srs_of(pacs, first.StudyInstanceUID)) == 2


def test_a_listing_without_modalities_keeps_every_instance():
    listing = [
        {"0020000E": {"Value": ["1.1"]}, "00080018": {"Value": ["1.1.1"]}, "00080060": {"Value": ["DX"]}},
        {"0020000E": {"Value": ["1.2"]}, "00080018": {"Value": ["1.2.1"]}, "00080060": {"Value": ["SR"]}},
        {"0020000E": {"Value": ["1.3"]}, "00080018": {"Value": ["1.3.1"]}},
        {"00080018": {"Value": ["1.4.1"]}},
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
    assert pacs_address("[::1]:11112") == ("[::1]", 11112)


def node_config_offline(spool, **settings):
    from cxr_dicom.node import NodeConfig

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
