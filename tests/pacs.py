"""A real PACS for tests: Debian's Orthanc with its DICOMweb plugin on 127.0.0.1, in a temporary folder.

Orthanc 1.10 has no bind-address option, so loopback is enforced by what it accepts: HTTP from loopback
clients only (`RemoteAccessAllowed` false, basic authentication on), DICOM associations only from the
modalities it knows (`DicomAlwaysAllow*` false), each at 127.0.0.1 with the peer's address checked
(`DicomCheckModalityHost`) and the called AE title checked (`DicomCheckCalledAet`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.conftest import free_port

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
HOST = "127.0.0.1"
AET = "ORTHANC"
NODE_AET = "CXRNODE"  # the cxr DICOM node, as Orthanc knows it (modality "cxrnode")
SCU_AET = "TESTSCU"  # the tests' own storage SCU
USER, PASSWORD = "cxr", "orthanc-test-password"  # a throwaway loopback server's account
STARTUP_S = 30
TIMEOUT_S = 20


@dataclass
class Pacs:
    """A running Orthanc: its REST and DICOMweb roots, credentials, DICOM address and a REST session."""

    url: str
    dicomweb_url: str
    auth: tuple[str, str]
    host: str
    port: int
    aet: str
    node_port: int
    folder: Path
    process: subprocess.Popen = field(repr=False)
    session: requests.Session = field(repr=False)

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET a REST path (e.g. "/system"), raising on an HTTP error."""
        return self._call("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        """POST to a REST path; pass `json=` or `data=`; raises on an HTTP error."""
        return self._call("POST", path, **kwargs)

    def json(self, path: str) -> Any:
        """The JSON body of a GET on a REST path."""
        return self.get(path).json()

    def dicomweb(self):
        """A DICOMweb client (QIDO-RS, WADO-RS, STOW-RS) on this server with its credentials."""
        from dicomweb_client import DICOMwebClient

        return DICOMwebClient(self.dicomweb_url, session=self.session, timeout=TIMEOUT_S)

    def stop(self) -> None:
        """Stop Orthanc and wait for it to exit."""
        self.session.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=TIMEOUT_S)

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT_S)
        response = self.session.request(method, self.url + path, **kwargs)
        response.raise_for_status()
        return response


def configuration(folder: Path, http_port: int, dicom_port: int, node_port: int) -> dict:
    """Orthanc's configuration: everything in `folder`, loopback peers only, authentication on, DICOMweb."""
    loopback_peer = {"Host": HOST, "AllowEcho": True, "AllowStore": True, "AllowFind": True}
    return {
        "Name": "cxr-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "TemporaryDirectory": str(folder / "tmp"),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": HOST},
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "OrthancExplorerEnabled": False,
        "HttpDescribeErrors": True,
        "DicomServerEnabled": True,
        "DicomAet": AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalitiesInDatabase": False,
        "DicomModalities": {
            "cxrnode": {
                "AET": NODE_AET,
                "Port": node_port,
                **loopback_peer,
                "AllowMove": True,
                "AllowGet": True,
            },
            "testscu": {"AET": SCU_AET, "Port": 104, **loopback_peer},  # stores in; never called back
        },
        "DicomScuTimeout": TIMEOUT_S,
        "DicomAssociationCloseDelay": 0,  # close Orthanc's own associations at once, so a stopped SCP is seen
        "StableAge": 2,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "LuaScripts": [],
        "StorageCompression": False,
    }


