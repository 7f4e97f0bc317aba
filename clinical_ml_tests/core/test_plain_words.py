"""Plain words for readers: clinical names with units for model inputs, and a glossary of every statistical
term at the end of each report that prints it."""

import re

import pytest

from clinical_ml.core.display_names import display_name, display_name_and_unit
from clinical_ml.core.glossary import BY_TEMPLATE, TERMS, glossary_for


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        ("creatinine__last_24h", "Creatinine, last value in 24 h (mg/dL)"),
        ("systolic_blood_pressure__min_24h", "Systolic blood pressure, lowest in 24 h (mmHg)"),
        ("temperature__max_24h", "Temperature, highest in 24 h (°C)"),
        ("platelets__mean_24h", "Platelets, mean in 24 h (×10³/µL)"),
        ("lactate__count_24h", "Lactate, number of measurements in 24 h"),
        ("lactate__missing_24h", "Lactate, not measured in 24 h"),
        ("heart_rate__slope_6h", "Heart rate, trend in 6 h (per min per h)"),
        ("hematocrit__last_24h", "Hematocrit, last value in 24 h (%)"),
        ("arterial_ph__min_24h", "Arterial pH, lowest in 24 h"),
        ("age_years", "Age (years)"),
        ("sex__F", "Sex: F"),
        ("admission_type__emergency", "Admission type: emergency"),
    ],
)
def test_a_model_input_reads_as_a_clinician_writes_it(feature, expected):
    assert display_name(feature) == expected


def test_no_display_name_shows_a_raw_column_name_or_a_ucum_code():
    from clinical_ml.core.units import feature_stem, measurement_codes

    for code in measurement_codes():
        for agg in ("last", "min", "max", "mean"):
            name, unit = display_name_and_unit(f"{feature_stem(code)}__{agg}_24h")
            assert "__" not in name and "_" not in name, name
            assert not re.search(r"\[|\{|\*|^Cel$", unit), (code, unit)


def test_every_term_a_report_lists_has_a_meaning_and_each_glossary_is_in_reading_order():
    for template, terms in BY_TEMPLATE.items():
        assert terms and len(set(terms)) == len(terms), template
        assert all(TERMS[t].strip() for t in terms)
        assert [t for t, _ in glossary_for(template)] == terms
    assert glossary_for("no_such.html.j2") == []


def test_the_report_card_ends_with_a_glossary_of_the_terms_it_prints():
    from clinical_ml_tests.core.test_reports import _render

    html = _render(hostile=False)["card_html"]
    glossary = html[html.index('id="glossary"') :]
    for printed, term in (
        ("Equalized odds difference", "Equalized odds difference"),
        ("Calibration slope", "Calibration slope"),
        ("AUROC", "AUROC"),
        ("mean |SHAP|", "Mean |SHAP|"),
    ):
        assert printed in html[: html.index('id="glossary"')], printed
        assert f"<dt>{term}</dt>" in glossary, term
    fairness = _render(hostile=False)["fairness_html"]
    assert "<dt>Equalized odds difference</dt>" in fairness[fairness.index('id="glossary"') :]
