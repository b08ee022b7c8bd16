"""The DICOM node end to end, against a real PACS (Debian's Orthanc on loopback) and the real server:
real NIH films wrapped as DX studies go into Orthanc, Orthanc pushes them to the node (C-STORE) or the
node pulls them (DICOMweb), the node scores the frontal ones at `cxr serve`, and the SR found back in
Orthanc says what the endpoint said, about the instances it scored, unverified and valid."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import pydicom
import pytest
from highdicom.sr import srread
from pydicom.uid import generate_uid

from cxr.data.findings import FINDINGS
from cxr_dicom.node import DicomNode, NodeConfig
from cxr_dicom.sr import FINDING_CODES, PROBABILITY

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
from .pacs import pacs_fixture, store_scu, study_id  # noqa: F401 - the `pacs` fixture


def a_study(nih_root, lateral: bool = True) -> list[pydicom.Dataset]:
    """A study of two real films: one PA or AP as released, the other turned into a lateral when asked."""
    study = nih_study(nih_root, list(FILMS))
    if lateral:
        study[1].ViewPosition = "LL"
    return study


def test_a_study_pushed_by_the_pacs_comes_back_as_an_sr(pacs, endpoint, nih_root, tmp_path, caplog):
    server, capture = endpoint
    caplog.set_level(logging.DEBUG)
    study = a_study(nih_root)
    frontal, lateral = study
    assert store_scu(pacs, study) == [0, 0]
    caplog.clear()  # from here, what the node logs
    node = DicomNode(node_config(pacs, server, tmp_path / "spool"))
    node.start()
    try:
        orthanc_study = study_id(pacs, frontal.StudyInstanceUID)
        pacs.post("/modalities/cxrnode/store", json={"Resources": [orthanc_study], "Synchronous": True})
        outcome = wait_for(lambda: next((o for o in node.outcomes if o.status == "sent"), None))
        assert (outcome.scored, outcome.skipped) == (1, 1)  # the lateral is not sent to the endpoint
        (sr,) = srs_of(pacs, frontal.StudyInstanceUID)

        # the same study pushed again: recognised, not scored again, no second report
        pacs.post("/modalities/cxrnode/store", json={"Resources": [orthanc_study], "Synchronous": True})
        wait_for(lambda: any(o.status == "seen" for o in node.outcomes))
        assert len(srs_of(pacs, frontal.StudyInstanceUID)) == 1
    finally:
        node.stop()

    assert sr.StudyInstanceUID == frontal.StudyInstanceUID and sr.PatientID == frontal.PatientID
    assert sr.VerificationFlag == "UNVERIFIED" and sr.SOPInstanceUID == outcome.sr_uid
    evidence = referenced(sr)
    assert evidence == [frontal.SOPInstanceUID] and lateral.SOPInstanceUID not in evidence
    status, body, _ = server.post(dicom_file(frontal), "application/dicom")  # the endpoint's own answer
    assert status == 200
    answer = json.loads(body)["predictions"][0]
    report = srread(pydicom.filebase.DicomBytesIO(dicom_file(sr))).content
    for finding in FINDINGS:
        (group,) = report.get_image_measurement_groups(
            finding_type=FINDING_CODES[finding], referenced_sop_instance_uid=frontal.SOPInstanceUID
        )
        (probability,) = group.get_measurements(name=PROBABILITY)
        assert probability.value == pytest.approx(answer["probabilities"][finding], abs=1e-6)
    assert dciodvfy_errors(dicom_file(sr), tmp_path) == []

    logged = caplog.text
    for identifying in (frontal.StudyInstanceUID, frontal.SOPInstanceUID, str(frontal.PatientID)):
        assert identifying not in logged
    captured = b"".join(path.read_bytes() for path in capture.rglob("*") if path.is_file())
    assert captured and str(frontal.PatientID).encode() not in captured
    assert frontal.StudyInstanceUID.encode() not in captured


def test_a_study_pulled_by_dicomweb_gets_its_sr_by_stow(pacs, endpoint, nih_root, tmp_path):
    """`cxr dicom-node pull` fetches the study by WADO-RS and sends the report by STOW-RS."""
    server, _ = endpoint
    study = a_study(nih_root, lateral=False)
    assert store_scu(pacs, study) == [0, 0]
    password = tmp_path / "password"
    password.write_text(pacs.auth[1])
    command = [sys.executable, "-m", "cxr.cli", "dicom-node", "pull", study[0].StudyInstanceUID,
               "--endpoint", server.url, "--dicomweb", pacs.dicomweb_url, "--dicomweb-user", pacs.auth[0],
               "--dicomweb-password-file", str(password), "--send", "stow",
               "--spool", str(tmp_path / "spool")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ": sent (2 scored, 0 skipped)" in result.stdout
    (sr,) = srs_of(pacs, study[0].StudyInstanceUID)
    assert set(referenced(sr)) == {d.SOPInstanceUID for d in study}


def test_a_study_that_keeps_failing_goes_to_the_dead_letter_folder(pacs, nih_root, tmp_path):
    """The endpoint down: each attempt fails, the study's files and the reason go to the dead-letter
    folder, and nothing reaches the PACS."""

    class Down:
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    node = DicomNode(node_config(pacs, Down, tmp_path / "spool"))
    study = a_study(nih_root, lateral=False)
    for dataset in study:
        node.spool.store(dataset)
    outcome = node.process(node.spool.folder(study[0].StudyInstanceUID))
    assert outcome.status == "dead" and "endpoint unreachable" in outcome.reason
    (buried,) = list((tmp_path / "spool" / "dead-letter").iterdir())
    assert (
        len(list(buried.glob("*.dcm"))) == 2 and "endpoint unreachable" in (buried / "reason.txt").read_text()
    )
    assert not list((tmp_path / "spool" / "incoming").iterdir())
    assert srs_of(pacs, study[0].StudyInstanceUID) == []


def test_an_instance_the_node_cannot_keep_is_refused_so_the_sender_keeps_it(nih_root, tmp_path):
    """C-STORE to the node: acknowledged only once the instance is on disk; when it cannot be written,
    the answer is "out of resources" (0xA700), and the same instance sent again is stored."""
    from pynetdicom import AE, StoragePresentationContexts

    config = NodeConfig(
        spool=tmp_path / "spool", port=free_port(), settle_seconds=3600, allowed_aes=("MODALITY",)
    )
    node = DicomNode(config)
    node.start()
    try:
        (instance,) = nih_study(nih_root, FILMS[:1])
        blocked = node.spool.folder(instance.StudyInstanceUID)
        blocked.write_text("in the way")  # the study's folder cannot be made

        def send(calling: str = "MODALITY") -> int:
            ae = AE(ae_title=calling)
            ae.requested_contexts = StoragePresentationContexts[:50]
            association = ae.associate("127.0.0.1", node.config.port, ae_title="CXRNODE")
            if not association.is_established:
                return -1
            try:
                return int(association.send_c_store(instance).Status)
            finally:
                association.release()

        assert send() == 0xA700 and not list(node.spool.incoming.glob("*/*.dcm"))
        blocked.unlink()
        assert send("STRANGER") == -1  # not on the allowlist: no association
        assert send() == 0x0000
        (stored,) = node.spool.incoming.glob("*/*.dcm")
        assert stored.stat().st_mode & 0o777 == 0o600 and stored.parent.stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    finally:
        node.stop()


def test_instances_arriving_while_a_study_is_processed_wait_for_the_next_round(nih_root, tmp_path):
    """Processing consumes the files it started with; one C-STOREd meanwhile stays spooled, not lost."""
    node = DicomNode(NodeConfig(spool=tmp_path / "spool", settle_seconds=0))
    first, late = nih_study(nih_root, list(FILMS))
    node.spool.store(first)
    folder = node.spool.folder(first.StudyInstanceUID)
    node._send = lambda outbox: None

    def meanwhile(path):  # the endpoint's answer takes a while: a film arrives
        node.spool.store(late)
        return refused_answer(path)

    node._score = meanwhile
    assert node.process(folder).status == "sent"
    (left,) = folder.glob("*.dcm")
    assert pydicom.dcmread(left).SOPInstanceUID == late.SOPInstanceUID
    node._score = refused_answer
    assert node.process(folder).status == "sent"  # the next round

    def resent(path):  # the first instance, corrected, is sent again while the late one is scored
        node.spool.store(first)
        return refused_answer(path)

    node._score = resent
    extra = copy.deepcopy(late)
    extra.SOPInstanceUID = generate_uid()
    node.spool.store(extra)
    node.spool.store(first)
    assert node.process(folder).status == "sent"  # the extra film: a new image
    (kept,) = folder.glob("*.dcm")  # the re-sent copy that came meanwhile waits for its own round
    assert pydicom.dcmread(kept).SOPInstanceUID == first.SOPInstanceUID
    assert node.process(folder).status == "seen"  # scored before: no new report


def test_a_study_claimed_when_the_node_stopped_is_back_in_line(nih_root, tmp_path):
    node = DicomNode(NodeConfig(spool=tmp_path / "spool", settle_seconds=0))
    (film,) = nih_study(nih_root, FILMS[:1])
    node.spool.store(film)
    claimed = node.spool.claim(node.spool.folder(film.StudyInstanceUID))
    assert claimed is not None and node.spool.claim(node.spool.folder(film.StudyInstanceUID)) is None
    again = DicomNode(NodeConfig(spool=tmp_path / "spool", settle_seconds=0, port=free_port()))  # a restart
    again.start()
    again.stop()
    assert not claimed.exists() and len(list(again.spool.folder(film.StudyInstanceUID).glob("*.dcm"))) == 1


def test_a_spooled_file_that_cannot_be_read_is_buried_and_the_node_goes_on(nih_root, tmp_path, caplog):
    node = DicomNode(NodeConfig(spool=tmp_path / "spool", settle_seconds=0))
    broken = node.spool.incoming / "0123456789abcdef"
    broken.mkdir()
    (broken / "x.dcm").write_bytes(b"not DICOM at all")
    (outcome,) = node.process_settled()
    assert outcome.status == "dead" and outcome.reason.startswith("unexpected")
    (buried,) = list(node.spool.dead.iterdir())
    assert (buried / "x.dcm").read_bytes() == b"not DICOM at all" and not broken.exists()
    assert node.process_settled() == []  # nothing left to trip over


def test_an_image_the_endpoint_refuses_is_reported_as_not_judged(pacs, endpoint, nih_root, tmp_path):
    """A frontal film whose pixel data is cut short: the endpoint refuses it, and the study still gets its
    report, saying the image was not judged and why, under the model the endpoint serves."""
    server, _ = endpoint
    (broken,) = nih_study(nih_root, FILMS[:1])
    broken.PixelData = broken.PixelData[:1000]
    status, _, _ = server.post(dicom_file(broken), "application/dicom")
    assert 400 <= status < 500
    node = DicomNode(node_config(pacs, server, tmp_path / "spool"))
    node.spool.store(broken)
    outcome = node.process(node.spool.folder(broken.StudyInstanceUID))
    assert outcome.status == "sent", outcome
    (sr,) = srs_of(pacs, broken.StudyInstanceUID)
    assert b"Not judged" in dicom_file(sr) and referenced(sr) == [broken.SOPInstanceUID]
    assert sr.ManufacturerModelName == "cxr-test-0"  # the served model, from /models


def test_a_wrong_endpoint_is_a_failure_not_a_refusal(pacs, endpoint, nih_root, tmp_path):
    """A 404 (a wrong URL) says nothing about the image: retried, then dead-lettered, no report."""
    server, _ = endpoint

    class Wrong:
        url = server.url + "/not-the-endpoint"

    node = DicomNode(node_config(pacs, Wrong, tmp_path / "spool"))
    (film,) = nih_study(nih_root, FILMS[:1])
    node.spool.store(film)
    outcome = node.process(node.spool.folder(film.StudyInstanceUID))
    assert outcome.status == "dead" and outcome.reason == "endpoint answered 404"
    assert srs_of(pacs, film.StudyInstanceUID) == []


def test_pull_errors_do_not_name_the_study(pacs, tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.1234567890123456789"
    command = [sys.executable, "-m", "cxr.cli", "dicom-node", "pull", uid, "--dicomweb", pacs.dicomweb_url,
               "--dicomweb-user", pacs.auth[0], "--spool", str(tmp_path / "spool")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)  # no password: 401
    assert result.returncode == 2 and "QIDO-RS search failed (HTTPError, status 401)" in result.stderr
    assert uid not in result.stdout + result.stderr
