"""A site's declared clock skew and unit spellings (site mapping ``clock_skew_minutes``, ``measurement_units``),
and vital codes by measurement method: what they accept, what they still reject, and their validation."""

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from clinical_ml.core.ingestion import BatchContext, ingest_file
from clinical_ml.core.site_mapping import SiteMapping, SiteMappingError, load_site_mapping

NOW = datetime(2025, 1, 1)
CHARTED = "2024-01-02 08:00:00"


def _vitals(path: Path, rows: list[tuple[str, float, str, str, str]]) -> Path:
    """rows: (code, value, unit, charted_time, stored_time) of encounter E0001."""
    pl.DataFrame(
        {
            "encounter_id": ["E0001"] * len(rows),
            "code": [r[0] for r in rows],
            "value": [r[1] for r in rows],
            "unit": [r[2] for r in rows],
            "charted_time": [r[3] for r in rows],
            "stored_time": [r[4] for r in rows],
        }
    ).write_csv(path)
    return path


def _labs(path: Path, result_times: list[str]) -> Path:
    pl.DataFrame(
        {
            "encounter_id": ["E0001"] * len(result_times),
            "loinc_code": ["2160-0"] * len(result_times),
            "value": [1.0] * len(result_times),
            "unit": ["mg/dL"] * len(result_times),
            "specimen_time": [f"2024-01-02 08:{i:02d}:00" for i in range(len(result_times))],
            "result_time": result_times,
        }
    ).write_csv(path)
    return path


def _ingest(path: Path, source: str, mapping: dict | None = None):
    site = SiteMapping.model_validate({"name": "testsite", **(mapping or {})})
    return ingest_file(path, source, batch=BatchContext(), now=NOW, mapping=site)


