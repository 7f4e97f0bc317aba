"""Streaming k-anonymity (issue 18, item 5): people too easy to single out in their delivery are held back in
the phi zone and released with a later delivery once enough people alike have been, instead of being lost to
the audit. Real files: a synthetic hospital landed, ingested and released batch by batch (:func:`publish_batch`,
what the anonymization asset runs)."""

import shutil
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from clinical_ml.core.artifacts import DeidStore, PhiStore
from clinical_ml.core.deid_publish import Published, ReleaseSettings, publish_batch, suppresses_race
from clinical_ml.core.delivery import ZonePaths, process_batch
from clinical_ml.core.holdback import HELD, RELEASED, hold_record, rows_of, still_held
from clinical_ml.core.imaging import process_imaging
from clinical_ml.core.reidentification import RiskPolicy, measure_risk, released_quasi_identifiers
from clinical_ml.core.row_accounting import batch_account, delivery_rows, privacy_by_group
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital

NOW = datetime(2026, 3, 1)
POLICY = RiskPolicy(
    k=5, age_bands=(0, 18, 45, 65, 80), races_kept=("White", "Black or African American", "Asian", "Unknown")
)


def _zones(root: Path) -> ZonePaths:
    return ZonePaths(
        landing=root / "landing", archive=root / "archive", quarantine=root / "quarantine", phi=root / "phi"
    )


def _release(
    root: Path,
    batch: str,
    *,
    scope: str = "cumulative",
    policy: RiskPolicy = POLICY,
    max_holds: int = 2,
    max_hold_deliveries: int = 30,
) -> Published:
    return publish_batch(
        paths=_zones(root),
        deid=DeidStore(root / "deid", root / "reports"),
        batch_id=batch,
        settings=ReleaseSettings(
            policy=policy,
            pseudonym_mode="vault",
            hmac_key=None,
            max_shift_weeks=52,
            seed=7,
            risk_scope=scope,
            max_holds=max_holds,
            max_hold_deliveries=max_hold_deliveries,
        ),
    )


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("hospital")
    hospital = generate_hospital(
        root / "landing",
        SyntheticConfig(n_patients=300, n_batches=4, seed=23, days_per_batch=10, imaging=True),
    )
    for batch in hospital.batch_ids:
        process_batch(zones=_zones(root), batch_id=batch, now=NOW)
        process_imaging(zones=_zones(root), batch_id=batch, now=NOW)
    return root, list(hospital.batch_ids)


@pytest.fixture(scope="module")
def released(ingested, tmp_path_factory) -> tuple[Path, list[str]]:
    base, batches = ingested
    root = tmp_path_factory.mktemp("released")
    shutil.copytree(base, root, dirs_exist_ok=True)
    for batch in batches:
        _release(root, batch)
    return root, batches


def _privacy(root: Path, batches: list[str]) -> list[dict]:
    deid = DeidStore(root / "deid", root / "reports")
    return [deid.privacy.part(b).read().as_dict() for b in batches]


