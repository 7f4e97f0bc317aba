"""Clinical use cases defined as data (one YAML file each), validated on load.

A bad file raises :class:`UseCaseError` naming the file and the offending field, e.g.
``usecases/x.yaml: success_criteria.auroc_min: Input should be less than or equal to 1``.
"""

import hashlib
import itertools
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from clinical_ml.core.units import is_known_code, plain_name

CODE_PATTERN = re.compile(r"^(LAB|VITAL)//[A-Za-z0-9_.\-]+$")


class UseCaseError(ValueError):
    """A use case file that cannot be used, with the field at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Ages leave the anonymization boundary capped at this value ("90+", HIPAA Safe Harbor).
AGE_CAP_YEARS = 90


def _known_codes(codes: list[str], *, measurements_only: bool) -> list[str]:
    unknown = [c for c in codes if not is_known_code(c, measurements_only=measurements_only)]
    if unknown:
        kind = "measurement codes (LAB//<LOINC>, VITAL//<name>)" if measurements_only else "codes"
        raise ValueError(
            f"{', '.join(map(repr, unknown))} not in the vocabulary of {kind}; known codes are listed in "
            "docs/usecases.md (clinical_ml/core/units.py)"
        )
    return codes


class Population(_Strict):
    """Who the question is asked about. Every filter is optional; an unset list keeps everyone.

    Values of ``units``, ``admission_types``, ``sites`` and ``discharge_dispositions`` are compared with the
    de-identified data exactly (the hospital's coded values). ``discharge_dispositions`` is only known at
    discharge: use it with ``prediction_time.anchor: discharge`` (it is refused for earlier predictions).
    """

    min_age_years: int = Field(18, ge=0)
    max_age_years: int | None = Field(None, ge=0)
    units: list[str] | None = Field(None, min_length=1)
    unit_types: list[Literal["ICU", "STEP_DOWN", "WARD", "ED", "OTHER"]] | None = Field(
        None,
        min_length=1,
        description="keep stays whose unit is of these types (the site mapping's unit types)",
    )
    admission_types: list[str] | None = Field(None, min_length=1)
    sites: list[str] | None = Field(None, min_length=1)
    discharge_dispositions: list[str] | None = Field(None, min_length=1)
    min_observed_hours: float = Field(
        0, ge=0, description="hours the stay must have been observed (since admission) by the prediction time"
    )
    no_prior_codes: list[str] = Field(
        [], description="exclude patients with any of these codes (any earlier stay or earlier in this one)"
    )
    inclusion: str
    exclusion: str

    @field_validator("min_age_years", "max_age_years")
    @classmethod
    def _below_the_age_cap(cls, v: int | None) -> int | None:
        if v is not None and v > AGE_CAP_YEARS:
            raise ValueError(
                f"must be at most {AGE_CAP_YEARS}: de-identified ages are capped at {AGE_CAP_YEARS} ('90+'), so "
                f"a minimum of {v} would select nobody"
            )
        return v

    @field_validator("no_prior_codes")
    @classmethod
    def _vocabulary(cls, codes: list[str]) -> list[str]:
        return _known_codes(codes, measurements_only=False)

    @model_validator(mode="after")
    def _age_range(self) -> "Population":
        if self.max_age_years is not None and self.max_age_years < self.min_age_years:
            raise ValueError("max_age_years must be at least min_age_years")
        return self


class PredictionTime(_Strict):
    """When the model is asked: an anchor of the stay plus an offset, once or repeatedly.

    Anchors: ``admission`` (hospital admission), ``icu_admission`` (the first ICU unit event of the stay),
    ``discharge`` (hospital discharge, alive), ``first_code`` (the moment the first value of ``code`` in the
    stay is available, e.g. a first lactate result). ``every_hours`` repeats the prediction during the stay
    (one row per stay and time) until the stay ends or ``max_predictions`` is reached.
    """

    anchor: Literal["admission", "icu_admission", "discharge", "first_code"] = "admission"
    code: str | None = None
    offset_hours: float = Field(0, ge=0, le=24 * 30)
    every_hours: float | None = Field(None, gt=0, le=24 * 7)
    max_predictions: int = Field(60, ge=1, le=1000)

    @field_validator("code")
    @classmethod
    def _vocabulary(cls, code: str | None) -> str | None:
        return code if code is None else _known_codes([code], measurements_only=False)[0]

    @model_validator(mode="after")
    def _anchor_fields(self) -> "PredictionTime":
        if (self.anchor == "first_code") != (self.code is not None):
            raise ValueError("code is required with anchor first_code and only then")
        if self.anchor == "discharge" and self.every_hours is not None:
            raise ValueError("every_hours repeats predictions during the stay; it cannot follow discharge")
        return self

    def describe(self) -> str:
        """Plain words, e.g. '24 h after ICU admission, then every 4 h'."""
        anchor = {
            "admission": "hospital admission",
            "icu_admission": "ICU admission",
            "discharge": "hospital discharge",
            "first_code": f"the first {plain_name(self.code or '')} result",
        }[self.anchor]
        when = f"{self.offset_hours:g} h after {anchor}" if self.offset_hours else f"at {anchor}"
        return when + (f", then every {self.every_hours:g} h during the stay" if self.every_hours else "")


class ValueRule(_Strict):
    """Which values of a code count as the event: absolute bounds, or a ratio to the patient's baseline
    (the lowest value available by the prediction time in the stay), e.g. KDIGO creatinine >= 1.5x."""

    at_least: float | None = None
    at_most: float | None = None
    at_least_times_baseline: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_rule(self) -> "ValueRule":
        if self.at_least is None and self.at_most is None and self.at_least_times_baseline is None:
            raise ValueError("give at least one of at_least, at_most, at_least_times_baseline")
        return self


class OutcomeWords(_Strict):
    """How reports, the CLI and the FHIR output name the outcome."""

    event: str = Field(description="one occurrence, e.g. 'death', 'readmission'")
    events: str = Field(description="plural, e.g. 'deaths'")
    non_events: str = Field(description="patients without it, e.g. 'survivors'")
    with_event: str = Field(description="e.g. 'patients who died'")
    without_event: str = Field(description="e.g. 'patients who survived'")


class _OutcomeBase(_Strict):
    description: str
    words: OutcomeWords | None = None


class DeathOutcome(_OutcomeBase):
    """Death before hospital discharge (``within_days`` unset) or within N days of the prediction time,
    wherever it happens (a death recorded on any stay of the patient)."""

    type: Literal["death"]
    within_days: float | None = Field(None, gt=0, le=3650)

    @property
    def outcome_code(self) -> str:
        return "death_in_hospital" if self.within_days is None else f"death_within_{self.within_days:g}d"

    @property
    def window(self) -> str:
        if self.within_days is None:
            return "until hospital discharge"
        return f"within {self.within_days:g} days of the prediction time, in or out of hospital"


class ReadmissionOutcome(_OutcomeBase):
    """A new admission of the same patient within N days after discharge of the index stay (day N counts).
    Index stays ending in death or in a transfer (``transfer_dispositions``) are excluded from the cohort."""

    type: Literal["readmission"]
    within_days: float = Field(gt=0, le=3650)
    unplanned_only: bool = False
    planned_admission_types: list[str] = ["ELECTIVE"]
    transfer_dispositions: list[str] = ["TRANSFER", "TRANSFERRED", "ACUTE_CARE_TRANSFER"]

    @property
    def outcome_code(self) -> str:
        return f"{'unplanned_' if self.unplanned_only else ''}readmission_within_{self.within_days:g}d"

    @property
    def window(self) -> str:
        kind = "unplanned " if self.unplanned_only else ""
        return f"an {kind}admission within {self.within_days:g} days after discharge (day {self.within_days:g} counts)"


class EventOutcome(_OutcomeBase):
    """A code (optionally with a value rule) occurring within ``window_hours`` after the prediction time.
    Stays that already have the event by the prediction time are excluded unless ``exclude_prevalent`` is
    false."""

    type: Literal["event"]
    code: str
    value: ValueRule | None = None
    window_hours: float = Field(gt=0, le=24 * 365)
    exclude_prevalent: bool = True

    @property
    def outcome_code(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", self.code.lower()).strip("_")
        return f"event_{slug}_within_{self.window_hours:g}h"

    @property
    def window(self) -> str:
        return f"within {self.window_hours:g} h after the prediction time"

    @field_validator("code")
    @classmethod
    def _vocabulary(cls, code: str) -> str:
        return _known_codes([code], measurements_only=False)[0]

    @model_validator(mode="after")
    def _value_rule_needs_values(self) -> "EventOutcome":
        if self.value is not None and not is_known_code(self.code, measurements_only=True):
            raise ValueError("a value rule needs a measurement code (LAB//..., VITAL//...)")
        return self


class LengthOfStayOutcome(_OutcomeBase):
    """The stay lasting more than ``beyond_hours`` after the prediction time (a death before then is not a
    prolonged stay)."""

    type: Literal["length_of_stay"]
    beyond_hours: float = Field(gt=0, le=24 * 365)

    @property
    def outcome_code(self) -> str:
        return f"stay_beyond_{self.beyond_hours:g}h"

    @property
    def window(self) -> str:
        return f"still in hospital {self.beyond_hours:g} h after the prediction time"


class SuppliedLabelOutcome(_OutcomeBase):
    """A label the hospital supplies per stay (e.g. from chart review), delivered as the optional ``labels``
    landing source and stored as ``LABEL//<label>`` events: the value of the latest one recorded for the
    stay. Stays without one wait for it (scored, not trained on)."""

    type: Literal["supplied_label"]
    label: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")

    @property
    def code(self) -> str:
        return f"LABEL//{self.label}"

    @property
    def outcome_code(self) -> str:
        return f"supplied_{self.label}"

    @property
    def window(self) -> str:
        return "as recorded by the hospital for the stay (e.g. chart review)"


Outcome = Annotated[
    DeathOutcome | ReadmissionOutcome | EventOutcome | LengthOfStayOutcome | SuppliedLabelOutcome,
    Field(discriminator="type"),
]


def _legacy_outcome(raw: object) -> object:
    """Use case files written before outcome types (``name: in_hospital_death``) still load."""
    if isinstance(raw, dict) and raw.get("name") == "in_hospital_death" and "type" not in raw:
        return {"type": "death", "description": raw.get("description", "")}
    return raw


class HistoryFeature(_Strict):
    """A feature from the patient's earlier care: the number of earlier admissions in ``days`` (``code``
    unset), or whether ``code`` occurred in the ``days`` before the prediction time (earlier stays included)."""

    days: float = Field(gt=0, le=3650)
    code: str | None = None

    @field_validator("code")
    @classmethod
    def _vocabulary(cls, code: str | None) -> str | None:
        return code if code is None else _known_codes([code], measurements_only=False)[0]


STATIC_FEATURES = ("age_years", "sex", "admission_type", "unit", "site")


class Features(_Strict):
    window_hours: list[float] = Field(min_length=1)
    aggregations: list[Literal["last", "min", "max", "mean", "count", "slope", "time_since_last"]] = Field(
        min_length=1
    )
    codes: list[str] = Field(min_length=1)
    static: list[Literal["age_years", "sex", "admission_type", "unit", "site"]] = []
    history: list[HistoryFeature] = []
    missing_indicators: bool = Field(
        True, description="Add <code>__missing_<w>h = 1 when a code has no available value in a window."
    )
    max_categories: int = Field(
        12, ge=1, le=100, description="categories of a static attribute kept (most frequent in derivation)"
    )

    @field_validator("codes")
    @classmethod
    def _codes_are_meds_codes(cls, codes: list[str]) -> list[str]:
        bad = [c for c in codes if not CODE_PATTERN.match(c)]
        if bad:
            raise ValueError(f"codes must look like LAB//<LOINC> or VITAL//<name>, got {bad}")
        if len(set(codes)) != len(codes):
            raise ValueError("codes must not repeat")
        return _known_codes(codes, measurements_only=True)


class OperatingPoint(_Strict):
    policy: Literal["min_sensitivity", "min_specificity"]
    target: float = Field(gt=0, lt=1)
    clinical_action: str | None = Field(
        None,
        min_length=3,
        max_length=300,
        description="what the team does for a patient flagged at the operating point, e.g. 'review goals of "
        "care within 12 h' (shown in the reports, the Model Facts label and each flagged RiskAssessment)",
    )


class SuccessCriteria(_Strict):
    auroc_min: float = Field(ge=0.5, le=1)
    sensitivity_min: float = Field(ge=0, le=1)
    specificity_min: float = Field(ge=0, le=1)
    calibration_slope_range: tuple[float, float] = (0.0, 10.0)
    calibration_intercept_range: tuple[float, float] | None = None
    observed_expected_range: tuple[float, float] | None = None
    brier_max: float = Field(1.0, gt=0, le=1)
    # Below these counts in the validation cohort the gate refuses: too few outcomes to judge (see
    # docs/usecases.md for why 100 of each).
    min_events: int = Field(
        100, ge=1, description="outcome events needed in the validation cohort before the minimums are judged"
    )
    min_non_events: int = Field(
        100, ge=1, description="patients without the outcome needed in the validation cohort"
    )
    # Operational limits at the operating point, judged on the validation cohort (optional).
    alerts_per_100_patient_days_max: float | None = Field(
        None, gt=0, description="flagged predictions per 100 patient-days of the stays scored"
    )
    alerts_per_unit_day_max: float | None = Field(
        None, gt=0, description="flagged predictions per ward or ICU unit per calendar day"
    )
    number_needed_to_evaluate_max: float | None = Field(
        None, ge=1, description="patients flagged per true event found (1 / PPV)"
    )

    @field_validator("calibration_slope_range", "calibration_intercept_range", "observed_expected_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] >= v[1]:
            raise ValueError("a range must be [low, high] with low < high")
        return v


class Subgroups(_Strict):
    # site: the hospital of the network (audited like a group of patients: does the model work as well in each?)
    # payer: the stay's expected payer, a socio-economic proxy (Medicaid, self-pay ...); stays whose data have
    # none (not delivered, or withheld by the privacy gate) form the group "Unknown"
    attributes: list[Literal["sex", "race_ethnicity", "age_band", "site", "payer"]] = Field(min_length=1)
    age_bands: list[int] = Field(min_length=2)
    min_cell_size: int = Field(11, ge=1)
    auroc_min: float = Field(0.5, ge=0.5, le=1)
    sensitivity_min: float = Field(0.0, ge=0, le=1)
    # A group's calibration fails when its whole 95% CI lies outside the range (see docs/usecases.md).
    observed_expected_range: tuple[float, float] = Field(
        (0.8, 1.2), description="acceptable observed/expected ratio of a group"
    )
    calibration_slope_range: tuple[float, float] = Field(
        (0.7, 1.3), description="acceptable calibration slope of a group"
    )

    @field_validator("observed_expected_range", "calibration_slope_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1]:
            raise ValueError("a range must be [low, high] with 0 < low < high")
        return v

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
    approval: Literal["panel", "automatic"] = Field(
        "panel",
        description="'panel': a challenger that passed the gate becomes champion only after a recorded sign-off "
        "(who, when, decision, note, the sha256 of the report card read); 'automatic': it becomes champion "
        "when the gate passes and the subcohort fairness verdict is pass (any other verdict waits for the "
        "panel)",
    )


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


class Operations(_Strict):
    """How the use case's predictions must run once deployed."""

    max_hours_to_prediction: float = Field(
        24.0,
        gt=0,
        description="hours from a batch landing (its first ledger entry) to its predictions being written; "
        "judged per batch by the time_to_prediction_within_limit check",
    )