def _early(minutes: int) -> str:
    """A stored time ``minutes`` before :data:`CHARTED`."""
    return (datetime(2024, 1, 2, 8) - timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M:%S")


@pytest.mark.parametrize("minutes", [1, 59, 60])
def test_without_a_declared_skew_a_value_stored_before_it_was_charted_is_rejected(tmp_path, minutes):
    rows = [("heart_rate", 80.0, "/min", CHARTED, _early(minutes))]
    result = _ingest(_vitals(tmp_path / "vitals.csv", rows), "vitals")
    assert result.rejected_by_reason == {"stored_before_charted": 1}
    labs = _ingest(_labs(tmp_path / "labs.csv", ["2024-01-02 07:59:00"]), "labs")
    assert labs.rejected_by_reason == {"result_before_specimen": 1}


def test_a_declared_skew_accepts_rows_within_it_at_their_chart_time_and_rejects_the_rest(tmp_path):
    rows = [
        ("heart_rate", 80.0, "/min", CHARTED, _early(1)),
        ("heart_rate", 81.0, "/min", "2024-01-02 09:00:00", "2024-01-02 08:00:00"),  # 60 min early
        ("heart_rate", 82.0, "/min", "2024-01-02 10:00:00", "2024-01-02 08:59:00"),  # 61 min early
        ("heart_rate", 83.0, "/min", "2024-01-02 11:00:00", "2024-01-02 11:20:00"),  # stored after
    ]
    skew = {"clock_skew_minutes": {"stored_before_charted": 60}}
    result = _ingest(_vitals(tmp_path / "vitals.csv", rows), "vitals", skew)
    assert result.rejected_by_reason == {"stored_before_charted": 1}
    assert result.rejects["row_number"].to_list() == [3]
    assert result.warnings["stored_before_charted_tolerated"] == 2
    accepted = result.accepted.sort("row_number")
    # never available before it was measured: the early rows are available at their chart time
    assert (accepted["stored_time"] >= accepted["charted_time"]).all()
    assert accepted["stored_time"].dt.strftime("%H:%M").to_list() == ["08:00", "09:00", "11:20"]
    # the skew relaxes the rule it names only: a lab resulted before its specimen is still rejected
    labs = _ingest(_labs(tmp_path / "labs.csv", ["2024-01-02 07:59:00", "2024-01-02 09:00:00"]), "labs", skew)
    assert labs.rejected_by_reason == {"result_before_specimen": 1}
    assert "result_before_specimen_tolerated" not in labs.warnings


def test_a_lab_skew_tolerates_results_before_the_specimen_time(tmp_path):
    skew = {"clock_skew_minutes": {"result_before_specimen": 5}}
    # specimens at 08:00 and 08:01; results 3 and 10 minutes before them
    labs = _ingest(_labs(tmp_path / "labs.csv", ["2024-01-02 07:57:00", "2024-01-02 07:51:00"]), "labs", skew)
    assert labs.rejected_by_reason == {"result_before_specimen": 1}
    assert labs.warnings["result_before_specimen_tolerated"] == 1
    (row,) = labs.accepted.iter_rows(named=True)
    assert row["result_time"] == row["specimen_time"]


def test_a_site_unit_spelling_maps_onto_a_vocabulary_unit_and_is_converted(tmp_path):
    rows = [
        ("temperature", 98.6, "?F", CHARTED, CHARTED),
        ("temperature", 37.5, "?C", "2024-01-02 09:00:00", "2024-01-02 09:00:00"),
    ]
    path = _vitals(tmp_path / "vitals.csv", rows)
    assert _ingest(path, "vitals").rejected_by_reason == {"unknown_unit": 2}
    result = _ingest(path, "vitals", {"measurement_units": {"vitals": {"?F": "[degF]", "?C": "Cel"}}})
    assert result.rows_rejected == 0
    accepted = result.accepted.sort("row_number")
    assert accepted["unit"].to_list() == ["Cel", "Cel"] and accepted["unit_known"].all()
    assert accepted["value"].to_list() == pytest.approx([37.0, 37.5])
    # a spelling mapped for labs does not apply to vitals
    labs_only = _ingest(path, "vitals", {"measurement_units": {"labs": {"?F": "mg/dL"}}})
    assert labs_only.rejected_by_reason == {"unknown_unit": 2}


def test_arterial_and_cuff_pressures_at_the_same_minute_are_two_measurements(tmp_path):
    by_method = [
        ("systolic_bp_invasive", 121.0, "mmHg", CHARTED, CHARTED),
        ("systolic_bp_noninvasive", 109.0, "mmHg", CHARTED, CHARTED),
    ]
    result = _ingest(_vitals(tmp_path / "by_method.csv", by_method), "vitals")
    assert result.rows_rejected == 0 and result.accepted["unit"].to_list() == ["mm[Hg]"] * 2
    # under one code they remain a conflict: which value is that code's is unknown
    one_code = [("systolic_bp", v, u, c, s) for _, v, u, c, s in by_method]
    assert _ingest(_vitals(tmp_path / "one.csv", one_code), "vitals").rejected_by_reason == {
        "conflicting_duplicate": 2
    }


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("clock_skew_minutes: {stored_before_charted: -5}", "clock_skew_minutes"),
        ("clock_skew_minutes: {stored_before_charted: 2000}", "clock_skew_minutes"),
        ("clock_skew_minutes: {event_after_discharge: 60}", "clock_skew_minutes"),
        ("measurement_units: {vitals: {'?F': degrees}}", "measurement_units"),
        ("measurement_units: {vitals: {'?F': mg/dL}}", "measurement_units"),
        ("measurement_units: {medications: {mcg: ug}}", "measurement_units"),
    ],
)
def test_a_bad_skew_or_unit_spelling_is_refused_naming_the_file_and_the_field(tmp_path, text, where):
    (tmp_path / "broken.yaml").write_text(text)
    with pytest.raises(SiteMappingError) as err:
        load_site_mapping("broken", folder=tmp_path)
    assert "broken.yaml" in str(err.value) and where in str(err.value)


def test_declaring_a_skew_or_a_unit_spelling_changes_the_mapping_digest():
    plain = SiteMapping(name="s")
    skewed = SiteMapping.model_validate({"name": "s", "clock_skew_minutes": {"stored_before_charted": 60}})
    spelled = SiteMapping.model_validate({"name": "s", "measurement_units": {"vitals": {"?F": "[degF]"}}})
    assert len({plain.digest(), skewed.digest(), spelled.digest()}) == 3
