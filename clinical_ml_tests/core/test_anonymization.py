import json
from datetime import date, datetime

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinical_ml.core.anonymization import (
    DEID_COLUMNS,
    RESTRICTED_ZIP3,
    RESTRICTED_ZIP3_FILE,
    Vault,
    age_in_years,
    anonymize_batch,
    generalize_zip,
)
from clinical_ml.core.ingestion import ingest_file
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital


def _batches(tmp_path, n_batches=2):
    # batches of two weeks: patients come back within the span (readmissions)
    h = generate_hospital(
        tmp_path, SyntheticConfig(n_patients=400, n_batches=n_batches, seed=21, days_per_batch=14)
    )
    return [
        {
            s: ingest_file(tmp_path / b / f"{s}.csv", s).accepted
            for s in ("patients", "encounters", "labs", "vitals")
        }
        for b in h.batch_ids
    ], h.batch_ids


def test_only_allowlisted_columns_leave_and_the_same_patient_keeps_one_pseudonym(tmp_path):
    raws, ids = _batches(tmp_path)
    vault = Vault.empty()
    outs = []
    for raw, bid in zip(raws, ids, strict=True):
        out = anonymize_batch(**raw, vault=vault, batch_id=bid, rng=np.random.default_rng(0))
        vault = out.vault
        outs.append(out)
        assert tuple(out.patients.columns) == DEID_COLUMNS["patients"]
        assert tuple(out.encounters.columns) == DEID_COLUMNS["encounters"]
        assert "note" in out.dropped_columns["encounters"]
    both = set(raws[0]["patients"]["mrn"]) & set(raws[1]["patients"]["mrn"])
    assert both, "the synthetic hospital readmits some patients in a later batch"
    mapping = dict(zip(vault.patients["mrn"], vault.patients["subject_id"], strict=True))
    assert vault.patients["subject_id"].n_unique() == vault.patients.height
    for mrn in both:
        sid = mapping[mrn]
        assert sid in set(outs[0].patients["subject_id"]) and sid in set(outs[1].patients["subject_id"])


def test_dates_shift_by_whole_weeks_and_intervals_are_preserved(tmp_path):
    raws, ids = _batches(tmp_path, 1)
    out = anonymize_batch(**raws[0], vault=Vault.empty(), batch_id=ids[0])
    raw = raws[0]["encounters"].join(out.vault.encounters, on="encounter_id")
    joined = raw.join(out.encounters, on="hadm_id", suffix="_deid")
    shift = (joined["admit_time_deid"] - joined["admit_time"]).dt.total_seconds()
    assert (shift % (7 * 86400) == 0).all() and (shift != 0).all()
    assert (
        (joined["discharge_time_deid"] - joined["admit_time_deid"])
        == (joined["discharge_time"] - joined["admit_time"])
    ).all()
    assert (joined["admit_time_deid"].dt.weekday() == joined["admit_time"].dt.weekday()).all()


@given(st.integers(min_value=0, max_value=120), st.integers(min_value=1, max_value=364))
def test_age_is_completed_years_capped_at_90(age, day_of_year):
    at = datetime(2026, 1, 1) + (datetime(2026, 12, 31) - datetime(2026, 1, 1)) * (day_of_year / 365)
    birth = date(at.year - age, at.month, min(at.day, 28))
    got = pl.select(age_in_years(pl.lit(birth), pl.lit(at))).item()
    assert got == min(age, 90)


def test_zip_generalization():
    zips = ["02139", "03601", "90210-1234", "abcde", None, *[f"{z}12" for z in sorted(RESTRICTED_ZIP3)]]
    got = pl.select(generalize_zip(pl.Series(zips, dtype=pl.String))).to_series().to_list()
    assert got[:5] == ["021", "000", "902", None, None]
    assert set(got[5:]) == {"000"}


# --- small hand-made batches -------------------------------------------------------------------------


