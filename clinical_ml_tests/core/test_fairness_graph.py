"""Ground truth on the session's graph run (default scenario): no group flagged beyond chance, small cells
never leave the analysis with their size, and one report card per model version."""

import json

import pytest

from clinical_ml.core.storage import read_json
from clinical_ml.defs.usecase.paths import use_case_key

pytestmark = pytest.mark.slow

USE_CASE = "icu_mortality_24h"


@pytest.fixture(scope="module")
def fairness(graph_run) -> dict:
    return read_json(graph_run.data_root / "deid" / "usecases" / USE_CASE / "fairness.json")


def test_default_scenario_flags_no_group_beyond_chance(fairness):
    beyond_chance = [f for r in fairness["rows"] for f in r["flags"] if "beyond chance" in f]
    assert beyond_chance == []
    assert fairness["tests"] > 0  # groups were compared, not all suppressed
    audited = [r for r in fairness["rows"] if r["attribute"] != "overall"]
    assert {r["attribute"] for r in audited} >= {"sex", "race_ethnicity", "age_band", "sex & age_band"}


def test_small_cells_keep_their_rows_but_not_their_sizes(fairness):
    k = fairness["min_cell_size"]
    suppressed = [r for r in fairness["rows"] if r["suppressed"]]
    assert suppressed  # intersections of a small hospital always have some
    for r in fairness["rows"]:
        assert r["n"] is None or r["n"] >= k
        assert r["events"] is None or r["events"] >= k
        if r["suppressed"]:
            assert r["metrics"] == {}


def test_one_report_card_per_model_version(graph_run, fairness):
    reports = graph_run.data_root / "reports" / USE_CASE
    card = reports / f"report_card_{fairness['model_version']}.html"
    html = card.read_text()
    assert fairness["model_version"] in html
    assert 'id="subgroups"' in html and 'id="decision"' in html
    md = (reports / f"report_card_{fairness['model_version']}.md").read_text()
    assert fairness["verdict"].upper() in md
    mats = graph_run.instance.fetch_materializations(
        records_filter=use_case_key(USE_CASE, "model_report_card"), limit=1
    ).records
    meta = mats[0].asset_materialization.metadata
    assert meta["model_version"].value == fairness["model_version"]
    assert "data:image/png;base64," in meta["report"].value
    assert json.dumps(meta["fairness_verdict"].value) == json.dumps(fairness["verdict"])


def test_too_few_deaths_to_judge_give_insufficient_data_not_pass(graph_run, fairness):
    # the session's small hospital has about 60 deaths in validation, under the use case's 100
    overall = fairness["rows"][0]
    events, survivors = overall["events"], overall["n"] - overall["events"]
    assert events < 100 <= survivors
    assert fairness["verdict"] in ("insufficient data", "fail")  # a group's failure would still be shown
    assert (
        f"too few outcomes to judge: {events} deaths and {survivors} survivors in the validation cohort, and at "
        "least 100 deaths and 100 survivors are needed"
    ) in fairness["reasons"]
    html = (graph_run.data_root / "reports" / USE_CASE / "subcohort_fairness_report.html").read_text()
    assert f'id="fairness-verdict">{fairness["verdict"].upper()}</span>' in html
    assert html.count('alt="Observed / expected deaths by ') == len(fairness["attributes"])
