"""The web application as a person uses it: a real headless Chromium against `cxr app` and a real
`cxr serve`: sign in, read a real NIH film, see its findings and a heatmap, review it, watch the endpoint,
and find the review used by a MonitorFlow run."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from metaflow import Runner

from cxr.data.findings import FINDINGS
from cxr.monitor.baseline import compute_baseline
from cxr.registry import Registry

from .app_support import Client, LiveApp, add_user
from .browser import keep_screenshot, tab_to
from .conftest import REPO, free_port
from .serving_support import CROP, LiveServer, dicom_bytes, make_package
from .test_train_flow import card_contents

pytestmark = pytest.mark.browser
PASSWORD = "rita-password-5678"


@contextmanager
def running_stack(tmp_path, nih_root, *serve_args: str):
    """A registered model with its baseline, served with capture, and `cxr app` in front of it."""
    package, model, cache = make_package(tmp_path / "pkg", nih_root)
    version = Registry().register({"model.tar.gz": package}, {"mean_auroc": 0.5}, {}, status="production")
    rows = np.arange(40)
    compute_baseline(model, cache, rows, CROP, {}, dict.fromkeys(FINDINGS, 0.5)).save(version.directory)
    live = LiveServer(
        free_port(), "--model", str(package), "--capture", str(tmp_path / "capture"), *serve_args
    )
    env = {"CXR_ADMIN_TOKEN": live.admin_token, "METAFLOW_DEFAULT_DATASTORE": "local",
           "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "metaflow")}  # fmt: skip
    add_user("rita", PASSWORD, "reviewer", env)
    app = LiveApp("--endpoint", live.url, env=env)
    try:
        yield app, live, env
    finally:
        app.stop()
        live.stop()


@pytest.fixture
def stack(tmp_path, nih_root):
    with running_stack(tmp_path, nih_root) as running:
        yield running


def sign_in(page, app):
    """Sign in with the keyboard only."""
    page.goto(app.url + "/")
    assert "/sign-in" in page.url
    tab_to(page, page.locator("#username"))
    page.keyboard.type("rita")
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(app.url + "/")


def drop(page, body: bytes) -> None:
    """Drag a PNG file onto the drop zone, as a file dragged from the desktop arrives."""
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "film.png", {type: "image/png"}));
            const options = {dataTransfer: transfer, bubbles: true, cancelable: true};
            document.getElementById("dropzone").dispatchEvent(new DragEvent("drop", options));
        }""",
        base64.b64encode(body).decode(),
    )


def test_read_review_and_the_review_reaches_monitor_flow(page, stack, nih_root, tmp_path):
    app, _, env = stack
    sign_in(page, app)
    keep_screenshot(page, "read")
    tab_to(page, page.locator("#image"))  # the file picker is reachable by keyboard
    film = sorted((nih_root / "images_001" / "images").glob("*.png"))[0]
    page.set_input_files("#image", str(film))
    page.get_by_role("button", name="Read").click()
    page.wait_for_url("**/cases/*")
    inference_id = page.url.rsplit("/", 1)[1]

    rows = page.locator("table.findings tbody tr")
    assert rows.count() == len(FINDINGS)
    assert page.locator("#model-version").inner_text() == "1" and page.locator("#variant").inner_text() == "A"
    assert page.locator("#input-check").inner_text() in ("in_distribution", "unchecked")
    assert page.locator("img#film").evaluate("img => img.naturalWidth") == 1024  # the real film, full size
    probability = float(rows.first.locator("td").first.inner_text())
    assert 0 <= probability <= 1

    page.locator("tr[data-finding='Effusion']").get_by_role("link", name="Show").click()
    heatmap = page.locator("img#heatmap")
    heatmap.wait_for()
    page.wait_for_function("() => document.querySelector('img#heatmap').complete")
    assert heatmap.evaluate("img => img.naturalWidth") == CROP  # Grad-CAM over the model's input
    keep_screenshot(page, "case")

    assert page.locator("table.findings input:checked").count() == 0  # nothing pre-selected for the reviewer
    page.get_by_role("button", name="Save review").click()
    assert "/cases/" in page.url and page.locator(".flash").count() == 0  # the browser asks for every answer
    for index in range(rows.count()):  # agree with the model on every finding but Effusion
        row = rows.nth(index)
        says_positive = row.locator("td").nth(2).inner_text() == "positive"
        disagree = row.get_attribute("data-finding") == "Effusion"
        row.get_by_label("present" if says_positive != disagree else "absent").check()
    page.get_by_role("button", name="Save review").click()
    assert "1 finding(s) corrected" in page.locator(".flash").inner_text()

    page.goto(app.url + "/")
    drop(page, film.read_bytes())  # a second film, dragged onto the page
    page.wait_for_url("**/cases/*")
    assert page.url.rsplit("/", 1)[1] != inference_id
    page.goto(app.url + "/review")
    assert "1 of 2 cases reviewed" in page.locator("main").inner_text()

    end = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)).isoformat()
    flow = Runner(str(REPO / "flows" / "monitor_flow.py"), show_output=False, env={**os.environ, **env},
                  cwd=str(tmp_path))  # fmt: skip
    with flow.run(capture_uri=str(tmp_path / "capture"), window_end=end, window_hours=2.0) as running:
        assert running.status == "successful", running.stderr
        run = running.run
    join = run["join"].task
    assert join["labelled_cases"].data == 1  # the review, read from the app's database with no file
    results = join["results"].data
    matched = results[(results["check"] == "performance") & (results["feature"] == "labelled_images")]
    assert matched["statistic"].tolist() == [1]  # matched by inference id, once despite the heatmap request
    assert join["traffic_summary"].data[0]["images"] == 2  # three requests: two films, one heatmap
    assert len(card_contents(join)) == 1  # the monitor's card, where the client and the Metaflow UI look

    page.goto(app.url + "/watch")
    assert page.locator("#traffic tbody tr").first.locator("th").inner_text() == "A"
    assert run.pathspec in page.locator("#monitor-runs").inner_text()
    assert page.locator("img.plot").evaluate("img => img.naturalWidth") > 0
    assert "1" in page.locator("#ab tbody tr").first.inner_text()
    keep_screenshot(page, "watch")


