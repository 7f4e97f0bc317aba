"""The stay's payer (a socio-economic proxy) end to end: landing contract and site mapping, the anonymization
boundary (coded values only; a weak quasi-identifier the privacy gate withholds before race), the synthetic
hospital and the MIMIC adapter that deliver it, and the subcohort audit that reports by it."""

from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from clinical_ml.core import ingestion
from clinical_ml.core.anonymization import DEID_COLUMNS, Vault, anonymize_batch
from clinical_ml.core.reidentification import (
    QUASI_IDENTIFIERS,
    RiskPolicy,
    enforce_k_anonymity,
    quasi_identifiers,
    withhold_rare_payers,
)
from clinical_ml.core.row_accounting import privacy_by_group
from clinical_ml.core.site_mapping import CODED_FIELDS, CONTRACT, SiteMapping, load_site_mapping
from clinical_ml_tests.core.test_adapters import mimic_small  # noqa: F401 (a fixture)
from clinical_ml_tests.core.test_anonymization import _people, raw_frames

NOW = datetime(2026, 12, 1)
PAYERS = ("Medicare", "Medicaid", "Private", "Self-pay", "Other government", "Other", "Unknown")
COLUMNS = (
    "encounter_id,mrn,admit_time,discharge_time,admission_type,unit,site,discharge_disposition,death_time"
)


def _encounters_csv(path: Path, payers: list[str] | None, *, header_again: bool = False) -> Path:
    """One encounter per payer (``None``: the file has no payer column); ``header_again`` repeats the
    header as a data row, as a concatenated export does."""
    n = len(payers) if payers is not None else 3
    lines = [COLUMNS + (",payer" if payers is not None else "")]
    for i in range(n):
        row = f"E{i:05d},MRN{i:05d},2026-03-01 08:00:00,2026-03-04 10:00:00,EMERGENCY,MICU,SITE_A,HOME,"
        lines.append(row + (f",{payers[i]}" if payers is not None else ""))
    if header_again:
        lines.append(lines[0])
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_payer_is_an_optional_coded_column_of_the_encounters_with_its_own_vocabulary():
    assert CONTRACT.payer == PAYERS
    assert "payer" in CODED_FIELDS["encounters"]
    assert ingestion.SCHEMAS["encounters"].columns["payer"].nullable
    assert "payer" in ingestion.OPTIONAL_COLUMNS["encounters"]
    assert "payer" in DEID_COLUMNS["encounters"]


def test_a_delivered_payer_is_recoded_and_one_outside_the_vocabulary_becomes_unmapped_and_counted(tmp_path):
    planted = "Blue Cross member 4711 Alice Smith"
    out = ingestion.ingest_file(
        _encounters_csv(
            tmp_path / "encounters.csv", ["medicare ", "Self Pay", planted, "", "OTHER GOVERNMENT"]
        ),
        "encounters",
        now=NOW,
    )
    assert out.rejects.height == 0
    assert out.accepted["payer"].to_list() == ["Medicare", "Self-pay", "unmapped", None, "Other government"]
    assert out.warnings["unmapped:payer"] == 1
    # the delivered text is kept for the data steward in the phi zone only, beside the coded value
    assert out.unmapped_values.to_dicts() == [{"field": "payer", "value": planted, "rows": 1}]


def test_an_export_without_a_payer_column_is_accepted_with_the_payer_not_known(tmp_path):
    out = ingestion.ingest_file(
        _encounters_csv(tmp_path / "encounters.csv", None, header_again=True), "encounters", now=NOW
    )
    assert out.accepted.height == 3 and out.accepted["payer"].null_count() == 3
    # a repeated header is still recognised when the optional column is absent
    assert out.rejects["reason"].to_list() == ["repeated_header"]


