"""The cxr web application: read a film, review served cases, watch the models, behind sign-in.

Built on the `cxr` library and any endpoint it can reach (a local `cxr serve`, or SageMaker through the
gateway). `create_app` builds the Flask application; `cxr app` runs it (`cxr_app.cli`).
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict

from flask import Flask, Response, current_app, render_template
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from cxr_app.endpoint import Endpoint
from cxr_app.settings import AppSettings
from cxr_app.store import Store

# Every asset is served by the app itself: no CDN, no inline script.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def create_app(settings: AppSettings | None = None) -> Flask:
    """The application for `settings` (embedded defaults when None)."""
    settings = settings or AppSettings()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.cookies_secure,
        SESSION_COOKIE_NAME="cxr_session",
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=settings.session_hours),
        MAX_CONTENT_LENGTH=int(settings.max_upload_mb * 2**20),
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
    )
    CSRFProtect(app)
    app.extensions["cxr_settings"] = settings
    app.extensions["cxr_store"] = Store(settings.database_url)
    app.extensions["cxr_endpoint"] = Endpoint(settings.endpoint_url, settings.admin_token)
    app.extensions["cxr_heatmaps"] = OrderedDict()
    app.extensions["cxr_monitor_runs"] = {}

    from cxr_app.views import views

    app.register_blueprint(views)
    app.after_request(_security_headers)
    app.register_error_handler(CSRFError, _csrf_error)
    app.register_error_handler(HTTPException, _http_error)
    return app


def _security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"  # films and findings stay off shared workstations' disks
    if current_app.config["SESSION_COOKIE_SECURE"]:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    return response


def _csrf_error(error: CSRFError) -> tuple[str, int]:
    return render_template("error.html", status=400, message=f"refused: {error.description}"), 400


def _http_error(error: HTTPException) -> tuple[str, int]:
    status = error.code or 500
    return render_template("error.html", status=status, message=error.description), status
