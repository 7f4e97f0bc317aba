"""A seeded synthetic hospital that writes exports in the landing contract.

Every patient carries real-looking direct identifiers (names, MRN, birth date, address, ZIP, phone, email)
so that the anonymization boundary is exercised on every run. Three outcomes are drawn from known logistic
risk models over the physiology, each learnable from the measurements (validation AUROC about 0.7 to 0.9)
while no single measurement gives it away:

In-hospital mortality, predicted 24 h after admission
    Over the physiology at 24 h (lactate, creatinine, MAP, GCS, respiratory and heart rate, SpO2,
    bilirubin, platelets), age and the 24 h trajectory (``trend``).
30-day readmission, predicted at discharge
    Every stay discharged alive and not transferred (disposition neither ``EXPIRED`` nor ``TRANSFER``) may
    be followed by a new encounter of the same patient: an unplanned readmission within 30 days (gap at
    most 30 days after the discharge time) from a risk model over the physiology at discharge (hemoglobin,
    creatinine, BUN, sodium, heart rate), age, length of stay, admission type, prior admissions in the data
    and an unmeasured frailty; else a planned (``ELECTIVE``) readmission within 30 days; else a late return
    31 to 45 days after discharge (not a 30-day readmission: the boundary matters). A readmission is a
    stay of its own (physiology, death, further readmissions, up to ``MAX_ENCOUNTERS_PER_PATIENT`` per
    patient). It is written only when it falls inside the generated span, in the batch of its admission;
    later ones are right-censored.
Acute kidney injury (KDIGO creatinine criterion) within 48 h, predicted 24 h after admission
    From a risk model over severity, age, MAP, lactate, baseline creatinine and trajectory, creatinine rises
    to 1.6 to 3 times its baseline from an onset that lies between 24 h and 56 h after admission (a few
    onsets lie before 24 h: those stays already meet the criterion at the prediction time). Creatinine is
    drawn every 10 h (never more than 12 h apart) through the first 72 h, so the rise is observable.

Labs are drawn every 10 h for the first 72 h, then daily until discharge; vitals hourly for the first 48 h,
then every 4 h until discharge, so the last day before discharge is measured. Batch ``b`` holds the
admissions of days ``[b * days_per_batch, (b + 1) * days_per_batch)`` from ``start_date``, with all their
labs and vitals (even those charted after the batch's last day).

Scenarios
---------
``default``
    Stationary case mix, every site declares its units.
``drift``
    From ``drift_from_batch`` on, three changes (``drift_changes``, all by default), each declared in the
    manifest with where it shows in the exports: the lactate assay reads ``LACTATE_ASSAY_BIAS`` mmol/L higher
    at every site (``assay_change``); patients first admitted from then on are ``DRIFT_AGE_YEARS`` older
    (``age_shift``: their birth dates, capped at 103 years of age); every admission from then on is
    ``DRIFT_SEVERITY_SD`` standard deviations sicker (``severity_shift``: more deaths).
``bias``
    Patients of ``BIAS_GROUP`` are under-measured (lactate drawn a third as often), their pulse oximetry
    over-reads by ``SPO2_OVERREAD`` points (occult hypoxaemia), and part of their risk is visible in no
    measurement (``UNMEASURED_RISK_LOGIT``, under-triage), so a model misses more of their deaths.

The ground truth (scenario, outcome rates as drawn and as a correct labeller finds them in the exports,
risk model descriptions) is written to ``_manifest.json`` at the root of the output folder.
"""

import dataclasses
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from faker import Faker

from clinical_ml.core.landing import IMAGING_FOLDER
from clinical_ml.core.storage import sha256_file

Scenario = Literal["default", "drift", "bias"]

COMPLETION_MARKER = "_SUCCESS"
MANIFEST_NAME = "_manifest.json"
SOURCES = ("patients", "encounters", "labs", "vitals")

LACTATE_ASSAY_BIAS = 0.8
DRIFT_AGE_YEARS = 6.0
DRIFT_SEVERITY_SD = 0.35
MAX_AGE_YEARS = 103
DriftChange = Literal["assay_change", "age_shift", "severity_shift"]
DRIFT_CHANGES: tuple[DriftChange, ...] = ("assay_change", "age_shift", "severity_shift")
SPO2_OVERREAD = 3.0
UNMEASURED_RISK_LOGIT = 1.6
BIAS_GROUP = {"race": "Black or African American"}

EXPIRED = "EXPIRED"
TRANSFER = "TRANSFER"
PLANNED_ADMISSION_TYPE = "ELECTIVE"
MAX_ENCOUNTERS_PER_PATIENT = 4
READMISSION_DAYS = 30
PLANNED_READMISSION_P = 0.03
PLANNED_GAP_DAYS = (5.0, 30.0)
LATE_RETURN_P = 0.07
LATE_RETURN_GAP_DAYS = (31.0, 45.0)
AKI_RATIO = 1.5
AKI_PREDICTION_HOURS = 24
AKI_WINDOW_HOURS = 48
CREATININE_LOINC = "2160-0"

RACES = (
    ("White", 0.64),
    ("Black or African American", 0.16),
    ("Asian", 0.07),
    ("American Indian or Alaska Native", 0.015),
    ("Native Hawaiian or Other Pacific Islander", 0.005),
    ("Other", 0.04),
    ("Unknown", 0.07),
)
# A hospital network draws most patients from a few nearby three-digit ZIP areas (036 is a restricted one).
CATCHMENT_ZIP3 = (
    ("021", 0.30),
    ("024", 0.18),
    ("018", 0.14),
    ("019", 0.12),
    ("017", 0.10),
    ("020", 0.08),
    ("036", 0.03),
    ("100", 0.03),
    ("606", 0.02),
)
ADMISSION_TYPES = (("EMERGENCY", 0.72), ("URGENT", 0.12), ("ELECTIVE", 0.16))
# Expected payer of the stay (a socio-economic proxy the fairness audit can use), as in US ICU case mixes: nearly
# everyone 65 or over is on Medicare; under 65, private insurance, Medicaid (more often for Black and
# Hispanic patients, as in US coverage surveys) and the uninsured (self-pay). Drawn per patient from its own
# random stream (PAYER_STREAM), so the other files of a seed do not change; readmissions keep the payer.
PAYERS_65_AND_OVER = (
    ("Medicare", 0.86),
    ("Private", 0.05),
    ("Medicaid", 0.03),
    ("Other government", 0.04),
    ("Self-pay", 0.01),
    ("Other", 0.005),
    ("Unknown", 0.005),
)
PAYERS_UNDER_65 = (
    ("Private", 0.46),
    ("Medicaid", 0.27),
    ("Medicare", 0.10),
    ("Self-pay", 0.09),
    ("Other government", 0.04),
    ("Other", 0.02),
    ("Unknown", 0.02),
)
PAYERS_UNDER_65_BLACK_OR_HISPANIC = (
    ("Private", 0.33),
    ("Medicaid", 0.38),
    ("Medicare", 0.10),
    ("Self-pay", 0.11),
    ("Other government", 0.04),
    ("Other", 0.02),
    ("Unknown", 0.02),
)
PAYER_STREAM = 0x50415952
UNPLANNED_ADMISSION_TYPES = (("EMERGENCY", 0.85), ("URGENT", 0.15))
ALIVE_DISPOSITIONS = (("HOME", 0.53), ("SNF", 0.24), ("REHAB", 0.11), ("HOSPICE", 0.07), (TRANSFER, 0.05))
UNITS = (("MICU", 0.4), ("SICU", 0.25), ("CCU", 0.2), ("NEURO_ICU", 0.15))