def test_site_mappings_map_local_payer_spellings_and_refuse_a_value_outside_the_vocabulary():
    default = load_site_mapping()
    assert default.table("payer")["UNINSURED"] == "Self-pay"
    assert default.table("payer")["MEDICAID"] == "Medicaid"  # a contract value maps to itself
    mimic = load_site_mapping("mimic_iii")
    assert mimic.columns["encounters"]["INSURANCE"] == "payer"
    assert mimic.table("payer")["GOVERNMENT"] == "Other government"
    with pytest.raises(ValidationError, match="payer"):
        SiteMapping.model_validate({"values": {"payer": {"BCBS": "Blue Cross"}}})


def _raw(payers: list[str | None] | None) -> dict[str, pl.DataFrame]:
    spec = {"age_days": 20000, "admit_min": 0, "stay_h": 30, "lab_offsets_h": [2.0], "died": False}
    n = len(payers) if payers is not None else 1
    raw = raw_frames(_people([{**spec, "admit_min": 60 * i} for i in range(n)]))
    if payers is None:
        raw["encounters"] = raw["encounters"].drop("payer")
    else:
        raw["encounters"] = raw["encounters"].with_columns(pl.Series("payer", payers, dtype=pl.String))
    return raw


def test_the_payer_crosses_the_boundary_coded_and_text_outside_the_vocabulary_does_not():
    out = anonymize_batch(
        **_raw(["Medicaid", "Aetna PPO, member Alice Smith", None]), vault=Vault.empty(), batch_id="b"
    )
    assert out.encounters["payer"].to_list() == ["Medicaid", "unmapped", None]
    assert out.unmapped_at_boundary == {"payer": 1}
    assert out.unmapped_released == {"payer": 1}


def test_encounters_ingested_before_the_contract_had_a_payer_cross_with_the_payer_not_known():
    out = anonymize_batch(**_raw(None), vault=Vault.empty(), batch_id="b")
    assert out.encounters.columns == list(DEID_COLUMNS["encounters"])
    assert out.encounters["payer"].to_list() == [None]