def raw_frames(people: list[dict], *, extra_patient_columns: dict | None = None) -> dict[str, pl.DataFrame]:
    """Raw frames in the ingestion contract. Each person: mrn, birth (date), zip, admit (datetime),
    stay_h, lab_offsets_h, and optionally sex, race, ethnicity, died."""
    from datetime import timedelta

    from clinical_ml.core.ingestion import empty_accepted

    def frame(source: str, rows: list[dict]) -> pl.DataFrame:
        schema = empty_accepted(source).schema
        return pl.DataFrame(
            [{c: r.get(c) for c in schema} | {"row_number": i + 1} for i, r in enumerate(rows)], schema=schema
        )

    pats, encs, labs, vitals = [], [], [], []
    for i, p in enumerate(people):
        pats.append(
            {
                "mrn": p["mrn"],
                "first_name": "Canary",
                "last_name": f"Person{i}",
                "birth_date": p["birth"],
                "sex": p.get("sex", "F"),
                "race": p.get("race", "White"),
                "ethnicity": p.get("ethnicity", "Not Hispanic or Latino"),
                "address": f"{i} Test Street",
                "zip": p.get("zip", "02139"),
                "phone": f"(617) 555-{i:04d}",
                "email": f"person{i}@example.org",
            }
        )
        enc_id = f"E{i:05d}"
        admit = p["admit"]
        discharge = admit + timedelta(hours=p.get("stay_h", 72))
        encs.append(
            {
                "encounter_id": enc_id,
                "mrn": p.get("encounter_mrn", p["mrn"]),
                "admit_time": admit,
                "discharge_time": discharge,
                "admission_type": "EMERGENCY",
                "unit": "MICU",
                "site": "SITE_A",
                "discharge_disposition": "DIED" if p.get("died") else "HOME",
                "death_time": discharge if p.get("died") else None,
            }
        )
        for h in p.get("lab_offsets_h", [1.5, 20.0]):
            t = admit + timedelta(hours=h)
            labs.append(
                {
                    "encounter_id": enc_id,
                    "loinc_code": "2524-7",
                    "specimen_time": t,
                    "result_time": t + timedelta(minutes=45),
                    "value": 2.0,
                    "unit": "mmol/L",
                    "implausible": False,
                }
            )
            vitals.append(
                {
                    "encounter_id": enc_id,
                    "code": "heart_rate",
                    "charted_time": t,
                    "stored_time": t + timedelta(minutes=5),
                    "value": 90.0,
                    "unit": "/min",
                    "implausible": False,
                }
            )
    out = {
        "patients": frame("patients", pats),
        "encounters": frame("encounters", encs),
        "labs": frame("labs", labs),
        "vitals": frame("vitals", vitals),
    }
    if extra_patient_columns:
        out["patients"] = out["patients"].with_columns(
            pl.lit(v).alias(k) for k, v in extra_patient_columns.items()
        )
    return out


_EPOCH = datetime(2026, 1, 5, 8, 0)
_person = st.fixed_dictionaries(
    {
        "age_days": st.integers(min_value=0, max_value=120 * 365),
        "admit_min": st.integers(min_value=0, max_value=60 * 24 * 90),
        "stay_h": st.integers(min_value=1, max_value=24 * 40),
        "lab_offsets_h": st.lists(st.floats(min_value=0, max_value=500, allow_nan=False), max_size=4),
        "died": st.booleans(),
    }
)


def _people(specs: list[dict]) -> list[dict]:
    from datetime import timedelta

    out = []
    for i, s in enumerate(specs):
        admit = _EPOCH + timedelta(minutes=s["admit_min"])
        out.append(
            {
                "mrn": f"MRN{i:06d}",
                "birth": (admit - timedelta(days=s["age_days"])).date(),
                "admit": admit,
                "stay_h": s["stay_h"],
                "lab_offsets_h": s["lab_offsets_h"],
                "died": s["died"],
            }
        )
    return out


