"""The application's pages: sign in, read a film, review cases, watch the models, administer."""

from __future__ import annotations

import base64
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from cxr.data.findings import FINDINGS
from cxr.registry import RegistryError
from cxr.serve.errors import RequestError
from cxr_app import watch
from cxr_app.accounts import (
    SignInError,
    add_user,
    current_user,
    end_sessions,
    has_role,
    requires,
    sign_in,
    start_session,
)
from cxr_app.cases import PNG, findings_table, read_film
from cxr_app.endpoint import Endpoint, EndpointError
from cxr_app.store import ROLES, Store

views = Blueprint("views", __name__)
HEATMAPS_KEPT = 64
MONITOR_RUNS_KEPT_S = 60.0


def store() -> Store:
    return current_app.extensions["cxr_store"]


def endpoint() -> Endpoint:
    return current_app.extensions["cxr_endpoint"]


def username() -> str:
    user = current_user()
    return str(user["username"]) if user else ""


@views.app_context_processor
def inject() -> dict[str, Any]:
    return {"user": current_user(), "has_role": has_role, "findings": FINDINGS}


# -- sign-in --------------------------------------------------------------------------------------------


@views.route("/sign-in", methods=["GET", "POST"], endpoint="sign_in")
def sign_in_page() -> Any:
    """The sign-in form; on success, a new session and back to where the user was going."""
    if request.method == "POST":
        try:
            user = sign_in(store(), request.form.get("username", ""), request.form.get("password", ""))
        except SignInError as error:
            flash(str(error), "error")
            return render_template("sign_in.html"), 401
        start_session(user)
        return redirect(_local(request.args.get("next")) or url_for("views.read"))
    return render_template("sign_in.html")


def _local(target: str | None) -> str | None:
    """Only a path on this site (no open redirect)."""
    if not target:
        return None
    parts = urlsplit(target)
    return (
        target
        if not parts.scheme and not parts.netloc and target.startswith("/") and "\\" not in target
        else None
    )


@views.route("/sign-out", methods=["POST"])
def sign_out() -> Any:
    """End every session of this account (a copied cookie stops working too)."""
    if current_user() is not None:
        end_sessions(store(), username())
        store().log(username(), "signed_out")
    session.clear()
    return redirect(url_for("views.sign_in"))


# -- read -----------------------------------------------------------------------------------------------


@views.route("/", methods=["GET"])
@requires("viewer")
def read() -> Any:
    """Upload a film (drag and drop or the file picker)."""
    return render_template("read.html", endpoint_url=endpoint().url)


@views.route("/read", methods=["POST"])
@requires("viewer")
def read_upload() -> Any:
    upload = request.files.get("image")
    body = upload.read() if upload else b""
    if not body:
        flash("choose an image file first", "error")
        return render_template("read.html", endpoint_url=endpoint().url), 400
    try:
        inference_id = read_film(store(), endpoint(), body, username())
    except RequestError as error:
        flash(str(error), "error")
        return render_template("read.html", endpoint_url=endpoint().url), error.status_code
    except EndpointError as error:
        flash(f"the endpoint answered {error.status}: {error.message}", "error")
        return render_template("read.html", endpoint_url=endpoint().url), _relayed(error.status)
    return redirect(url_for("views.case", inference_id=inference_id))


def _relayed(status: int) -> int:
    """The endpoint's refusal of the request (4xx) as ours; its failures as a bad gateway."""
    return status if 400 <= status < 500 and status not in (401, 403) else 502


@views.route("/cases/<inference_id>")
@requires("viewer")
def case(inference_id: str) -> Any:
    """One case: the film, the findings against their operating points, the gate's verdict, the review."""
    found = _case(inference_id)
    answer = found["answer"]
    return render_template(
        "case.html", case=found, answer=answer, rows=findings_table(answer),
        review=store().reviews.get(inference_id), heatmap=request.args.get("heatmap"),
        order=request.args.get("order", ""),
    )  # fmt: skip


