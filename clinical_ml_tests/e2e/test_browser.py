"""Seen in a real browser: the Dagster UI's page of the fairness report and the HTML reports themselves.

Starts the real webserver on the instance the session's graph run wrote to, and drives Debian's headless
Chromium with Playwright (the Playwright browser download does not work here). Screenshots are saved under
``test-artifacts/browser/``.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from clinical_ml_tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USE_CASE = "icu_mortality_24h"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_signals() -> None:
    # a server started from a non-interactive shell inherits ignored SIGINT/SIGTERM: restore the defaults
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="module")
def webserver(graph_run, tmp_path_factory):
    """The Dagster webserver on a free local port, reading the instance of the session's graph run."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("webserver") / "webserver.log").open("wb")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(graph_run.instance.root_directory),
        "CLINICAL_ML_DATA_ROOT": str(graph_run.data_root),
    }
    proc = subprocess.Popen(
        [
            str(PROJECT_ROOT / ".venv" / "bin" / "dagster-webserver"),
            *("-h", "127.0.0.1", "-p", str(port), "-w", str(PROJECT_ROOT / "workspace.yaml")),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_reset_signals,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "the webserver exited during start-up"
            assert time.monotonic() < deadline, "the webserver did not answer within 60 s"
            time.sleep(0.5)
        yield url
    finally:
        # stop only the process group started here
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


def _dismiss_community_modal(page, *, wait_ms: int = 5000) -> None:
    """Click "Skip" on the "Join the Dagster community" modal (shown on a first visit only)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(state="visible", timeout=wait_ms)
    except PlaywrightTimeout:
        return
    skip.click()


def test_fairness_report_asset_page_shows_its_latest_materialization(webserver, browser_context):
    page = browser_context.new_page()
    # use-case asset keys are <use case>/<use case>__<stage> (the UI labels nodes by the last part)
    page.goto(
        f"{webserver}/assets/{USE_CASE}/{USE_CASE}__subcohort_fairness_report", wait_until="domcontentloaded"
    )
    _dismiss_community_modal(page)
    # the page title is the key's last part, middle-truncated when long: wait for the metadata instead
    # metadata of the latest materialization: the verdict and the report's path
    page.get_by_text("verdict", exact=True).first.wait_for(state="visible", timeout=30000)
    page.get_by_text("subcohort_fairness_report.html").first.wait_for(state="visible", timeout=30000)
    page.screenshot(path=str(ARTIFACTS / "fairness_asset_page.png"), full_page=True)
    assert page.get_by_text("groups_suppressed").first.is_visible()
    # the report card's Markdown summary carries its plots as embedded PNGs
    page.goto(f"{webserver}/assets/{USE_CASE}/{USE_CASE}__model_report_card", wait_until="domcontentloaded")
    _dismiss_community_modal(page, wait_ms=1000)
    page.get_by_text("[Show Markdown]").first.click(timeout=30000)
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Report card:").first.wait_for(state="visible", timeout=15000)
    dialog.locator("img").first.wait_for(state="visible", timeout=15000)
    assert dialog.locator("img").count() >= 2
    page.screenshot(path=str(ARTIFACTS / "report_card_markdown.png"))
    page.close()


def test_report_card_opens_in_the_browser_with_its_sections_and_plots(graph_run, browser_context):
    reports = graph_run.data_root / "reports" / USE_CASE
    cards = sorted(reports.glob("report_card_v*.html"))
    assert cards, "the graph run wrote no report card"
    page = browser_context.new_page()
    page.goto(cards[-1].as_uri())
    for selector in ("#five-minutes", "#fairness-verdict", "#promotion", "#subgroups", "#thresholds"):
        assert page.locator(selector).first.is_visible(), selector
    assert page.get_by_role("heading", name="9. Subgroups").is_visible()
    broken = page.evaluate(
        "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"
    )
    assert broken == 0
    assert page.evaluate("document.images.length") >= 7
    page.screenshot(path=str(ARTIFACTS / "report_card.png"), full_page=True)
    page.goto((reports / "subcohort_fairness_report.html").as_uri())
    assert page.locator("#fairness-verdict").is_visible()
    assert page.locator("table.subgroups").count() >= 6  # three attributes and three intersections
    page.screenshot(path=str(ARTIFACTS / "subcohort_fairness_report.png"), full_page=True)
    page.close()


def test_hostile_values_stay_text_in_the_browser(browser_context, tmp_path):
    from clinical_ml_tests.core.test_reports import SCRIPT, _render

    path = tmp_path / "hostile_card.html"
    path.write_text(_render(hostile=True)["card_html"], encoding="utf-8")
    page = browser_context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_timeout(300)
    assert dialogs == []
    assert page.get_by_text(SCRIPT).first.is_visible()
    page.screenshot(path=str(ARTIFACTS / "hostile_report_card.png"))
    page.close()


def test_artifacts_folder_is_not_tracked():
    gitignore = (PROJECT_ROOT / ".gitignore").read_text()
    assert "test-artifacts/" in gitignore
    assert (
        shutil.which("git") is None
        or "test-artifacts"
        not in subprocess.run(
            ["git", "ls-files", "test-artifacts"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout
    )