@settings(deadline=None, max_examples=60)
@given(st.lists(_person, min_size=1, max_size=8))
def test_every_interval_within_every_patient_is_preserved_and_weekdays_kept(specs):
    people = _people(specs)
    raw = raw_frames(people)
    out = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1", max_shift_weeks=3)
    mapping = out.vault.patients.select(pl.col("mrn"), "subject_id")
    raw_times = (
        raw["labs"]
        .join(raw["encounters"].select("encounter_id", "mrn", "admit_time"), on="encounter_id")
        .select("mrn", (pl.col("specimen_time") - pl.col("admit_time")).alias("offset"))
        .join(mapping, on="mrn")
    )
    deid = (
        out.events.filter(pl.col("code").str.starts_with("LAB//"))
        .join(out.encounters.select("subject_id", "admit_time"), on="subject_id")
        .select("subject_id", (pl.col("time") - pl.col("admit_time")).alias("offset"))
    )
    for sid in mapping["subject_id"]:
        a = raw_times.filter(pl.col("subject_id") == sid)["offset"].sort().to_list()
        b = deid.filter(pl.col("subject_id") == sid)["offset"].sort().to_list()
        assert a == b
    enc = raw["encounters"].join(mapping, on="mrn").join(out.encounters, on="subject_id", suffix="_deid")
    shift = enc["admit_time_deid"] - enc["admit_time"]
    assert (shift.dt.total_seconds() % (7 * 86400) == 0).all()
    assert (shift.dt.total_days().abs() <= 21).all() and (shift.dt.total_days() != 0).all()
    assert (enc["admit_time_deid"].dt.weekday() == enc["admit_time"].dt.weekday()).all()
    assert (
        (enc["discharge_time_deid"] - enc["admit_time_deid"]) == (enc["discharge_time"] - enc["admit_time"])
    ).all()
    died = enc.filter(pl.col("death_time").is_not_null())
    assert (
        (died["death_time_deid"] - died["admit_time_deid"]) == (died["death_time"] - died["admit_time"])
    ).all()


@settings(deadline=None, max_examples=150)
@given(st.integers(min_value=0, max_value=120), st.integers(min_value=0, max_value=364))
def test_ages_90_and_over_are_aggregated_and_no_birth_event_implies_more(age, day):
    from datetime import timedelta

    admit = datetime(2026, 1, 1, 10) + timedelta(days=day)
    birth = date(admit.year - age, admit.month, min(admit.day, 28))
    raw = raw_frames([{"mrn": "MRN1", "birth": birth, "admit": admit}])
    out = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1")
    assert out.encounters["age_years"].to_list() == [min(age, 90)]
    born = out.events.filter(pl.col("code") == "MEDS_BIRTH")["time"].item()
    admitted = out.encounters["admit_time"].item()
    implied = pl.select(age_in_years(pl.lit(born), pl.lit(admitted))).item()
    if age >= 90:
        assert implied == 90  # the birth event never implies an age above the cap
    else:
        assert implied <= 90
        assert (admitted - born).days == (
            datetime(2026, 1, 1, 10) + timedelta(days=day)
        ).date().toordinal() - birth.toordinal()
    assert out.ages_capped == int(age >= 90)


@pytest.mark.parametrize("prefix", sorted(RESTRICTED_ZIP3))
@pytest.mark.parametrize("suffix", ["12", "99-1234"])
def test_every_restricted_prefix_becomes_000(prefix, suffix):
    got = pl.select(generalize_zip(pl.lit(f"{prefix}{suffix}"))).item()
    assert got == "000"


def test_restricted_zip3_list_is_versioned_config():
    meta = json.loads(RESTRICTED_ZIP3_FILE.read_text())
    assert meta["version"] and meta["source"]
    assert all(len(p) == 3 and p.isdigit() for p in meta["prefixes"])
    assert frozenset(meta["prefixes"]) == RESTRICTED_ZIP3