@views.route("/cases/<inference_id>/image.png")
@requires("viewer")
def case_image(inference_id: str) -> Response:
    return Response(_case(inference_id)["image_png"], mimetype=PNG, headers={"Cache-Control": "private"})


@views.route("/cases/<inference_id>/heatmap/<finding>.png")
@requires("viewer")
def heatmap(inference_id: str, finding: str) -> Response:
    """The Grad-CAM overlay of one finding, from the variant that answered (same inference id)."""
    if finding not in FINDINGS:
        abort(404)
    kept: OrderedDict[tuple[str, str], bytes] = current_app.extensions["cxr_heatmaps"]
    key = (inference_id, finding)
    if key not in kept:
        found = _case(inference_id)
        try:
            answer = endpoint().invoke(found["image_png"], PNG, explain=[finding], inference_id=inference_id,
                                       variant=found["variant"])  # fmt: skip
        except EndpointError as error:
            abort(502, f"the endpoint answered {error.status}: {error.message}")
        encoded = (answer["predictions"][0].get("heatmaps") or {}).get(finding)
        if not encoded:
            abort(502, "the endpoint returned no heatmap")
        kept[key] = base64.b64decode(encoded)
        while len(kept) > HEATMAPS_KEPT:
            kept.popitem(last=False)
    return Response(kept[key], mimetype=PNG, headers={"Cache-Control": "private"})


def _case(inference_id: str) -> dict[str, Any]:
    found = store().case(inference_id)
    if found is None:
        abort(404)
    return found


# -- review ---------------------------------------------------------------------------------------------


@views.route("/review")
@requires("reviewer")
def worklist() -> Any:
    """Cases awaiting review, oldest first or the most uncertain first."""
    uncertain = request.args.get("order") == "uncertain"
    return render_template("worklist.html", cases=store().worklist(uncertain), uncertain=uncertain,
                           counts=store().case_counts())  # fmt: skip


@views.route("/cases/<inference_id>/review", methods=["POST"])
@requires("reviewer")
def review(inference_id: str) -> Any:
    """Confirm or correct each finding; stored as the case's ground truth and audited."""
    found = _case(inference_id)
    labels = {}
    for finding in FINDINGS:
        value = request.form.get(f"label-{finding}")
        if value not in ("0", "1"):
            abort(400, f"answer {finding}: present (1) or absent (0)")
        labels[finding] = int(value)
    store().reviews.save(inference_id, labels, username())
    decided = found["answer"]["decisions"]
    corrected = sorted(f for f in FINDINGS if bool(labels[f]) != bool(decided[f]))
    store().log(username(), "review", inference_id=inference_id, corrected=corrected)
    flash(f"review saved ({len(corrected)} finding(s) corrected)", "info")
    uncertain = request.form.get("order") == "uncertain"
    waiting = store().worklist(uncertain_first=uncertain, limit=1)
    if not waiting:
        return redirect(url_for("views.worklist"))
    order = "uncertain" if uncertain else None
    return redirect(url_for("views.case", inference_id=waiting[0]["inference_id"], order=order))


# -- watch ----------------------------------------------------------------------------------------------


@views.route("/watch")
@requires("viewer")
def watch_page() -> Any:
    """Traffic and latency per variant, MonitorFlow's verdicts, A/B from reviews, the registry."""
    problems = []
    try:
        traffic = watch.traffic(endpoint().metrics())
    except EndpointError as error:
        traffic, problems = [], [f"endpoint metrics: {error.message}"]
    try:
        weights = endpoint().weights()
    except EndpointError as error:
        weights = {}
        problems.append(f"endpoint weights: {error.message}")
    runs, problem = _monitor_runs()
    problems += [problem] if problem else []
    try:
        versions = watch.registry_versions(current_app.extensions["cxr_settings"].open_registry())
    except (RegistryError, OSError) as error:
        versions = []
        problems.append(f"registry: {error}")
    return render_template(
        "watch.html", traffic=traffic, weights=weights, runs=runs, versions=versions, problems=problems,
        ab=watch.reviewed_accuracy(store().reviewed_cases()), counts=store().case_counts(),
    )  # fmt: skip


