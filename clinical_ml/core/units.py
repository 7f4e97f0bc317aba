"""Clinical vocabulary: canonical units, known unit variants, plausible ranges and plain-word names.

The codes live in a data file (``vocabulary.yaml`` beside this module) that a hospital extends by
configuration (``CLINICAL_ML_VOCABULARY``: YAML files of the same shape merged over it); the tables below are
read from it once, when the module is imported.
"""

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

VOCABULARY_FILE = Path(__file__).with_name("vocabulary.yaml")
VOCABULARY_ENV = "CLINICAL_ML_VOCABULARY"


class VocabularyError(ValueError):
    """A vocabulary file that cannot be used, naming the file, the code and the field."""


class _Conversion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    add: float = 0.0
    multiply: float = 1.0
    divide: float = Field(1.0, gt=0)

    def __call__(self, v: Any) -> Any:  # floats and polars expressions alike
        return (v + self.add) * self.multiply / self.divide if self.add else v * self.multiply / self.divide


class VocabularyEntry(BaseModel):
    """One measurement code: plain name, canonical unit, plausible range, unit variants."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=80)
    unit: str = Field(min_length=1, max_length=20)
    plausible: tuple[float, float]
    typical_median: tuple[float, float] | None = None
    convert: dict[str, _Conversion] = {}
    # the code this one is a kind of (same section, same unit): a feature on the broader code also takes this
    # code's values (mean arterial pressure by any method), a feature on this code takes only its own
    broader: str | None = None

    @field_validator("plausible", "typical_median")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError("a range must be [low, high] with low <= high")
        return v


class NamedCode(BaseModel):
    """A code that carries no value (a procedure, an imaging modality, body part or finding): its plain name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=80)


