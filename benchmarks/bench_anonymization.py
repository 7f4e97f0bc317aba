"""Anonymization of one batch vs a bare polars join-and-shift over the same events.

Ours is what the `anonymized_*` asset computes for a batch, without file I/O: allowlist, pseudonyms (vault
mode, new random surrogates for every patient and admission), per-patient week shifts of every timestamp,
ages, ZIP3, MEDS codes, stay and birth events, then k-anonymity measured and remedied
(`anonymize_batch` + `enforce_k_anonymity`). The baseline is the least any de-identification must do to the
events: join each lab and vital to an existing pseudonym/shift mapping by encounter and add the shift to its
two timestamps (one polars join, no new ids, no checks). Goal from issue 4: ours <= 1.5x the baseline at
50M events. The HMAC mode is timed too (extra), as is the peak RSS.
"""

import gc
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import psutil

from clinical_ml.core.anonymization import Vault, anonymize_batch
from clinical_ml.core.pseudonyms import HmacKey
from clinical_ml.core.reidentification import RiskPolicy, enforce_k_anonymity

SCALES = {"small": 2_000_000, "default": 50_000_000}
EVENTS_PER_ADMISSION = 320
LAB_SHARE = 0.17
LOINC = ["2160-0", "3094-0", "2951-2", "2823-3", "2345-7", "6690-2", "718-7", "777-3", "2524-7", "1975-2"]
VITALS = [
    "heart_rate",
    "systolic_bp",
    "diastolic_bp",
    "mean_bp",
    "resp_rate",
    "spo2",
    "temperature",
    "gcs_total",
]
BENCH_KEY = HmacKey(b"benchmark-only-key-" + b"0" * 32)