def test_undeclared_columns_and_free_text_are_dropped_and_counted():
    people = _people(
        [{"age_days": 20000, "admit_min": 0, "stay_h": 30, "lab_offsets_h": [2.0], "died": False}]
    )
    raw = raw_frames(people, extra_patient_columns={"ssn": "000-12-3456", "comment": "lives with Canary"})
    raw["encounters"] = raw["encounters"].with_columns(pl.lit("called (617) 555-0000").alias("note"))
    out = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1")
    assert {"ssn", "comment"} <= set(out.dropped_columns["patients"])
    assert out.free_text_dropped == {"patients": ["comment"], "encounters": ["note"]}
    for table, frame in (("patients", out.patients), ("encounters", out.encounters), ("events", out.events)):
        assert tuple(frame.columns) == DEID_COLUMNS[table]


def test_the_same_patient_from_another_source_spelling_keeps_one_pseudonym():
    people = _people(
        [{"age_days": 20000, "admit_min": 0, "stay_h": 30, "lab_offsets_h": [2.0], "died": False}]
    )
    people[0]["encounter_mrn"] = "  mrn000000 "
    raw = raw_frames(people)
    out = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1")
    assert out.vault.patients.height == 1
    assert out.encounters["subject_id"].to_list() == out.patients["subject_id"].to_list()


def test_surrogates_are_random_not_derived_from_the_identifier():
    raw = raw_frames(
        _people([{"age_days": 9000, "admit_min": 0, "stay_h": 5, "lab_offsets_h": [], "died": False}])
    )
    a = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1", rng=np.random.default_rng(1))
    b = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1", rng=np.random.default_rng(2))
    assert a.patients["subject_id"].item() != b.patients["subject_id"].item()
    assert a.persist_vault and a.pseudonym_mode == "vault"


def test_an_empty_batch_gives_empty_frames_with_the_allowlisted_columns():
    from clinical_ml.core.ingestion import empty_accepted

    raw = {s: empty_accepted(s) for s in ("patients", "encounters", "labs", "vitals")}
    out = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1")
    for table, frame in (("patients", out.patients), ("encounters", out.encounters), ("events", out.events)):
        assert frame.height == 0 and tuple(frame.columns) == DEID_COLUMNS[table]
    assert out.new_pseudonyms == 0


def test_events_find_their_admission_across_spellings_and_orphans_are_counted_not_released():
    specs = [{"age_days": 20000, "admit_min": 0, "stay_h": 30, "lab_offsets_h": [2.0, 4.0], "died": False}]
    raw = raw_frames(_people(specs * 2))
    labs = raw["labs"]
    raw["labs"] = pl.concat(
        [
            labs.with_columns(pl.col("encounter_id").str.to_lowercase()),  # another source's spelling
            labs.head(1).with_columns(pl.lit("E99999").alias("encounter_id")),  # admission not in this batch
        ]
    )
    out = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1")
    assert out.events.filter(pl.col("code").str.starts_with("LAB//")).height == labs.height
    assert out.orphan_events == 1
    assert out.vault.encounters.height == raw["encounters"].height


def test_the_same_batch_gives_the_same_events():
    """Re-running a batch with the same vault gives the same events (row order may differ: see
    ``_measurements``; the MEDS writer sorts)."""
    specs = [
        {
            "age_days": 15000 + i,
            "admit_min": 30 * i,
            "stay_h": 40,
            "lab_offsets_h": [1.0, 2.0, 3.0],
            "died": False,
        }
        for i in range(40)
    ]
    raw = raw_frames(_people(specs))
    runs = [
        anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1", rng=np.random.default_rng(4))
        for _ in range(3)
    ]
    key = ["subject_id", "time", "code", "available_time"]
    first = runs[0].events.sort(key)
    assert all(r.events.sort(key).equals(first) for r in runs[1:])


