"""Seen in a real browser: the Dagster UI's pages (the fairness report, the promotion decision) and the HTML
reports themselves, on a 1280 px screen and printed to A4.

Starts the real webserver on the instance the session's graph run wrote to, and drives Debian's headless
Chromium with Playwright (the Playwright browser download does not work here). Screenshots are saved under
``test-artifacts/browser/``.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from clinical_ml_tests.conftest import GRAPH_USE_CASES, PROJECT_ROOT

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
# A4 is 210 mm wide; the reports' @page margins are 10 mm: 190 mm = 718 CSS px at 96 px per inch
A4_PRINTABLE_PX = 718
SCREEN_PX = 1280
REPORTS = (
    "report_card_v*.html",
    "performance_report.html",
    "subcohort_fairness_report.html",
    "feature_drift_report.html",
    "monitoring_report.html",
    "model_facts_v*.html",
)
ONE_PAGE = ("model_facts",)  # the Model Facts label is one printed page


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
        "CLINICAL_ML_DATA": "all",  # the graph run's use cases are written for two data sources
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
def browser_context(tmp_path_factory, monitored):
    # ``monitored`` runs Dagster in process first: its event loops must not start beside Playwright's
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


@pytest.fixture(scope="module")
def monitored(graph_run, tmp_path_factory) -> Path:
    """A copy of the session's data root in which every batch was scored and checked, so that every report
    exists, the monitoring report too. A challenger the gate refused on this small cohort is made champion
    in the copy only: printing is what is tested here, not the gate (the session's run is left as it was)."""
    from clinical_ml.core.registry import Registry
    from clinical_ml.core.storage import read_json
    from clinical_ml.defs.build import build_definitions
    from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
    from clinical_ml.defs.usecase.paths import use_case_key
    from clinical_ml.resources.settings import AnonymizationSettings

    root = tmp_path_factory.mktemp("monitored") / "data_root"
    shutil.copytree(graph_run.data_root, root)
    for uc in GRAPH_USE_CASES:
        registry = Registry(root / "registry", uc)
        if registry.champion() is None:
            registry.set_champion(read_json(root / "deid" / "usecases" / uc / "decision.json")["challenger"])
    defs = build_definitions(
        data_root=root,
        usecases_dir=root / "usecases",
        anonymization=AnonymizationSettings(pseudonym_seed=1),
    )
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, list(graph_run.hospital.batch_ids))
        for batch in graph_run.hospital.batch_ids:
            per_batch = [
                use_case_key(uc, a) for uc in GRAPH_USE_CASES for a in ("batch_predictions", "batch_drift")
            ]
            job.execute_in_process(
                instance=instance, asset_selection=per_batch, partition_key=batch, raise_on_error=False
            )
        reports = [
            use_case_key(uc, a)
            for uc in GRAPH_USE_CASES
            for a in ("monitoring_report", "feature_drift_report")
        ]
        res = job.execute_in_process(instance=instance, asset_selection=reports, raise_on_error=False)
        assert res.success
    return root


def _report_files(data_root: Path, use_case: str) -> list[Path]:
    folder = data_root / "reports" / use_case
    found = [sorted(folder.glob(pattern))[-1:] for pattern in REPORTS]
    return [f for files in found for f in files]


_TABLE_RIGHT_EDGES = (
    "Array.from(document.querySelectorAll('table')).map(t => t.getBoundingClientRect().right)"
)


def test_each_report_fits_a_screen_and_prints_on_a4_without_clipped_tables(monitored, browser_context):
    page = browser_context.new_page()
    seen = []
    for use_case in GRAPH_USE_CASES:
        files = _report_files(monitored, use_case)
        assert len(files) == len(REPORTS), [f.name for f in files]
        for path in files:
            stem = re.sub(r"_v\d{8}T\d+Z$", "", path.stem)  # a model version in the name
            name = f"{use_case}__{stem}"
            page.emulate_media(media="screen")
            page.set_viewport_size({"width": SCREEN_PX, "height": 900})
            page.goto(path.as_uri())
            assert page.evaluate("document.documentElement.scrollWidth") <= SCREEN_PX, name
            page.screenshot(path=str(ARTIFACTS / f"{name}_1280.png"), full_page=True)
            # printed: laid out at the printable width of A4, every table within it
            page.emulate_media(media="print")
            page.set_viewport_size({"width": A4_PRINTABLE_PX, "height": 1123})
            page.goto(path.as_uri())
            edges = page.evaluate(_TABLE_RIGHT_EDGES)
            assert edges, f"{name}: no table"
            too_wide = [round(e) for e in edges if e > A4_PRINTABLE_PX + 0.5]
            assert not too_wide, f"{name}: tables end at {too_wide} px, beyond {A4_PRINTABLE_PX} px"
            assert page.evaluate("document.documentElement.scrollWidth") <= A4_PRINTABLE_PX, name
            page.screenshot(path=str(ARTIFACTS / f"{name}_a4.png"), full_page=True)
            pdf = page.pdf(format="A4", prefer_css_page_size=True, print_background=True)
            pages = len(re.findall(rb"/Type\s*/Page[^s]", pdf))
            assert pdf.startswith(b"%PDF") and (pages == 1 if stem in ONE_PAGE else pages >= 2), (name, pages)
            (ARTIFACTS / f"{name}_a4.pdf").write_bytes(pdf)
            seen.append(name)
    page.close()
    assert len(seen) == len(GRAPH_USE_CASES) * len(REPORTS)


def test_the_lineage_shows_one_box_per_use_case_beside_the_shared_stages(webserver, browser_context):
    """The global lineage tells the story: the shared ingestion and anonymization, then one group per clinical
    question (not one box per stage holding every question's look-alike nodes)."""
    page = browser_context.new_page()
    page.set_viewport_size({"width": SCREEN_PX, "height": 900})
    page.goto(f"{webserver}/asset-groups", wait_until="domcontentloaded")
    _dismiss_community_modal(page, wait_ms=3000)
    for group in ("ingestion", "anonymization", *GRAPH_USE_CASES):
        page.locator(f"div[data-tooltip='{group}']").first.wait_for(state="visible", timeout=30000)
    # no box per stage of the use cases' branches
    assert page.locator("div[data-tooltip='training']").count() == 0
    page.screenshot(path=str(ARTIFACTS / "lineage.png"))
    page.close()


def test_the_promotion_decision_page_says_what_was_decided_and_why(graph_run, webserver, browser_context):
    from clinical_ml.core.reports import decision_in_words
    from clinical_ml.core.storage import read_json

    page = browser_context.new_page()
    page.set_viewport_size({"width": SCREEN_PX, "height": 1000})
    for use_case in GRAPH_USE_CASES:
        decision = read_json(graph_run.data_root / "deid" / "usecases" / use_case / "decision.json")
        words = decision_in_words(decision)
        page.goto(
            f"{webserver}/assets/{use_case}/{use_case}__promotion_decision", wait_until="domcontentloaded"
        )
        _dismiss_community_modal(page, wait_ms=3000)
        page.get_by_text("decision_in_words", exact=True).first.wait_for(state="visible", timeout=30000)
        # the sentence itself, as the UI shows it (a refusal reads "Refused: ... because ... stays ...")
        page.get_by_text(words[:60]).first.wait_for(state="visible", timeout=15000)
        verdict = "refused" if not decision["promoted"] else "promoted"
        page.screenshot(path=str(ARTIFACTS / f"{use_case}__promotion_decision_{verdict}.png"), full_page=True)
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