def make_batch(n_events: int, *, seed: int = 0) -> dict[str, pl.DataFrame]:
    """Raw frames of one batch in the ingestion contract: about 320 events per admission, 15% readmissions."""
    rng = np.random.default_rng(seed)
    n_adm = max(n_events // EVENTS_PER_ADMISSION, 10)
    n_pat = max(int(n_adm / 1.15), 5)
    pat_of_adm = np.concatenate([np.arange(n_pat), rng.integers(0, n_pat, n_adm - n_pat)])
    mrn = pl.Series("mrn", rng.choice(10**8, n_pat, replace=False)).cast(pl.String).str.zfill(8)
    t0 = np.datetime64(datetime(2026, 1, 5), "us")
    admit = t0 + (rng.integers(0, 24 * 60, n_adm) * 60_000_000).astype("timedelta64[us]")
    stay = (rng.integers(6, 24 * 14, n_adm) * 3_600_000_000).astype("timedelta64[us]")
    died = rng.random(n_adm) < 0.12
    birth = (t0 - (rng.uniform(18, 103, n_pat) * 365.25 * 86400e6).astype("timedelta64[us]")).astype(
        "datetime64[D]"
    )
    patients = pl.DataFrame(
        {
            "mrn": mrn,
            "first_name": pl.Series(rng.integers(0, 5000, n_pat)).cast(pl.String).str.pad_start(6, "F"),
            "last_name": pl.Series(rng.integers(0, 5000, n_pat)).cast(pl.String).str.pad_start(6, "L"),
            "birth_date": birth,
            "sex": np.where(rng.random(n_pat) < 0.56, "M", "F"),
            "race": rng.choice(["White", "Black or African American", "Asian", "Other", "Unknown"], n_pat),
            "ethnicity": np.where(rng.random(n_pat) < 0.11, "Hispanic or Latino", "Not Hispanic or Latino"),
            "address": pl.Series(rng.integers(1, 9999, n_pat)).cast(pl.String) + " Main St",
            "zip": rng.choice(["02139", "02446", "01803", "01970", "03601", "10001"], n_pat),
            "phone": pl.Series(rng.integers(0, 10000, n_pat))
            .cast(pl.String)
            .str.zfill(4)
            .str.pad_start(14, "5"),
            "email": pl.Series(np.arange(n_pat)).cast(pl.String) + "@example.org",
        }
    )
    enc_id = pl.Series("encounter_id", np.arange(n_adm) + 10**9).cast(pl.String)
    encounters = pl.DataFrame(
        {
            "encounter_id": enc_id,
            "mrn": mrn.gather(pat_of_adm),
            "admit_time": admit,
            "discharge_time": admit + stay,
            "admission_type": rng.choice(["EMERGENCY", "URGENT", "ELECTIVE"], n_adm),
            "unit": rng.choice(["MICU", "SICU", "CCU", "NEURO_ICU"], n_adm),
            "site": rng.choice(["SITE_A", "SITE_B", "SITE_C"], n_adm),
            "discharge_disposition": np.where(died, "DIED", "HOME"),
            "death_time": pl.Series(admit + stay).set(pl.Series(~died), None),
            "note": "Seen by Dr. Smith; contact (617) 555-0100.",
        }
    )

    def events(n: int, codes: list[str], code_col: str, t_cols: tuple[str, str]) -> pl.DataFrame:
        adm = rng.integers(0, n_adm, n)
        t = admit[adm] + (rng.random(n) * 36 * 3600e6).astype("timedelta64[us]")
        return pl.DataFrame(
            {
                "encounter_id": enc_id.gather(adm),
                code_col: pl.Series(codes).gather(rng.integers(0, len(codes), n)),
                "value": rng.normal(50, 20, n),
                t_cols[0]: t,
                t_cols[1]: t + (rng.exponential(0.7, n) * 3600e6).astype("timedelta64[us]"),
                "implausible": rng.random(n) < 0.002,
            }
        )

    n_labs = int(n_events * LAB_SHARE)
    labs = events(n_labs, LOINC, "loinc_code", ("specimen_time", "result_time"))
    vitals = events(n_events - n_labs, VITALS, "code", ("charted_time", "stored_time"))
    return {"patients": patients, "encounters": encounters, "labs": labs, "vitals": vitals}


def ours(batch: dict[str, pl.DataFrame], *, hmac_key: HmacKey | None = None) -> pl.DataFrame:
    out = anonymize_batch(
        **batch, vault=Vault.empty(), batch_id="bench", rng=np.random.default_rng(1), hmac_key=hmac_key
    )
    remedied = enforce_k_anonymity(
        patients=out.patients, encounters=out.encounters, events=out.events, policy=RiskPolicy()
    )
    return remedied.events


def bare_join_and_shift(batch: dict[str, pl.DataFrame], keys: pl.DataFrame) -> pl.DataFrame:
    """The baseline: events joined to an existing (encounter -> subject, hadm, shift) mapping, times shifted."""

    def one(ev: pl.DataFrame, code: str, t: str, avail: str) -> pl.LazyFrame:
        shift = pl.duration(days=pl.col("shift_days"))
        return (
            ev.lazy()
            .join(keys.lazy(), on="encounter_id", how="inner")
            .select(
                "subject_id",
                (pl.col(t) + shift).alias("time"),
                pl.col(code).alias("code"),
                pl.col("value").alias("numeric_value"),
                "hadm_id",
                (pl.col(avail) + shift).alias("available_time"),
            )
        )

    return pl.concat(
        [
            one(batch["labs"], "loinc_code", "specimen_time", "result_time"),
            one(batch["vitals"], "code", "charted_time", "stored_time"),
        ]
    ).collect()


def _mapping(batch: dict[str, pl.DataFrame]) -> pl.DataFrame:
    out = anonymize_batch(
        patients=batch["patients"],
        encounters=batch["encounters"],
        labs=batch["labs"].head(0),
        vitals=batch["vitals"].head(0),
        vault=Vault.empty(),
        batch_id="bench",
        rng=np.random.default_rng(2),
    )
    v = out.vault
    return (
        batch["encounters"]
        .select("encounter_id", "mrn")
        .join(v.patients, on="mrn")
        .join(v.encounters, on="encounter_id")
        .select("encounter_id", "subject_id", "hadm_id", "shift_days")
    )


def _timed(fn, *args, **kwargs) -> tuple[float, int]:
    gc.collect()
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    elapsed = time.perf_counter() - t
    n = result.height
    del result
    return elapsed, n


def run(workdir: Path, *, scale: str, repetitions: int) -> list[dict]:
    n_events = SCALES[scale]
    t = time.perf_counter()
    batch = make_batch(n_events)
    generate_s = time.perf_counter() - t
    keys = _mapping(batch)
    proc = psutil.Process()
    ours_s, base_s, hmac_s = [], [], []
    rows_ours = rows_base = 0
    peak = proc.memory_info().rss
    for _ in range(repetitions):
        # alternate the order so that neither side always runs on a warmer machine
        s, rows_base = _timed(bare_join_and_shift, batch, keys)
        base_s.append(s)
        s, rows_ours = _timed(ours, batch)
        ours_s.append(s)
        peak = max(peak, proc.memory_info().rss)
    s, _ = _timed(ours, batch, hmac_key=BENCH_KEY)
    hmac_s.append(s)
    ratio = float(np.median(ours_s) / np.median(base_s))
    return [
        {
            "name": f"anonymization: {n_events:,} lab and vital events of one batch",
            "ours": "anonymize_batch + enforce_k_anonymity (vault mode)",
            "ours_s": ours_s,
            "baseline": "bare polars join-and-shift (mapping given)",
            "baseline_s": base_s,
            "goal": "<= 1.5x baseline",
            "goal_ratio": 1.5,
            "extra": {
                "ratio_median": round(ratio, 3),
                "events_in": n_events,
                "events_out_ours": rows_ours,
                "events_out_baseline": rows_base,
                "admissions": batch["encounters"].height,
                "patients": batch["patients"].height,
                "hmac_mode_s": hmac_s,
                "hmac_ratio": round(float(np.median(hmac_s) / np.median(base_s)), 3),
                "generate_s": round(generate_s, 1),
                "peak_rss_mb": round(peak / 2**20),
            },
        }
    ]


if __name__ == "__main__":
    import json
    import sys

    print(
        json.dumps(
            run(Path("."), scale=sys.argv[1] if len(sys.argv) > 1 else "small", repetitions=3), indent=2
        )
    )
