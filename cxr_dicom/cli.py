"""`cxr dicom-node`: the DICOM node between a PACS and the cxr endpoint.

cxr dicom-node --pacs 127.0.0.1:4242 --pacs-ae ORTHANC            # Storage SCP as CXRNODE on :11112
cxr dicom-node --dicomweb http://pacs:8042/dicom-web --send stow   # results back by STOW-RS
cxr dicom-node pull 1.2.840.... --dicomweb http://pacs:8042/dicom-web  # fetch one study (QIDO-RS, WADO-RS)
cxr dicom-node replay                                                # list the dead letters
cxr dicom-node replay NAME... | --all                                # put them back in line
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from cxr.config import cxr_home
from cxr_dicom.node import DicomNode, NodeConfig, NodeError
from cxr_dicom.spool import Spool, SpoolBusy


def main(argv: list[str]) -> int:
    if argv[:1] == ["replay"]:
        return replay(argv[1:])
    pull = argv[:1] == ["pull"]
    args = _parser(pull).parse_args(argv[1:] if pull else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = DicomNode(config_from(args))
    if pull:
        try:
            outcome = node.pull(args.study)
        except NodeError as error:
            print(f"cxr dicom-node pull: error: {error}", file=sys.stderr)
            return 2
        print(f"study {outcome.study}: {outcome.status} ({outcome.scored} scored, {outcome.skipped} skipped)")
        return 0 if outcome.status in ("sent", "seen", "nothing") else 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        node.start()
    except SpoolBusy as error:
        print(f"cxr dicom-node: error: {error}", file=sys.stderr)
        return 2
    print(
        f"cxr dicom-node: {args.ae_title} on {args.host}:{args.port} → endpoint {args.endpoint}",
        file=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    node.stop()
    return 0


def replay(argv: list[str]) -> int:
    """List the dead letters, or put the named ones (or all) back in line for the node to process."""
    parser = argparse.ArgumentParser(
        prog="cxr dicom-node replay", description="list dead letters, or put them back in line"
    )
    parser.add_argument("names", nargs="*", help="dead letters to put back (as listed)")
    parser.add_argument("--all", action="store_true", help="put every dead letter back")
    parser.add_argument("--spool", default=str(default_spool()), help="the node's spool")
    args = parser.parse_args(argv)
    spool = Spool(Path(args.spool))
    letters = spool.dead_letters()
    names = [name for name, _, _ in letters] if args.all else args.names
    if not names:
        for name, reason, count in letters:
            print(f"{name}  {count} file(s)  {reason}")
        print(f"{len(letters)} dead letter(s) in {spool.dead}", file=sys.stderr)
        return 0
    for name in names:
        try:
            print(f"{name}: {spool.replay(name)} file(s) back in line")
        except FileNotFoundError as error:
            print(f"cxr dicom-node replay: error: {error}", file=sys.stderr)
            return 2
    return 0


def default_spool() -> Path:
    return cxr_home() / "dicom-node"


def pacs_address(text: str) -> tuple[str, int]:
    """HOST:PORT of the PACS, as argparse reads it (a clear error otherwise)."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:104, an IPv6 address
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. pacs.hospital:104)")
    return host, int(port)


def config_from(args: argparse.Namespace) -> NodeConfig:
    """The node's settings from the command line (the DICOMweb password from a file or the environment)."""
    host, port = args.pacs
    password = os.environ.get("CXR_DICOMWEB_PASSWORD")
    if args.dicomweb_password_file:
        password = Path(args.dicomweb_password_file).read_text(encoding="utf-8").strip()
    return NodeConfig(
        spool=Path(args.spool), endpoint=args.endpoint, ae_title=args.ae_title, host=args.host,
        port=args.port, pacs_host=host, pacs_port=port, pacs_ae_title=args.pacs_ae,
        dicomweb=args.dicomweb, dicomweb_user=args.dicomweb_user, dicomweb_password=password,
        send=args.send, settle_seconds=args.settle, attempts=args.attempts, retry_seconds=args.retry_seconds,
        max_images=args.max_images,
        allowed_aes=tuple(args.allow_ae or ()), keep_days=args.keep_days, overlays=args.overlays,
    )  # fmt: skip


def _parser(pull: bool) -> argparse.ArgumentParser:
    name = "cxr dicom-node pull" if pull else "cxr dicom-node"
    parser = argparse.ArgumentParser(prog=name, description="score chest radiographs from a PACS, SR back")
    if pull:
        parser.add_argument("study", help="the Study Instance UID to fetch by DICOMweb (QIDO-RS, WADO-RS)")
    parser.add_argument("--ae-title", default="CXRNODE", help="the node's AE title")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    parser.add_argument("--port", type=int, default=11112, help="DICOM port of the node")
    parser.add_argument("--endpoint", default="http://127.0.0.1:8080", help="the cxr endpoint (`cxr serve`)")
    parser.add_argument("--allow-ae", action="append", help="a calling AE title allowed to store (repeat)")
    parser.add_argument(
        "--pacs", type=pacs_address, default=("127.0.0.1", 4242), help="HOST:PORT the SR is C-STOREd to"
    )
    parser.add_argument("--pacs-ae", default="ORTHANC", help="the PACS's AE title")
    parser.add_argument("--dicomweb", default=None, help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    parser.add_argument("--dicomweb-user", default=None, help="HTTP basic user for DICOMweb")
    parser.add_argument(
        "--dicomweb-password-file",
        default=None,
        help="file holding its password (else $CXR_DICOMWEB_PASSWORD)",
    )
    parser.add_argument("--send", choices=("c-store", "stow"), default="c-store", help="how the SR goes back")
    parser.add_argument(
        "--spool", default=str(default_spool()), help="received instances, state, dead letters"
    )
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds without new instances before a study is scored"
    )
    parser.add_argument(
        "--attempts", type=int, default=5, help="tries before a study goes to the dead-letter folder"
    )
    parser.add_argument(
        "--retry-seconds", type=float, default=5.0, help="wait before the second try, doubling after each"
    )
    parser.add_argument("--max-images", type=int, default=16, help="frontal radiographs scored per study")
    parser.add_argument(
        "--overlays", action="store_true", help="also send a Grad-CAM overlay of each positive finding"
    )
    parser.add_argument(
        "--keep-days",
        type=float,
        default=30.0,
        help="days a study's answers are kept for a replacement report",
    )
    return parser