def test_admin_actions_reach_the_endpoint_and_registry_and_dicom_tags_are_not_kept(tmp_path, nih_root):
    film = sorted((nih_root / "images_001" / "images").glob("*.png"))[1]
    pixels = cv2.imread(str(film), cv2.IMREAD_GRAYSCALE)
    with running_stack(tmp_path, nih_root, "--challenger", str(tmp_path / "pkg" / "model.tar.gz"),
                       "--weights", "A=100,B=0") as (app, live, env):  # fmt: skip
        add_user("ada", "ada-password-1234", "admin", env)
        admin = Client(app.url)
        assert admin.sign_in("ada", "ada-password-1234").status_code == 302
        admin.get("/")
        upload = {"image": ("Doe_Jane_PID-SECRET-4242.dcm", dicom_bytes(pixels))}
        read = admin.http.post(app.url + "/read", data={"csrf_token": admin.token}, files=upload, timeout=120)
        assert read.status_code == 200 and "/cases/" in read.url
        image = admin.get(read.url.removeprefix(app.url) + "/image.png")
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        database = Path(os.environ["CXR_HOME"]) / "app.db"
        stored = b"".join(p.read_bytes() for p in database.parent.glob("app.db*"))
        for identifier in (b"Doe^Jane", b"PID-SECRET-4242", b"Doe_Jane"):
            assert identifier not in stored  # neither the tags nor the file name

        admin.get("/watch")
        assert admin.post("/watch/weights", {"weight-A": "0", "weight-B": "1"}).status_code == 302
        assert json.loads(live.admin("GET", "/admin/weights")[1]) == {"A": 0.0, "B": 1.0}

        registry = Registry()
        candidate = registry.register(
            {"model.tar.gz": tmp_path / "pkg" / "model.tar.gz"}, {"mean_auroc": 0.6}, {}
        )
        admin.get("/watch")
        assert admin.post(f"/models/{candidate.version}/approve").status_code == 302
        assert registry.get(candidate.version).status == "production" and registry.get(1).status == "archived"
        admin.get("/watch")
        assert admin.post("/models/1/rollback").status_code == 302
        assert registry.get(1).status == "production" and registry.get(candidate.version).status == "archived"
        admin.get("/watch")
        admin.post("/models/1/archive")  # the production version is not archived from the page
        assert registry.get(1).status == "production"
        card = admin.get(f"/models/{candidate.version}/card")
        assert card.status_code == 200 and "Model version 2" in card.text
        audit = admin.get("/admin/audit").text
        for action in ("weights", "model_approve", "model_rollback", "signed_in"):
            assert f"<td>{action}</td>" in audit, action