class ImagingVocabulary(BaseModel):
    """Imaging codes: DICOM modalities and body parts (defined terms) and coded findings ``<scheme>:<code>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    modalities: dict[str, NamedCode] = {}
    body_parts: dict[str, NamedCode] = {}
    findings: dict[str, NamedCode] = {}


# ATC (WHO Anatomical Therapeutic Chemical) codes of a substance; ICD-10-PCS procedure codes; ICD-10-CM
# diagnosis codes (validated by pattern: the classification has ~70,000 codes), in their dotted form.
ATC_PATTERN = r"^[A-Z][0-9]{2}[A-Z]{2}[0-9]{2}$"
ICD10PCS_PATTERN = r"^[0-9A-HJ-NP-Z]{7}$"
ICD10CM_PATTERN = r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$"


_Entry = TypeVar("_Entry")


class Vocabulary(BaseModel):
    """Labs by LOINC, vitals by name, medications by ATC code (dose units), medication routes, procedures by
    ICD-10-PCS code and imaging codes (see ``vocabulary.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    labs: dict[str, VocabularyEntry] = {}
    vitals: dict[str, VocabularyEntry] = {}
    medications: dict[str, VocabularyEntry] = {}
    routes: dict[str, NamedCode] = {}
    procedures: dict[str, NamedCode] = {}
    imaging: ImagingVocabulary = ImagingVocabulary()

    @field_validator("labs", "vitals")
    @classmethod
    def _code_names(cls, v: dict[str, VocabularyEntry]) -> dict[str, VocabularyEntry]:
        return _keyed_by(v, r"[A-Za-z0-9_.\-]{1,40}", "codes must be 1-40 letters, digits, '_', '.', '-'")

    @field_validator("medications")
    @classmethod
    def _atc(cls, v: dict[str, VocabularyEntry]) -> dict[str, VocabularyEntry]:
        return _keyed_by(v, ATC_PATTERN, "medications are keyed by 7-character ATC codes (e.g. J01CA04)")

    @field_validator("procedures")
    @classmethod
    def _pcs(cls, v: dict[str, NamedCode]) -> dict[str, NamedCode]:
        return _keyed_by(v, ICD10PCS_PATTERN, "procedures are keyed by 7-character ICD-10-PCS codes")

    @field_validator("routes")
    @classmethod
    def _routes(cls, v: dict[str, NamedCode]) -> dict[str, NamedCode]:
        return _keyed_by(v, r"[A-Z]{2,6}", "routes are 2-6 capital letters (e.g. IV, PO)")


def _broader_checked(v: dict[str, VocabularyEntry], kind: str) -> None:
    """Each ``broader`` names a code of the same section, in the same unit, that is not itself narrower."""
    for code, e in v.items():
        top = v.get(e.broader) if e.broader is not None else None
        if e.broader is not None and (top is None or top.broader is not None or top.unit != e.unit):
            raise ValueError(
                f"{kind} {code}: broader must be a {kind} code with no broader code of its own, in the same unit"
            )


def _keyed_by(codes: dict[str, _Entry], pattern: str, rule: str) -> dict[str, _Entry]:
    """``codes`` when every key matches ``pattern`` whole, else the rule and the first offending keys."""
    bad = [c for c in codes if not re.fullmatch(pattern, c)]
    if bad:
        raise ValueError(f"{rule}: {bad[:5]}")
    return codes


_KINDS = ("labs", "vitals", "medications", "routes", "procedures")


def load_vocabulary(extensions: Sequence[Path | str] = ()) -> Vocabulary:
    """The shipped vocabulary with each extension file merged over it, code by code (an extension may add
    codes or replace a shipped code's entry). Raises :class:`VocabularyError` naming the file and field."""
    merged: dict[str, dict] = {k: {} for k in _KINDS}
    merged["imaging"] = {k: {} for k in ImagingVocabulary.model_fields}
    for path in (VOCABULARY_FILE, *map(Path, extensions)):
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            if not isinstance(raw, dict):
                raise VocabularyError(f"{path}: expected a mapping with 'labs' and/or 'vitals'")
            part = Vocabulary.model_validate(raw)
        except (OSError, yaml.YAMLError) as exc:
            raise VocabularyError(f"{path}: cannot be read ({type(exc).__name__})") from None
        except ValidationError as exc:
            where = "; ".join(".".join(map(str, e["loc"])) + f": {e['msg']}" for e in exc.errors())
            raise VocabularyError(f"{path}: {where}") from None
        for kind in _KINDS:
            merged[kind].update({k: e.model_dump() for k, e in getattr(part, kind).items()})
        for kind in ImagingVocabulary.model_fields:
            merged["imaging"][kind].update(
                {k: e.model_dump() for k, e in getattr(part.imaging, kind).items()}
            )
        clash = sorted(set(merged["labs"]) & set(merged["vitals"]))
        if clash:
            raise VocabularyError(f"{path}: codes listed both as labs and as vitals: {clash[:5]}")
    vocabulary = Vocabulary.model_validate(merged)
    try:
        for kind in ("labs", "vitals"):
            _broader_checked(getattr(vocabulary, kind), kind)
    except ValueError as exc:
        raise VocabularyError(f"{', '.join(map(str, (VOCABULARY_FILE, *extensions)))}: {exc}") from None
    return vocabulary


def _extensions() -> list[str]:
    return [p for p in os.environ.get(VOCABULARY_ENV, "").split(os.pathsep) if p]


VOCABULARY = load_vocabulary(_extensions())

# LOINC -> (plain name, canonical UCUM unit)
LAB_CODES: dict[str, tuple[str, str]] = {k: (e.name, e.unit) for k, e in VOCABULARY.labs.items()}
# vital code -> (plain name, canonical UCUM unit)
VITAL_CODES: dict[str, tuple[str, str]] = {k: (e.name, e.unit) for k, e in VOCABULARY.vitals.items()}
_ENTRIES = {**VOCABULARY.labs, **VOCABULARY.vitals}
# ATC -> (plain name, canonical dose unit); dose conversions and plausible ranges per ATC code
MEDICATION_CODES: dict[str, tuple[str, str]] = {
    k: (e.name, e.unit) for k, e in VOCABULARY.medications.items()
}
MEDICATION_CONVERSIONS: dict[tuple[str, str], Callable[[float], float]] = {
    (code, unit): conversion
    for code, e in VOCABULARY.medications.items()
    for unit, conversion in e.convert.items()
}
MEDICATION_PLAUSIBLE: dict[str, tuple[float, float]] = {
    k: e.plausible for k, e in VOCABULARY.medications.items()
}
ROUTES: dict[str, str] = {k: e.name for k, e in VOCABULARY.routes.items()}
PROCEDURE_CODES: dict[str, str] = {k: e.name for k, e in VOCABULARY.procedures.items()}
IMAGING_MODALITIES: dict[str, str] = {k: e.name for k, e in VOCABULARY.imaging.modalities.items()}
IMAGING_BODY_PARTS: dict[str, str] = {k: e.name for k, e in VOCABULARY.imaging.body_parts.items()}
IMAGING_FINDINGS: dict[str, str] = {k: e.name for k, e in VOCABULARY.imaging.findings.items()}

# Codes of the stay itself (written by the anonymizer and the adapters, see anonymization.encounter_events):
# a prefix followed by the coded value, e.g. ``ICU_UNIT//MICU``; ``MEDS_DEATH`` alone.
STAY_CODE_PREFIXES: tuple[str, ...] = ("ADMISSION//", "ICU_UNIT//", "HOSPITAL_DISCHARGE//", "LABEL//")
STAY_CODES: tuple[str, ...] = ("MEDS_DEATH", "MEDS_BIRTH")
# Codes of the further sources (clinical_ml.core.clinical_sources, clinical_ml.core.dicom): a medication's dose
# in its canonical unit, a device vital's hourly mean and its samples per hour (numeric); a diagnosis, a
# procedure, an imaging study (``IMAGING//<modality>//<body part>``) and an imaging finding (no value).
MED_PREFIX, DEVICE_PREFIX, DEVICE_RATE_PREFIX = "MED//", "DEVICE//", "DEVICE_RATE//"
DX_PREFIX, PROC_PREFIX, IMAGING_PREFIX, FINDING_PREFIX = "DX//", "PROC//", "IMAGING//", "IMAGING_FINDING//"


def measurement_codes() -> dict[str, tuple[str, str]]:
    """Every numeric MEDS code of the vocabulary -> (name, unit): ``LAB//<LOINC>``, ``VITAL//<name>``,
    ``MED//<ATC>`` (dose), ``DEVICE//<vital>`` (hourly mean of device data), ``DEVICE_RATE//<vital>``."""
    codes = {f"LAB//{k}": v for k, v in LAB_CODES.items()}
    codes |= {f"VITAL//{k}": v for k, v in VITAL_CODES.items()}
    codes |= {f"{MED_PREFIX}{k}": (f"{name} dose", unit) for k, (name, unit) in MEDICATION_CODES.items()}
    codes |= {
        f"{DEVICE_PREFIX}{k}": (f"{name} (device, hourly mean)", u) for k, (name, u) in VITAL_CODES.items()
    }
    return codes | {
        f"{DEVICE_RATE_PREFIX}{k}": (f"{name} (device samples per hour)", "/h")
        for k, (name, _) in VITAL_CODES.items()
    }


def is_known_code(code: str, *, measurements_only: bool = False) -> bool:
    """True when ``code`` is in the vocabulary: a measurement code, or (unless ``measurements_only``) a
    stay code such as ``ICU_UNIT//MICU``, ``ICU_UNIT//`` (any unit) or ``MEDS_DEATH``, a diagnosis
    ``DX//<ICD-10-CM>``, a procedure ``PROC//<ICD-10-PCS>`` of the vocabulary, an imaging study
    ``IMAGING//<modality>//<body part>`` or finding ``IMAGING_FINDING//<scheme>:<code>`` of the vocabulary."""
    if code in measurement_codes():
        return True
    if measurements_only:
        return False
    if code.startswith(DX_PREFIX):
        return re.fullmatch(ICD10CM_PATTERN, code.removeprefix(DX_PREFIX)) is not None
    if code.startswith(PROC_PREFIX):
        return code.removeprefix(PROC_PREFIX) in PROCEDURE_CODES
    if code.startswith(FINDING_PREFIX):
        return code.removeprefix(FINDING_PREFIX) in IMAGING_FINDINGS
    if code.startswith(IMAGING_PREFIX):
        modality, _, body = code.removeprefix(IMAGING_PREFIX).partition("//")
        return modality in IMAGING_MODALITIES and body in {*IMAGING_BODY_PARTS, "unmapped"}
    return code in STAY_CODES or any(code.startswith(p) for p in STAY_CODE_PREFIXES)


# MEDS code -> the broader MEDS code it is a kind of (``VITAL//mean_bp_invasive`` -> ``VITAL//mean_bp``)
BROADER_CODES: dict[str, str] = {
    f"{prefix}{code}": f"{prefix}{e.broader}"
    for prefix, entries in (("LAB//", VOCABULARY.labs), ("VITAL//", VOCABULARY.vitals))
    for code, e in entries.items()
    if e.broader is not None
}


def feature_code_members(codes: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Event code -> the feature codes among ``codes`` its values count for: each code for itself, and a
    narrower code (an arterial-line pressure) for its broader code too when that is a feature."""
    wanted = set(codes)
    members: dict[str, tuple[str, ...]] = {c: (c,) for c in codes}
    for narrow, broad in BROADER_CODES.items():
        if broad in wanted:
            members[narrow] = (*members.get(narrow, ()), broad)
    return members


# (code, delivered unit) -> conversion into the canonical unit. Anything not listed and not canonical is
# rejected as an unknown unit: guessing a unit is how a tenfold error reaches a model.
UNIT_CONVERSIONS: dict[tuple[str, str], Callable[[float], float]] = {
    (code, unit): conversion for code, e in _ENTRIES.items() for unit, conversion in e.convert.items()
}

# Physiologically possible range in the canonical unit; values outside are flagged, kept raw, and not
# used as features.
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {code: e.plausible for code, e in _ENTRIES.items()}


def canonical_unit(code: str) -> str:
    """Canonical unit of a LOINC lab code or vital code."""
    if code in LAB_CODES:
        return LAB_CODES[code][1]
    return VITAL_CODES[code][1]


def plain_name(meds_code: str) -> str:
    """Plain-word name of a MEDS code such as ``LAB//2160-0`` for reports."""
    numeric = measurement_codes().get(meds_code)
    if numeric is not None and not meds_code.startswith(("LAB//", "VITAL//")):
        return numeric[0]
    _, _, code = meds_code.partition("//")
    if meds_code.startswith(PROC_PREFIX) and code in PROCEDURE_CODES:
        return PROCEDURE_CODES[code]
    if meds_code.startswith(FINDING_PREFIX) and code in IMAGING_FINDINGS:
        return IMAGING_FINDINGS[code]
    if code in LAB_CODES:
        return LAB_CODES[code][0]
    if code in VITAL_CODES:
        return VITAL_CODES[code][0]
    return meds_code


def feature_stem(meds_code: str) -> str:
    """Column-safe stem for features of a MEDS code: ``LAB//2160-0`` -> ``creatinine``."""
    name = plain_name(meds_code)
    if name == meds_code:
        name = meds_code.replace("//", "_").lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# Where the median of one batch's values of a code (in the canonical unit) is expected to fall, per delivered
# unit and site. A median outside this band means values were sent in another unit than declared (creatinine
# in umol/L labelled mg/dL lands near 90; temperature in Fahrenheit labelled Cel near 98; SpO2 as a fraction
# near 1). Bands are wide on purpose: they catch unit switches, not sick cohorts.
TYPICAL_MEDIAN_RANGES: dict[str, tuple[float, float]] = {
    code: e.typical_median or e.plausible for code, e in _ENTRIES.items()
}

# Values that exports use for "missing". Text sentinels empty a nullable column and reject a row whose column
# is required; numeric sentinels in a value column reject the row.
MISSING_TEXT_SENTINELS: tuple[str, ...] = (
    "NA",
    "N/A",
    "n/a",
    "na",
    "#N/A",
    "NULL",
    "null",
    "Null",
    "NaN",
    "nan",
    "None",
    "none",
    "?",
    ".",
    "-",
)
MISSING_NUMERIC_SENTINELS: tuple[float, ...] = (-999.0, -9999.0, -99999.0, -99.0)


def vocabulary_markdown() -> str:
    """The measurement codes a use case may name, as a Markdown table (docs/usecases.md holds this text;
    a test keeps the two the same)."""
    lines = ["| code | name | unit |", "|---|---|---|"]
    lines += [
        f"| `{code}` | {name} | `{unit}` |" for code, (name, unit) in sorted(measurement_codes().items())
    ]
    return "\n".join(lines)
