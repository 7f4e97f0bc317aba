"""A seeded synthetic hospital that writes exports in the landing contract.

Every patient carries real-looking direct identifiers (names, MRN, birth date, address, ZIP, phone, email)
so that the anonymization boundary is exercised on every run. In-hospital mortality is drawn from a known
logistic risk model over the patient's physiology at 24 h, so a model trained on the measurements can
reach an AUROC of about 0.85 while no single measurement gives the outcome away.

Scenarios
---------
``default``
    Stationary case mix, every site declares its units.
``drift``
    From ``drift_from_batch`` on, the case mix shifts (older, sicker patients) and the lactate assay reads
    ``LACTATE_ASSAY_BIAS`` mmol/L higher at every site.
``bias``
    Patients of ``BIAS_GROUP`` are under-measured (lactate drawn a third as often), their pulse oximetry
    over-reads by ``SPO2_OVERREAD`` points (occult hypoxaemia), and part of their risk is visible in no
    measurement (``UNMEASURED_RISK_LOGIT``, under-triage), so a model misses more of their deaths.

The ground truth of a scenario is written to ``_manifest.json`` at the root of the output folder.
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

from clinical_ml.core.storage import sha256_file

Scenario = Literal["default", "drift", "bias"]

COMPLETION_MARKER = "_SUCCESS"
MANIFEST_NAME = "_manifest.json"
SOURCES = ("patients", "encounters", "labs", "vitals")

LACTATE_ASSAY_BIAS = 0.8
SPO2_OVERREAD = 3.0
UNMEASURED_RISK_LOGIT = 1.6
BIAS_GROUP = {"race": "Black or African American"}

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
        Distinct patients; about 15% come back for a second admission in a later batch.
    n_batches
        Daily batches, one folder each, starting at ``start_date``.
    n_sites
        Hospitals of the network. Odd-numbered sites report creatinine in umol/L, every third site
        reports temperature in degrees Fahrenheit.
    seed
        Everything is a function of this seed.
    scenario
        ``default``, ``drift`` or ``bias`` (see the module docstring).
    drift_from_batch
        First affected batch (0-based) of the ``drift`` scenario; the middle batch when not given.
    """

    n_patients: int = 2000
    n_batches: int = 5
    n_sites: int = 3
    seed: int = 7
    scenario: Scenario = "default"
    start_date: date = date(2026, 1, 5)
    drift_from_batch: int | None = None

    def __post_init__(self) -> None:
        if self.n_patients < 10:
            raise ValueError("n_patients must be at least 10")
        if self.n_batches < 1 or self.n_sites < 1:
            raise ValueError("n_batches and n_sites must be at least 1")
        if self.scenario not in ("default", "drift", "bias"):
            raise ValueError(f"unknown scenario {self.scenario!r}; expected default, drift or bias")

    @property
    def first_drift_batch(self) -> int | None:
        if self.scenario != "drift":
            return None
        return self.drift_from_batch if self.drift_from_batch is not None else self.n_batches // 2


@dataclass(frozen=True)
class SyntheticHospital:
    """What the generator wrote: batch folders in order and the scenario's ground truth."""

    root: Path
    batch_ids: tuple[str, ...]
    manifest: dict


def batch_id_for(start: date, index: int) -> str:
    return (start + timedelta(days=index)).isoformat()


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


