"""Accounts: Argon2id password hashes, sign-in with lock-out, and roles (viewer < reviewer < admin)."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import abort, current_app, g, redirect, request, session, url_for

from cxr_app.store import ROLES, Store, now

HASHER = PasswordHasher()  # Argon2id with the library's current recommended parameters
MAX_FAILURES = 5  # failed sign-ins in a row before the account locks
LOCK_MINUTES = 15
MIN_PASSWORD = 12
# Verified against when the user does not exist, so that a wrong name costs as long as a wrong password.
_DUMMY = HASHER.hash("an account that does not exist")


class SignInError(Exception):
    """Why a sign-in failed, in words safe to show (never which of name or password was wrong)."""


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"passwords have at least {MIN_PASSWORD} characters")
    return HASHER.hash(password)


def add_user(store: Store, username: str, password: str, role: str) -> None:
    """Create or reset an account."""
    if not username or len(username) > 64 or not username.isprintable():
        raise ValueError("user names are 1-64 printable characters")
    store.put_user(username, hash_password(password), role)


def sign_in(store: Store, username: str, password: str) -> dict[str, Any]:
    """The account when the password is right and it is not locked; locks it after repeated failures."""
    user = store.user(username)
    if user is None:
        _verify(_DUMMY, password)
        store.log(None, "sign_in_failed", account=username[:64])
        raise SignInError("wrong user name or password")
    locked = user["locked_until"]
    if locked is not None and _aware(locked) > now():
        store.log(username, "sign_in_refused_locked")
        raise SignInError(f"this account is locked after {MAX_FAILURES} failed sign-ins; try again later")
    if not _verify(user["password_hash"], password):
        failures = user["failed_logins"] + 1
        lock = now() + dt.timedelta(minutes=LOCK_MINUTES) if failures >= MAX_FAILURES else None
        store.update_user(username, failed_logins=0 if lock else failures, locked_until=lock)
        store.log(username, "account_locked" if lock else "sign_in_failed", failures=failures)
        raise SignInError("wrong user name or password")
    if HASHER.check_needs_rehash(user["password_hash"]):
        store.update_user(username, password_hash=HASHER.hash(password))
    store.update_user(username, failed_logins=0, locked_until=None)
    store.log(username, "signed_in")
    return user


def _verify(hashed: str, password: str) -> bool:
    try:
        return HASHER.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)  # SQLite returns naive times


def current_user() -> dict[str, Any] | None:
    """The signed-in account of this request (checked against the database every request)."""
    if "user" not in g:
        name = session.get("user")
        user = current_app.extensions["cxr_store"].user(name) if name else None
        g.user = user if user and session.get("epoch") == _epoch(user) else None
    return g.user


def _epoch(user: dict[str, Any]) -> str:
    """Changes when the password changes, so that resetting it signs out every session."""
    return hashlib.sha256(str(user["password_hash"]).encode()).hexdigest()[:16]


def start_session(user: dict[str, Any]) -> None:
    session.clear()
    session["user"], session["epoch"] = user["username"], _epoch(user)
    session.permanent = True


def has_role(user: dict[str, Any] | None, role: str) -> bool:
    return user is not None and ROLES.index(user["role"]) >= ROLES.index(role)


def requires(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A view decorator: anonymous requests go to the sign-in page (401 for API calls), lesser roles 403."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            user = current_user()
            if user is None:
                if request.method == "GET" and request.accept_mimetypes.accept_html:
                    return redirect(url_for("views.sign_in", next=request.path))
                abort(401)
            if not has_role(user, role):
                abort(403)
            return view(*args, **kwargs)

        wrapped.required_role = role  # type: ignore[attr-defined]
        return wrapped

    return decorate
