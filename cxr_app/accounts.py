"""Accounts: Argon2id password hashes, sign-in with lock-out, and roles (viewer < reviewer < admin)."""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import abort, current_app, g, redirect, request, session, url_for

from cxr_app.store import ROLES, Store, now, users

HASHER = PasswordHasher()  # Argon2id with the library's current recommended parameters
MAX_FAILURES = 5  # failed sign-ins in a row before the account locks
LOCK_MINUTES = 15
MIN_PASSWORD = 12
# Verified against when the user does not exist, so that a wrong name costs as long as a wrong password.
_DUMMY = HASHER.hash("an account that does not exist")


FAILED = (
    f"sign-in failed: wrong user name or password (after {MAX_FAILURES} failures in a row an account is "
    f"locked for {LOCK_MINUTES} minutes)"
)


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
    """The account when the password is right and it is not locked; locks it after repeated failures.

    Each attempt is counted before the password is checked, in one atomic update, so parallel guesses
    cannot outrun the lock. Every failure says the same thing and costs one Argon2 verification, so
    neither the message nor the time tells whether an account exists or is locked.
    """
    user = store.count_attempt(username)
    if user is None:
        _verify(_DUMMY, password)
        store.log(None, "sign_in_failed_unknown_account")  # the name as typed may be a password
        raise SignInError(FAILED)
    locked = user["locked_until"] is not None and _aware(user["locked_until"]) > now()
    if locked or user["failed_logins"] > MAX_FAILURES:
        _verify(_DUMMY, password)
        store.log(username, "sign_in_refused_locked")
        raise SignInError(FAILED)
    if not _verify(user["password_hash"], password):
        if user["failed_logins"] >= MAX_FAILURES:
            store.lock(username, now() + dt.timedelta(minutes=LOCK_MINUTES))
            store.log(username, "account_locked", failures=user["failed_logins"])
        else:
            store.log(username, "sign_in_failed", failures=user["failed_logins"])
        raise SignInError(FAILED)
    if HASHER.check_needs_rehash(user["password_hash"]):
        store.update_user(username, password_hash=HASHER.hash(password))
    store.update_user(username, failed_logins=0, locked_until=None)
    store.log(username, "signed_in")
    return store.user(username) or user


def _verify(hashed: str, password: str) -> bool:
    try:
        return HASHER.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)  # SQLite returns naive times


def current_user() -> dict[str, Any] | None:
    """The signed-in account of this request, checked against the database on every request: a session
    ends when its account signs out anywhere, is reset or locked, or `session_hours` after sign-in."""
    if "user" not in g:
        g.user = None
        name, since = session.get("user"), session.get("since", 0)
        user = current_app.extensions["cxr_store"].user(name) if name else None
        hours = current_app.extensions["cxr_settings"].session_hours
        fresh = time.time() - float(since) < hours * 3600
        if user and fresh and session.get("version") == user["session_version"] and user["role"] in ROLES:
            g.user = user
    return g.user


def start_session(user: dict[str, Any]) -> None:
    session.clear()
    session["user"], session["version"], session["since"] = (
        user["username"],
        user["session_version"],
        time.time(),
    )
    session.permanent = True


def end_sessions(store: Store, username: str) -> None:
    """Sign `username` out everywhere: every session cookie issued so far stops working."""
    store.update_user(username, session_version=users.c.session_version + 1)


def has_role(user: dict[str, Any] | None, role: str) -> bool:
    return user is not None and user["role"] in ROLES and ROLES.index(user["role"]) >= ROLES.index(role)


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
