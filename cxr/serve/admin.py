"""The bearer token that guards `/admin/*` on `cxr serve` and `cxr gateway`.

The token comes from a file given by flag, else from `$CXR_ADMIN_TOKEN`, else from `$CXR_HOME/admin-token`,
which is created on first use (a random URL-safe token, mode 0600), so that other programs of the same user
on the machine (the web application) read the same one. The token itself is never logged: only its source.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from cxr.config import cxr_home

log = logging.getLogger(__name__)

ENV = "CXR_ADMIN_TOKEN"
FILE_NAME = "admin-token"
ADMIN_PREFIX = "/admin/"
TOKEN_PATTERN = re.compile(r"[\x21-\x7e]{16,1024}")  # printable ASCII, no spaces: it travels in a header
CHALLENGE = 'Bearer realm="cxr-admin"'


def admin_token_path() -> Path:
    """Where the embedded default token lives: `$CXR_HOME/admin-token`."""
    return cxr_home() / FILE_NAME


def admin_token_source(path: str | Path | None = None) -> str:
    """Where `load_admin_token(path)` takes the token from, in words (never the token)."""
    if path is not None:
        return str(path)
    if os.environ.get(ENV):
        return f"${ENV}"
    return str(admin_token_path())


def load_admin_token(path: str | Path | None = None) -> str:
    """The admin token: read from `path` when given (it must exist), else `$CXR_ADMIN_TOKEN`, else read
    from `$CXR_HOME/admin-token`, creating that file with a random token (mode 0600) when absent."""
    source = admin_token_source(path)
    if path is None and os.environ.get(ENV):
        token = os.environ[ENV]
    else:
        token = local_secret(Path(source)) if path is None else _read(Path(source))
    token = _checked(token, source)
    log.info("admin routes need the bearer token from %s", source)
    return token


def local_secret(path: Path) -> str:
    """The secret kept in `path`, created (random, mode 0600, atomically) when missing: the admin token,
    the web application's session key."""
    if not path.exists():
        _create(path)
    return _read(path)


def admin_headers(token: str) -> dict[str, str]:
    """The request header an admin call carries."""
    return {"Authorization": f"Bearer {token}"}


def require_admin_token(token: str) -> Middleware:
    """aiohttp middleware: every route under `/admin/` (any method) needs `Authorization: Bearer <token>`;
    401 without one, 403 with a wrong one. Judged on the matched route, so path spellings cannot slip by."""
    expected = _checked(token, "the admin token").encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_admin(request):
            refusal = _refusal(request.headers.get("Authorization"), expected)
            if refusal is not None:
                return refusal
        return await handler(request)

    return middleware


def _is_admin(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else request.path
    return canonical.startswith(ADMIN_PREFIX) or request.path.startswith(ADMIN_PREFIX)


def _refusal(header: str | None, expected: bytes) -> web.Response | None:
    """None when the header carries the token; else the 401 (none given) or 403 (a wrong one)."""
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return web.json_response(
            {"error": "admin routes need 'Authorization: Bearer <admin token>'"},
            status=401,
            headers={"WWW-Authenticate": CHALLENGE},
        )
    if hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected):
        return None
    return web.json_response({"error": "wrong admin token"}, status=403)


def _read(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("admin token file %s is readable by others (mode %o); chmod 600 it", path, mode & 0o777)
    return path.read_text(encoding="ascii", errors="replace").strip()


def _create(path: Path) -> None:
    """Write a new random token to `path` atomically (0600); a file another process made first wins."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(temporary, path)  # fails if the file exists: never overwrites a token in use
            log.info("created the admin token file %s (mode 0600)", path)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def _checked(token: str, source: str) -> str:
    token = token.strip()
    if not TOKEN_PATTERN.fullmatch(token):
        raise ValueError(
            f"the admin token from {source} must be 16-1024 printable ASCII characters without spaces"
        )
    return token
