"""The web application's security, over real HTTP: sign-in, roles, CSRF, lock-out, secrets kept out of
storage and logs, hostile uploads refused."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from argon2 import PasswordHasher

from cxr.data.findings import FINDINGS
from cxr_app.accounts import MAX_FAILURES, add_user
from cxr_app.settings import AppSettings

from .app_support import Client, running_app
from .conftest import free_port
from .serving_support import decompression_bomb

PASSWORDS = {"ada": "ada-password-1234", "rita": "rita-password-5678", "vic": "vic-password-9012"}
ROLES = {"ada": "admin", "rita": "reviewer", "vic": "viewer"}
PUBLIC = {"views.sign_in", "views.sign_out", "views.healthz", "static"}
SAMPLE = {"inference_id": "case-1", "finding": "Effusion", "version": "1", "action": "approve"}


@pytest.fixture
def app_url(tmp_path):
    settings = AppSettings(database_url=f"sqlite:///{tmp_path / 'app.db'}",
                           endpoint_url=f"http://127.0.0.1:{free_port()}")  # fmt: skip
    with running_app(settings) as (url, app):
        store = app.extensions["cxr_store"]
        for name, password in PASSWORDS.items():
            add_user(store, name, password, ROLES[name])
        yield url, app, tmp_path / "app.db"


def routes(app, role: str | None = None):
    """(path, method, endpoint) of every route; only those needing `role` when given."""
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC:
            continue
        view = app.view_functions[rule.endpoint]
        if role is not None and getattr(view, "required_role", None) != role:
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: SAMPLE[m.group(1)], rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield path, method, rule.endpoint


def test_every_non_public_route_refuses_an_anonymous_request(app_url):
    url, app, _ = app_url
    every = list(routes(app))
    assert len(every) >= 14 and all(
        getattr(app.view_functions[e], "required_role", None) for _, _, e in every
    )
    anonymous = Client(url)
    anonymous.get("/sign-in")  # a valid CSRF token of an anonymous session: refused for who, not for CSRF
    for path, method, _ in every:
        response = anonymous.get(path) if method == "GET" else anonymous.post(path, {})
        if method == "GET":  # a browser is sent to sign in; nothing of the page is shown
            assert response.status_code == 302 and "/sign-in" in response.headers["Location"], (
                path,
                response,
            )
        else:
            assert response.status_code == 401, (method, path, response.status_code)
    assert Client(url).get("/healthz").status_code == 200


def test_a_reviewer_cannot_reach_admin_actions_and_a_viewer_cannot_review(app_url):
    url, app, _ = app_url
    reviewer = Client(url)
    assert reviewer.sign_in("rita", PASSWORDS["rita"]).status_code == 302
    admin_routes = list(routes(app, "admin"))
    assert {e for _, _, e in admin_routes} >= {"views.model_action", "views.set_weights", "views.users_page",
                                               "views.audit_page"}  # fmt: skip
    for path, method, _ in admin_routes:
        reviewer.get("/")
        response = (
            reviewer.get(path) if method == "GET" else reviewer.post(path, {"username": "x", "role": "admin"})
        )
        assert response.status_code == 403, (method, path, response.status_code)
    viewer = Client(url)
    viewer.sign_in("vic", PASSWORDS["vic"])
    viewer.get("/")
    assert viewer.get("/review").status_code == 403
    assert viewer.post("/cases/case-1/review", {}).status_code == 403
    assert app.extensions["cxr_store"].user("x") is None


def test_a_forged_cross_site_post_fails(app_url):
    url, app, _ = app_url
    admin = Client(url)
    admin.sign_in("ada", PASSWORDS["ada"])
    admin.get("/admin/users")
    form = {"username": "mallory", "password": "mallory-password-1", "role": "admin"}
    # A page elsewhere can make the browser send the cookie (were it not SameSite) but cannot read the token.
    forged = admin.post("/admin/users", form, csrf=False, headers={"Origin": "https://evil.example"})
    assert forged.status_code == 400 and "CSRF" in forged.text
    other = Client(url)
    other.get("/sign-in")  # a token from another session does not pass either
    admin.token = other.token
    assert admin.post("/admin/users", form).status_code == 400
    assert app.extensions["cxr_store"].user("mallory") is None
    cookie = admin.http.cookies._cookies  # the session cookie's attributes as the server set them
    session = next(c for domain in cookie.values() for path in domain.values() for c in path.values())
    assert session.has_nonstandard_attr("HttpOnly") and session.get_nonstandard_attr("SameSite") == "Lax"
    admin.get("/admin/users")
    assert admin.post("/admin/users", form).status_code == 200  # the real form, with its token, works
    assert app.extensions["cxr_store"].user("mallory")["role"] == "admin"


def test_session_cookies_are_secure_off_loopback():
    assert AppSettings(host="0.0.0.0", secret_key="k").cookies_secure
    assert not AppSettings(host="127.0.0.1", secret_key="k").cookies_secure
    assert AppSettings(host="127.0.0.1", secret_key="k", secure_cookies=True).cookies_secure


def test_parallel_guesses_cannot_outrun_the_lock(app_url):
    url, app, _ = app_url
    with ThreadPoolExecutor(20) as pool:
        answers = list(
            pool.map(lambda _: Client(url).sign_in("rita", "wrong-password-0000").status_code, range(20))
        )
    assert answers == [401] * 20
    actions = [e["action"] for e in app.extensions["cxr_store"].audit_log()]
    assert actions.count("sign_in_failed") + actions.count("account_locked") == MAX_FAILURES  # checked: 5
    assert (
        actions.count("account_locked") == 1 and actions.count("sign_in_refused_locked") == 20 - MAX_FAILURES
    )
    assert Client(url).sign_in("rita", PASSWORDS["rita"]).status_code == 401  # locked, right password or not


def test_signing_out_ends_the_session_everywhere_and_a_success_resets_the_count(app_url):
    url, app, _ = app_url
    for _ in range(MAX_FAILURES - 1):
        Client(url).sign_in("ada", "wrong-password-0000")
    admin = Client(url)
    assert admin.sign_in("ada", PASSWORDS["ada"]).status_code == 302  # a success resets the failures
    assert app.extensions["cxr_store"].user("ada")["failed_logins"] == 0
    copied = dict(admin.http.cookies)  # a cookie taken from this browser
    admin.get("/")
    assert admin.post("/sign-out").status_code == 302
    thief = Client(url)
    thief.http.cookies.update(copied)
    assert thief.get("/admin/users").status_code == 302  # to the sign-in page: the session is over


def test_an_old_hash_is_upgraded_at_sign_in_without_losing_the_session(app_url):
    url, app, _ = app_url
    store = app.extensions["cxr_store"]
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORDS["vic"])
    store.update_user("vic", password_hash=weak)
    viewer = Client(url)
    assert viewer.sign_in("vic", PASSWORDS["vic"]).headers["Location"] == "/"
    assert viewer.get("/").status_code == 200 and store.user("vic")["password_hash"] != weak


def test_sign_in_and_sign_out_need_the_csrf_token(app_url):
    url, _, _ = app_url
    client = Client(url)
    client.get("/sign-in")
    form = {"username": "vic", "password": PASSWORDS["vic"]}
    assert client.post("/sign-in", form, csrf=False).status_code == 400
    assert client.post("/sign-in", form).status_code == 302
    client.get("/")
    assert client.post("/sign-out", {}, csrf=False).status_code == 400
    assert client.get("/").status_code == 200  # still signed in


def test_off_loopback_the_session_cookie_is_sent_secure(tmp_path):
    settings = AppSettings(database_url=f"sqlite:///{tmp_path / 'secure.db'}", secure_cookies=True,
                           endpoint_url=f"http://127.0.0.1:{free_port()}")  # fmt: skip
    with running_app(settings) as (url, _):
        page = Client(url).get("/sign-in")  # the session (holding the CSRF token) starts here
        cookie = page.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert page.headers["Strict-Transport-Security"].startswith("max-age=")


def test_repeated_failures_lock_the_account_and_are_audited(app_url):
    url, app, _ = app_url
    client = Client(url)
    for _ in range(MAX_FAILURES):
        assert client.sign_in("rita", "wrong-password-0000").status_code == 401
    locked = client.sign_in("rita", PASSWORDS["rita"])
    assert locked.status_code == 401 and "locked" in locked.text
    actions = [e["action"] for e in app.extensions["cxr_store"].audit_log()]
    assert actions.count("sign_in_failed") == MAX_FAILURES - 1 and "account_locked" in actions
    assert "sign_in_refused_locked" in actions
    unknown = client.sign_in("nobody", "whatever-password")
    assert unknown.status_code == 401  # the same words (the CSRF token aside, it is timed): no hint which
    assert without_csrf_token(unknown.text) == without_csrf_token(locked.text)


def without_csrf_token(page: str) -> str:
    return re.sub(r'name="csrf_token"[^>]*>', "", page)


def test_passwords_are_never_stored_or_logged_in_clear(app_url, caplog):
    url, app, database = app_url
    caplog.set_level(logging.DEBUG)
    admin = Client(url)
    admin.sign_in("ada", PASSWORDS["ada"])
    admin.get("/admin/users")
    new_password = "brand-new-password-42"
    admin.post("/admin/users", {"username": "nora", "password": new_password, "role": "reviewer"})
    Client(url).sign_in("nora", "nora-wrong-password")
    assert Client(url).sign_in("nora", new_password).status_code == 302
    stored = app.extensions["cxr_store"].user("nora")["password_hash"]
    assert stored.startswith("$argon2id$")
    secrets = [*PASSWORDS.values(), new_password, "nora-wrong-password"]
    raw = database.read_bytes() + b"".join(p.read_bytes() for p in database.parent.glob("app.db-*"))
    audit = str(app.extensions["cxr_store"].audit_log())
    for secret in secrets:
        assert secret.encode() not in raw and secret not in audit and secret not in caplog.text


def test_a_password_reset_signs_out_every_session(app_url):
    url, app, _ = app_url
    reviewer = Client(url)
    reviewer.sign_in("rita", PASSWORDS["rita"])
    assert reviewer.get("/review").status_code == 200
    add_user(app.extensions["cxr_store"], "rita", "a-new-password-for-rita", "reviewer")
    assert reviewer.get("/review").status_code == 302  # back to the sign-in page


def test_sign_in_redirects_only_within_the_site(app_url):
    url, _, _ = app_url
    client = Client(url)
    client.get("/sign-in")
    targets = [
        ("https://evil.example/x", "/"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("/watch", "/watch"),
    ]
    for target, expected in targets:
        client.http.cookies.clear()
        client.get("/sign-in")
        response = client.post(f"/sign-in?next={target}", {"username": "vic", "password": PASSWORDS["vic"]})
        assert response.headers["Location"] == expected, target


def test_hostile_uploads_get_a_clear_4xx(app_url):
    url, app, _ = app_url
    viewer = Client(url)
    viewer.sign_in("vic", PASSWORDS["vic"])
    viewer.get("/")
    data = {"csrf_token": viewer.token}
    not_an_image = viewer.http.post(url + "/read", data=data, files={"image": ("x.png", b"<html>hi</html>")},
                                    timeout=30)  # fmt: skip
    assert not_an_image.status_code == 400
    assert "PNG, JPEG or DICOM" in not_an_image.text
    limit = app.config["MAX_CONTENT_LENGTH"]
    too_big = viewer.http.post(url + "/read", data=data, files={"image": ("big.png", b"\0" * (limit + 1))},
                               timeout=60)  # fmt: skip
    assert too_big.status_code == 413
    files = {"image": ("b.png", decompression_bomb())}
    bomb = viewer.http.post(url + "/read", data=data, files=files, timeout=60)
    assert bomb.status_code == 413 and "max_image_pixels" in bomb.text
    assert app.extensions["cxr_store"].case_counts()["cases"] == 0


def test_pages_load_nothing_from_elsewhere_and_endpoint_failures_are_explained(app_url, nih_root):
    url, _, _ = app_url
    viewer = Client(url)
    viewer.sign_in("vic", PASSWORDS["vic"])
    page = viewer.get("/")
    policy = page.headers["Content-Security-Policy"]
    assert (
        "default-src 'self'" in policy
        and "script-src 'self'" in policy
        and "frame-ancestors 'none'" in policy
    )
    assert "http" not in re.sub(r"https?://127\.0\.0\.1:\d+", "", page.text.split("<main")[0])  # no CDN
    film = sorted((nih_root / "images_001" / "images").glob("*.png"))[0].read_bytes()
    form = {"csrf_token": viewer.token}
    down = viewer.http.post(url + "/read", data=form, files={"image": ("f.png", film)}, timeout=60)
    assert down.status_code == 502 and "cannot be reached" in down.text


def test_the_worklist_puts_the_most_uncertain_first(app_url):
    _, app, _ = app_url
    store = app.extensions["cxr_store"]
    answer = {"decisions": dict.fromkeys(FINDINGS, False)}
    for name, priority in [("calm", 10), ("unsure", 900), ("middling", 300)]:
        store.add_case({"inference_id": name, "created_by": "vic", "answer": answer, "priority": priority,
                        "image_png": b""})  # fmt: skip
    assert [c["inference_id"] for c in store.worklist(uncertain_first=False)] == [
        "calm",
        "unsure",
        "middling",
    ]
    assert [c["inference_id"] for c in store.worklist(uncertain_first=True)] == ["unsure", "middling", "calm"]
    store.reviews.save("unsure", dict.fromkeys(FINDINGS, 0), "rita")
    assert [c["inference_id"] for c in store.worklist(uncertain_first=True)] == ["middling", "calm"]


def test_passwords_shorter_than_12_characters_are_refused(app_url):
    _, app, _ = app_url
    with pytest.raises(ValueError, match="at least 12"):
        add_user(app.extensions["cxr_store"], "sam", "eleven-char", "viewer")
    assert app.extensions["cxr_store"].user("sam") is None