# (LOINC, name, unit, conversion from canonical unit) per lab; canonical units are the ones listed.
LABS = {
    "creatinine": ("2160-0", "Creatinine", "mg/dL"),
    "bun": ("3094-0", "Urea nitrogen", "mg/dL"),
    "sodium": ("2951-2", "Sodium", "mmol/L"),
    "potassium": ("2823-3", "Potassium", "mmol/L"),
    "glucose": ("2345-7", "Glucose", "mg/dL"),
    "wbc": ("6690-2", "Leukocytes", "10*3/uL"),
    "hemoglobin": ("718-7", "Hemoglobin", "g/dL"),
    "platelets": ("777-3", "Platelets", "10*3/uL"),
    "lactate": ("2524-7", "Lactate", "mmol/L"),
    "bilirubin": ("1975-2", "Bilirubin total", "mg/dL"),
}
CREATININE_UMOL_PER_MGDL = 88.42
VITALS = {
    "heart_rate": "/min",
    "systolic_bp": "mm[Hg]",
    "diastolic_bp": "mm[Hg]",
    "mean_bp": "mm[Hg]",
    "resp_rate": "/min",
    "spo2": "%",
    "temperature": "Cel",
    "gcs_total": "{score}",
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic hospital.

    Parameters
    ----------
    n_patients
        Distinct patients, each first admitted on a uniformly drawn day of the span; readmissions (see the
        module docstring) add encounters of the same patients.
    n_batches
        Batches, one folder each, starting at ``start_date``.
    n_sites
        Hospitals of the network. Odd-numbered sites report creatinine in umol/L, every third site
        reports temperature in degrees Fahrenheit.
    seed
        Everything is a function of this seed.
    scenario
        ``default``, ``drift`` or ``bias`` (see the module docstring).
    start_date
        First day of the first batch.
    drift_from_batch
        First affected batch (0-based) of the ``drift`` scenario; the middle batch when not given.
    drift_changes
        The changes the ``drift`` scenario injects (see the module docstring); all of them by default.
    days_per_batch
        Days of admissions per batch: batch ``b`` covers days ``[b * d, (b + 1) * d)`` from ``start_date``,
        so the data span ``n_batches * days_per_batch`` days. 30-day readmissions need a span of months
        (e.g. 5 batches of 14 days); the drift replay keeps daily batches.
    more_sources
        Also write medications, diagnoses, procedures and minute-level device vitals (their own random stream:
        the other files of a seed do not change). Off by default, which keeps the many small test hospitals
        small; the demo asks for them.
    imaging
        Also write DICOM headers of imaging studies under ``<batch>/imaging/``, listed in the batch's marker
        (their own random stream too). Off by default for the small test hospitals; the demo asks for them.
    """

    n_patients: int = 2000
    n_batches: int = 5
    n_sites: int = 3
    seed: int = 7
    scenario: Scenario = "default"
    start_date: date = date(2026, 1, 5)
    drift_from_batch: int | None = None
    drift_changes: tuple[DriftChange, ...] = DRIFT_CHANGES
    days_per_batch: int = 1
    more_sources: bool = False
    imaging: bool = False

    def __post_init__(self) -> None:
        if self.n_patients < 10:
            raise ValueError("n_patients must be at least 10")
        if self.n_batches < 1 or self.n_sites < 1:
            raise ValueError("n_batches and n_sites must be at least 1")
        if self.days_per_batch < 1:
            raise ValueError("days_per_batch must be at least 1")
        if self.scenario not in ("default", "drift", "bias"):
            raise ValueError(f"unknown scenario {self.scenario!r}; expected default, drift or bias")
        unknown = sorted(set(self.drift_changes) - set(DRIFT_CHANGES))
        if unknown:
            raise ValueError(f"unknown drift change(s) {unknown}; expected some of {list(DRIFT_CHANGES)}")

    @property
    def first_drift_batch(self) -> int | None:
        if self.scenario != "drift":
            return None
        return self.drift_from_batch if self.drift_from_batch is not None else self.n_batches // 2

    def drifts(self, change: DriftChange) -> bool:
        """Whether the scenario injects ``change``."""
        return self.first_drift_batch is not None and change in self.drift_changes

    @property
    def span_days(self) -> int:
        """Days from ``start_date`` to the end (exclusive) of the last batch."""
        return self.n_batches * self.days_per_batch


@dataclass(frozen=True)
class SyntheticHospital:
    """What the generator wrote: batch folders in order and the scenario's ground truth."""

    root: Path
    batch_ids: tuple[str, ...]
    manifest: dict


def batch_id_for(start: date, index: int, *, days_per_batch: int = 1) -> str:
    """The ISO date of the first day of batch ``index``."""
    return (start + timedelta(days=index * days_per_batch)).isoformat()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _choice(rng: np.random.Generator, options: tuple[tuple[str, float], ...], size: int) -> np.ndarray:
    labels = np.array([o[0] for o in options])
    probs = np.array([o[1] for o in options])
    return labels[rng.choice(len(labels), size=size, p=probs / probs.sum())]


def _patients(cfg: SyntheticConfig, rng: np.random.Generator) -> pl.DataFrame:
    n = cfg.n_patients
    fake = Faker("en_US")
    fake.seed_instance(cfg.seed)
    sex = np.where(rng.random(n) < 0.56, "M", "F")
    # ICU case mix: median mid-60s, a tail past 90 that Safe Harbor must aggregate.
    age = np.clip(rng.normal(63, 17, n), 18, 103)
    age = np.where(rng.random(n) < 0.04, rng.uniform(90, 103, n), age)
    hispanic = rng.random(n) < 0.11
    mrns = rng.choice(10**8, size=n, replace=False)
    first_names = [fake.first_name_male() if s == "M" else fake.first_name_female() for s in sex]
    return pl.DataFrame(
        {
            "mrn": [f"{m:08d}" for m in mrns],
            "first_name": first_names,
            "last_name": [fake.last_name() for _ in range(n)],
            "sex": sex,
            "race": _choice(rng, RACES, n),
            "ethnicity": np.where(hispanic, "Hispanic or Latino", "Not Hispanic or Latino"),
            "age_at_first_admission": age,
            "address": [fake.street_address() for _ in range(n)],
            "zip": [
                f"{z3}{d:02d}"
                for z3, d in zip(_choice(rng, CATCHMENT_ZIP3, n), rng.integers(0, 100, n), strict=True)
            ],
            "phone": [f"({rng.integers(201, 990)}) 555-{rng.integers(0, 10000):04d}" for _ in range(n)],
            "email": [f"{fake.user_name()}{i}@example.org" for i in range(n)],
        }
    )


def _payers(patients: pl.DataFrame, *, seed: int) -> np.ndarray:
    """Each patient's payer, by age at first admission and race/ethnicity (:data:`PAYERS_UNDER_65` ...)."""
    rng = np.random.default_rng([seed, PAYER_STREAM])
    n = patients.height
    older = patients["age_at_first_admission"].to_numpy() >= 65
    minority = (patients["race"].to_numpy() == "Black or African American") | (
        patients["ethnicity"].to_numpy() == "Hispanic or Latino"
    )
    return np.select(
        [older, minority],
        [_choice(rng, PAYERS_65_AND_OVER, n), _choice(rng, PAYERS_UNDER_65_BLACK_OR_HISPANIC, n)],
        _choice(rng, PAYERS_UNDER_65, n),
    )


def _new_encounters(
    cfg: SyntheticConfig,
    patients: pl.DataFrame,
    rng: np.random.Generator,
    *,
    patient_index: np.ndarray,
    admit_s: np.ndarray,
    admission_type: np.ndarray,
    prior: np.ndarray,
) -> pl.DataFrame:
    """Encounters admitted ``admit_s`` seconds after the start of the span, in the batch of that day."""
    m = patient_index.size
    batch = admit_s // (86400 * cfg.days_per_batch)
    # the patient's own age (older new patients of a drift are older in their birth date too)
    age = patients["age_at_first_admission"].to_numpy()[patient_index] + admit_s / (86400 * 365.25)
    drift_from = cfg.first_drift_batch
    sicker = cfg.drifts("severity_shift") and drift_from is not None
    shifted = (batch >= drift_from) if sicker else np.zeros(m, dtype=bool)
    return pl.DataFrame(
        {
            "patient_index": patient_index,
            "batch": batch,
            "admit_s": admit_s,
            "prior_admissions": prior,
            "age": age,
            "admission_type": admission_type,
            "unit": _choice(rng, UNITS, m),
            "site": [f"SITE_{chr(ord('A') + s)}" for s in rng.integers(0, cfg.n_sites, m)],
            "severity_shift": shifted,
        },
        schema_overrides={"batch": pl.Int64, "admit_s": pl.Int64, "prior_admissions": pl.Int64},
    )


def _first_encounters(
    cfg: SyntheticConfig, patients: pl.DataFrame, rng: np.random.Generator
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each patient's first admission in the data, on a uniformly drawn day of the span; the patients with
    the drift's age shift applied to those first admitted from its first batch on."""
    n = patients.height
    day = rng.integers(0, cfg.span_days, n)
    admit_s = day * 86400 + rng.integers(0, 86400, n)
    if cfg.drifts("age_shift"):
        # a shift of who comes in (new patients are older), so it is in their birth date: an admission's age
        # and every later one follow from it (drawn no random number: the other files of a seed keep theirs)
        new_after = day // cfg.days_per_batch >= (cfg.first_drift_batch or 0)
        age = patients["age_at_first_admission"].to_numpy()
        older = np.where(new_after, np.minimum(age + DRIFT_AGE_YEARS, MAX_AGE_YEARS), age)
        patients = patients.with_columns(pl.Series("age_at_first_admission", older))
    return patients, _new_encounters(
        cfg,
        patients,
        rng,
        patient_index=np.arange(n),
        admit_s=admit_s.astype(np.int64),
        admission_type=_choice(rng, ADMISSION_TYPES, n),
        prior=np.zeros(n, dtype=np.int64),
    )


def _physiology(
    enc: pl.DataFrame, patients: pl.DataFrame, rng: np.random.Generator, *, scenario: str = "default"
) -> dict:
    """Latent severity and the true state at 24 h; mortality and acute kidney injury from their known
    risk models."""
    m = enc.height
    age = enc["age"].to_numpy()
    adm = enc["admission_type"].to_numpy()
    shifted = enc["severity_shift"].to_numpy()
    sev = (
        rng.normal(0, 1, m)
        + 0.012 * (age - 63)
        + np.where(adm == "ELECTIVE", -0.7, 0.0)
        + np.where(adm == "EMERGENCY", 0.15, 0.0)
        + np.where(shifted, DRIFT_SEVERITY_SD, 0.0)
    )
    trend = rng.normal(0, 0.45, m)  # severity units per day: deteriorating (+) or recovering (-)
    t = {
        "heart_rate": 86 + 9 * sev + rng.normal(0, 11, m),
        "mean_bp": 82 - 6 * sev + rng.normal(0, 9, m),
        "resp_rate": 18 + 2.5 * sev + rng.normal(0, 3.5, m),
        "spo2": np.minimum(99.5, 96.5 - 1.3 * sev + rng.normal(0, 1.4, m)),
        "temperature": 37.0 + rng.normal(0, 0.55, m) + 0.25 * sev * rng.choice([-1.0, 1.0], m),
        "gcs_total": np.clip(14.6 - 1.6 * np.maximum(sev, 0) * rng.uniform(0.3, 1.4, m), 3, 15),
        "lactate": np.exp(np.log(1.5) + 0.28 * sev + rng.normal(0, 0.32, m)),
        "creatinine": np.exp(np.log(1.0) + 0.25 * sev + 0.005 * (age - 63) + rng.normal(0, 0.38, m)),
        "bun": np.exp(np.log(19) + 0.22 * sev + 0.006 * (age - 63) + rng.normal(0, 0.4, m)),
        "sodium": 139 + rng.normal(0, 4, m),
        "potassium": 4.1 + 0.12 * sev + rng.normal(0, 0.5, m),
        "glucose": 135 + 14 * sev + rng.normal(0, 35, m),
        "wbc": np.exp(np.log(9.5) + 0.17 * sev + rng.normal(0, 0.38, m)),
        "hemoglobin": 11.6 - 0.45 * sev + rng.normal(0, 1.6, m),
        "platelets": np.exp(np.log(215) - 0.15 * sev + rng.normal(0, 0.42, m)),
        "bilirubin": np.exp(np.log(0.8) + 0.22 * sev + rng.normal(0, 0.55, m)),
    }
    # The known risk model: a logistic function of the physiology at 24 h, age and trajectory.
    logit = (
        -3.45
        + 0.032 * (age - 63)
        + 0.85 * (np.log(t["lactate"]) - np.log(1.5)) / 0.42
        + 0.55 * (np.log(t["creatinine"]) - 0.0) / 0.46
        - 0.40 * (t["mean_bp"] - 82) / 10
        + 0.45 * (15 - t["gcs_total"]) / 2
        + 0.30 * (t["resp_rate"] - 18) / 4
        + 0.25 * (t["heart_rate"] - 86) / 13
        - 0.30 * (t["spo2"] - 96.5) / 1.8
        + 0.20 * (np.log(t["bilirubin"]) - np.log(0.8)) / 0.6
        - 0.20 * (np.log(t["platelets"]) - np.log(215)) / 0.45
        + 0.90 * trend
    )
    if scenario == "bias":
        # Under-triage: part of the affected group's risk is not visible in any measurement (later
        # presentation, access barriers), so a model calibrated on everyone under-estimates it.
        group = patients["race"].to_numpy()[enc["patient_index"].to_numpy()] == BIAS_GROUP["race"]
        logit = logit + np.where(group, UNMEASURED_RISK_LOGIT, 0.0)
    risk = _sigmoid(logit)
    died = rng.random(m) < risk
    # Acute kidney injury: hypoperfusion (MAP, lactate), severity, age, a modest share for a high baseline
    # creatinine, and a deteriorating trajectory. Most onsets lie after the 24 h prediction time.
    aki_logit = (
        -2.55
        + 0.75 * sev
        + 0.02 * (age - 63)
        - 0.45 * (t["mean_bp"] - 82) / 10
        + 0.45 * (np.log(t["lactate"]) - np.log(1.5)) / 0.42
        + 0.20 * np.log(t["creatinine"]) / 0.46
        + 1.4 * trend
    )
    aki_risk = _sigmoid(aki_logit)
    aki = rng.random(m) < aki_risk
    onset = np.where(rng.random(m) < 0.12, rng.uniform(3, 20, m), rng.uniform(24, 56, m))
    return {
        "severity": sev,
        "trend": trend,
        "true": t,
        "risk": risk,
        "died": died,
        "aki_risk": aki_risk,
        "aki": aki,
        "aki_onset_h": onset,
        "aki_peak": rng.uniform(1.6, 3.0, m),  # times the baseline creatinine
        "aki_ramp_h": rng.uniform(8, 20, m),
        "aki_residual": rng.uniform(0.1, 0.6, m),  # share of the rise left once it has resolved
    }


def _stay_times(enc: pl.DataFrame, phys: dict, rng: np.random.Generator) -> pl.DataFrame:
    """Length of stay, disposition and death; adds the stay's end and its trajectory to ``phys``."""
    m = enc.height
    died = phys["died"]
    # A few deaths happen before the 24 h prediction time (excluded by the use case), most later.
    death_h = np.where(rng.random(m) < 0.12, rng.uniform(2, 23.5, m), 24 + rng.exponential(110, m))
    alive_los_h = np.where(rng.random(m) < 0.08, rng.uniform(4, 23.5, m), rng.lognormal(np.log(85), 0.6, m))
    # Nobody goes home while their kidneys are failing: an injury prolongs the stay past its course.
    aki_stay_h = phys["aki_onset_h"] + rng.uniform(36, 120, m)
    alive_los_h = np.where(phys["aki"], np.maximum(alive_los_h, aki_stay_h), alive_los_h)
    los_h = np.where(died, death_h, np.maximum(alive_los_h, 4))
    los_s = np.floor(los_h * 3600).astype(np.int64)
    disposition = np.where(died, EXPIRED, _choice(rng, ALIVE_DISPOSITIONS, m))
    # Deaths are charted at or a few minutes before the discharge time of the stay.
    death_s = los_s - np.floor(rng.uniform(0, 20, m) * 60).astype(np.int64)
    # After 72 h the state moves from its 72 h value to the one at discharge: survivors recover (with a
    # spread that matters for readmission), deaths deteriorate.
    shift_72 = 2 * phys["trend"]
    phys["shift_end"] = np.where(
        died, np.maximum(shift_72, 0) + 1.0, -0.4 + 0.3 * phys["trend"] + rng.normal(0, 0.5, m)
    )
    phys["los_h"] = los_s / 3600
    return enc.with_columns(
        pl.Series("discharge_s", enc["admit_s"].to_numpy() + los_s),
        pl.Series("discharge_disposition", disposition),
        pl.Series("death_s", np.where(died, enc["admit_s"].to_numpy() + death_s, -1)),
        pl.Series("los_hours", los_s / 3600),
    )


def _shift(phys: dict, rows: np.ndarray, hours: np.ndarray) -> np.ndarray:
    """Change of severity since 24 h: the 24 h trend up to 72 h, then a linear move to the end state."""
    trend = phys["trend"][rows]
    early = trend * (np.minimum(hours, 72) - 24) / 24
    late = np.clip((hours - 72) / np.maximum(phys["los_h"][rows] - 72, 24), 0, 1)
    return np.where(hours <= 72, early, early + (phys["shift_end"][rows] - early) * late)


def _kidney_ratio(phys: dict, rows: np.ndarray, hours: np.ndarray) -> np.ndarray:
    """Creatinine over its baseline: a rise from the onset to the peak, a plateau of a day, then a partial
    recovery over two days."""
    since = hours - phys["aki_onset_h"][rows]
    rise = np.clip(since / phys["aki_ramp_h"][rows], 0, 1)
    recover = np.clip((since - phys["aki_ramp_h"][rows] - 24) / 48, 0, 1)
    level = (phys["aki_peak"][rows] - 1) * rise * (1 - (1 - phys["aki_residual"][rows]) * recover)
    return 1 + np.where(phys["aki"][rows], level, 0.0)


def _true_value(phys: dict, name: str, rows: np.ndarray, hours: np.ndarray) -> np.ndarray:
    """True value (before measurement noise) of a variable at ``hours`` after admission."""
    base = phys["true"][name][rows]
    per_severity = {"heart_rate": 9, "mean_bp": -6, "resp_rate": 2.5, "spo2": -1.3, "gcs_total": -1.2}
    shift = _shift(phys, rows, hours)
    if name in per_severity:
        return base + per_severity[name] * shift
    if name in ("lactate", "bun", "bilirubin", "wbc"):
        value = base * np.exp(0.25 * shift)
        return value * _kidney_ratio(phys, rows, hours) ** 0.6 if name == "bun" else value
    if name == "creatinine":
        # Creatinine follows the kidneys more than the overall severity, so that only an injury (not the
        # trajectory or the assay noise) moves it past 1.5 times its baseline.
        return base * np.exp(0.08 * shift) * _kidney_ratio(phys, rows, hours)
    return base.copy()


def _value_at(
    phys: dict, name: str, rows: np.ndarray, hours: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Measured value of a variable at ``hours`` after admission for encounter ``rows``."""
    value = _true_value(phys, name, rows, hours)
    noise = {
        "heart_rate": 5,
        "mean_bp": 5,
        "resp_rate": 2,
        "spo2": 1.0,
        "temperature": 0.2,
        "gcs_total": 0.6,
        "sodium": 1.5,
        "potassium": 0.2,
        "glucose": 15,
        "hemoglobin": 0.4,
    }.get(name)
    if noise is not None:
        return value + rng.normal(0, noise, value.size)
    return value * np.exp(rng.normal(0, 0.05 if name == "creatinine" else 0.1, value.size))


def _next_encounters(
    cfg: SyntheticConfig, enc: pl.DataFrame, phys: dict, patients: pl.DataFrame, rng: np.random.Generator
) -> tuple[pl.DataFrame, dict]:
    """Draw what follows each stay discharged alive and not transferred, and the encounters of those that
    fall inside the span.

    Returns the new encounters and, per stay of ``enc``, the drawn outcome: ``readmit_risk`` (the 30-day
    unplanned readmission risk model), ``readmit_kind`` (``unplanned``, ``planned``, ``late`` or empty) and
    ``readmit_eligible``.
    """
    m = enc.height
    rows = np.arange(m)
    los_h = phys["los_h"]
    at_discharge = {
        name: _true_value(phys, name, rows, los_h)
        for name in ("hemoglobin", "creatinine", "bun", "sodium", "heart_rate")
    }
    adm = enc["admission_type"].to_numpy()
    prior = enc["prior_admissions"].to_numpy()
    frailty = patients["frailty"].to_numpy()[enc["patient_index"].to_numpy()]
    # The known risk model of 30-day unplanned readmission, over what is known at discharge (and an
    # unmeasured frailty that also shows as prior admissions).
    logit = (
        -2.3
        + 0.02 * (enc["age"].to_numpy() - 63)
        + 0.55 * (11.6 - at_discharge["hemoglobin"]) / 1.6
        + 0.45 * np.log(at_discharge["creatinine"]) / 0.46
        + 0.25 * (np.log(at_discharge["bun"]) - np.log(19)) / 0.45
        + 0.50 * np.maximum(0, 137 - at_discharge["sodium"]) / 3
        + 0.45 * (at_discharge["heart_rate"] - 86) / 12
        + 0.30 * np.log(np.maximum(los_h, 4) / 85) / 0.6
        + np.where(adm == "EMERGENCY", 0.25, 0.0)
        + np.where(adm == "ELECTIVE", -0.45, 0.0)
        + 0.35 * np.minimum(prior, 3)
        + 0.40 * frailty
    )
    risk = _sigmoid(logit)
    disposition = enc["discharge_disposition"].to_numpy()
    eligible = (disposition != EXPIRED) & (disposition != TRANSFER)
    can_return = eligible & (prior + 1 < MAX_ENCOUNTERS_PER_PATIENT)
    unplanned = can_return & (rng.random(m) < risk)
    planned = can_return & ~unplanned & (rng.random(m) < PLANNED_READMISSION_P)
    late = can_return & ~unplanned & ~planned & (rng.random(m) < LATE_RETURN_P)
    # Most unplanned readmissions come in the first two weeks, some in the last days of the 30.
    gap_days = np.select(
        [unplanned, planned],
        [0.25 + (READMISSION_DAYS - 0.25) * rng.beta(0.9, 1.4, m), rng.uniform(*PLANNED_GAP_DAYS, m)],
        rng.uniform(*LATE_RETURN_GAP_DAYS, m),
    )
    admission_type = np.select(
        [unplanned, planned],
        [_choice(rng, UNPLANNED_ADMISSION_TYPES, m), np.full(m, PLANNED_ADMISSION_TYPE)],
        _choice(rng, ADMISSION_TYPES, m),
    )
    admit_s = enc["discharge_s"].to_numpy() + np.floor(gap_days * 86400).astype(np.int64)
    inside = (unplanned | planned | late) & (admit_s < cfg.span_days * 86400)
    drawn = {
        "readmit_risk": risk,
        "readmit_kind": np.select([unplanned, planned, late], ["unplanned", "planned", "late"], ""),
        "readmit_eligible": eligible,
    }
    nxt = _new_encounters(
        cfg,
        patients,
        rng,
        patient_index=enc["patient_index"].to_numpy()[inside],
        admit_s=admit_s[inside],
        admission_type=admission_type[inside],
        prior=prior[inside] + 1,
    )
    return nxt, drawn


def _take(phys: dict, order: np.ndarray) -> dict:
    return {k: _take(v, order) if isinstance(v, dict) else v[order] for k, v in phys.items()}


def _concat(parts: list[dict]) -> dict:
    return {
        k: _concat([p[k] for p in parts]) if isinstance(v, dict) else np.concatenate([p[k] for p in parts])
        for k, v in parts[0].items()
    }


def _hospital_stays(
    cfg: SyntheticConfig, patients: pl.DataFrame, rng: np.random.Generator
) -> tuple[pl.DataFrame, dict, pl.DataFrame]:
    """Every encounter of the span with its physiology: first admissions, then each generation of
    readmissions, in admission order; and the patients as admitted (a drift's age shift applied)."""
    frames, states = [], []
    patients, enc = _first_encounters(cfg, patients, rng)
    while enc.height:
        phys = _physiology(enc, patients, rng, scenario=cfg.scenario)
        enc = _stay_times(enc, phys, rng)
        nxt, drawn = _next_encounters(cfg, enc, phys, patients, rng)
        frames.append(enc)
        states.append(phys | drawn)
        enc = nxt
    all_enc = pl.concat(frames)
    order = np.argsort(all_enc["admit_s"].to_numpy(), kind="stable")
    all_enc = all_enc[order]
    ids = rng.choice(10**10, size=all_enc.height, replace=False)
    all_enc = all_enc.with_columns(pl.Series("encounter_id", [f"{x:010d}" for x in ids]))
    return all_enc, _take(_concat(states), order), patients


def _clock(start: datetime, seconds: np.ndarray) -> np.ndarray:
    """Wall-clock times ``seconds`` after ``start`` (whole seconds, as the exports write them)."""
    return np.datetime64(start, "us") + seconds.astype("timedelta64[s]").astype("timedelta64[us]")


def _labs(
    cfg: SyntheticConfig,
    enc: pl.DataFrame,
    phys: dict,
    black: np.ndarray,
    rng: np.random.Generator,
    *,
    start: datetime,
) -> pl.DataFrame:
    los_h = enc["los_hours"].to_numpy()
    # Every 10 h through 72 h (at most 1 h early or late, so draws are never more than 12 h apart), then
    # daily until discharge.
    draws_per = 8 + np.maximum(0, np.ceil((los_h - 71) / 24)).astype(int)
    rows = np.repeat(np.arange(enc.height), draws_per)
    k = np.arange(rows.size) - np.repeat(np.cumsum(draws_per) - draws_per, draws_per)
    hours = np.where(
        k < 8,
        1.0 + 10 * k + rng.uniform(-1, 1, rows.size),
        71.0 + 24 * (k - 7) + rng.uniform(-2, 2, rows.size),
    )
    hours = np.clip(hours, 0.2, None)
    keep = hours < los_h[rows]
    rows, hours, k = rows[keep], hours[keep], k[keep]
    frames = []
    admit_s = enc["admit_s"].to_numpy()
    site_idx = np.array([ord(s[-1]) - ord("A") for s in enc["site"].to_list()])
    batch = enc["batch"].to_numpy()
    drift_from = cfg.first_drift_batch
    for name, (loinc, _, unit) in LABS.items():
        p_row = np.where(
            k < 8,
            {"lactate": 0.55, "bilirubin": 0.35, "creatinine": 1.0}.get(name, 0.93),
            {"lactate": 0.3, "bilirubin": 0.35}.get(name, 0.93),
        )
        if name != "creatinine":  # every creatinine of the first 72 h is drawn: the injury must be observable
            p_row[k == 0] = 0.97 if name != "bilirubin" else 0.6
        if name == "lactate" and cfg.scenario == "bias":
            p_row = np.where(black[rows], p_row / 3, p_row)
        take = rng.random(rows.size) < p_row
        r, h = rows[take], hours[take]
        value = _value_at(phys, name, r, h, rng)
        if name == "lactate" and drift_from is not None and cfg.drifts("assay_change"):
            value = np.where(batch[r] >= drift_from, value + LACTATE_ASSAY_BIAS, value)
        units = np.full(r.size, unit, dtype=object)
        if name == "creatinine":
            umol = site_idx[r] % 2 == 1
            value = np.where(umol, value * CREATININE_UMOL_PER_MGDL, value)
            units = np.where(umol, "umol/L", unit)
        decimals = 0 if name in ("sodium", "platelets", "glucose", "bun") else 2
        specimen_s = admit_s[r] + np.floor(h * 3600).astype(np.int64)
        turnaround_min = rng.lognormal(np.log(25 if name == "lactate" else 55), 0.35, r.size)
        frames.append(
            pl.DataFrame(
                {
                    "encounter_id": enc["encounter_id"].to_numpy()[r],
                    "loinc_code": np.full(r.size, loinc),
                    "lab_name": np.full(r.size, LABS[name][1]),
                    "value": np.round(value, decimals),
                    "unit": units.astype(str),
                    "specimen_time": _clock(start, specimen_s),
                    "result_time": _clock(start, specimen_s + np.floor(turnaround_min * 60).astype(np.int64)),
                    "_batch": batch[r],
                }
            )
        )
    return pl.concat(frames).sort("specimen_time")


def _vitals(
    cfg: SyntheticConfig,
    enc: pl.DataFrame,
    phys: dict,
    black: np.ndarray,
    rng: np.random.Generator,
    *,
    start: datetime,
) -> pl.DataFrame:
    los_h = enc["los_hours"].to_numpy()
    # Hourly for the first 48 h, then every 4 h until discharge.
    hourly = np.maximum(1, np.floor(np.minimum(los_h, 48)).astype(int))
    later = np.where(los_h > 48, np.ceil((los_h - 48) / 4), 0).astype(int)
    per = hourly + later
    rows = np.repeat(np.arange(enc.height), per)
    j = np.arange(rows.size) - np.repeat(np.cumsum(per) - per, per)
    slot = np.where(j < hourly[rows], j, 48 + 4 * (j - hourly[rows]))
    hours = slot + rng.uniform(0, 0.25, rows.size)
    keep = hours < los_h[rows]
    rows, hours = rows[keep], hours[keep]
    admit_s = enc["admit_s"].to_numpy()
    site_idx = np.array([ord(s[-1]) - ord("A") for s in enc["site"].to_list()])
    frames = []
    for name, unit in VITALS.items():
        every = 4 if name in ("temperature", "gcs_total") else 1
        take = (np.floor(hours).astype(int) % every == 0) & (rng.random(rows.size) < 0.95)
        r, h = rows[take], hours[take]
        if name in ("systolic_bp", "diastolic_bp"):
            mbp = _value_at(phys, "mean_bp", r, h, rng)
            pulse = rng.normal(48, 9, r.size)
            value = mbp + (2 / 3 * pulse if name == "systolic_bp" else -pulse / 3)
        else:
            value = _value_at(phys, name, r, h, rng)
        units = np.full(r.size, unit, dtype=object)
        if name == "spo2":
            if cfg.scenario == "bias":
                value = np.where(black[r], value + SPO2_OVERREAD, value)
            value = np.clip(value, 70, 100)
        if name == "gcs_total":
            value = np.clip(np.round(value), 3, 15)
        if name == "temperature":
            fahrenheit = site_idx[r] % 3 == 2
            value = np.where(fahrenheit, value * 9 / 5 + 32, value)
            units = np.where(fahrenheit, "[degF]", unit)
        charted_s = admit_s[r] + np.floor(h * 3600).astype(np.int64)
        stored_s = charted_s + np.floor(rng.uniform(0.5, 20, r.size) * 60).astype(np.int64)
        frames.append(
            pl.DataFrame(
                {
                    "encounter_id": enc["encounter_id"].to_numpy()[r],
                    "code": np.full(r.size, name),
                    "value": np.round(value, 1),
                    "unit": units.astype(str),
                    "charted_time": _clock(start, charted_s),
                    "stored_time": _clock(start, stored_s),
                    "_batch": enc["batch"].to_numpy()[r],
                }
            )
        )
    return pl.concat(frames).sort("charted_time")


def _observed_readmissions(enc: pl.DataFrame, *, span_end: datetime) -> dict:
    """30-day readmission as a correct labeller finds it in the exports, over the index stays whose 30 days
    lie inside the span (the others are right-censored)."""
    window = pl.duration(days=READMISSION_DAYS)
    index = enc.filter(
        ~pl.col("discharge_disposition").is_in([EXPIRED, TRANSFER])
        & (pl.col("discharge_time") + window <= span_end)
    ).select("encounter_id", "mrn", "discharge_time")
    later = enc.select("mrn", pl.col("admit_time").alias("_admit"), pl.col("admission_type").alias("_type"))
    within = index.join(later, on="mrn").filter(
        (pl.col("_admit") > pl.col("discharge_time"))
        & (pl.col("_admit") <= pl.col("discharge_time") + window)
    )
    anyone = within["encounter_id"].n_unique()
    unplanned = within.filter(pl.col("_type") != PLANNED_ADMISSION_TYPE)["encounter_id"].n_unique()
    return {
        "observed_index_stays": index.height,
        "observed_unplanned_rate": round(unplanned / index.height, 4) if index.height else None,
        "observed_any_rate": round(anyone / index.height, 4) if index.height else None,
    }


def _observed_kidney_injury(enc: pl.DataFrame, labs: pl.DataFrame) -> dict:
    """KDIGO creatinine AKI within 48 h of the 24 h prediction time as a correct labeller finds it in the
    exports (each stay reports creatinine in one unit, so ratios need no conversion)."""
    t0 = pl.col("admit_time") + pl.duration(hours=AKI_PREDICTION_HOURS)
    stays = enc.filter(
        (pl.col("discharge_time") > t0) & (pl.col("death_time").is_null() | (pl.col("death_time") > t0))
    ).select("encounter_id", t0.alias("_t0"))
    creat = labs.filter(pl.col("loinc_code") == CREATININE_LOINC).join(stays, on="encounter_id")
    known = creat.filter(pl.col("result_time") <= pl.col("_t0")).sort("encounter_id", "specimen_time")
    prevalent = known.filter(
        pl.col("value") >= AKI_RATIO * pl.col("value").cum_min().shift(1).over("encounter_id")
    )["encounter_id"]
    baseline = known.group_by("encounter_id").agg(pl.col("value").min().alias("_baseline"))
    cohort = baseline.filter(~pl.col("encounter_id").is_in(prevalent.implode()))
    events = (
        creat.join(cohort, on="encounter_id")
        .filter(
            (pl.col("specimen_time") > pl.col("_t0"))
            & (pl.col("specimen_time") <= pl.col("_t0") + pl.duration(hours=AKI_WINDOW_HOURS))
            & (pl.col("value") >= AKI_RATIO * pl.col("_baseline"))
        )["encounter_id"]
        .n_unique()
    )
    return {
        "observed_cohort_stays": cohort.height,
        "observed_prevalent_excluded": prevalent.n_unique(),
        "observed_rate": round(events / cohort.height, 4) if cohort.height else None,
    }


# The further sources (clinical_ml.core.clinical_sources, clinical_ml.core.dicom), drawn from their own random
# stream so that the patients, stays, labs and vitals of a seed stay what they were.
MORE_SOURCES_STREAM = 16
# (ATC, dose, unit, route, every hours, share of stays): antibiotics, prophylaxis, analgesia.
SCHEDULED_MEDICATIONS = (
    ("J01DD04", 2000.0, "mg", "IV", 24, 0.35),
    ("J01CR05", 4500.0, "mg", "IV", 8, 0.25),
    ("J01XA01", 1000.0, "mg", "IV", 12, 0.2),
    ("B01AB01", 5000.0, "[iU]", "SC", 12, 0.55),
    ("N02BE01", 1000.0, "mg", "PO", 6, 0.4),
    ("C03CA01", 40.0, "mg", "IV", 12, 0.2),
)
PRIMARY_DIAGNOSES = (
    "A41.9",
    "J18.9",
    "I50.9",
    "J44.1",
    "I63.9",
    "I21.4",
    "K92.2",
    "N17.9",
    "J96.01",
    "S06.5X0A",
)
SECONDARY_DIAGNOSES = (
    "E11.9",
    "I10",
    "N18.3",
    "E87.1",
    "D64.9",
    "I48.91",
    "E78.5",
    "F10.20",
    "J96.00",
    "R65.21",
)
# Minute-level device vitals for the first hours of some stays; the site that samples every other minute.
DEVICE_CODES = ("heart_rate", "spo2")
DEVICE_HOURS = 4
DEVICE_SHARE = 0.2
SLOW_DEVICE_SITE = "SITE_B"


def _stay_arrays(enc: pl.DataFrame) -> dict[str, np.ndarray]:
    death = enc["death_s"].to_numpy()
    end = np.where(
        death >= 0, np.minimum(enc["discharge_s"].to_numpy(), death), enc["discharge_s"].to_numpy()
    )
    return {
        "admit": enc["admit_s"].to_numpy(),
        "end": end,
        "discharge": enc["discharge_s"].to_numpy(),
        "enc": enc["encounter_id"].to_numpy(),
        "batch": enc["batch"].to_numpy(),
        "site": enc["site"].to_numpy(),
    }


def _medications(enc: pl.DataFrame, phys: dict, rng: np.random.Generator, *, start: datetime) -> pl.DataFrame:
    """Scheduled doses (an eMAR) and a vasopressor infusion charted every 2 h for the sickest; some stays have no
    medication record at all (their ward was not on the eMAR yet), one site charts antibiotics in grams."""
    s = _stay_arrays(enc)
    on_emar = rng.random(enc.height) > 0.1
    frames = []
    for atc, dose, unit, route, every, share in SCHEDULED_MEDICATIONS:
        stays = np.flatnonzero(on_emar & (rng.random(enc.height) < share))
        n = np.maximum(1, ((s["end"][stays] - s["admit"][stays]) // (every * 3600)).astype(int))
        rows = np.repeat(stays, n)
        k = np.arange(rows.size) - np.repeat(np.cumsum(n) - n, n)
        t = s["admit"][rows] + 1800 + k * every * 3600 + rng.integers(0, 900, rows.size)
        ok = t < s["end"][rows]
        rows, t = rows[ok], t[ok]
        grams = (s["site"][rows] == "SITE_C") & (unit == "mg") & (atc.startswith("J01"))
        frames.append(
            pl.DataFrame(
                {
                    "encounter_id": s["enc"][rows],
                    "atc_code": np.full(rows.size, atc),
                    "dose": np.where(grams, dose / 1000, dose),
                    "dose_unit": np.where(grams, "g", unit),
                    "route": np.full(rows.size, route),
                    "admin_time": _clock(start, t),
                    "recorded_time": _clock(start, t + rng.integers(60, 1800, rows.size)),
                    "_batch": s["batch"][rows],
                }
            )
        )
    sick = np.flatnonzero(on_emar & (phys["severity"] > np.quantile(phys["severity"], 0.8)))
    n = np.maximum(1, np.minimum(12, (s["end"][sick] - s["admit"][sick]) // 7200)).astype(int)
    rows = np.repeat(sick, n)
    k = np.arange(rows.size) - np.repeat(np.cumsum(n) - n, n)
    t = s["admit"][rows] + 600 + k * 7200
    ok = t < s["end"][rows]
    rows, t = rows[ok], t[ok]
    frames.append(
        pl.DataFrame(
            {
                "encounter_id": s["enc"][rows],
                "atc_code": np.full(rows.size, "C01CA03"),
                "dose": np.round(np.clip(rng.lognormal(np.log(0.15), 0.6, rows.size), 0.01, 2.0), 3),
                "dose_unit": np.full(rows.size, "ug/kg/min"),
                "route": np.full(rows.size, "IV"),
                "admin_time": _clock(start, t),
                "recorded_time": _clock(start, t + rng.integers(60, 600, rows.size)),
                "_batch": s["batch"][rows],
            }
        )
    )
    return pl.concat(frames).sort("admin_time")


def _diagnoses(enc: pl.DataFrame, phys: dict, rng: np.random.Generator, *, start: datetime) -> pl.DataFrame:
    """An admitting diagnosis for most stays, a primary and up to four secondary ones coded one to five days
    after discharge; AKI stays carry N17.9. Some stays were never coded; one site writes codes without the dot."""
    s = _stay_arrays(enc)
    coded = rng.random(enc.height) > 0.08
    stays, codes, kinds, times = [], [], [], []
    primary = rng.choice(PRIMARY_DIAGNOSES, enc.height)
    admitting = np.flatnonzero(coded & (rng.random(enc.height) < 0.6))
    stays.append(admitting)
    codes.append(primary[admitting])
    kinds.append(np.full(admitting.size, "admitting"))
    times.append(s["admit"][admitting] + rng.integers(600, 7200, admitting.size))
    idx = np.flatnonzero(coded)
    lag = rng.integers(86400, 5 * 86400, idx.size)
    stays.append(idx)
    codes.append(primary[idx])
    kinds.append(np.full(idx.size, "primary"))
    times.append(s["discharge"][idx] + lag)
    n_sec = rng.integers(0, 5, idx.size)
    rows = np.repeat(idx, n_sec)
    sec = rng.choice(SECONDARY_DIAGNOSES, rows.size)
    stays.append(rows)
    codes.append(sec)
    kinds.append(np.full(rows.size, "secondary"))
    times.append(np.repeat(s["discharge"][idx] + lag, n_sec))
    aki = np.flatnonzero(coded & phys["aki"] & (primary != "N17.9"))
    stays.append(aki)
    codes.append(np.full(aki.size, "N17.9"))
    kinds.append(np.full(aki.size, "secondary"))
    times.append(s["discharge"][aki] + 86400)
    r = np.concatenate(stays)
    out = pl.DataFrame(
        {
            "encounter_id": s["enc"][r],
            "icd10_code": np.concatenate(codes),
            "diagnosis_type": np.concatenate(kinds),
            "recorded_time": _clock(start, np.concatenate(times)),
            "_batch": s["batch"][r],
            "_site": s["site"][r],
        }
    ).unique(["encounter_id", "icd10_code", "diagnosis_type"], keep="first", maintain_order=True)
    undotted = pl.col("_site") == "SITE_A"
    return out.with_columns(
        pl.when(undotted)
        .then(pl.col("icd10_code").str.replace(".", "", literal=True))
        .otherwise("icd10_code")
    ).drop("_site")


def _procedures(enc: pl.DataFrame, phys: dict, rng: np.random.Generator, *, start: datetime) -> pl.DataFrame:
    """Intubation and ventilation (by length), central lines, renal replacement for some AKI stays; some
    ventilation episodes have no end recorded."""
    s = _stay_arrays(enc)
    parts = []

    def add(rows: np.ndarray, code: str | np.ndarray, t0: np.ndarray, t1: np.ndarray | None) -> None:
        end = np.full(rows.size, -1) if t1 is None else np.where(rng.random(rows.size) < 0.1, -1, t1)
        parts.append(
            pl.DataFrame(
                {
                    "encounter_id": s["enc"][rows],
                    "procedure_code": np.broadcast_to(code, rows.shape),
                    "start_time": _clock(start, t0),
                    "end_time": pl.Series(_clock(start, np.maximum(end, 0))).set(pl.Series(end < 0), None),
                    "recorded_time": _clock(start, np.maximum(t0, np.where(end < 0, t0, end)) + 1800),
                    "_batch": s["batch"][rows],
                }
            )
        )

    sick = phys["severity"] > np.quantile(phys["severity"], 0.6)
    vent = np.flatnonzero(sick & (rng.random(enc.height) < 0.6))
    t0 = s["admit"][vent] + rng.integers(0, 6 * 3600, vent.size)
    t0 = np.minimum(t0, s["end"][vent] - 60)
    t1 = np.minimum(t0 + rng.integers(6, 200, vent.size) * 3600, s["end"][vent])
    hours = (t1 - t0) / 3600
    add(vent, np.full(vent.size, "0BH17EZ"), t0, None)
    add(vent, np.where(hours > 96, "5A1955Z", np.where(hours >= 24, "5A1945Z", "5A1935Z")), t0, t1)
    line = np.flatnonzero(rng.random(enc.height) < 0.45)
    add(
        line,
        "02HV33Z",
        np.minimum(s["admit"][line] + rng.integers(0, 4 * 3600, line.size), s["end"][line] - 60),
        None,
    )
    crrt = np.flatnonzero(phys["aki"] & (rng.random(enc.height) < 0.3))
    t0 = np.minimum(s["admit"][crrt] + rng.integers(24, 60, crrt.size) * 3600, s["end"][crrt] - 3600)
    add(crrt, "5A1D90Z", t0, np.minimum(t0 + rng.integers(24, 96, crrt.size) * 3600, s["end"][crrt]))
    out = pl.concat(parts).sort("start_time")
    return out.filter(pl.col("start_time") >= pl.lit(start))


def _device_vitals(
    enc: pl.DataFrame, phys: dict, rng: np.random.Generator, *, start: datetime
) -> pl.DataFrame:
    """Minute-level heart rate and SpO2 for the first hours of some stays (``SLOW_DEVICE_SITE`` samples every
    other minute), with dropped samples and a few disconnections of 10 to 30 minutes."""
    s = _stay_arrays(enc)
    stays = np.flatnonzero(rng.random(enc.height) < DEVICE_SHARE)
    frames = []
    for code in DEVICE_CODES:
        step = np.where(s["site"][stays] == SLOW_DEVICE_SITE, 120, 60)
        n = (DEVICE_HOURS * 3600 // step).astype(int)
        rows = np.repeat(stays, n)
        k = np.arange(rows.size) - np.repeat(np.cumsum(n) - n, n)
        t = s["admit"][rows] + 300 + k * np.repeat(step, n)
        gap_at = np.repeat(rng.integers(0, DEVICE_HOURS * 3600, stays.size), n)
        gap_len = np.repeat(np.where(rng.random(stays.size) < 0.3, rng.integers(600, 1800, stays.size), 0), n)
        off = (t - s["admit"][rows] >= gap_at) & (t - s["admit"][rows] < gap_at + gap_len)
        keep = (t < s["end"][rows]) & ~off & (rng.random(rows.size) > 0.03)
        rows, t = rows[keep], t[keep]
        hours = (t - s["admit"][rows]) / 3600
        value = _value_at(phys, code, rows, hours, rng) + rng.normal(0, 1.5, rows.size)
        if code == "spo2":
            value = np.clip(value, 70, 100)
        frames.append(
            pl.DataFrame(
                {
                    "encounter_id": s["enc"][rows],
                    "code": np.full(rows.size, code),
                    "value": np.round(value, 0),
                    "unit": np.full(rows.size, VITALS[code]),
                    "charted_time": _clock(start, t),
                    "_batch": s["batch"][rows],
                }
            )
        )
    return pl.concat(frames).sort("charted_time")


IMAGING_UID_ROOT = "1.2.826.0.1.3680043.8.498."
# (modality, body part, share of stays); a structured report with coded findings follows some chest images.
IMAGING_STUDIES = (("DX", "CHEST", 0.35), ("CT", "HEAD", 0.08), ("US", "ABDOMEN", 0.05))
REPORT_FINDINGS = ("233604007", "60046008", "36118008", "19242006", "2472002")


def _imaging_studies(
    enc: pl.DataFrame, patients: pl.DataFrame, rng: np.random.Generator, *, start: datetime
) -> pl.DataFrame:
    """One row per study: the stay, modality, body part, study time, and the gaps a PACS export has (no
    admission number, no body part, ultrasound with burned-in annotations), and a report's finding or none."""
    s = _stay_arrays(enc)
    parts = []
    for modality, body, share in IMAGING_STUDIES:
        rows = np.flatnonzero(rng.random(enc.height) < share)
        t = np.minimum(s["admit"][rows] + rng.integers(1800, 36 * 3600, rows.size), s["end"][rows] - 60)
        parts.append(
            pl.DataFrame(
                {
                    "_row": rows,
                    "modality": np.full(rows.size, modality),
                    "body_part": np.where(rng.random(rows.size) < 0.1, "", body),
                    "study_s": t,
                    "with_admission_id": rng.random(rows.size) > 0.15,
                    "burned_in": np.full(rows.size, modality == "US") & (rng.random(rows.size) < 0.5),
                    # gaps of real exports: a study date without its time, an ultrasound without the flag
                    "with_study_time": rng.random(rows.size) > 0.05,
                    "with_burn_in_flag": (modality != "US") | (rng.random(rows.size) > 0.2),
                    "finding": np.where(
                        (modality == "DX") & (rng.random(rows.size) < 0.5),
                        rng.choice([*REPORT_FINDINGS, "999999"], rows.size),
                        "",
                    ),
                }
            )
        )
    studies = pl.concat(parts).sort("study_s")
    pidx = enc["patient_index"].to_numpy()[studies["_row"].to_numpy()]
    return studies.with_columns(
        pl.Series("encounter_id", s["enc"][studies["_row"].to_numpy()]),
        pl.Series("_batch", s["batch"][studies["_row"].to_numpy()]),
        pl.Series("site", s["site"][studies["_row"].to_numpy()]),
        pl.Series("mrn", patients["mrn"].to_numpy()[pidx]),
        pl.Series("first_name", patients["first_name"].to_numpy()[pidx]),
        pl.Series("last_name", patients["last_name"].to_numpy()[pidx]),
        pl.Series("birth_date", patients["birth_date"].to_numpy()[pidx]),
        pl.Series("sex", patients["sex"].to_numpy()[pidx]),
        pl.Series("study_time", _clock(start, studies["study_s"].to_numpy())),
    )


def _dicom_header(study: dict, *, seed: int, number: int, report: bool):
    """A DICOM header (no pixel data, except a few bytes on burned-in ultrasound) with the identifiers a real
    one carries: the patient's name, MRN, birth date, the admission and accession numbers, the institution, the
    referring physician, a free-text description naming the patient, and a private attribute."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    uid = f"{IMAGING_UID_ROOT}{seed}.{number}"
    ds.SOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.88.22"
        if report
        else (
            "1.2.840.10008.5.1.4.1.1.1.1"
            if study["modality"] == "DX"
            else "1.2.840.10008.5.1.4.1.1.2"
            if study["modality"] == "CT"
            else "1.2.840.10008.5.1.4.1.1.6.1"
        )
    )
    ds.StudyInstanceUID = uid
    ds.SeriesInstanceUID = f"{uid}.{2 if report else 1}"
    ds.SOPInstanceUID = f"{uid}.{2 if report else 1}.1"
    ds.PatientName = f"{study['last_name']}^{study['first_name']}"
    ds.PatientID = study["mrn"]
    ds.PatientBirthDate = study["birth_date"].strftime("%Y%m%d")
    ds.PatientAge = f"{min((study['study_time'].date() - study['birth_date']).days // 365, 999):03d}Y"
    ds.PatientSex = {"F": "F", "M": "M"}.get(str(study["sex"])[:1].upper(), "O")
    if study["with_admission_id"]:
        ds.AdmissionID = study["encounter_id"]
    ds.AccessionNumber = f"A{seed % 100:02d}{number:07d}"
    ds.InstitutionName = f"{study['site']} General Hospital"
    ds.ReferringPhysicianName = f"Doe^{study['last_name'][:1]}"
    ds.StudyDescription = (
        f"{study['modality']} {study['body_part'] or ''} for {study['first_name']} {study['last_name']}"
    )
    ds.Modality = "SR" if report else study["modality"]
    if study["body_part"]:
        ds.BodyPartExamined = study["body_part"]
    ds.StudyDate = study["study_time"].strftime("%Y%m%d")
    if study.get("with_study_time", True):
        ds.StudyTime = study["study_time"].strftime("%H%M%S")
    ds.OperatorsName = f"Tech^{study['site']}"
    ds.SeriesNumber, ds.InstanceNumber = (2 if report else 1), 1
    block = ds.private_block(0x0011, "SYNTHETIC PACS", create=True)
    block.add_new(0x01, "LO", study["mrn"])
    if report:
        when = study["study_time"] + timedelta(hours=2)
        ds.ContentDate, ds.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
        ds.ValueType = "CONTAINER"
        item, concept = Dataset(), Dataset()
        item.ValueType, item.RelationshipType = "CODE", "CONTAINS"
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
            study["finding"],
            "SCT",
            "finding",
        )
        item.ConceptCodeSequence = [concept]
        ds.ContentSequence = [item]
    elif study["burned_in"] or not study.get("with_burn_in_flag", True):
        if study["burned_in"]:
            ds.BurnedInAnnotation = "YES"
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 8, 8, 7
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.PixelData = bytes(4)
    else:
        ds.BurnedInAnnotation = "NO"
    return ds


def write_imaging(batch_dir: Path, studies: pl.DataFrame, *, seed: int) -> int:
    """Write the batch's studies as DICOM files under ``<batch>/imaging/`` (and a structured report for those
    with a finding); returns the number of files."""
    from clinical_ml.core.dicom import DICOM_SUFFIX, IMAGING_FOLDER, write_dicom

    n = 0
    for study in studies.iter_rows(named=True):
        number = int(study["_number"])
        write_dicom(
            _dicom_header(study, seed=seed, number=number, report=False),
            batch_dir / IMAGING_FOLDER / f"{number:07d}{DICOM_SUFFIX}",
        )
        n += 1
        if study["finding"]:
            write_dicom(
                _dicom_header(study, seed=seed, number=number, report=True),
                batch_dir / IMAGING_FOLDER / f"{number:07d}_sr{DICOM_SUFFIX}",
            )
            n += 1
    return n


def _fmt_times(df: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    return df.with_columns(pl.col(c).dt.strftime("%Y-%m-%d %H:%M:%S") for c in cols)


def write_completion_marker(batch_dir: Path) -> None:
    """Write the marker last, listing each file with its size and sha256 (the DICOM files by their path,
    ``imaging/<name>``), so a reader can tell a complete batch from one still being copied."""
    files = sorted(p for p in batch_dir.iterdir() if p.is_file() and p.name != COMPLETION_MARKER)
    if (batch_dir / IMAGING_FOLDER).is_dir():
        files += sorted(p for p in (batch_dir / IMAGING_FOLDER).iterdir() if p.is_file())
    listing = {
        p.relative_to(batch_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in files
    }
    (batch_dir / COMPLETION_MARKER).write_text(json.dumps({"files": listing}, indent=2))


def _drift_changes() -> list[dict]:
    """The changes of the drift scenario as the manifest declares them."""
    return [
        {
            "kind": "assay_change",
            "code": f"LAB//{LABS['lactate'][0]}",
            "loinc_code": LABS["lactate"][0],
            "name": "lactate",
            "shift": LACTATE_ASSAY_BIAS,
            "unit": LABS["lactate"][2],
            "shows_in": "labs: every lactate result of an admission from the first drifted batch on, "
            "at every site, reads this much higher",
        },
        {
            "kind": "age_shift",
            "age_years": DRIFT_AGE_YEARS,
            "max_age_years": MAX_AGE_YEARS,
            "shows_in": "patients: the birth date of each patient first admitted from the first drifted "
            "batch on is this many years earlier (age capped at max_age_years)",
        },
        {
            "kind": "severity_shift",
            "severity_sd": DRIFT_SEVERITY_SD,
            "shows_in": "encounters: every admission from the first drifted batch on is sicker (latent "
            "severity up by this many SD), so more of them die (death_time)",
        },
    ]


def generate_hospital(out_dir: Path | str, config: SyntheticConfig | None = None) -> SyntheticHospital:
    """Write ``config.n_batches`` batch folders of CSV exports under ``out_dir``.

    Parameters
    ----------
    out_dir
        The landing zone (or any folder); batch folders are named by the ISO date of their first day.
    config
        Generator knobs; defaults to :class:`SyntheticConfig` ().

    Returns
    -------
    SyntheticHospital
        The batch ids in delivery order and the manifest that records the scenario's ground truth.
    """
    cfg = config or SyntheticConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    patients = _patients(cfg, rng)
    patients = patients.with_columns(pl.Series("frailty", rng.normal(0, 1, patients.height)))
    enc, phys, patients = _hospital_stays(cfg, patients, rng)
    start = datetime.combine(cfg.start_date, datetime.min.time())
    span_end = start + timedelta(days=cfg.span_days)
    pidx = enc["patient_index"].to_numpy()
    death_s = enc["death_s"].to_numpy()
    enc = enc.with_columns(
        pl.Series("mrn", patients["mrn"].to_numpy()[pidx]),
        pl.Series("payer", _payers(patients, seed=cfg.seed)[pidx]),
        pl.Series("admit_time", _clock(start, enc["admit_s"].to_numpy())),
        pl.Series("discharge_time", _clock(start, enc["discharge_s"].to_numpy())),
        pl.when(pl.Series(death_s >= 0))
        .then(pl.Series(_clock(start, death_s)))
        .otherwise(None)
        .alias("death_time"),
    )
    black = patients["race"].to_numpy()[pidx] == BIAS_GROUP["race"]
    labs = _labs(cfg, enc, phys, black, rng, start=start)
    vitals = _vitals(cfg, enc, phys, black, rng, start=start)

    notes = [
        f"Seen by Dr. {ln}; family contact {ph}. Pt {fn} {pl_} transferred from ED."
        for ln, ph, fn, pl_ in zip(
            patients["last_name"].shuffle(seed=cfg.seed).to_numpy()[pidx],
            patients["phone"].to_numpy()[pidx],
            patients["first_name"].to_numpy()[pidx],
            patients["last_name"].to_numpy()[pidx],
            strict=True,
        )
    ]
    enc = enc.with_columns(pl.Series("note", notes))
    birth = [
        (start - timedelta(days=float(a) * 365.25)).date()
        for a in patients["age_at_first_admission"].to_numpy()
    ]
    patients = patients.with_columns(pl.Series("birth_date", birth))
    more: dict[str, pl.DataFrame] = {}
    if cfg.more_sources:
        more_rng = np.random.default_rng([cfg.seed, MORE_SOURCES_STREAM])
        more = {
            "medications": _medications(enc, phys, more_rng, start=start),
            "diagnoses": _diagnoses(enc, phys, more_rng, start=start),
            "procedures": _procedures(enc, phys, more_rng, start=start),
            "device_vitals": _device_vitals(enc, phys, more_rng, start=start),
        }
    studies = None
    if cfg.imaging:
        studies = _imaging_studies(
            enc, patients, np.random.default_rng([cfg.seed, MORE_SOURCES_STREAM + 1]), start=start
        )
        studies = studies.with_columns(pl.int_range(1, pl.len() + 1).alias("_number"))

    batch_ids = []
    for b in range(cfg.n_batches):
        bid = batch_id_for(cfg.start_date, b, days_per_batch=cfg.days_per_batch)
        batch_ids.append(bid)
        bdir = out / bid
        bdir.mkdir(parents=True, exist_ok=True)
        e = enc.filter(pl.col("batch") == b)
        p = patients[np.unique(e["patient_index"].to_numpy())]
        p.select(
            "mrn",
            "first_name",
            "last_name",
            "birth_date",
            "sex",
            "race",
            "ethnicity",
            "address",
            "zip",
            "phone",
            "email",
        ).write_csv(bdir / "patients.csv")
        _fmt_times(
            e.select(
                "encounter_id",
                "mrn",
                "admit_time",
                "discharge_time",
                "admission_type",
                "unit",
                "site",
                "discharge_disposition",
                "death_time",
                "payer",
                "note",
            ),
            ["admit_time", "discharge_time", "death_time"],
        ).write_csv(bdir / "encounters.csv")
        _fmt_times(
            labs.filter(pl.col("_batch") == b).drop("_batch"), ["specimen_time", "result_time"]
        ).write_csv(bdir / "labs.csv")
        _fmt_times(
            vitals.filter(pl.col("_batch") == b).drop("_batch"), ["charted_time", "stored_time"]
        ).write_csv(bdir / "vitals.csv")
        for name, frame in more.items():
            times = [c for c, t in frame.schema.items() if isinstance(t, pl.Datetime)]
            _fmt_times(frame.filter(pl.col("_batch") == b).drop("_batch"), times).write_csv(
                bdir / f"{name}.csv"
            )
        if studies is not None:
            write_imaging(bdir, studies.filter(pl.col("_batch") == b), seed=cfg.seed)
        write_completion_marker(bdir)

    died = phys["died"]
    eligible = phys["readmit_eligible"]
    kind = phys["readmit_kind"]
    los_h = phys["los_h"]
    onset = phys["aki_onset_h"]
    death_h = (enc["death_s"] - enc["admit_s"]).to_numpy() / 3600
    in_at_24h = (los_h > AKI_PREDICTION_HOURS) & (~died | (death_h > AKI_PREDICTION_HOURS))
    aki_cohort = in_at_24h & ~(phys["aki"] & (onset < AKI_PREDICTION_HOURS))
    aki_in_window = phys["aki"] & (onset >= AKI_PREDICTION_HOURS) & (onset < los_h)
    manifest = {
        "generator": "clinical_ml.core.synthetic",
        "config": {k: str(v) if isinstance(v, date) else v for k, v in dataclasses.asdict(cfg).items()},
        "batch_ids": batch_ids,
        "span": {"first_day": cfg.start_date.isoformat(), "end_exclusive": span_end.date().isoformat()},
        "n_patients": cfg.n_patients,
        "n_encounters": enc.height,
        "in_hospital_mortality": round(float(died.mean()), 4),
        "risk_model": "logistic over lactate, creatinine, MAP, GCS, RR, HR, SpO2, bilirubin, platelets, "
        "age and 24 h trajectory",
        "readmission_30d": {
            "definition": "a new encounter of the same MRN admitted after the index stay's discharge_time and at "
            f"most {READMISSION_DAYS} days after it; index stays discharged {EXPIRED} or {TRANSFER} are "
            f"excluded; unplanned: admission_type not {PLANNED_ADMISSION_TYPE}",
            "risk_model": "logistic over hemoglobin, creatinine, BUN, sodium below 137 and heart rate at "
            "discharge, age, length of stay, admission type, prior admissions in the data and an unmeasured "
            "patient frailty",
            "eligible_index_stays": int(eligible.sum()),
            "unplanned_rate": round(float((kind[eligible] == "unplanned").mean()), 4)
            if eligible.any()
            else None,
            "mean_risk": round(float(phys["readmit_risk"][eligible].mean()), 4) if eligible.any() else None,
            "planned_rate": round(float((kind[eligible] == "planned").mean()), 4) if eligible.any() else None,
            "late_return_rate": round(float((kind[eligible] == "late").mean()), 4)
            if eligible.any()
            else None,
            "gap_days": {
                "unplanned": [0.25, READMISSION_DAYS],
                "planned": list(PLANNED_GAP_DAYS),
                "late_return": list(LATE_RETURN_GAP_DAYS),
            },
            "max_encounters_per_patient": MAX_ENCOUNTERS_PER_PATIENT,
            "note": "rates as drawn count readmissions after the span too (they are not delivered); the "
            "observed ones are over index stays whose 30 days end inside the span",
            **_observed_readmissions(enc, span_end=span_end),
        },
        "acute_kidney_injury_48h": {
            "definition": f"a creatinine ({CREATININE_LOINC}) with specimen_time in (t0, t0 + "
            f"{AKI_WINDOW_HOURS} h] at least {AKI_RATIO} times the baseline (lowest creatinine with "
            f"result_time <= t0), t0 = admit_time + {AKI_PREDICTION_HOURS} h; stays not in hospital alive at "
            f"t0 or already meeting the criterion by t0 (a value >= {AKI_RATIO} x the minimum of the earlier "
            "values) are excluded",
            "risk_model": "logistic over severity, age, MAP, lactate, baseline creatinine and 24 h trajectory; "
            "creatinine rises to 1.6-3 x baseline from the onset (24 to 56 h after admission, some before 24 h)",
            "cohort_stays": int(aki_cohort.sum()),
            "rate": round(float(aki_in_window[aki_cohort].mean()), 4) if aki_cohort.any() else None,
            **_observed_kidney_injury(enc, labs),
        },
        "units": {
            "creatinine_umol_per_l_sites": [f"SITE_{chr(65 + s)}" for s in range(cfg.n_sites) if s % 2 == 1],
            "temperature_fahrenheit_sites": [f"SITE_{chr(65 + s)}" for s in range(cfg.n_sites) if s % 3 == 2],
        },
        "drift": None,
        "bias": None,
    }
    if cfg.scenario == "drift":
        first = cfg.first_drift_batch
        manifest["drift"] = {
            "first_batch_index": first,
            "first_batch_id": batch_ids[first] if first is not None and first < len(batch_ids) else None,
            # each change says where the exports show it (clinical_ml_tests/core/test_synthetic_drift.py
            # finds every one there)
            "changes": [c for c in _drift_changes() if cfg.drifts(c["kind"])],
        }
    if cfg.scenario == "bias":
        manifest["bias"] = {
            "group": BIAS_GROUP,
            "mechanisms": [
                {"kind": "under_measurement", "name": "lactate", "draw_rate_factor": 1 / 3},
                {"kind": "measurement_bias", "name": "spo2", "overread_points": SPO2_OVERREAD},
                {
                    "kind": "unmeasured_risk",
                    "logit_shift": UNMEASURED_RISK_LOGIT,
                    "effect": "model under-estimates the group's risk: lower sensitivity, observed/expected above 1",
                },
            ],
        }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return SyntheticHospital(root=out, batch_ids=tuple(batch_ids), manifest=manifest)