def orthanc_missing() -> None:
    """Fail where CI runs (it installs Orthanc), skip elsewhere."""
    message = f"{ORTHANC} or {DICOMWEB_PLUGIN} is missing (Debian packages orthanc, orthanc-dicomweb)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def orthanc(folder: Path, node_port: int | None = None) -> Iterator[Pacs]:
    """Run Orthanc with its storage, index, configuration and log in `folder`; it knows the cxr node as
    modality "cxrnode" (AE title CXRNODE at 127.0.0.1:`node_port`, a free port unless given)."""
    binary = shutil.which(ORTHANC) or shutil.which(ORTHANC, path="/usr/sbin")
    if binary is None or not DICOMWEB_PLUGIN.is_file():
        orthanc_missing()
    http_port, dicom_port, node_port = free_port(), free_port(), node_port or free_port()
    config = folder / "orthanc.json"
    config.write_text(json.dumps(configuration(folder, http_port, dicom_port, node_port), indent=2))
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    log = (folder / "orthanc.log").open("wb")
    process = subprocess.Popen([str(binary), str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    log.close()
    url = f"http://{HOST}:{http_port}"
    pacs = Pacs(
        url, f"{url}/dicom-web", (USER, PASSWORD), HOST, dicom_port, AET, node_port, folder, process, session
    )
    try:
        wait_until_up(pacs)
        yield pacs
    finally:
        pacs.stop()


def wait_until_up(pacs: Pacs) -> None:
    """Wait (bounded) until REST /system answers; fail with the log's tail if Orthanc exits or never does."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and pacs.process.poll() is None:
        try:
            if pacs.session.get(pacs.url + "/system", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    state = f"exited with {pacs.process.returncode}" if pacs.process.poll() is not None else "did not answer"
    pacs.stop()
    tail = pacs.log.read_text(errors="replace")[-4000:]
    pytest.fail(f"Orthanc {state} within {STARTUP_S} s; {pacs.log}:\n{tail}")


@pytest.fixture(scope="module", name="pacs")
def pacs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    """An Orthanc for the test module (import this fixture into a module to use it)."""
    with orthanc(tmp_path_factory.mktemp("orthanc")) as running:
        yield running


def store_scu(
    pacs: Pacs, datasets: Iterable[pydicom.Dataset], calling_aet: str = SCU_AET, from_host: str = HOST
) -> list[int]:
    """Send instances to Orthanc by C-STORE (one association from `from_host`); returns each instance's
    DIMSE status; raises ConnectionError if Orthanc refuses the association."""
    from pynetdicom import AE, StoragePresentationContexts

    datasets = list(datasets)
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    sop_classes = {ds.SOPClassUID for ds in datasets}
    ae.requested_contexts = [c for c in StoragePresentationContexts if c.abstract_syntax in sop_classes]
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.aet, bind_address=(from_host, 0))
    if not assoc.is_established:
        raise ConnectionError(f"Orthanc refused the association from {calling_aet} at {from_host}")
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def stow(pacs: Pacs, datasets: Iterable[pydicom.Dataset]) -> pydicom.Dataset:
    """Send instances to Orthanc by DICOMweb STOW-RS as DICOM files (PS3.10); returns the store response."""
    return pacs.dicomweb().store_instances([part10(ds) for ds in datasets])


def part10(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of `ds` with the file preamble, without which DICOMweb clients write bare data sets under
    pydicom 3 and Orthanc stores (and serves back) exactly those bytes."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def study_id(pacs: Pacs, study_uid: str) -> str | None:
    """Orthanc's ID of the study with this StudyInstanceUID, or None if it holds no such study."""
    found = pacs.post("/tools/lookup", data=study_uid).json()
    return next((match["ID"] for match in found if match["Type"] == "Study"), None)


def instances(pacs: Pacs, study_uid: str) -> list[dict]:
    """What Orthanc holds for a study: each instance's REST record (ID, MainDicomTags, ParentSeries, ...)."""
    study = study_id(pacs, study_uid)
    return [] if study is None else pacs.json(f"/studies/{study}/instances")


def fetch(pacs: Pacs, instance_id: str) -> pydicom.Dataset:
    """An instance Orthanc holds, by its Orthanc ID, as a pydicom Dataset."""
    return pydicom.dcmread(BytesIO(pacs.get(f"/instances/{instance_id}/file").content))