def _release(people: list[tuple[int, int, str | None]]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(subject_id, age, payer): women of the same race, ZIP3 and quarter, one admission each."""
    ids = [p[0] for p in people]
    patients = pl.DataFrame(
        {
            "subject_id": ids,
            "sex": "F",
            "race": "White",
            "ethnicity": "Not Hispanic or Latino",
            "zip3": "021",
        },
        schema_overrides={"subject_id": pl.Int64},
    )
    encounters = pl.DataFrame(
        {
            "subject_id": ids,
            "hadm_id": [1000 + i for i in ids],
            "age_years": [p[1] for p in people],
            "period": "2026Q1",
            "payer": [p[2] for p in people],
        },
        schema_overrides={"subject_id": pl.Int64, "age_years": pl.Int32, "payer": pl.String},
    )
    events = pl.DataFrame({"subject_id": ids, "code": "A"}, schema_overrides={"subject_id": pl.Int64})
    return patients, encounters, events


def test_a_rare_payer_is_withheld_and_the_pool_takes_what_it_lacks_from_the_largest_payer():
    # twelve women of 70 on Medicare and two on Medicaid: the two cannot form a class of 5, so their payer
    # is withheld; a pool of 2 would single them out, so 3 Medicare patients (the lowest pseudonyms) join it
    people = [(i, 70, "Medicare") for i in range(12)] + [(20, 70, "Medicaid"), (21, 70, "Medicaid")]
    patients, encounters, _ = _release(people)
    out, withheld = withhold_rare_payers(patients, encounters, RiskPolicy(k=5))
    assert out.filter(pl.col("payer") == "Medicare")["subject_id"].to_list() == list(range(3, 12))
    assert out["payer"].null_count() == 5
    assert withheld.to_list() == [0, 1, 2, 20, 21]
    assert out.drop("payer").equals(encounters.drop("payer"))


def test_a_class_large_enough_keeps_every_payer_held_by_k_people():
    people = [(i, 70, "Medicare") for i in range(6)] + [(10 + i, 70, "Private") for i in range(5)]
    patients, encounters, _ = _release(people)
    out, withheld = withhold_rare_payers(patients, encounters, RiskPolicy(k=5))
    assert out["payer"].to_list() == encounters["payer"].to_list() and withheld.len() == 0


payer_people = st.lists(
    st.tuples(st.sampled_from([30, 50, 70, 85]), st.sampled_from([*PAYERS, None])), min_size=1, max_size=80
)


@settings(deadline=None, max_examples=60)
@given(payer_people, st.integers(2, 6))
def test_the_payer_never_splits_a_class_over_the_other_quasi_identifiers_below_k(people, k):
    patients, encounters, _ = _release([(i, age, payer) for i, (age, payer) in enumerate(people)])
    policy = RiskPolicy(k=k)
    out, withheld = withhold_rare_payers(patients, encounters, policy)
    others = [q for q in QUASI_IDENTIFIERS if q != "payer"]
    qi = quasi_identifiers(patients, out, policy=policy)
    sized = qi.with_columns(
        pl.col("subject_id").n_unique().over(others).alias("_class"),
        pl.col("subject_id").n_unique().over(QUASI_IDENTIFIERS).alias("_with_payer"),
    )
    # where the other attributes keep k people, so does every released payer; nothing else changes
    assert (sized.filter(pl.col("_class") >= k)["_with_payer"] >= k).all()
    assert out.drop("payer").equals(encounters.drop("payer"))
    # only delivered payers are released ("Unknown" is released as not known), and each withheld one counted
    released = out["payer"].drop_nulls().to_list()
    delivered = encounters["payer"].to_list()
    assert all(p == d for p, d in zip(out["payer"], delivered, strict=True) if p is not None)
    assert "Unknown" not in released
    lost = {
        s
        for s, p, d in zip(out["subject_id"], out["payer"], delivered, strict=True)
        if p is None and d not in (None, "Unknown")
    }
    assert set(withheld.to_list()) == lost


@settings(deadline=None, max_examples=40)
@given(payer_people, st.integers(2, 6))
def test_after_the_remedies_every_class_with_the_payer_holds_k_people(people, k):
    patients, encounters, events = _release([(i, age, payer) for i, (age, payer) in enumerate(people)])
    policy = RiskPolicy(k=k)
    out = enforce_k_anonymity(patients=patients, encounters=encounters, events=events, policy=policy)
    qi = quasi_identifiers(out.patients, out.encounters, policy=policy)
    assert (
        qi.group_by(list(QUASI_IDENTIFIERS)).agg(pl.col("subject_id").n_unique())["subject_id"] >= k
    ).all()
    assert (
        out.payer_suppressed
        == out.encounters.filter(
            pl.col("payer").is_null()
            & pl.col("hadm_id").is_in(
                encounters.filter(pl.col("payer").is_not_null() & (pl.col("payer") != "Unknown"))[
                    "hadm_id"
                ].implode()
            )
        ).height
    )


def test_without_a_delivered_payer_the_remedies_are_those_of_the_other_quasi_identifiers():
    rng = np.random.default_rng(4)
    people = [(i, int(rng.choice([30, 50, 70])), None) for i in range(60)]
    patients, encounters, events = _release(people)
    patients = patients.with_columns(pl.Series("zip3", rng.choice(["021", "024", "100"], 60)))
    with_column = enforce_k_anonymity(
        patients=patients, encounters=encounters, events=events, policy=RiskPolicy()
    )
    without = enforce_k_anonymity(
        patients=patients, encounters=encounters.drop("payer"), events=events, policy=RiskPolicy()
    )
    assert with_column.patients.equals(without.patients)
    assert with_column.encounters.drop("payer").equals(without.encounters)
    assert with_column.before.as_dict() == without.before.as_dict()
    assert with_column.after.as_dict() == without.after.as_dict()
    # no payer delivered: the payer is not an audited group of this batch
    assert "payer" not in with_column.audited_groups and with_column.payer_suppressed == 0


def test_what_the_payer_remedy_takes_from_each_payer_group_is_counted():
    people = [(i, 70, "Medicare") for i in range(12)] + [(20, 70, "Medicaid"), (21, 70, "Medicaid")]
    patients, encounters, events = _release(people)
    out = enforce_k_anonymity(patients=patients, encounters=encounters, events=events, policy=RiskPolicy(k=5))
    groups = out.audited_groups["payer"]
    assert groups["Medicaid"] == {"patients": 2, "withheld": 0, "payer_not_released": 2}
    assert groups["Medicare"] == {"patients": 12, "withheld": 0, "payer_not_released": 3}
    # the payer costs the payer audit only: nobody lost their race or their record
    assert out.subjects_withheld == 0 and out.race_suppressed == 0
    rows = {
        (r["attribute"], r["group"]): r for r in privacy_by_group([{"audited_groups": out.audited_groups}])
    }
    assert rows[("payer", "Medicaid")]["share_lost"] == 1.0 and rows[("payer", "Medicaid")]["over_limit"]
    assert rows[("payer", "Medicare")]["lost"] == 3
    assert rows[("race_ethnicity", "White")]["lost"] == 0
    # a use case that does not audit the payer is not shown what the privacy gate took from it
    audited = privacy_by_group([{"audited_groups": out.audited_groups}], attributes=["sex", "race_ethnicity"])
    assert {r["attribute"] for r in audited} == {"sex", "race_ethnicity"}


def test_the_synthetic_hospital_writes_a_payer_that_follows_age_and_coverage(tmp_path):
    from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital

    h = generate_hospital(tmp_path, SyntheticConfig(n_patients=1500, n_batches=1, seed=3))
    batch = tmp_path / h.batch_ids[0]
    enc = ingestion.ingest_file(batch / "encounters.csv", "encounters", now=NOW).accepted
    pat = ingestion.ingest_file(batch / "patients.csv", "patients", now=NOW).accepted
    rows = enc.join(pat.select("mrn", "birth_date", "race", "ethnicity"), on="mrn").with_columns(
        ((pl.col("admit_time").dt.date() - pl.col("birth_date")).dt.total_days() / 365.25).alias("age")
    )
    assert set(rows["payer"].unique()) <= set(PAYERS)

    def share(frame: pl.DataFrame, payer: str) -> float:
        return float((frame["payer"] == payer).mean())

    older, younger = rows.filter(pl.col("age") >= 66), rows.filter(pl.col("age") < 64)
    assert share(older, "Medicare") > 0.75 > share(younger, "Medicare")
    assert share(younger, "Private") > share(older, "Private")
    minority = (pl.col("race") == "Black or African American") | (pl.col("ethnicity") == "Hispanic or Latino")
    assert share(younger.filter(minority), "Medicaid") > share(younger.filter(~minority), "Medicaid")


def test_the_mimic_adapter_maps_insurance_onto_the_payer(mimic_small: Path):  # noqa: F811
    from clinical_ml.core.adapters import mimic

    table = mimic_small / "tables" / "admissions.parquet"
    admissions = pl.read_parquet(table)
    insurance = ["Medicare", "Self Pay", "Charity plan of Dr Who"]
    admissions.with_columns(pl.Series("insurance", insurance)).write_parquet(table)
    out = mimic.adapt(mimic_small, rng=np.random.default_rng(1))
    by_stay = dict(
        zip(out.encounters["admit_time"].to_list(), out.encounters["payer"].to_list(), strict=True)
    )
    assert [by_stay[t] for t in admissions["admittime"].to_list()] == ["Medicare", "Self-pay", "Other"]
    assert out.counts["insurance_unmapped"] == 1


def test_the_mimic_adapter_without_insurance_leaves_the_payer_unknown(mimic_small: Path):  # noqa: F811
    from clinical_ml.core.adapters import mimic

    out = mimic.adapt(mimic_small, rng=np.random.default_rng(1))
    assert set(out.encounters["payer"].to_list()) == {"Unknown"}


def test_the_cohort_carries_the_payer_and_a_deid_layer_without_it_reads_as_not_known():
    from clinical_ml.core.labeling import build_cohort
    from clinical_ml_tests.core.test_labeling import BASE, d, stays

    enc, pat = stays([{"s": 1, "a": 10, "in": d(0), "out": d(3)}, {"s": 2, "a": 20, "in": d(0), "out": d(4)}])
    cohort, _ = build_cohort(enc.with_columns(pl.Series("payer", ["Medicaid", None])), pat, BASE)
    assert dict(zip(cohort["hadm_id"], cohort["payer"], strict=True)) == {10: "Medicaid", 20: None}
    cohort, _ = build_cohort(enc, pat, BASE)
    assert cohort["payer"].null_count() == cohort.height == 2


def test_stays_released_before_the_payer_existed_are_read_as_not_known(tmp_path):
    from clinical_ml.core.artifacts import DeidStore
    from clinical_ml.core.labeling import build_cohort
    from clinical_ml_tests.core.test_labeling import BASE, d, stays

    deid = DeidStore(tmp_path / "deid", tmp_path / "reports")
    enc, pat = stays([{"s": 1, "a": 10, "in": d(0), "out": d(3)}, {"s": 2, "a": 20, "in": d(1), "out": d(4)}])
    old, new = enc.filter(pl.col("hadm_id") == 10), enc.filter(pl.col("hadm_id") == 20)
    deid.encounters.part("2026-01-05").write(old)  # anonymized before the contract had a payer
    deid.encounters.part("2026-01-19").write(new.with_columns(pl.lit("Private").alias("payer")))
    with pytest.raises(pl.exceptions.PolarsError):
        deid.encounters.read_all()  # why the graph reads the encounters relaxed
    cohort, _ = build_cohort(deid.encounters.read_all(relaxed=True), pat, BASE)
    assert dict(zip(cohort["hadm_id"], cohort["payer"], strict=True)) == {10: None, 20: "Private"}


def test_the_audit_reports_by_payer_when_the_use_case_lists_it():
    from clinical_ml.core.fairness import audit_subcohorts
    from clinical_ml.core.usecase import OperatingPoint, Subgroups

    rng = np.random.default_rng(5)
    n = 3000
    p = 1 / (1 + np.exp(-rng.normal(-1.8, 1.2, n)))
    y = rng.random(n) < p
    payer = rng.choice(["Medicare", "Medicaid", "Private", None], n, p=[0.45, 0.2, 0.25, 0.1])
    frame = pl.DataFrame(
        {
            "split": np.where(np.arange(n) < 1000, "tuning", "held_out"),
            "label": y,
            "risk": p,
            "sex": rng.choice(["F", "M"], n),
            "payer": pl.Series(payer, dtype=pl.String),
            "subject_id": np.arange(n),
        }
    )
    audit = audit_subcohorts(
        frame,
        threshold=0.2,
        subgroups=Subgroups(attributes=["sex", "payer"], age_bands=[18, 65]),
        operating_point=OperatingPoint(policy="min_sensitivity", target=0.8),
        n_boot=50,
        seed=1,
    )
    rows = audit.analysis.rows_of("payer")
    # a stay without a payer (not delivered, or withheld by the privacy gate) is in the group "Unknown"
    assert [r.group for r in rows] == ["Medicaid", "Medicare", "Private", "Unknown"]
    held = frame.filter(pl.col("split") == "held_out")
    assert [r.n for r in rows] == [
        held.filter(pl.col("payer").fill_null("Unknown") == g).height
        for g in ("Medicaid", "Medicare", "Private", "Unknown")
    ]
    assert any(r.attribute == "sex & payer" for r in audit.analysis.rows)
    with pytest.raises(ValidationError):
        Subgroups(attributes=["insurance"], age_bands=[18, 65])