class UseCase(_Strict):
    """One clinical question, its prediction time, its data, and its success criteria."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    clinical_question: str
    owner: str
    datasets: list[str] = Field(
        [],
        description="the data this question is written for (`clinical-ml run --data`: synthetic, eicu, mimic, "
        "or a hospital's own name); empty: any. `clinical-ml run` without --usecase runs the use cases "
        "written for the data it runs on.",
    )
    population: Population
    prediction_time: PredictionTime
    observation_window_hours: float = Field(gt=0)
    outcome: Annotated[Outcome, BeforeValidator(_legacy_outcome)]
    features: Features
    operating_point: OperatingPoint
    success_criteria: SuccessCriteria
    subgroups: Subgroups
    validation: Validation = Validation()
    promotion: Promotion = Promotion()
    guardrails: Guardrails = Guardrails()
    operations: Operations = Operations()
    source_sha256: str = ""

    @model_validator(mode="after")
    def _windows_fit(self) -> "UseCase":
        if max(self.features.window_hours) > self.observation_window_hours:
            raise ValueError("features.window_hours cannot exceed observation_window_hours")
        return self

    @model_validator(mode="after")
    def _parts_agree(self) -> "UseCase":
        anchor = self.prediction_time.anchor
        if self.population.discharge_dispositions is not None and anchor != "discharge":
            raise ValueError(
                "population.discharge_dispositions is only known at discharge: use it with "
                "prediction_time.anchor: discharge"
            )
        if isinstance(self.outcome, LengthOfStayOutcome) and anchor == "discharge":
            raise ValueError("outcome length_of_stay cannot be predicted at or after discharge")
        if (
            isinstance(self.outcome, DeathOutcome)
            and self.outcome.within_days is None
            and anchor == "discharge"
        ):
            raise ValueError(
                "outcome death before discharge cannot be predicted at discharge; set outcome.within_days"
            )
        return self

    @property
    def words(self) -> OutcomeWords:
        """How reports name the outcome (the file's ``outcome.words``, else the outcome type's defaults)."""
        return outcome_words(self.outcome)


# Default words per outcome type (event, events, non_events, with_event, without_event); ``{name}`` is the
# event's code name or the supplied label's name.
_DEFAULT_WORDS: dict[str, tuple[str, str, str, str, str]] = {
    "death": ("death", "deaths", "survivors", "patients who died", "patients who survived"),
    "readmission": (
        "readmission",
        "readmissions",
        "patients not readmitted",
        "patients who were readmitted",
        "patients who were not readmitted",
    ),
    "length_of_stay": (
        "prolonged stay",
        "prolonged stays",
        "shorter stays",
        "patients who stayed longer",
        "patients who left or died sooner",
    ),
    "supplied_label": (
        "positive {name}",
        "positive {name} labels",
        "patients with a negative {name} label",
        "patients labelled positive ({name})",
        "patients labelled negative ({name})",
    ),
    "event": (
        "{name} event",
        "{name} events",
        "patients without a {name} event",
        "patients with a {name} event",
        "patients without a {name} event",
    ),
}


def outcome_words(
    outcome: "DeathOutcome | ReadmissionOutcome | EventOutcome | LengthOfStayOutcome | SuppliedLabelOutcome",
) -> OutcomeWords:
    """The outcome's own words when the file gives them, else defaults of its type."""
    if outcome.words is not None:
        return outcome.words
    if isinstance(outcome, SuppliedLabelOutcome):
        name = outcome.label.replace("_", " ")
    elif isinstance(outcome, EventOutcome):
        name = plain_name(outcome.code)
    else:
        name = ""
    fields = ("event", "events", "non_events", "with_event", "without_event")
    return OutcomeWords(
        **{f: w.format(name=name) for f, w in zip(fields, _DEFAULT_WORDS[outcome.type], strict=True)}
    )


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
