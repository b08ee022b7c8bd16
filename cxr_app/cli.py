"""`cxr app`: run the web application, or manage its accounts.

cxr app                                   # http://127.0.0.1:8000, embedded defaults
cxr app --endpoint http://gateway:8080 --database postgresql://... --host 0.0.0.0
cxr app add-user alice --role admin       # asks for the password (or --password-stdin)
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys

from cxr.reviews import default_database_url
from cxr_app.accounts import add_user
from cxr_app.settings import AppSettings
from cxr_app.store import ROLES, Store

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    if argv[:1] == ["add-user"]:
        return _add_user(argv[1:])
    args = _run_parser().parse_args(argv)
    settings = AppSettings(host=args.host, port=args.port)
    for name in ("endpoint_url", "database_url", "registry"):
        if getattr(args, name):
            setattr(settings, name, getattr(args, name))
    if args.insecure_cookies:
        settings.secure_cookies = False
    return run(settings, args.threads)


def run(settings: AppSettings, threads: int = 8) -> int:
    """Serve the application with waitress until interrupted."""
    from waitress import serve

    from cxr_app import create_app

    app = create_app(settings)
    if not app.extensions["cxr_store"].users():
        print("no accounts yet: create one with `cxr app add-user NAME --role admin`", file=sys.stderr)
    print(
        f"cxr app on http://{settings.host}:{settings.port} → endpoint {settings.endpoint_url}",
        file=sys.stderr,
    )
    serve(app, host=settings.host, port=settings.port, threads=threads, ident="cxr")
    return 0


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr app", description="the web application: read, review, watch")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--endpoint", dest="endpoint_url", help="endpoint URL (default $CXR_APP_ENDPOINT or :8080)"
    )
    parser.add_argument("--database", dest="database_url", help="SQLAlchemy URL (default $CXR_APP_DATABASE)")
    parser.add_argument("--registry", help="'local' or the SageMaker registry's s3:// prefix")
    parser.add_argument("--threads", type=int, default=8, help="request threads")
    parser.add_argument(
        "--insecure-cookies",
        action="store_true",
        help="session cookie without the Secure flag off loopback: for plain HTTP, never in production "
        "(behind a TLS-terminating proxy the browser sees HTTPS, so keep the default)",
    )
    return parser


def _add_user(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cxr app add-user", description="create an account or reset one")
    parser.add_argument("username")
    parser.add_argument("--role", choices=ROLES, default="viewer")
    parser.add_argument("--database", dest="database_url", help="SQLAlchemy URL (default $CXR_APP_DATABASE)")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    args = parser.parse_args(argv)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("password: ")
    store = Store(args.database_url or default_database_url())
    try:
        add_user(store, args.username, password, args.role)
    except ValueError as error:
        print(f"cxr app add-user: {error}", file=sys.stderr)
        return 2
    store.log(None, "user_saved", account=args.username, role=args.role, via="command line")
    print(f"account {args.username} ({args.role}) saved")
    return 0
