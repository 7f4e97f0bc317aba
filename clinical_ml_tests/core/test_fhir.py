import json
from datetime import datetime

import pytest
from pydantic import ValidationError

from clinical_ml.core.fhir import ScoredAdmission, read_ndjson, risk_assessment, write_ndjson

ROW = ScoredAdmission(
    subject_id="1001",
    encounter_id="555",
    prediction_time=datetime(2026, 1, 5, 10, 30),
    risk=0.42,
    flagged=True,
    reasons=("lactate high", "low blood pressure"),
    flags=("out_of_range:lactate__max_24h",),
)


def test_risk_assessment_carries_risk_flag_model_and_reasons():
    res = risk_assessment(ROW, use_case="uc", outcome="in_hospital_death", model_version="v1", threshold=0.3)
    assert res["resourceType"] == "RiskAssessment"
    assert res["subject"]["reference"] == "Patient/1001"
    assert res["method"]["coding"][0]["version"] == "v1"
    assert res["prediction"][0]["probabilityDecimal"] == pytest.approx(0.42)
    assert res["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "high"
    notes = " ".join(n["text"] for n in res["note"])
    assert "lactate high" in notes and "out_of_range:lactate__max_24h" in notes


def test_ndjson_round_trips_through_the_fhir_validator(tmp_path):
    rows = [ROW, ScoredAdmission(**{**ROW.__dict__, "encounter_id": "556", "risk": 0.1, "flagged": False})]
    out = tmp_path / "x.ndjson"
    n = write_ndjson(rows, out, use_case="uc", outcome="death", model_version="v2", threshold=0.3)
    assert n == 2 and len(out.read_text().splitlines()) == 2
    parsed = read_ndjson(out)
    assert [r.prediction[0].qualitativeRisk.coding[0].code for r in parsed] == ["high", "low"]


def test_site_ids_replace_pseudonyms_when_mapped(tmp_path):
    out = tmp_path / "x.ndjson"
    write_ndjson(
        [ROW],
        out,
        use_case="uc",
        outcome="death",
        model_version="v",
        threshold=0.3,
        subject_ids={"1001": "MRN-X"},
        subject_system="urn:site:mrn",
    )
    res = json.loads(out.read_text())
    assert res["subject"]["identifier"] == {"system": "urn:site:mrn", "value": "MRN-X"}


def test_an_invalid_probability_is_rejected():
    with pytest.raises(ValidationError):
        risk_assessment(
            ScoredAdmission(**{**ROW.__dict__, "risk": float("nan")}),
            use_case="uc",
            outcome="death",
            model_version="v",
            threshold=0.3,
        )


def test_reidentify_for_ehr_restores_site_ids_and_the_real_clock():
    from datetime import datetime

    import polars as pl
    import pytest

    from clinical_ml.core.fhir import reidentify_for_ehr

    preds = pl.DataFrame(
        {
            "subject_id": [11, 12],
            "hadm_id": [101, 102],
            "prediction_time": [datetime(2030, 1, 15, 8), datetime(2030, 2, 1, 0)],
            "predicted_risk": [0.1, 0.7],
        }
    )
    patients = pl.DataFrame({"mrn": ["0042", "0077"], "subject_id": [11, 12], "shift_days": [14, -7]})
    encounters = pl.DataFrame({"encounter_id": ["E-9", "E-8"], "hadm_id": [101, 102]})
    site = reidentify_for_ehr(preds, patients, encounters)
    assert site["mrn"].to_list() == ["0042", "0077"]
    assert site["encounter_id"].to_list() == ["E-9", "E-8"]
    assert site["prediction_time"].to_list() == [datetime(2030, 1, 1, 8), datetime(2030, 2, 8, 0)]
    assert "subject_id" not in site.columns and "hadm_id" not in site.columns
    with pytest.raises(ValueError, match="1 of 2 scored admissions") as err:
        reidentify_for_ehr(preds, patients.head(1), encounters)
    assert "0042" not in str(err.value) and "12" not in str(err.value)


def test_a_flagged_admission_carries_the_clinical_action_and_an_unflagged_one_does_not(tmp_path):
    action = "Review goals of care with the ICU team within 12 h"
    rows = [ROW, ScoredAdmission(**{**ROW.__dict__, "encounter_id": "556", "risk": 0.1, "flagged": False})]
    out = tmp_path / "x.ndjson"
    write_ndjson(
        rows, out, use_case="uc", outcome="death", model_version="v2", threshold=0.3, clinical_action=action
    )
    parsed = read_ndjson(out)
    assert [r.mitigation for r in parsed] == [action, None]
    bare = risk_assessment(ROW, use_case="uc", outcome="death", model_version="v1", threshold=0.3)
    assert "mitigation" not in bare