@views.route("/watch/drift.svg")
@requires("viewer")
def drift_plot() -> Response:
    return Response(watch.drift_plot(_monitor_runs()[0]), mimetype="image/svg+xml")


def _monitor_runs() -> tuple[list[dict[str, Any]], str | None]:
    """The latest MonitorFlow runs (kept a minute, for the page and its plot), or why there are none."""
    kept = current_app.extensions["cxr_monitor_runs"]
    if time.monotonic() - kept.get("at", -1e9) > MONITOR_RUNS_KEPT_S:
        try:
            kept.update(runs=watch.monitor_runs(), problem=None)
        except Exception as error:  # the Metaflow client: a service down, a datastore unreadable, ...
            kept.update(runs=[], problem=f"MonitorFlow runs: {type(error).__name__}: {error}"[:300])
        kept["at"] = time.monotonic()
    return kept["runs"], kept["problem"]


@views.route("/models/<int:version>/card")
@requires("viewer")
def model_card(version: int) -> Any:
    try:
        found = current_app.extensions["cxr_settings"].open_registry().get(version)
    except RegistryError:
        abort(404)
    card = found.card.read_text() if found.card.is_file() else "(this version has no model card)"
    return render_template("card.html", version=found, card=card)


@views.route("/models/<int:version>/<action>", methods=["POST"])
@requires("admin")
def model_action(version: int, action: str) -> Any:
    """approve (to production) or rollback (an earlier version back to production) or archive."""
    registry = current_app.extensions["cxr_settings"].open_registry()
    allowed = {
        "approve": ("candidate", "approved"),
        "archive": ("candidate", "approved"),
        "rollback": ("archived",),
    }
    if action not in allowed:
        abort(404)
    try:
        status = registry.get(version).status
        if status not in allowed[action]:
            raise RegistryError(f"cannot {action} version {version}: it is {status}")
        if action == "approve":
            registry.approve(version)
        elif action == "rollback":
            registry.set_status(version, "production", f"Rolled back to by {username()}.")
        else:
            registry.set_status(version, "archived")
    except RegistryError as error:
        flash(str(error), "error")
        return redirect(url_for("views.watch_page"))
    store().log(username(), f"model_{action}", version=version)
    flash(f"version {version}: {action} done", "info")
    return redirect(url_for("views.watch_page"))


@views.route("/watch/weights", methods=["POST"])
@requires("admin")
def set_weights() -> Any:
    """Change the endpoint's A/B weights (promote a variant with all the weight, or roll back)."""
    try:
        weights = {
            k.removeprefix("weight-"): float(v) for k, v in request.form.items() if k.startswith("weight-")
        }
        endpoint().set_weights(weights)
    except ValueError:
        flash("weights are numbers", "error")
    except EndpointError as error:
        flash(f"the endpoint answered {error.status}: {error.message}", "error")
    else:
        store().log(username(), "weights", weights=weights)
        flash("weights changed", "info")
    return redirect(url_for("views.watch_page"))


# -- administration -------------------------------------------------------------------------------------


@views.route("/admin/audit")
@requires("admin")
def audit_page() -> Any:
    return render_template("audit.html", entries=store().audit_log())


@views.route("/admin/users", methods=["GET", "POST"])
@requires("admin")
def users_page() -> Any:
    """List accounts; create one or reset its password and role."""
    status = 200
    if request.method == "POST":
        name, role = request.form.get("username", ""), request.form.get("role", "")
        try:
            add_user(store(), name, request.form.get("password", ""), role)
        except ValueError as error:
            flash(str(error), "error")
            status = 400
        else:
            store().log(username(), "user_saved", account=name, role=role)
            flash(f"account {name} saved", "info")
    return render_template("users.html", users=store().users(), roles=ROLES), status


@views.route("/healthz")
def healthz() -> Any:
    return {"status": "ok"}
