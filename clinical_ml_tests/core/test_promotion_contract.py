"""The use case contract's validation, promotion and guardrail sections: defaults keep old files valid."""

from pathlib import Path

import pytest

from clinical_ml.core.usecase import UseCaseError, parse_use_case

GOOD = (Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml").read_text()


def _without_sections(text: str, *names: str) -> str:
    out, skipping = [], False
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            skipping = line.split(":")[0] in names
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def test_a_file_without_the_new_sections_gets_the_defaults():
    uc = parse_use_case(_without_sections(GOOD, "promotion", "guardrails", "validation"))
    assert uc.validation.strategy == "patient" and uc.validation.validation_periods is None
    assert uc.promotion.auroc_non_inferiority_margin == 0.02
    assert uc.guardrails.policy == "abstain"


def test_temporal_validation_with_named_periods():
    text = GOOD.replace("strategy: patient", 'strategy: temporal\n  validation_periods: ["2015"]')
    uc = parse_use_case(text)
    assert uc.validation.strategy == "temporal" and uc.validation.validation_periods == ["2015"]


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("strategy: patient", "strategy: random", "validation.strategy"),
        ("policy: abstain", "policy: ignore", "guardrails.policy"),
        ("latency_p99_ms_max: 10", "latency_p99_ms_max: 0", "promotion.latency_p99_ms_max"),
        (
            "observed_expected_range: [0.7, 1.5]",
            "observed_expected_range: [1.5, 0.7]",
            "success_criteria.observed_expected_range",
        ),
    ],
)
def test_bad_values_name_the_field(old, new, field):
    assert old in GOOD
    with pytest.raises(UseCaseError, match=field.replace(".", r"\.")):
        parse_use_case(GOOD.replace(old, new), source="x.yaml")
