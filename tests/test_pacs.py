"""The test PACS itself: real NIH images go into Orthanc by C-STORE and STOW-RS, come back by QIDO-RS and
WADO-RS, stay behind authentication and known AE titles, and Orthanc pushes studies to the node's port."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from tests.dicom_support import nih_dx
from tests.pacs import (  # noqa: F401 - pacs_fixture provides the module's `pacs`
    HOST,
    NODE_AET,
    SCU_AET,
    TIMEOUT_S,
    Pacs,
    fetch,
    instances,
    pacs_fixture,
    store_scu,
    stow,
    study_id,
)

SUCCESS = 0x0000
FILM = "00000442_000.png"


@pytest.fixture
def film(nih_root: Path) -> pydicom.Dataset:
    """A real NIH film as a DX instance, a new study each time."""
    return nih_dx(nih_root, FILM)


def send_by_c_store(pacs: Pacs, ds: pydicom.Dataset) -> None:
    assert store_scu(pacs, [ds]) == [SUCCESS]


def send_by_stow(pacs: Pacs, ds: pydicom.Dataset) -> None:
    response = stow(pacs, [ds])
    assert response.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("send", [send_by_c_store, send_by_stow], ids=["c-store", "stow-rs"])
def test_stored_instance_found_by_qido_and_retrieved_by_wado(pacs: Pacs, film: pydicom.Dataset, send) -> None:
    send(pacs, film)

    held = instances(pacs, film.StudyInstanceUID)
    assert [record["MainDicomTags"]["SOPInstanceUID"] for record in held] == [film.SOPInstanceUID]
    assert np.array_equal(fetch(pacs, held[0]["ID"]).pixel_array, film.pixel_array)

    client = pacs.dicomweb()
    studies = client.search_for_studies(search_filters={"StudyInstanceUID": film.StudyInstanceUID})
    assert [study["0020000D"]["Value"] for study in studies] == [[film.StudyInstanceUID]]
    retrieved = client.retrieve_instance(film.StudyInstanceUID, film.SeriesInstanceUID, film.SOPInstanceUID)
    assert retrieved.Modality == "DX"
    assert retrieved.pixel_array.shape == (1024, 1024)
    assert np.array_equal(retrieved.pixel_array, film.pixel_array)


@pytest.mark.parametrize("path", ["/system", "/studies", "/dicom-web/studies"])
@pytest.mark.parametrize("auth", [None, ("cxr", "wrong")], ids=["anonymous", "wrong-password"])
def test_rest_and_dicomweb_refuse_requests_without_credentials(pacs: Pacs, path: str, auth) -> None:
    response = requests.get(pacs.url + path, auth=auth, timeout=TIMEOUT_S)
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("calling_aet", "from_host"),
    [("STRANGER", HOST), (SCU_AET, "127.0.0.2")],
    ids=["unknown-aet", "other-host"],
)
def test_associations_from_unknown_peers_are_refused(
    pacs: Pacs, film: pydicom.Dataset, calling_aet: str, from_host: str
) -> None:
    with pytest.raises(ConnectionError, match=f"{calling_aet} at {from_host}"):
        store_scu(pacs, [film], calling_aet=calling_aet, from_host=from_host)
    assert instances(pacs, film.StudyInstanceUID) == []


def test_stored_study_becomes_stable(pacs: Pacs, film: pydicom.Dataset) -> None:
    send_by_c_store(pacs, film)
    study = study_id(pacs, film.StudyInstanceUID)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and not pacs.json(f"/studies/{study}")["IsStable"]:
        time.sleep(0.2)
    assert any(
        change["ChangeType"] == "StableStudy" and change["ID"] == study
        for change in pacs.json("/changes?limit=1000")["Changes"]
    )


@contextmanager
def node_scp(port: int) -> Iterator[list[pydicom.Dataset]]:
    """A storage SCP with the cxr node's AE title on 127.0.0.1:`port`; yields the instances it receives."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: list[pydicom.Dataset] = []

    def on_store(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return SUCCESS

    ae = AE(ae_title=NODE_AET)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.require_called_aet = True
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    server = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None  # not blocking: the server runs in its own thread
    try:
        yield received
    finally:
        server.shutdown()


def test_orthanc_pushes_a_study_to_the_node_by_c_store(pacs: Pacs, film: pydicom.Dataset) -> None:
    stow(pacs, [film])
    study = study_id(pacs, film.StudyInstanceUID)
    with node_scp(pacs.node_port) as received:
        job = pacs.post("/modalities/cxrnode/store", json={"Resources": [study], "Synchronous": True}).json()
    assert job["FailedInstancesCount"] == 0
    assert [r.SOPInstanceUID for r in received] == [film.SOPInstanceUID]
    assert np.array_equal(received[0].pixel_array, film.pixel_array)
