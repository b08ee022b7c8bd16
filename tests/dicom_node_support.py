"""What the DICOM node's tests share: a live endpoint, the node's settings against the test PACS, and
reading the reports the PACS holds."""

from __future__ import annotations

import time

import pydicom
import pytest

from cxr_dicom.node import NodeConfig

from .conftest import free_port
from .pacs import instances
from .serving_support import LiveServer, make_package

FILMS = ("00000442_000.png", "00000574_000.png")  # two real NIH films, filed as one study


@pytest.fixture(scope="module", name="endpoint")
def endpoint_fixture(tmp_path_factory, nih_root):
    """`cxr serve` with a package of a seeded model, capturing what it serves (import into a module)."""
    package, _, _ = make_package(tmp_path_factory.mktemp("package"), nih_root)
    capture = tmp_path_factory.mktemp("capture")
    server = LiveServer(free_port(), "--model", str(package), "--capture", str(capture))
    yield server, capture
    server.stop()


def node_config(pacs, endpoint, spool, **settings) -> NodeConfig:
    return NodeConfig(
        spool=spool, endpoint=endpoint.url, port=pacs.node_port, pacs_host=pacs.host, pacs_port=pacs.port,
        pacs_ae_title=pacs.aet, dicomweb=pacs.dicomweb_url, dicomweb_user=pacs.auth[0],
        dicomweb_password=pacs.auth[1], settle_seconds=1.0, attempts=2, retry_seconds=0.2, **settings,
    )  # fmt: skip


def srs_of(pacs, study_uid: str) -> list[pydicom.Dataset]:
    """The SR instances Orthanc holds for a study."""
    found = []
    for record in instances(pacs, study_uid):
        data = pacs.get(f"/instances/{record['ID']}/file").content
        dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        if dataset.Modality == "SR":
            found.append(dataset)
    return found


def referenced(sr: pydicom.Dataset) -> list[str]:
    """The SOP instances an SR names as its evidence."""
    studies = sr.CurrentRequestedProcedureEvidenceSequence
    series = [one for study in studies for one in study.ReferencedSeriesSequence]
    return [item.ReferencedSOPInstanceUID for one in series for item in one.ReferencedSOPSequence]


def wait_for(predicate, seconds: float = 90.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds} s")


def refused_answer(path) -> dict:
    """An answer the node can report on without an endpoint: the image refused by a named model's gate."""
    return {"error": "refused", "model": {"name": "cxr-test", "version": "1"},
            "input_gate": [{"verdict": "out_of_distribution", "score": 1.0, "threshold": 0.5}]}  # fmt: skip


def judged_answer(path) -> dict:
    """An answer the node can report on without an endpoint: every finding judged positive."""
    from cxr.data.findings import FINDINGS

    prediction = {
        "probabilities": dict.fromkeys(FINDINGS, 0.9),
        "decisions": dict.fromkeys(FINDINGS, True),
        "input_check": {"verdict": "in_distribution", "score": 0.1, "threshold": 0.5},
    }
    return {"model": {"name": "cxr-test", "version": "1"}, "thresholds": dict.fromkeys(FINDINGS, 0.5),
            "predictions": [prediction]}  # fmt: skip
