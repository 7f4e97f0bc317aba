"""Feasibility of a use case on small hand-built de-identified tables: counts against hand-counted values,
small cells masked, uncoded group values never named, code availability by the prediction time."""

import json
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml

from clinical_ml.core.feasibility import (
    EVENTS_PER_FEATURE_MIN,
    UNCODED_GROUP,
    Cell,
    assess_feasibility,
)
from clinical_ml.core.usecase import load_use_case, parse_use_case

SHIPPED = load_use_case(Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml")
# The hand-built hospital below has no ICU unit events or unit types and the counts it checks have nothing to
# do with the anchor: the base case asks the shipped mortality question 24 h after *hospital* admission of a
# stay in any unit (the settings it had before it was anchored at ICU admission).
BASE = parse_use_case(
    yaml.safe_dump(
        SHIPPED.model_dump(mode="json", exclude={"source_sha256"})
        | {
            "population": {**SHIPPED.population.model_dump(mode="json"), "unit_types": None},
            "prediction_time": {"anchor": "admission", "offset_hours": 24},
        }
    )
)
T0 = datetime(2026, 1, 5, 8, 0)
CREATININE, HEART_RATE = "LAB//2160-0", "VITAL//heart_rate"


def use_case(**update: object):
    """The base mortality use case with two feature codes, one window, ``last`` only (plus missingness),
    static age and sex, and parts replaced (validated like a file)."""
    raw = BASE.model_dump(mode="json", exclude={"source_sha256"})
    raw["features"] = {
        "window_hours": [24],
        "aggregations": ["last"],
        "codes": [CREATININE, HEART_RATE],
        "static": ["age_years", "sex"],
    }
    raw.update(update)
    return parse_use_case(yaml.safe_dump(raw))


def hospital(
    sites: list[str], deaths: set[int], *, batch: str = "export", short: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One stay per patient (hadm = subject = i), 72 h long, at ``sites[i]``; ``deaths`` die at 48 h; the
    ``short`` last stays end after 12 h (before a 24 h prediction time)."""
    n = len(sites)
    admit = [T0 + timedelta(hours=i) for i in range(n)]
    hours = [12 if i >= n - short else 72 for i in range(n)]
    enc = pl.DataFrame(
        {
            "subject_id": list(range(n)),
            "hadm_id": list(range(n)),
            "admit_time": admit,
            "discharge_time": [a + timedelta(hours=h) for a, h in zip(admit, hours, strict=True)],
            "death_time": pl.Series(
                [a + timedelta(hours=48) if i in deaths else None for i, a in enumerate(admit)],
                dtype=pl.Datetime("us"),
            ),
            "admission_type": ["EMERGENCY"] * n,
            "unit": ["MICU"] * n,
            "site": sites,
            "discharge_disposition": ["EXPIRED" if i in deaths else "HOME" for i in range(n)],
            "age_years": [60.0] * n,
            "period": ["2026Q1"] * n,
            "batch_id": [batch] * n,
        }
    ).with_columns(pl.col("admit_time", "discharge_time").cast(pl.Datetime("us")))
    pat = pl.DataFrame(
        {
            "subject_id": list(range(n)),
            "sex": ["F" if i % 2 else "M" for i in range(n)],
            "race": ["White"] * n,
            "ethnicity": ["Not Hispanic or Latino"] * n,
        }
    )
    return enc, pat


def events(rows: list[tuple[int, str, float, float, float, bool]]) -> pl.DataFrame:
    """(stay, code, value, hours after admission charted, hours after admission available, implausible)."""
    return pl.DataFrame(
        {
            "subject_id": [r[0] for r in rows],
            "hadm_id": [r[0] for r in rows],
            "time": [T0 + timedelta(hours=r[0] + r[3]) for r in rows],
            "code": [r[1] for r in rows],
            "numeric_value": [r[2] for r in rows],
            "available_time": [T0 + timedelta(hours=r[0] + r[4]) for r in rows],
            "implausible": [r[5] for r in rows],
        },
        schema_overrides={"time": pl.Datetime("us"), "available_time": pl.Datetime("us")},
    )


# 30 stays at SITE_A (12 deaths), 10 at SITE_B (2 deaths), 1 more at SITE_B ending before the prediction time.
SITES = ["SITE_A"] * 30 + ["SITE_B"] * 11
DEATHS = set(range(12)) | {30, 31}
EVENTS = events(
    [(i, CREATININE, 1.0, 2, 3, False) for i in range(20)]
    + [
        (20, CREATININE, 1.0, 2, 30, False),  # resulted after the prediction time: not available by then
        (21, CREATININE, 1.0, 2, 3, True),  # implausible: never a feature
        (22, CREATININE, 1.0, -10, -9, False),  # 34 h before the prediction time: outside the 24 h window
    ]
)


@pytest.mark.parametrize(
    ("n", "complement", "value", "text"),
    [
        (11, None, 11, "11"),
        (10, None, None, "< 11"),
        (0, None, None, "< 11"),
        (1200, 40, 1200, "1,200"),
        (30, 5, None, "> 24"),  # 35 in the group, fewer than 11 without the outcome: 30 is not shown
    ],
)
def test_a_cell_under_the_minimum_size_is_only_a_bound(n, complement, value, text):
    cell = Cell.of(n, min_cell_size=11, complement=complement)
    assert (cell.value, cell.text) == (value, text)
    assert cell.as_json() == (value if value is not None else text)


def test_counts_match_the_hand_counted_hospital():
    enc, pat = hospital(SITES, DEATHS, short=1)
    f = assess_feasibility(enc, pat, EVENTS.lazy(), use_case())
    c = f.counts
    assert (c.eligible_stays, c.prediction_rows, c.labelled_rows, c.label_unknown_rows) == (40, 40, 40, 0)
    assert (c.events, c.event_stays, c.prevalence) == (14, 14, pytest.approx(14 / 40))
    assert f.flow.excluded("stay ended") == 1
    assert (f.event_word, f.events_word) == ("death", "deaths")
    # creatinine and heart rate x (last, missing) + age + sex__f, sex__m (each on >= 11 admissions)
    assert f.candidate_features == 7
    assert f.events_per_feature == pytest.approx(2.0)
    assert f.thin and EVENTS_PER_FEATURE_MIN == 10
    assert f.cannot_serve() is None


def test_sites_and_periods_mask_small_cells():
    enc, pat = hospital(SITES, DEATHS, short=1)
    f = assess_feasibility(enc, pat, EVENTS, use_case())
    rows = {(g.attribute, g.value): g for g in f.groups}
    assert set(rows) == {("site", "SITE_A"), ("site", "SITE_B"), ("period", "2026Q1")}
    a, b, q = rows["site", "SITE_A"], rows["site", "SITE_B"], rows["period", "2026Q1"]
    assert (a.stays.text, a.events.text, a.prevalence) == ("30", "12", pytest.approx(0.4))
    assert (b.stays.text, b.events.text, b.prevalence) == ("< 11", "< 11", None)
    assert (q.stays.value, q.events.value) == (40, 14)
    # the masked counts are not in the JSON either
    site_b = next(g for g in f.as_dict()["groups"] if g["value"] == "SITE_B")
    assert site_b == {
        "attribute": "site",
        "value": "SITE_B",
        "stays": "< 11",
        "events": "< 11",
        "prevalence": None,
    }


def test_a_group_value_that_is_not_a_code_is_never_named():
    free_text = "St. Mary's, ward 3 (Dr Smith)"
    enc, pat = hospital(["SITE_A"] * 20 + [free_text] * 20, set(range(0, 40, 3)))
    f = assess_feasibility(enc, pat, EVENTS, use_case())
    assert {g.value for g in f.groups if g.attribute == "site"} == {"SITE_A", UNCODED_GROUP}
    assert "Smith" not in json.dumps(f.as_dict())


def test_code_availability_counts_values_available_in_the_window_by_the_prediction_time():
    enc, pat = hospital(SITES, DEATHS, short=1)
    f = assess_feasibility(enc, pat, EVENTS, use_case())
    by_code = {a.code: a for a in f.codes}
    # stays 0-19 only: 20 is resulted too late, 21 implausible, 22 outside the window
    assert by_code[CREATININE].share_of_stays == pytest.approx(20 / 40)
    assert by_code[CREATININE].events_in_data == 22  # plausible values anywhere in the data
    assert (by_code[HEART_RATE].events_in_data, by_code[HEART_RATE].share_of_stays) == (0, 0.0)
    assert ("features.codes", HEART_RATE) in f.absent
    assert ("features.codes", CREATININE) not in f.absent
    assert f.longest_window_hours == 24


def test_population_values_and_codes_the_data_never_hold_are_called_out():
    enc, pat = hospital(SITES, DEATHS)
    uc = use_case(
        population={
            **BASE.population.model_dump(mode="json"),
            "units": ["MICU", "CCU"],
            "no_prior_codes": ["LAB//2524-7"],
        }
    )
    f = assess_feasibility(enc, pat, EVENTS, uc)
    assert ("population.units", "CCU") in f.absent
    assert ("population.units", "MICU") not in f.absent
    assert ("population.no_prior_codes", "LAB//2524-7") in f.absent


def test_an_empty_cohort_cannot_be_served_and_says_where_the_stays_went():
    enc, pat = hospital(SITES, DEATHS)
    uc = use_case(population={**BASE.population.model_dump(mode="json"), "units": ["CCU"]})
    f = assess_feasibility(enc, pat, EVENTS, uc)
    assert f.counts.eligible_stays == 0 and f.events_per_feature == 0
    reason = f.cannot_serve()
    assert reason is not None and reason.startswith("no eligible admission")
    assert "excluded: unit not in the population: 41" in reason


def test_no_outcome_event_cannot_be_served():
    enc, pat = hospital(SITES, set())
    f = assess_feasibility(enc, pat, None, use_case())
    assert f.counts.events == 0
    assert f.cannot_serve() == "no deaths among the 41 rows whose outcome is known"
    assert all(a.share_of_stays == 0 for a in f.codes)


def test_labels_still_open_at_the_end_of_the_data_are_counted_apart():
    # discharged on 2026-01-08: a 30-day readmission window is still open when the data end (batch 2026-01-05)
    enc, pat = hospital(["SITE_A"] * 15, set(), batch="2026-01-05")
    uc = use_case(
        prediction_time={"anchor": "discharge"},
        outcome={"type": "readmission", "within_days": 30, "description": "any new admission"},
    )
    f = assess_feasibility(enc, pat, EVENTS, uc)
    assert (f.counts.prediction_rows, f.counts.labelled_rows, f.counts.label_unknown_rows) == (15, 0, 15)
    assert f.counts.prevalence is None
    assert f.cannot_serve() is not None and f.cannot_serve().startswith("no outcome is known yet")
    assert f.events_word == "readmissions"