def test_people_held_back_are_released_with_a_later_delivery_and_never_twice(released):
    root, batches = released
    deid, phi = DeidStore(root / "deid", root / "reports"), PhiStore(root / "phi")
    records = _privacy(root, batches)
    assert all(r["released"] for r in records)
    held_first = records[0]["subjects_withheld"]
    later = sum(r["held_back_from_earlier"]["patients_released"] for r in records[1:])
    assert held_first > 0 and later > 0  # the first delivery held people back; later ones released some
    # every admission released once, whatever delivery released it
    encounters = pl.concat([deid.encounters.part(b).read() for b in batches])
    assert encounters["hadm_id"].is_unique().all()
    # the cumulative release holds k people in every class (the gate's guarantee, measured on the union)
    union = released_quasi_identifiers(
        [(deid.patients.part(b).read(), deid.encounters.part(b).read()) for b in batches], policy=POLICY
    )
    risk = measure_risk(union, k=POLICY.k)
    assert risk.k_min is not None and risk.k_min >= POLICY.k
    # a carried admission keeps the delivery it came in as its batch_id (traceable), in a later part
    carried = [pl.read_parquet(deid.encounters.part(b).path).filter(pl.col("batch_id") != b) for b in batches]
    assert sum(c.height for c in carried) == sum(
        sum(r["held_back_from_earlier"]["admissions_released_by_batch"].values()) for r in records
    )
    assert all(c["batch_id"].is_in(batches[:i]).all() for i, c in enumerate(carried))
    # the hold record is in the phi zone only, and names no one released twice
    holds = [phi.held.part(b).read() for b in batches]
    pending = still_held(holds)
    assert set(pending["origin_batch"]) <= set(batches)
    assert not (root / "deid" / "held").exists()
    # every accepted admission is released exactly once or still held back (no consent register here)
    accepted = sum(
        next(
            s for s in batch_account(_zones(root), root / "deid", b).sources if s.source == "encounters"
        ).rows_accepted
        for b in batches
    )
    held_admissions = (
        records[-1]["admissions_withheld"] + records[-1]["held_back_from_earlier"]["admissions_held"]
    )
    assert encounters.height + held_admissions == accepted


def test_the_dicom_files_of_people_held_back_are_released_with_them(released):
    root, batches = released
    records = _privacy(root, batches)
    carried = sum((r.get("imaging") or {}).get("carried_from_earlier", 0) for r in records)
    assert carried > 0  # held-back people had imaging, released later with them
    deid = DeidStore(root / "deid", root / "reports")
    for batch in batches:
        released = set(deid.patients.part(batch).read()["subject_id"].cast(pl.String))
        folders = (
            {p.name for p in (root / "deid" / "imaging" / batch).iterdir()}
            if (root / "deid" / "imaging" / batch).is_dir()
            else set()
        )
        assert folders <= released, batch  # files only of the people this batch released
        events = deid.events.part(batch).read().filter(pl.col("code").str.starts_with("IMAGING//"))
        assert set(events["subject_id"].cast(pl.String)) <= released
    # a carried person's studies are in the later batch's folder, under the pseudonym they were released with
    later = [
        b
        for b, r in zip(batches, records, strict=True)
        if (r.get("imaging") or {}).get("carried_from_earlier")
    ]
    encounters = pl.concat(
        [deid.encounters.part(b).read().with_columns(pl.lit(b).alias("_part")) for b in later]
    )
    moved = encounters.filter(pl.col("batch_id") != pl.col("_part"))
    assert moved.height > 0
    with_files = {(b, p.name) for b in later for p in (root / "deid" / "imaging" / b).iterdir() if p.is_dir()}
    assert any((r["_part"], str(r["subject_id"])) in with_files for r in moved.iter_rows(named=True))


def test_the_audit_counts_a_person_released_later_as_released(released, ingested, tmp_path):
    root, batches = released
    with_hold = {(r["attribute"], r["group"]): r for r in privacy_by_group(_privacy(root, batches))}
    base, _ = ingested
    alone = tmp_path / "per_batch"
    shutil.copytree(base, alone)
    for batch in batches:  # the same batches, judged each on its own: no hold, nothing released later
        _release(alone, batch, scope="batch")
    without = {(r["attribute"], r["group"]): r for r in privacy_by_group(_privacy(alone, batches))}
    assert with_hold.keys() == without.keys()
    for key, row in with_hold.items():
        assert (
            row["patients"] == without[key]["patients"]
        )  # delivered people counted once per batch, as before
        assert 0 <= row["withheld"] <= row["patients"]
    assert sum(r["released_later"] for r in with_hold.values()) > 0
    assert all(r["released_later"] == 0 for r in without.values())
    # net withheld over every group of one attribute = the people still held back after the last batch
    phi = PhiStore(root / "phi")
    pending = still_held([phi.held.part(b).read() for b in batches])
    sex = [r for (attribute, _), r in with_hold.items() if attribute == "sex"]
    assert sum(r["withheld"] for r in sex) == pending.height
    # per delivery, admissions released later count as released in the row of the delivery they came in
    deid = DeidStore(root / "deid", root / "reports")
    rows = {
        r["batch_id"]: r
        for r in delivery_rows([deid.accounting.part(b).read().as_dict() for b in batches], {})
    }
    assert rows[batches[0]]["released_later"] > 0
    for b in batches:
        r = rows[b]
        assert r["accepted"] == r["withheld"] + r["released"], b


