"""Download the official NIH ChestX-ray14 archives: resumable, with progress and MD5 verification.

URLs are those of NIH's `batch_download_zips.py`; the MD5 sums are the ones NIH publishes in the dataset's
FAQ (FAQ_CHESTXRAY.pdf, Q07). About 42 GiB in all. A partial file (`*.part`) is resumed with an HTTP Range
request; a finished file whose checksum matches is never downloaded again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

_BOX = "https://nihcc.box.com/shared/static/"
_NIH_METADATA = (
    "https://nihcc.app.box.com/index.php?rm=box_download_shared_file&vanity_name=ChestXray-NIHCC&file_id=f_"
)
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of the official release."""

    name: str
    url: str
    md5: str | None = None


ARCHIVES: tuple[RemoteFile, ...] = tuple(
    RemoteFile(f"images_{i:03d}.tar.gz", _BOX + token + ".gz", md5)
    for i, (token, md5) in enumerate(
        [
            ("vfk49d74nhbxq3nqjg0900w5nvkorp5c", "fe8ed0a6961412fddcbb3603c11b3698"),
            ("i28rlmbvmfjbl8p2n3ril0pptcmcu9d1", "ab07a2d7cbe6f65ddd97b4ed7bde10bf"),
            ("f1t00wrtdk94satdfb9olcolqx20z2jp", "2301d03bde4c246388bad3876965d574"),
            ("0aowwzs5lhjrceb3qp67ahp0rd1l1etg", "9f1b7f5aae01b13f4bc8e2c44a4b8ef6"),
            ("v5e3goj22zr6h8tzualxfsqlqaygfbsn", "1861f3cd0ef7734df8104f2b0309023b"),
            ("asi7ikud9jwnkrnkj99jnpfkjdes7l6l", "456b53a8b351afd92a35bc41444c58c8"),
            ("jn1b4mw4n6lnh74ovmcjb8y48h8xj07n", "1075121ea20a137b87f290d6a4a5965e"),
            ("tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j", "b61f34cec3aa69f295fbb593cbd9d443"),
            ("upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj", "442a3caa61ae9b64e61c561294d1e183"),
            ("l6nilvfa9cg3s28tqv1qc1olm3gnz54p", "09ec81c4c31e32858ad8cf965c494b74"),
            ("hhq8fkdgvcari67vfhs7ppg2w6ni4jze", "499aefc67207a5a97692424cf5dbeed5"),
            ("ioqwiy20ihqwyr8pf4c24eazhh281pbu", "dc9fda1757c2de0032b63347a7d2895c"),
        ],
        start=1,
    )
)
METADATA_FILES: tuple[RemoteFile, ...] = (
    RemoteFile("Data_Entry_2017_v2020.csv", _NIH_METADATA + "219760887468"),
    RemoteFile("BBox_List_2017.csv", _NIH_METADATA + "219760940956"),
    RemoteFile("train_val_list.txt", _NIH_METADATA + "256056636701"),
    RemoteFile("test_list.txt", _NIH_METADATA + "256055473534"),
)


class ChecksumError(RuntimeError):
    """A downloaded file does not match its published checksum."""


def md5sum(path: Path) -> str:
    """MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    remote: RemoteFile, directory: str | Path, progress: bool = True, timeout: float = 60
) -> Path:
    """Download one file into `directory`, resuming a partial download and verifying its MD5."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target, partial = directory / remote.name, directory / (remote.name + ".part")
    if target.is_file() and (remote.md5 is None or md5sum(target) == remote.md5):
        log.info("%s already downloaded", target)
        return target
    if not remote.url.startswith(("https://", "http://")):
        raise ValueError(f"refusing to download from {remote.url!r}: only http(s) URLs are allowed")
    offset = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        remote.url, headers={"Range": f"bytes={offset}-"} if offset else {}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310  # nosec B310
        if offset and response.status != 206:
            offset = 0  # server ignored the Range header: start over
        total = offset + int(response.headers.get("Content-Length") or 0)
        with (
            open(partial, "ab" if offset else "wb") as handle,
            tqdm(
                total=total or None,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=remote.name,
                disable=not progress,
            ) as bar,
        ):
            for block in iter(lambda: response.read(CHUNK), b""):
                handle.write(block)
                bar.update(len(block))
    if remote.md5 is not None:
        actual = md5sum(partial)
        if actual != remote.md5:
            partial.unlink()
            raise ChecksumError(
                f"{remote.name}: MD5 {actual} != published {remote.md5}; removed, download again"
            )
    os.replace(partial, target)
    return target


def download_nih(
    directory: str | Path,
    archives: Iterable[int] = range(1, 13),
    metadata: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Download the chosen `images_XXX.tar.gz` archives (1–12) and the metadata files into `directory`."""
    chosen = [ARCHIVES[i - 1] for i in archives]
    files = (list(METADATA_FILES) if metadata else []) + chosen
    return [download_file(remote, directory, progress) for remote in files]
