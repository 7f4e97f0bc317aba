"""A FHIR prefetch read as the batch path's frames: codes, units, times, coded values; bad FHIR named by place."""

import copy
from datetime import timedelta
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from clinical_ml.serve.chart import PrefetchError, chart_from_prefetch
from clinical_ml_tests.serve.conftest import ADMIT, NOW, UTC_TZ, stay_request


def _chart(req, site_mapping, *, tz=UTC_TZ, prediction_time=NOW, with_history=False):
    return chart_from_prefetch(
        req["prefetch"],
        context=req["context"],
        prediction_time=prediction_time,
        site_mapping=site_mapping,
        tz=tz,
        with_history=with_history,
    )


def _value(chart, code: str) -> list[float]:
    return chart.events.filter(pl.col("code") == code)["numeric_value"].to_list()


def test_units_are_converted_as_ingestion_converts_them(site_mapping) -> None:
    chart = _chart(stay_request(), site_mapping)
    assert _value(chart, "LAB//2160-0") == [pytest.approx(150.0 / 88.42, rel=1e-6)]  # umol/L -> mg/dL
    assert _value(chart, "VITAL//temperature") == [
        pytest.approx((101.3 - 32) * 5 / 9, rel=1e-6)
    ]  # degF -> Cel
    assert chart.events["numeric_value"].dtype == pl.Float32  # as the anonymizer writes MEDS values


def test_static_attributes_go_through_the_site_mapping_and_age_rule(site_mapping) -> None:
    row = _chart(stay_request(), site_mapping).cohort.row(0, named=True)
    assert (row["sex"], row["admission_type"], row["unit"]) == ("F", "EMERGENCY", "MICU")
    assert row["age_years"] == 75  # born 1950-05-06, admitted 2026-03-02: birthday not yet reached
    unknown = _chart(stay_request(unit="Room 12 next to the window"), site_mapping).cohort.row(0, named=True)
    assert unknown["unit"] == "unmapped"  # never the delivered text


def test_results_are_placed_on_the_site_clock_and_known_when_issued(site_mapping) -> None:
    req = stay_request()
    berlin = ZoneInfo("Europe/Berlin")
    chart = _chart(req, site_mapping, tz=berlin, prediction_time=NOW + timedelta(hours=1))
    first = chart.events.filter(pl.col("code") == "LAB//2524-7").sort("time").row(0, named=True)
    assert first["time"] == ADMIT + timedelta(hours=9)  # sent as UTC, read at UTC+1 in March
    assert first["available_time"] - first["time"] == timedelta(minutes=40)


def test_observations_the_model_cannot_use_are_counted_not_used(site_mapping) -> None:
    req = stay_request()
    entries = req["prefetch"]["observations"]["entry"]
    prelim = copy.deepcopy(entries[0])
    prelim["resource"]["status"] = "preliminary"
    other = copy.deepcopy(entries[0])
    other["resource"]["encounter"] = {"reference": "Encounter/someone-else"}
    odd_unit = copy.deepcopy(entries[0])
    odd_unit["resource"]["valueQuantity"] = {"value": 3.0, "unit": "furlongs"}
    unknown = copy.deepcopy(entries[0])
    unknown["resource"]["code"] = {"coding": [{"system": "http://loinc.org", "code": "0000-0"}]}
    entries += [prelim, other, odd_unit, unknown]
    base = _chart(stay_request(), site_mapping)
    chart = _chart(req, site_mapping)
    assert chart.events.height == base.events.height
    assert chart.not_used == {
        "status_not_final": 1,
        "other_encounter": 1,
        "unknown_unit": 1,
        "code_not_in_vocabulary": 1,
    }


def test_missing_prefetch_is_a_precondition_not_a_crash(site_mapping) -> None:
    req = stay_request()
    del req["prefetch"]["observations"]
    with pytest.raises(PrefetchError) as exc:
        _chart(req, site_mapping)
    assert exc.value.missing and exc.value.issues[0].location == "prefetch.observations"


def test_bad_fhir_is_named_by_place_never_by_value(site_mapping) -> None:
    req = stay_request()
    secret = "Jane-Doe-4711"
    req["prefetch"]["observations"]["entry"][2]["resource"]["effectiveDateTime"] = secret
    with pytest.raises(PrefetchError) as exc:
        _chart(req, site_mapping)
    assert not exc.value.missing
    assert any(i.location.startswith("prefetch.observations.entry.2.resource") for i in exc.value.issues)
    assert secret not in str(exc.value)


def test_resources_of_another_patient_are_refused(site_mapping) -> None:
    req = stay_request()
    req["prefetch"]["encounter"]["subject"] = {"reference": "Patient/somebody-else"}
    with pytest.raises(PrefetchError) as exc:
        _chart(req, site_mapping)
    assert [i.location for i in exc.value.issues] == ["prefetch.encounter.subject"]


def test_earlier_stays_feed_history_features(site_mapping) -> None:
    req = stay_request()
    earlier = copy.deepcopy(req["prefetch"]["encounter"])
    earlier["id"] = "earlier"
    earlier["period"] = {"start": "2025-12-01T10:00:00+00:00", "end": "2025-12-09T10:00:00+00:00"}
    req["prefetch"]["encounters"] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": req["prefetch"]["encounter"]}, {"resource": earlier}],
    }
    chart = _chart(req, site_mapping, with_history=True)
    assert chart.encounters.height == 2
    assert chart.encounters["hadm_id"].n_unique() == 2


def test_duplicates_follow_ingestion_one_repeat_kept_conflicts_left_out(site_mapping) -> None:
    req = stay_request()
    entries = req["prefetch"]["observations"]["entry"]
    lactate = [e for e in entries if e["resource"]["code"]["coding"][0]["code"] == "2524-7"]
    repeat = copy.deepcopy(lactate[0])
    conflict = copy.deepcopy(lactate[1])
    conflict["resource"]["valueQuantity"]["value"] = 9.9
    entries += [repeat, conflict]
    chart = _chart(req, site_mapping)
    assert (
        len(_value(chart, "LAB//2524-7")) == 1
    )  # the repeat counted once, both conflicting results left out
    assert chart.not_used == {"conflicting_duplicate": 2}


def test_the_sites_unit_spellings_and_clock_skew_apply_as_in_ingestion(site_mapping) -> None:
    req = stay_request()
    entries = req["prefetch"]["observations"]["entry"]
    temp = next(e["resource"] for e in entries if e["resource"]["valueQuantity"]["unit"] == "[degF]")
    temp["valueQuantity"] = {"value": 101.3, "unit": "?F"}  # the site's spelling of degF
    hr = next(e["resource"] for e in entries if e["resource"]["code"]["coding"][0]["code"] == "8867-4")
    hr["issued"] = (ADMIT + timedelta(hours=5, minutes=55)).isoformat() + "+00:00"  # 5 min before charted
    strict = _chart(copy.deepcopy(req), site_mapping)
    assert strict.not_used == {"unknown_unit": 1, "stored_before_charted": 1}
    site = site_mapping.model_copy(
        update={
            "measurement_units": {"vitals": {"?F": "[degF]"}},
            "clock_skew_minutes": {"stored_before_charted": 10},
        }
    )
    chart = _chart(req, site)
    assert chart.not_used == {}
    assert _value(chart, "VITAL//temperature") == [pytest.approx((101.3 - 32) * 5 / 9, rel=1e-6)]
    first_hr = chart.events.filter(pl.col("code") == "VITAL//heart_rate").sort("time").row(0, named=True)
    assert first_hr["available_time"] == first_hr["time"]  # known when measured, never before