def test_a_batch_run_again_after_later_ones_gives_the_same_release(released, tmp_path):
    root, batches = released
    again = tmp_path / "again"
    shutil.copytree(root, again)
    summaries = {batch: _release(again, batch).release.summary for batch in batches[:3]}
    # the asset page says what each batch held back and what it released of earlier batches' held-back people
    records = _privacy(root, batches)
    first, second = records[0], records[1]["held_back_from_earlier"]
    assert (
        f"- held back (kept in the phi zone, judged again with each later batch): {first['subjects_withheld']} "
        f"patients, {first['admissions_withheld']} admissions" in summaries[batches[0]]
    )
    assert "released with this one" not in summaries[batches[0]]
    assert (
        f"- held back by earlier batches, released with this one: {second['patients_released']} patients, "
        f"{second['admissions_released']} admissions, {second['events_released']} events; still held back: "
        f"{second['patients_held']} patients" in summaries[batches[1]]
    )
    for table in ("patients", "encounters", "events"):
        for batch in batches:
            a = pl.read_parquet(root / "deid" / table / f"{batch}.parquet")
            b = pl.read_parquet(again / "deid" / table / f"{batch}.parquet")
            assert a.sort(a.columns, nulls_last=True).equals(b.sort(b.columns, nulls_last=True)), (
                table,
                batch,
            )
    for batch in batches:
        assert (
            PhiStore(root / "phi")
            .held.part(batch)
            .read()
            .equals(PhiStore(again / "phi").held.part(batch).read())
        )


def test_still_held_and_rows_of_follow_the_records():
    a = pl.DataFrame({"origin_batch": ["b1", "b1"], "mrn": ["M1", "M2"], "status": [HELD, HELD]})
    b = pl.DataFrame({"origin_batch": ["b1", "b2"], "mrn": ["M1", "M3"], "status": [RELEASED, HELD]})
    c = pl.DataFrame({"origin_batch": ["b1"], "mrn": ["M2"], "status": [HELD]})  # held again by a later batch
    assert still_held([a, b, c]).rows() == [("b1", "M2", 2), ("b2", "M3", 1)]
    assert still_held([]).height == 0
    raw = {
        "patients": pl.DataFrame({"mrn": [" m2", "M9"]}),
        "encounters": pl.DataFrame({"mrn": ["m2 ", "M9"], "encounter_id": ["e1", "E9"]}),
        "labs": pl.DataFrame({"encounter_id": [" E1", "e9", "E1"], "value": [1.0, 2.0, 3.0]}),
    }
    rows = rows_of(raw, pl.Series(["M2"]))
    assert rows["patients"].height == 1 and rows["encounters"]["encounter_id"].to_list() == ["e1"]
    assert rows["labs"]["value"].to_list() == [1.0, 3.0]  # identifiers matched as pseudonyms key them


def test_hold_record_lists_held_people_and_released_carried_ones_and_refuses_an_unknown_person():
    encounters = pl.DataFrame({"hadm_id": [1, 2, 3, 4], "subject_id": [10, 11, 12, 12]})
    origins = pl.DataFrame({"hadm_id": [3], "origin_batch": ["b0"]})
    mrn_of = pl.DataFrame({"subject_id": [10, 11, 12], "mrn": ["A", "B", "C"]})
    record = hold_record(
        batch_id="b1", encounters=encounters, origins=origins, withheld=pl.Series([11]), mrn_of=mrn_of
    )
    # 10 released (own: no row), 11 held, 12's carried admission released (its own one needs no row)
    assert record.rows() == [("b0", "C", RELEASED), ("b1", "B", HELD)]
    with pytest.raises(ValueError, match="no patient in the vault"):
        hold_record(
            batch_id="b1",
            encounters=encounters,
            origins=origins,
            withheld=pl.Series([11]),
            mrn_of=mrn_of.head(1),
        )