def _encounters(cfg: SyntheticConfig, patients: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    n = patients.height
    first_batch = rng.integers(0, cfg.n_batches, n)
    readmit = (rng.random(n) < 0.15) & (first_batch < cfg.n_batches - 1)
    idx = np.concatenate([np.arange(n), np.flatnonzero(readmit)])
    batch = np.concatenate(
        [first_batch, rng.integers(first_batch[readmit] + 1, cfg.n_batches, readmit.sum()).astype(int)]
        if readmit.any()
        else [first_batch]
    )
    m = idx.size
    start = datetime.combine(cfg.start_date, datetime.min.time())
    admit = np.array([start + timedelta(days=int(b)) for b in batch], dtype="datetime64[us]")
    admit = admit + (rng.uniform(0, 24 * 3600, m) * 1e6).astype("timedelta64[us]")
    gap_years = np.where(np.arange(m) >= n, rng.uniform(0, 0.01, m), 0.0)
    age = patients["age_at_first_admission"].to_numpy()[idx] + (batch - first_batch[idx]) / 365.25 + gap_years
    drift_from = cfg.first_drift_batch
    shifted = (batch >= drift_from) if drift_from is not None else np.zeros(m, dtype=bool)
    age = np.where(shifted, np.minimum(age + 6.0, 103), age)
    enc = pl.DataFrame(
        {
            "patient_index": idx,
            "batch": batch,
            "encounter_id": [f"{x:010d}" for x in rng.choice(10**10, size=m, replace=False)],
            "mrn": patients["mrn"].to_numpy()[idx],
            "admit_time": admit,
            "age": age,
            "admission_type": _choice(rng, ADMISSION_TYPES, m),
            "unit": _choice(rng, UNITS, m),
            "site": [f"SITE_{chr(ord('A') + s)}" for s in rng.integers(0, cfg.n_sites, m)],
            "case_mix_shift": shifted,
        }
    )
    return enc.sort("admit_time")


def _physiology(
    enc: pl.DataFrame, patients: pl.DataFrame, rng: np.random.Generator, *, scenario: str = "default"
) -> dict:
    """Latent severity and the true state at 24 h; mortality from the known risk model."""
    m = enc.height
    age = enc["age"].to_numpy()
    adm = enc["admission_type"].to_numpy()
    shifted = enc["case_mix_shift"].to_numpy()
    sev = (
        rng.normal(0, 1, m)
        + 0.012 * (age - 63)
        + np.where(adm == "ELECTIVE", -0.7, 0.0)
        + np.where(adm == "EMERGENCY", 0.15, 0.0)
        + np.where(shifted, 0.35, 0.0)
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
    risk = 1 / (1 + np.exp(-logit))
    died = rng.random(m) < risk
    return {"severity": sev, "trend": trend, "true": t, "risk": risk, "died": died}


def _stay_times(enc: pl.DataFrame, phys: dict, rng: np.random.Generator) -> pl.DataFrame:
    m = enc.height
    died = phys["died"]
    admit = enc["admit_time"].to_numpy()
    # A few deaths happen before the 24 h prediction time (excluded by the use case), most later.
    death_h = np.where(rng.random(m) < 0.12, rng.uniform(2, 23.5, m), 24 + rng.exponential(110, m))
    alive_los_h = np.where(rng.random(m) < 0.08, rng.uniform(4, 23.5, m), rng.lognormal(np.log(85), 0.6, m))
    los_h = np.where(died, death_h, np.maximum(alive_los_h, 4))
    discharge = admit + (los_h * 3600 * 10**6).astype("timedelta64[us]")
    disposition = np.where(
        died, "EXPIRED", _choice(rng, (("HOME", 0.55), ("SNF", 0.25), ("REHAB", 0.12), ("HOSPICE", 0.08)), m)
    )
    # Deaths are charted at or a few minutes before the discharge time of the stay.
    death_time = discharge - (rng.uniform(0, 20, m) * 60e6).astype("timedelta64[us]")
    return enc.with_columns(
        pl.Series("discharge_time", discharge),
        pl.Series("discharge_disposition", disposition),
        pl.when(pl.Series(died)).then(pl.Series(death_time)).otherwise(None).alias("death_time"),
        pl.Series("los_hours", los_h),
    )


def _value_at(
    phys: dict, name: str, rows: np.ndarray, hours: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Measured value of a variable at ``hours`` after admission for encounter ``rows``."""
    base = phys["true"][name][rows]
    drift_sd = {
        "heart_rate": 9,
        "mean_bp": -6,
        "resp_rate": 2.5,
        "spo2": -1.3,
        "gcs_total": -1.2,
    }
    shift = phys["trend"][rows] * (hours - 24) / 24
    if name in drift_sd:
        value = base + drift_sd[name] * shift
    elif name in ("lactate", "creatinine", "bun", "bilirubin", "wbc"):
        value = base * np.exp(0.25 * shift)
    else:
        value = base.copy()
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
        value = value + rng.normal(0, noise, value.size)
    else:
        value = value * np.exp(rng.normal(0, 0.1, value.size))
    return value


def _labs(cfg: SyntheticConfig, enc: pl.DataFrame, phys: dict, black: np.ndarray, rng: np.random.Generator):
    m = enc.height
    los_h = enc["los_hours"].to_numpy()
    draws_per = np.maximum(1, np.ceil(np.minimum(los_h, 72) / 10).astype(int))
    rows = np.repeat(np.arange(m), draws_per)
    k = np.concatenate([np.arange(d) for d in draws_per])
    hours = np.clip(1.0 + 10 * k + rng.normal(0, 1.5, rows.size), 0.2, None)
    keep = hours < los_h[rows]
    rows, hours, k = rows[keep], hours[keep], k[keep]
    frames = []
    admit = enc["admit_time"].to_numpy()
    site_idx = np.array([ord(s[-1]) - ord("A") for s in enc["site"].to_list()])
    batch = enc["batch"].to_numpy()
    drift_from = cfg.first_drift_batch
    for name, (loinc, _, unit) in LABS.items():
        p = {"lactate": 0.55, "bilirubin": 0.35}.get(name, 0.93)
        p_row = np.full(rows.size, p)
        p_row[k == 0] = 0.97 if name != "bilirubin" else 0.6
        if name == "lactate" and cfg.scenario == "bias":
            p_row = np.where(black[rows], p_row / 3, p_row)
        take = rng.random(rows.size) < p_row
        r, h = rows[take], hours[take]
        value = _value_at(phys, name, r, h, rng)
        if name == "lactate" and drift_from is not None:
            value = np.where(batch[r] >= drift_from, value + LACTATE_ASSAY_BIAS, value)
        units = np.full(r.size, unit, dtype=object)
        if name == "creatinine":
            umol = site_idx[r] % 2 == 1
            value = np.where(umol, value * CREATININE_UMOL_PER_MGDL, value)
            units = np.where(umol, "umol/L", unit)
        decimals = 0 if name in ("sodium", "platelets", "glucose", "bun") else 2
        if name == "creatinine":
            decimals = 2
        specimen = admit[r] + (h * 3600e6).astype("timedelta64[us]")
        turnaround_min = rng.lognormal(np.log(25 if name == "lactate" else 55), 0.35, r.size)
        frames.append(
            pl.DataFrame(
                {
                    "encounter_id": enc["encounter_id"].to_numpy()[r],
                    "loinc_code": np.full(r.size, loinc),
                    "lab_name": np.full(r.size, LABS[name][1]),
                    "value": np.round(value, decimals),
                    "unit": units.astype(str),
                    "specimen_time": specimen,
                    "result_time": specimen + (turnaround_min * 60e6).astype("timedelta64[us]"),
                    "_batch": batch[r],
                }
            )
        )
    return pl.concat(frames).sort("specimen_time")


def _vitals(cfg: SyntheticConfig, enc: pl.DataFrame, phys: dict, black: np.ndarray, rng: np.random.Generator):
    m = enc.height
    los_h = enc["los_hours"].to_numpy()
    n_hours = np.maximum(1, np.floor(np.minimum(los_h, 48)).astype(int))
    rows = np.repeat(np.arange(m), n_hours)
    hours = np.concatenate([np.arange(n) for n in n_hours]) + rng.uniform(0, 0.25, rows.size)
    keep = hours < los_h[rows]
    rows, hours = rows[keep], hours[keep]
    admit = enc["admit_time"].to_numpy()
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
        charted = admit[r] + (h * 3600e6).astype("timedelta64[us]")
        frames.append(
            pl.DataFrame(
                {
                    "encounter_id": enc["encounter_id"].to_numpy()[r],
                    "code": np.full(r.size, name),
                    "value": np.round(value, 1),
                    "unit": units.astype(str),
                    "charted_time": charted,
                    "stored_time": charted + (rng.uniform(0.5, 20, r.size) * 60e6).astype("timedelta64[us]"),
                    "_batch": enc["batch"].to_numpy()[r],
                }
            )
        )
    return pl.concat(frames).sort("charted_time")


def _fmt_times(df: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    return df.with_columns(pl.col(c).dt.strftime("%Y-%m-%d %H:%M:%S") for c in cols)


def write_completion_marker(batch_dir: Path) -> None:
    """Write the marker last, listing each file with its size and sha256, so a reader can tell a complete
    batch from one still being copied."""
    files = sorted(p for p in batch_dir.iterdir() if p.is_file() and p.name != COMPLETION_MARKER)
    listing = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    (batch_dir / COMPLETION_MARKER).write_text(json.dumps({"files": listing}, indent=2))


def generate_hospital(out_dir: Path | str, config: SyntheticConfig | None = None) -> SyntheticHospital:
    """Write ``config.n_batches`` daily batch folders of CSV exports under ``out_dir``.

    Parameters
    ----------
    out_dir
        The landing zone (or any folder); batch folders are named by their ISO date.
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
    enc = _encounters(cfg, patients, rng)
    phys = _physiology(enc, patients, rng, scenario=cfg.scenario)
    enc = _stay_times(enc, phys, rng)
    black = patients["race"].to_numpy()[enc["patient_index"].to_numpy()] == BIAS_GROUP["race"]
    labs = _labs(cfg, enc, phys, black, rng)
    vitals = _vitals(cfg, enc, phys, black, rng)

    notes = [
        f"Seen by Dr. {ln}; family contact {ph}. Pt {fn} {pl_} transferred from ED."
        for ln, ph, fn, pl_ in zip(
            patients["last_name"].shuffle(seed=cfg.seed).to_numpy()[enc["patient_index"].to_numpy()],
            patients["phone"].to_numpy()[enc["patient_index"].to_numpy()],
            patients["first_name"].to_numpy()[enc["patient_index"].to_numpy()],
            patients["last_name"].to_numpy()[enc["patient_index"].to_numpy()],
            strict=True,
        )
    ]
    enc = enc.with_columns(pl.Series("note", notes))
    start = datetime.combine(cfg.start_date, datetime.min.time())
    birth = [
        (start - timedelta(days=float(a) * 365.25)).date()
        for a in patients["age_at_first_admission"].to_numpy()
    ]
    patients = patients.with_columns(pl.Series("birth_date", birth))

    batch_ids = []
    for b in range(cfg.n_batches):
        bid = batch_id_for(cfg.start_date, b)
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
        write_completion_marker(bdir)

    died = phys["died"]
    manifest = {
        "generator": "clinical_ml.core.synthetic",
        "config": {k: str(v) if isinstance(v, date) else v for k, v in dataclasses.asdict(cfg).items()},
        "batch_ids": batch_ids,
        "n_patients": cfg.n_patients,
        "n_encounters": enc.height,
        "in_hospital_mortality": round(float(died.mean()), 4),
        "risk_model": "logistic over lactate, creatinine, MAP, GCS, RR, HR, SpO2, bilirubin, platelets, "
        "age and 24 h trajectory",
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
            "changes": [
                {
                    "kind": "assay_change",
                    "code": "LAB//2524-7",
                    "name": "lactate",
                    "shift": LACTATE_ASSAY_BIAS,
                    "unit": "mmol/L",
                },
                {"kind": "case_mix_shift", "age_years": 6.0, "severity_sd": 0.35},
            ],
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
