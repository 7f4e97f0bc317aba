"""Clinical use cases defined as data (one YAML file each), validated on load.

A bad file raises :class:`UseCaseError` naming the file and the offending field, e.g.
``usecases/x.yaml: success_criteria.auroc_min: Input should be less than or equal to 1``.
"""

import hashlib
import itertools
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CODE_PATTERN = re.compile(r"^(LAB|VITAL)//[A-Za-z0-9_.\-]+$")


class UseCaseError(ValueError):
    """A use case file that cannot be used, with the field at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Ages leave the anonymization boundary capped at this value ("90+", HIPAA Safe Harbor).
AGE_CAP_YEARS = 90


class Population(_Strict):
    min_age_years: int = Field(18, ge=0)
    inclusion: str
    exclusion: str

    @field_validator("min_age_years")
    @classmethod
    def _below_the_age_cap(cls, v: int) -> int:
        if v > AGE_CAP_YEARS:
            raise ValueError(
                f"must be at most {AGE_CAP_YEARS}: de-identified ages are capped at {AGE_CAP_YEARS} ('90+'), so "
                f"a minimum of {v} would select nobody"
            )
        return v


class PredictionTime(_Strict):
    anchor: Literal["admission"] = "admission"
    offset_hours: float = Field(gt=0, le=24 * 30)


class Outcome(_Strict):
    name: Literal["in_hospital_death"]
    description: str
    window: str


class Features(_Strict):
    window_hours: list[float] = Field(min_length=1)
    aggregations: list[Literal["last", "min", "max", "mean", "count", "slope", "time_since_last"]] = Field(
        min_length=1
    )
    codes: list[str] = Field(min_length=1)
    static: list[Literal["age_years", "sex", "admission_type", "unit"]] = []
    missing_indicators: bool = Field(
        True, description="Add <code>__missing_<w>h = 1 when a code has no available value in a window."
    )

    @field_validator("codes")
    @classmethod
    def _codes_are_meds_codes(cls, codes: list[str]) -> list[str]:
        bad = [c for c in codes if not CODE_PATTERN.match(c)]
        if bad:
            raise ValueError(f"codes must look like LAB//<LOINC> or VITAL//<name>, got {bad}")
        if len(set(codes)) != len(codes):
            raise ValueError("codes must not repeat")
        return codes


class OperatingPoint(_Strict):
    policy: Literal["min_sensitivity", "min_specificity"]
    target: float = Field(gt=0, lt=1)


class SuccessCriteria(_Strict):
    auroc_min: float = Field(ge=0.5, le=1)
    sensitivity_min: float = Field(ge=0, le=1)
    specificity_min: float = Field(ge=0, le=1)
    calibration_slope_range: tuple[float, float] = (0.0, 10.0)
    calibration_intercept_range: tuple[float, float] | None = None
    observed_expected_range: tuple[float, float] | None = None
    brier_max: float = Field(1.0, gt=0, le=1)

    @field_validator("calibration_slope_range", "calibration_intercept_range", "observed_expected_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] >= v[1]:
            raise ValueError("a range must be [low, high] with low < high")
        return v


class Subgroups(_Strict):
    attributes: list[Literal["sex", "race_ethnicity", "age_band"]] = Field(min_length=1)
    age_bands: list[int] = Field(min_length=2)
    min_cell_size: int = Field(11, ge=1)
    auroc_min: float = Field(0.5, ge=0.5, le=1)
    sensitivity_min: float = Field(0.0, ge=0, le=1)

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(hi <= lo for lo, hi in itertools.pairwise(v)):
            raise ValueError("age_bands must be strictly increasing")
        return v


class Validation(_Strict):
    """How the derivation and validation cohorts are formed.

    ``strategy: patient`` holds out a random ``fraction`` of patients. ``strategy: temporal`` holds out the
    patients admitted in the latest ``period`` (or in ``validation_periods`` when given, e.g. ``["2015"]``
    for a 2014 derivation / 2015 validation design); it falls back to ``patient`` when the data hold a single
    period. Either way no patient is in both cohorts, and the tuning part (early stopping, threshold) is
    carved from the derivation cohort only.
    """

    strategy: Literal["patient", "temporal"] = "patient"
    validation_periods: list[str] | None = Field(None, min_length=1)
    fraction: float = Field(0.3, gt=0, lt=1)
    tuning_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class Promotion(_Strict):
    """When a challenger may replace the champion (judged on the validation cohort)."""

    auroc_non_inferiority_margin: float = Field(0.02, ge=0, le=0.5)
    calibration_slope_margin: float = Field(
        0.1, ge=0, description="allowed increase of |calibration slope - 1| over the champion's"
    )
    calibration_intercept_margin: float = Field(
        0.1, ge=0, description="allowed increase of |calibration intercept| over the champion's"
    )
    latency_p99_ms_max: float = Field(10.0, gt=0, description="one-patient score with reasons, in process")


class Guardrails(_Strict):
    """What scoring does with inputs unlike the training data."""

    range_tolerance: float = Field(
        0.1,
        ge=0,
        description="a value is out of range beyond the training 1st-99th percentiles widened by "
        "this share of their span",
    )
    max_out_of_range: int = Field(3, ge=1, description="out-of-range features that make a patient abstain")
    max_missing_fraction: float = Field(
        0.5, gt=0, le=1, description="share of missing windowed features that makes a patient abstain"
    )
    policy: Literal["warn", "abstain"] = "abstain"


class UseCase(_Strict):
    """One clinical question, its prediction time, its data, and its success criteria."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    clinical_question: str
    owner: str
    population: Population
    prediction_time: PredictionTime
    observation_window_hours: float = Field(gt=0)
    outcome: Outcome
    features: Features
    operating_point: OperatingPoint
    success_criteria: SuccessCriteria
    subgroups: Subgroups
    validation: Validation = Validation()
    promotion: Promotion = Promotion()
    guardrails: Guardrails = Guardrails()
    source_sha256: str = ""

    @model_validator(mode="after")
    def _windows_fit(self) -> "UseCase":
        if max(self.features.window_hours) > self.observation_window_hours:
            raise ValueError("features.window_hours cannot exceed observation_window_hours")
        return self


def _location(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def parse_use_case(text: str, *, source: str = "<string>") -> UseCase:
    """Parse and validate a use case from YAML text.

    Raises
    ------
    UseCaseError
        With the file name and the dotted path of every field at fault.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UseCaseError(f"{source}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise UseCaseError(f"{source}: expected a mapping of fields at the top level")
    raw["source_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    try:
        return UseCase.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise UseCaseError(f"{source}: {problems}") from None


def load_use_case(path: Path | str) -> UseCase:
    """Load one use case file."""
    p = Path(path)
    return parse_use_case(p.read_text(encoding="utf-8"), source=str(p))


def load_use_cases(directory: Path | str) -> list[UseCase]:
    """Load every ``*.yaml`` in ``directory``, sorted by name; names must be unique."""
    cases = [load_use_case(p) for p in sorted(Path(directory).glob("*.yaml"))]
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UseCaseError(f"{directory}: use case names must be unique, repeated: {dupes}")
    return cases
