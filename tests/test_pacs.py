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
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

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


def nih_dx(png: Path) -> pydicom.Dataset:
    """A real NIH PNG as a one-instance DX study of its own."""
    pixels = np.asarray(Image.open(png).convert("L"))
    ds = pydicom.Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.PatientID, ds.PatientName, ds.AccessionNumber = png.stem.split("_")[0], "NIH^Test", png.stem[:16]
    ds.Modality, ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "DX", "20240101", 1, 1
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=8)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    return ds


@pytest.fixture
def pngs(nih_root: Path) -> list[Path]:
    return sorted((nih_root / "images_001" / "images").glob("*.png"))[:3]


def send_by_c_store(pacs: Pacs, ds: pydicom.Dataset) -> None:
    assert store_scu(pacs, [ds]) == [SUCCESS]


def send_by_stow(pacs: Pacs, ds: pydicom.Dataset) -> None:
    response = stow(pacs, [ds])
    assert response.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("send", [send_by_c_store, send_by_stow], ids=["c-store", "stow-rs"])
def test_stored_instance_found_by_qido_and_retrieved_by_wado(pacs: Pacs, pngs: list[Path], send) -> None:
    ds = nih_dx(pngs[0])
    send(pacs, ds)

    held = instances(pacs, ds.StudyInstanceUID)
    assert [record["MainDicomTags"]["SOPInstanceUID"] for record in held] == [ds.SOPInstanceUID]
    assert np.array_equal(fetch(pacs, held[0]["ID"]).pixel_array, ds.pixel_array)

    client = pacs.dicomweb()
    studies = client.search_for_studies(search_filters={"StudyInstanceUID": ds.StudyInstanceUID})
    assert [study["0020000D"]["Value"] for study in studies] == [[ds.StudyInstanceUID]]
    retrieved = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert retrieved.Modality == "DX"
    assert retrieved.pixel_array.shape == (1024, 1024)
    assert np.array_equal(retrieved.pixel_array, ds.pixel_array)


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
    pacs: Pacs, pngs: list[Path], calling_aet: str, from_host: str
) -> None:
    ds = nih_dx(pngs[0])
    with pytest.raises(ConnectionError, match=f"{calling_aet} at {from_host}"):
        store_scu(pacs, [ds], calling_aet=calling_aet, from_host=from_host)
    assert instances(pacs, ds.StudyInstanceUID) == []


def test_stored_study_becomes_stable(pacs: Pacs, pngs: list[Path]) -> None:
    ds = nih_dx(pngs[1])
    send_by_c_store(pacs, ds)
    study = study_id(pacs, ds.StudyInstanceUID)
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


def test_orthanc_pushes_a_study_to_the_node_by_c_store(pacs: Pacs, pngs: list[Path]) -> None:
    ds = nih_dx(pngs[2])
    stow(pacs, [ds])
    study = study_id(pacs, ds.StudyInstanceUID)
    with node_scp(pacs.node_port) as received:
        job = pacs.post("/modalities/cxrnode/store", json={"Resources": [study], "Synchronous": True}).json()
    assert job["FailedInstancesCount"] == 0
    assert [r.SOPInstanceUID for r in received] == [ds.SOPInstanceUID]
    assert np.array_equal(received[0].pixel_array, ds.pixel_array)