def test_holding_back_instead_of_suppressing_race_keeps_the_race_audit(released, ingested, tmp_path):
    """Race is kept and the rare held back instead, until they have been held back by ``max_holds``
    deliveries: only then is their race withheld to release them (so no one is held for ever for it)."""
    root, batches = released
    base, _ = ingested
    policy = RiskPolicy(
        k=POLICY.k, age_bands=POLICY.age_bands, races_kept=POLICY.races_kept, suppress_race=False
    )
    runs = {}
    for max_holds in (2, len(batches)):
        runs[max_holds] = tmp_path / f"holds_{max_holds}"
        shutil.copytree(base, runs[max_holds])
        for batch in batches:
            _release(runs[max_holds], batch, policy=policy, max_holds=max_holds)
    records = _privacy(runs[2], batches)
    assert all(r["released"] for r in records)
    # nobody is overdue before the third delivery; the overdue are released with race withheld after that
    assert [r["race_suppressed"] for r in records[:2]] == [0, 0] and sum(
        r["race_suppressed"] for r in records
    ) > 0
    assert all(r["race_suppressed"] == 0 for r in _privacy(runs[len(batches)], batches))  # never overdue
    assert sum(r["race_suppressed"] for r in _privacy(root, batches)) > sum(
        r["race_suppressed"] for r in records
    )
    for run in runs.values():
        deid = DeidStore(run / "deid", run / "reports")
        union = released_quasi_identifiers(
            [(deid.patients.part(b).read(), deid.encounters.part(b).read()) for b in batches], policy=POLICY
        )
        assert (measure_risk(union, k=POLICY.k).k_min or 0) >= POLICY.k  # still k-anonymous over the union
    never = privacy_by_group(_privacy(runs[len(batches)], batches), attributes=["race_ethnicity"])
    for row in never:
        if row["group"] in (POLICY.races_kept or ()):
            assert row["race_not_released"] == 0 and row["lost"] == row["withheld"], row["group"]
    pending = still_held([PhiStore(runs[len(batches)] / "phi").held.part(b).read() for b in batches])
    assert sum(r["withheld"] for r in never) == pending.height  # lost only while still held back


def test_a_person_held_back_longer_than_max_hold_deliveries_is_withheld_for_good(ingested, tmp_path):
    """A batch reads the hold records and rows of the last ``max_hold_deliveries`` batches only: however long
    the stream, it reads a bounded number of earlier deliveries; someone held longer stays withheld."""
    base, batches = ingested
    policy = RiskPolicy(
        k=POLICY.k, age_bands=POLICY.age_bands, races_kept=POLICY.races_kept, suppress_race=False
    )
    origins = {}
    for window in (1, 30):
        run = tmp_path / f"window_{window}"
        shutil.copytree(base, run)
        for batch in batches:
            _release(run, batch, policy=policy, max_holds=len(batches), max_hold_deliveries=window)
        records = _privacy(run, batches)
        origins[window] = [set(r["held_back_from_earlier"]["admissions_released_by_batch"]) for r in records]
        assert all(r["released"] for r in records)
    # with a window of one delivery, a batch releases held-back people of the batch just before it only
    assert all(o <= set(batches[i - 1 : i]) for i, o in enumerate(origins[1]))
    assert any(len(o) > 1 for o in origins[30])  # the default window reaches further back on this hospital
    with pytest.raises(ValueError, match="max_hold_deliveries"):
        ReleaseSettings(
            policy=POLICY, pseudonym_mode="vault", hmac_key=None, max_shift_weeks=52, max_hold_deliveries=0
        )


def test_race_is_always_suppressed_where_nothing_is_held_back():
    assert suppresses_race("batch", "hold_back") and suppresses_race("cumulative", "suppress")
    assert not suppresses_race("cumulative", "hold_back")
    with pytest.raises(ValueError, match="race_remedy"):
        suppresses_race("cumulative", "drop")