def test_streaming_mode_gives_the_same_events_and_orphans_as_the_in_memory_path():
    from clinical_ml.core.reidentification import RiskPolicy, enforce_k_anonymity, withhold_events

    specs = [
        {
            "age_days": 15000 + 400 * i,
            "admit_min": 30 * i,
            "stay_h": 40,
            "lab_offsets_h": [1.0, 2.5],
            "died": i == 3,
        }
        for i in range(12)
    ]
    raw = raw_frames(_people(specs))
    labs = raw["labs"]
    raw["labs"] = pl.concat(
        [
            labs.with_columns(pl.col("encounter_id").str.to_lowercase()),  # another source's spelling
            labs.head(2).with_columns(pl.lit(" e99999").alias("encounter_id")),  # not in this batch
            labs.head(1).with_columns(pl.lit(None, dtype=pl.String).alias("encounter_id")),
        ]
    )
    mem = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1", rng=np.random.default_rng(4))
    lazy_raw = raw | {"labs": raw["labs"].lazy(), "vitals": raw["vitals"].lazy()}
    streamed = anonymize_batch(**lazy_raw, vault=Vault.empty(), batch_id="b1", rng=np.random.default_rng(4))
    assert mem.events_plan is None and streamed.events_plan is not None and streamed.events.height == 0
    assert streamed.orphan_events == mem.orphan_events == 3
    key = ["subject_id", "time", "code", "available_time", "numeric_value"]
    got = streamed.events_plan.collect()
    assert got.schema == mem.events.schema and got.height == mem.events.height > 0
    assert got.sort(key).equals(mem.events.sort(key))
    policy = RiskPolicy(k=20)  # more than the batch's people: everyone is withheld
    a = enforce_k_anonymity(
        patients=mem.patients, encounters=mem.encounters, events=mem.events, policy=policy
    )
    b = enforce_k_anonymity(
        patients=streamed.patients, encounters=streamed.encounters, events=streamed.events, policy=policy
    )
    assert a.subjects_withheld == int(b.withheld_subjects.len()) == 12
    kept = withhold_events(streamed.events_plan, b).collect()
    assert kept.height == a.events.height < got.height
    assert kept.sort(key).equals(a.events.sort(key))


@pytest.mark.parametrize(
    ("unit", "icu_event"), [("MICU", True), ("WARD", False), ("ED", False), ("BED 4", False)]
)
def test_only_a_stay_in_an_icu_gets_an_icu_admission_event(unit, icu_event):
    """A use case anchored at ICU admission must not anchor on a ward or ED stay: the ICU_UNIT event is
    written only for a unit the site mapping types ICU (an unmapped unit has no type)."""
    people = _people(
        [{"age_days": 20000, "admit_min": 0, "stay_h": 30, "lab_offsets_h": [2.0], "died": False}]
    )
    raw = raw_frames(people)
    raw["encounters"] = raw["encounters"].with_columns(pl.lit(unit).alias("unit"))
    out = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1")
    icu = out.events.filter(pl.col("code").str.starts_with("ICU_UNIT//"))["code"].to_list()
    assert icu == (["ICU_UNIT//MICU"] if icu_event else [])
    assert out.events.filter(pl.col("code").str.starts_with("ADMISSION//")).height == 1


def test_fresh_surrogates_are_distinct_new_and_drawn_in_range():
    from clinical_ml.core.anonymization import _fresh_ids, _sorted_unique

    rng = np.random.default_rng(3)
    for a in (np.array([], np.int64), np.array([5]), rng.integers(0, 50, 1000), rng.integers(0, 2**40, 5000)):
        assert np.array_equal(_sorted_unique(a), np.unique(a))
    taken = rng.integers(10**9, 2**53, 2000)
    ids = _fresh_ids(20_000, taken, np.random.default_rng(4))
    assert ids.size == 20_000 == np.unique(ids).size
    assert not np.isin(ids, taken).any() and ids.min() >= 10**9 and ids.max() < 2**53
    assert not np.array_equal(ids, np.sort(ids))  # shuffled: order tells nothing about the draw
