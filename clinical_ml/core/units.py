"""Clinical vocabulary: canonical units, known unit variants, plausible ranges and plain-word names."""

import re
from collections.abc import Callable

# LOINC -> (plain name, canonical UCUM unit)
LAB_CODES: dict[str, tuple[str, str]] = {
    "2160-0": ("creatinine", "mg/dL"),
    "3094-0": ("urea nitrogen (BUN)", "mg/dL"),
    "2951-2": ("sodium", "mmol/L"),
    "2823-3": ("potassium", "mmol/L"),
    "2345-7": ("glucose", "mg/dL"),
    "6690-2": ("white cell count", "10*3/uL"),
    "718-7": ("hemoglobin", "g/dL"),
    "777-3": ("platelets", "10*3/uL"),
    "2524-7": ("lactate", "mmol/L"),
    "1975-2": ("bilirubin", "mg/dL"),
}

# vital code -> (plain name, canonical UCUM unit)
VITAL_CODES: dict[str, tuple[str, str]] = {
    "heart_rate": ("heart rate", "/min"),
    "systolic_bp": ("systolic blood pressure", "mm[Hg]"),
    "diastolic_bp": ("diastolic blood pressure", "mm[Hg]"),
    "mean_bp": ("mean arterial pressure", "mm[Hg]"),
    "resp_rate": ("respiratory rate", "/min"),
    "spo2": ("oxygen saturation (SpO2)", "%"),
    "temperature": ("temperature", "Cel"),
    "gcs_total": ("Glasgow Coma Scale", "{score}"),
}

# Codes the real-data adapters (eICU, MIMIC) bring beyond the landing contract's labs and vitals:
# MEDS code -> (plain name, unit). They are part of the vocabulary a use case may name.
EXTRA_CODE_NAMES: dict[str, tuple[str, str]] = {
    "LAB//2744-1": ("arterial pH", "[pH]"),
    "LAB//2703-7": ("PaO2", "mm[Hg]"),
    "LAB//2019-8": ("PaCO2", "mm[Hg]"),
    "LAB//3150-0": ("FiO2", "%"),
    "LAB//4544-3": ("hematocrit", "%"),
    "LAB//1751-7": ("albumin", "g/dL"),
    "VITAL//urine_output_24h": ("urine output over the first 24 h", "mL"),
    "VITAL//intubated": ("intubated on day 1", "{flag}"),
    "VITAL//mechanical_ventilation": ("mechanical ventilation on day 1", "{flag}"),
    "VITAL//dialysis": ("dialysis on day 1", "{flag}"),
}

# Codes of the stay itself (written by the anonymizer and the adapters, see anonymization.encounter_events):
# a prefix followed by the coded value, e.g. ``ICU_UNIT//MICU``; ``MEDS_DEATH`` alone.
STAY_CODE_PREFIXES: tuple[str, ...] = ("ADMISSION//", "ICU_UNIT//", "HOSPITAL_DISCHARGE//")
STAY_CODES: tuple[str, ...] = ("MEDS_DEATH", "MEDS_BIRTH")


def measurement_codes() -> dict[str, tuple[str, str]]:
    """Every numeric MEDS code of the vocabulary: ``LAB//<LOINC>`` and ``VITAL//<name>`` -> (name, unit)."""
    codes = {f"LAB//{k}": v for k, v in LAB_CODES.items()}
    codes |= {f"VITAL//{k}": v for k, v in VITAL_CODES.items()}
    return codes | EXTRA_CODE_NAMES


def is_known_code(code: str, *, measurements_only: bool = False) -> bool:
    """True when ``code`` is in the vocabulary: a measurement code, or (unless ``measurements_only``) a
    stay code such as ``ICU_UNIT//MICU``, ``ICU_UNIT//`` (any unit) or ``MEDS_DEATH``."""
    if code in measurement_codes():
        return True
    if measurements_only:
        return False
    return code in STAY_CODES or any(code.startswith(p) for p in STAY_CODE_PREFIXES)


# (code, delivered unit) -> conversion into the canonical unit. Anything not listed and not canonical is
# rejected as an unknown unit: guessing a unit is how a tenfold error reaches a model.
UNIT_CONVERSIONS: dict[tuple[str, str], Callable[[float], float]] = {
    ("2160-0", "umol/L"): lambda v: v / 88.42,
    ("2345-7", "mmol/L"): lambda v: v * 18.016,
    ("3094-0", "mmol/L"): lambda v: v * 2.801,
    ("temperature", "[degF]"): lambda v: (v - 32) * 5 / 9,
}

# Physiologically possible range in the canonical unit; values outside are flagged, kept raw, and not
# used as features.
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "2160-0": (0.1, 30),
    "3094-0": (1, 300),
    "2951-2": (90, 200),
    "2823-3": (1, 12),
    "2345-7": (10, 2000),
    "6690-2": (0, 500),
    "718-7": (1, 25),
    "777-3": (1, 2000),
    "2524-7": (0.1, 40),
    "1975-2": (0.05, 80),
    "heart_rate": (0, 300),
    "systolic_bp": (0, 300),
    "diastolic_bp": (0, 250),
    "mean_bp": (0, 250),
    "resp_rate": (0, 80),
    "spo2": (0, 100),
    "temperature": (25, 45),
    "gcs_total": (3, 15),
}


def canonical_unit(code: str) -> str:
    """Canonical unit of a LOINC lab code or vital code."""
    if code in LAB_CODES:
        return LAB_CODES[code][1]
    return VITAL_CODES[code][1]


def plain_name(meds_code: str) -> str:
    """Plain-word name of a MEDS code such as ``LAB//2160-0`` for reports."""
    if meds_code in EXTRA_CODE_NAMES:
        return EXTRA_CODE_NAMES[meds_code][0]
    _, _, code = meds_code.partition("//")
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
    "2160-0": (0.3, 10),
    "3094-0": (4, 150),
    "2951-2": (115, 165),
    "2823-3": (2.5, 7),
    "2345-7": (45, 600),
    "6690-2": (0.5, 80),
    "718-7": (4, 20),
    "777-3": (10, 900),
    "2524-7": (0.3, 15),
    "1975-2": (0.1, 25),
    "heart_rate": (30, 180),
    "systolic_bp": (60, 220),
    "diastolic_bp": (25, 140),
    "mean_bp": (35, 160),
    "resp_rate": (5, 50),
    "spo2": (60, 100),
    "temperature": (33, 41),
    "gcs_total": (3, 15),
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
