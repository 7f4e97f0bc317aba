from pathlib import Path

import pytest

from clinical_ml.core.usecase import UseCaseError, load_use_cases, parse_use_case

USECASES = Path(__file__).resolve().parents[2] / "usecases"
GOOD = (USECASES / "icu_mortality_24h.yaml").read_text()


def test_repository_use_cases_load():
    cases = load_use_cases(USECASES)
    assert "icu_mortality_24h" in {c.name for c in cases}
    uc = next(c for c in cases if c.name == "icu_mortality_24h")
    assert uc.prediction_time.offset_hours == 24
    assert len(uc.source_sha256) == 64


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("auroc_min: 0.75", "auroc_min: 1.75", "success_criteria.auroc_min"),
        ("offset_hours: 24", "offset_hours: -1", "prediction_time.offset_hours"),
        ("policy: min_sensitivity", "policy: best_guess", "operating_point.policy"),
        ("    - LAB//2160-0    # creatinine", "    - creatinine", "features.codes"),
        ("age_bands: [18, 45, 65, 80]", "age_bands: [18, 65, 45]", "subgroups.age_bands"),
        ("min_cell_size: 11", "min_cell_size: 11\n  colour: blue", "subgroups.colour"),
        ("min_age_years: 18", "min_age_years: 100", "population.min_age_years"),
        ("min_age_years: 18", "min_age_years: 91", "population.min_age_years"),
    ],
)
def test_bad_file_names_the_field(old, new, field):
    assert old in GOOD
    with pytest.raises(UseCaseError, match=field.replace(".", r"\.")) as err:
        parse_use_case(GOOD.replace(old, new), source="bad.yaml")
    assert str(err.value).startswith("bad.yaml: ")


def test_missing_field_and_bad_yaml_are_clear_errors():
    with pytest.raises(UseCaseError, match="clinical_question: Field required"):
        parse_use_case(GOOD.replace("clinical_question:", "clinical_questions:"))
    with pytest.raises(UseCaseError, match="not valid YAML"):
        parse_use_case("name: [unclosed")


def test_hash_changes_with_the_contract():
    a = parse_use_case(GOOD)
    b = parse_use_case(GOOD.replace("auroc_min: 0.75", "auroc_min: 0.76"))
    assert a.source_sha256 != b.source_sha256


def test_a_minimum_age_at_the_cap_is_allowed_and_above_it_says_why():
    assert (
        parse_use_case(GOOD.replace("min_age_years: 18", "min_age_years: 90")).population.min_age_years == 90
    )
    with pytest.raises(UseCaseError, match="capped at 90"):
        parse_use_case(GOOD.replace("min_age_years: 18", "min_age_years: 100"))
