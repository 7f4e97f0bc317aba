"""MIMIC-III delivered as a raw hospital export through the landing zone (issue 16 item 8).

The MIMIC-III demo is written as CSV batches in MIMIC's own terms (``clinical_ml/core/adapters/mimic_landing.py``)
with the ``mimic_iii`` site mapping, then ingested and anonymized by the real jobs, batch by batch. Measured:
the share of delivered lab and vital rows accepted (from the ledger), what went unmapped, and the cohort of
``mimic_readmission_30d`` built from the landing path against the one built from the adapter's output.
"""

from datetime import timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from clinical_ml.core.adapters import mimic, mimic_landing
from clinical_ml.core.adapters.common import read_table
from clinical_ml.core.artifacts import DeidStore
from clinical_ml.core.delivery import ZonePaths, read_ledger_entry
from clinical_ml.core.feasibility import label_counts
from clinical_ml.core.labeling import build_cohort, build_labels
from clinical_ml.core.landing import find_complete_batches
from clinical_ml.core.row_accounting import batch_account
from clinical_ml.core.site_mapping import load_site_mapping
from clinical_ml.core.units import VITAL_CODES
from clinical_ml.core.usecase import load_use_case
from clinical_ml_tests.conftest import PROJECT_ROOT

SOURCE = mimic.default_source()
pytestmark = [
    pytest.mark.skipif(
        not (SOURCE / "tables" / "chartevents.parquet").exists(),
        reason=f"the MIMIC-III demo is not at {SOURCE} (../shared/data/mimic-iii-demo)",
    ),
    pytest.mark.slow,
]
USE_CASE = "mimic_readmission_30d"
MIN_ACCEPTED = 0.95
# Coded values sent to Other/Unknown per field: at most this share of rows (none may be unmapped). MIMIC
# itself holds 12 of 129 admissions as unknown or unable to obtain, and records Hispanic origin with no
# race (15 admissions): the adapter's race is Unknown for 19 of its 100 patients, and so is the mapping's.
MAX_CATCH_ALL_SHARE = 0.25
# The demo's batches of about 32 admissions cannot meet the privacy gate's k = 5 (every admission would be
# withheld); the adapter path has no gate either, so the paths are compared with k = 1.
K_ANONYMITY = 1


@pytest.fixture(scope="module")
def landing_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, mimic_landing.ExportCounts]:
    from clinical_ml.defs.build import build_definitions
    from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
    from clinical_ml.resources.pseudonym_secret import anonymization_settings_from_env

    root = tmp_path_factory.mktemp("mimic_landing") / "data"
    counts = mimic_landing.write_landing_batches(SOURCE, root / "landing", n_batches=4)
    defs = build_definitions(
        data_root=root,
        usecases_dir=PROJECT_ROOT / "usecases",
        anonymization=anonymization_settings_from_env(pseudonym_seed=7, k_anonymity_min=K_ANONYMITY),
    )
    batches = find_complete_batches(root / "landing")
    assert len(batches) == counts.batches == 4
    job = defs.resolve_job_def("batch_ingestion_job")
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, [b.batch_id for b in batches])
        for b in batches:
            result = job.execute_in_process(
                instance=instance,
                partition_key=b.batch_id,
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                tags={"batch_id": b.batch_id, "content_sha256": b.content_hash},
            )
            assert result.success, b.batch_id
    return root, counts


def _accounts(root: Path) -> dict[str, dict[str, int]]:
    """Per source, rows delivered, accepted and rejected by reason over every batch (from the ledger)."""
    zones = ZonePaths(root / "landing", root / "archive", root / "quarantine", root / "phi")
    totals: dict[str, dict[str, int]] = {}
    for b in find_complete_batches(root / "landing"):
        for s in batch_account(zones, root / "deid", b.batch_id).sources:
            t = totals.setdefault(s.source, {"delivered": 0, "accepted": 0})
            assert s.accounted, (b.batch_id, s.source)
            t["delivered"] += s.rows_in
            t["accepted"] += s.rows_accepted
            for reason, n in s.rejected_by_reason:
                t[reason] = t.get(reason, 0) + n
    return totals


def test_the_mapping_file_is_the_one_generated_from_the_adapter():
    d_labitems = read_table(SOURCE, "d_labitems", columns=["itemid", "loinc_code"])
    committed = PROJECT_ROOT / "site_mappings" / f"{mimic_landing.SITE_MAPPING_NAME}.yaml"
    assert committed.read_text() == mimic_landing.site_mapping_yaml(d_labitems), (
        "regenerate: python -m clinical_ml.core.adapters.mimic_landing --mapping site_mappings/mimic_iii.yaml"
    )
    mapping = load_site_mapping(mimic_landing.SITE_MAPPING_NAME)
    # the mapping reads MIMIC's values as the adapter does, value by value
    race, ethnicity = mimic._race_ethnicity(pl.col("e"))
    frame = pl.DataFrame({"e": list(mimic_landing.ETHNICITY_VALUES)})
    expected = frame.select("e", race.alias("race"), ethnicity.alias("ethnicity"))
    for value, r, e in expected.iter_rows():
        assert mapping.table("race")[value] == r and mapping.table("ethnicity")[value] == e
    # vitals as the adapter codes them, blood pressure by method (the adapter folds both methods into one)
    vitals = yaml.safe_load(committed.read_text())["codes"]["vitals"]
    assert set(vitals) == {str(i) for i in mimic.CHART_ITEMS}
    for item, (code, _) in mimic.CHART_ITEMS.items():
        method = mimic_landing.BP_METHODS.get(item)
        assert vitals[str(item)] == (f"{code}_{method}" if method else code), item
        assert vitals[str(item)] in VITAL_CODES
    assert set(mimic_landing.BP_METHODS) <= {
        i for i, (c, _) in mimic.CHART_ITEMS.items() if c.endswith("_bp")
    }


def test_every_delivered_row_is_accounted_for_and_the_labs_are_accepted(landing_run):
    root, counts = landing_run
    totals = _accounts(root)
    print("\nMIMIC-III export through the landing zone:", counts)
    for source, t in sorted(totals.items()):
        print(f"  {source}: {t}  accepted {t['accepted'] / t['delivered']:.2%}")
    assert (
        totals["labs"]["delivered"] == counts.lab_rows and totals["vitals"]["delivered"] == counts.vital_rows
    )
    assert totals["patients"]["accepted"] >= counts.patients  # a patient comes with each batch of its stays
    assert totals["encounters"]["accepted"] == counts.admissions
    assert totals["labs"]["accepted"] >= MIN_ACCEPTED * totals["labs"]["delivered"], totals["labs"]
    # no item id reached the landing zone without a vocabulary code, no unit spelling of the labs is unknown
    assert totals["labs"].get("not_allowed:loinc_code", 0) == totals["vitals"].get("not_allowed:code", 0) == 0
    assert totals["labs"].get("unknown_unit", 0) == 0


def _warnings(root: Path, source: str) -> dict[str, int]:
    zones = ZonePaths(root / "landing", root / "archive", root / "quarantine", root / "phi")
    out: dict[str, int] = {}
    for b in find_complete_batches(root / "landing"):
        for key, n in (read_ledger_entry(zones, b.batch_id, source) or {}).get("warnings", {}).items():
            out[key] = out.get(key, 0) + n
    return out


def test_at_least_95_percent_of_vital_rows_are_accepted(landing_run):
    totals = _accounts(landing_run[0])["vitals"]
    assert totals["accepted"] >= MIN_ACCEPTED * totals["delivered"], totals


def test_the_declared_skew_is_tolerated_and_the_rest_still_rejected_with_reasons(landing_run):
    """What the mapping declares (one charting interval of clock skew, ``?F``/``?C``, blood pressure by
    method) is accepted; what remains is rejected by the contract's rules, each with its reason."""
    root, _ = landing_run
    totals = _accounts(root)["vitals"]
    delivered = pl.concat(
        pl.read_csv(root / "landing" / b.batch_id / "vitals.csv", infer_schema=False)
        for b in find_complete_batches(root / "landing")
    ).select(
        (pl.col("CHARTTIME").str.to_datetime() - pl.col("STORETIME").str.to_datetime()).alias("early"),
        pl.col("VALUENUM").is_not_null().alias("valued"),
    )
    skew = timedelta(minutes=mimic_landing.CLOCK_SKEW_MINUTES["stored_before_charted"])
    n_within = delivered.filter((pl.col("early") > timedelta(0)) & (pl.col("early") <= skew)).height
    n_beyond = delivered.filter((pl.col("early") > skew) & pl.col("valued")).height
    tolerated = _warnings(root, "vitals").get("stored_before_charted_tolerated", 0)
    print(
        f"\nvitals stored early within {skew}: {n_within} delivered, {tolerated} accepted; beyond: {n_beyond}"
    )
    assert 0 < tolerated <= n_within
    assert totals.get("stored_before_charted", 0) == n_beyond
    # accepted rows are never available before they were charted
    raw = pl.read_parquet(root / "phi" / "raw" / "vitals" / "*.parquet")
    assert raw.height == totals["accepted"] and (raw["stored_time"] >= raw["charted_time"]).all()
    assert set(raw["code"]) >= {
        f"{c}_bp_{m}" for c in ("systolic", "diastolic", "mean") for m in ("invasive", "noninvasive")
    }
    # no unit spelling is unknown; the rest are MIMIC's own: two items of one code charted at the same minute
    # with other values (respiratory rate total and spontaneous, two arterial lines), rows without a value,
    # charts after death
    other = {k: n for k, n in totals.items() if k not in ("delivered", "accepted")}
    assert set(other) <= {
        "conflicting_duplicate",
        "missing_value:value",
        "event_after_death",
        "duplicate_row",
    }, other


@pytest.fixture(scope="module")
def adapted() -> mimic.AdaptedSource:
    return mimic.adapt(SOURCE, rng=np.random.default_rng(7))


def _distribution(frame: pl.DataFrame, field: str) -> dict[str, int]:
    return dict(frame[field].fill_null("(missing)").value_counts().iter_rows())


def test_coded_values_are_mapped_as_the_adapter_maps_them(landing_run, adapted):
    root, _ = landing_run
    deid = DeidStore(root / "deid", root / "reports")
    # a patient is delivered with each batch holding one of its admissions: one row per patient here
    patients = deid.patients.read_all().unique("subject_id", keep="last")
    encounters = deid.encounters.read_all()
    assert encounters.height == adapted.encounters.height and patients.height == adapted.patients.height
    for landing, adapter, fields in (
        (patients, adapted.patients, ("sex", "race", "ethnicity")),
        (
            encounters,
            adapted.encounters,
            ("admission_type", "unit", "unit_type", "site", "discharge_disposition"),
        ),
    ):
        for field in fields:
            n_unmapped = int((landing[field] == "unmapped").sum())
            n_catch_all = int(landing[field].is_in(["Unknown", "Other", "OTHER", "UNKNOWN"]).sum())
            assert n_unmapped == 0, field
            assert n_catch_all <= MAX_CATCH_ALL_SHARE * landing.height, (field, n_catch_all)
            expected = _distribution(adapter, field)
            if field == "race":
                # the anonymizer generalizes a race too rare to release into Other (the privacy record's
                # race_generalized); the adapter's output does not pass the anonymizer
                rare = {k: n for k, n in expected.items() if k not in _distribution(landing, field)}
                expected = {k: n for k, n in expected.items() if k not in rare}
                expected["Other"] = expected.get("Other", 0) + sum(rare.values())
            assert _distribution(landing, field) == expected, field


def test_the_readmission_cohort_agrees_with_the_adapter_path(landing_run, adapted):
    root, _ = landing_run
    use_case = load_use_case(PROJECT_ROOT / "usecases" / f"{USE_CASE}.yaml")
    deid = DeidStore(root / "deid", root / "reports")
    landing_enc, landing_pat = deid.encounters.read_all(), deid.patients.read_all()
    n_landing, n_adapter = landing_enc.height, 0
    landing_events = pl.read_parquet(deid.events.files())

    def counts(encounters: pl.DataFrame, patients: pl.DataFrame, events: pl.DataFrame):
        cohort, flow = build_cohort(encounters, patients, use_case, events)
        labels = build_labels(cohort, use_case, encounters=encounters, events=events)
        return label_counts(cohort, labels), flow

    landing, landing_flow = counts(landing_enc, landing_pat, landing_events)
    adapter, adapter_flow = counts(adapted.encounters, adapted.patients, adapted.events)
    print("\nlanding path:", landing, landing_flow.rows())
    print("adapter path:", adapter, adapter_flow.rows())
    n_adapter = adapted.encounters.height
    assert n_landing == n_adapter
    # The one stated difference: MIMIC records a few in-hospital deaths (hospital_expire_flag 1, discharged
    # DEAD/EXPIRED) with a death time after the discharge time. The adapter moves such a death to the
    # discharge; the landing zone keeps the export's times, so the cohort's "died in hospital" rule
    # (death_time <= discharge_time) does not see the death and the stay enters the cohort.
    admissions = read_table(SOURCE, "admissions", columns=["hospital_expire_flag", "deathtime", "dischtime"])
    death_after_discharge = admissions.filter(
        (pl.col("hospital_expire_flag") == 1) & (pl.col("deathtime") > pl.col("dischtime"))
    ).height
    assert landing.eligible_stays == adapter.eligible_stays + death_after_discharge
    assert landing.labelled_rows == adapter.labelled_rows + death_after_discharge
    assert landing.events == adapter.events and landing.event_stays == adapter.event_stays


def test_vital_events_agree_with_the_adapter_path(landing_run, adapted):
    """Per vital code (blood pressure by method folded into the adapter's code), the landing path's events
    are the adapter's less what the contract rejects. Stated difference: MetaVision charts the GCS as three
    component items that the adapter sums into ``gcs_total``; the export delivers the chart items a hospital
    would (the CareVue total), not a sum, so the comparison leaves ``gcs_total`` out of the total."""
    root, _ = landing_run
    deid = DeidStore(root / "deid", root / "reports")
    landing = (
        pl.read_parquet(deid.events.files())
        .filter(pl.col("code").str.starts_with("VITAL//"))
        .with_columns(pl.col("code").str.replace(r"_(invasive|noninvasive)$", ""))
        .group_by("code")
        .len("landing")
    )
    adapter = adapted.events.filter(pl.col("code").str.starts_with("VITAL//")).group_by("code").len("adapter")
    both = adapter.join(landing, on="code", how="full", coalesce=True).fill_null(0).sort("code")
    print("\n", both.with_columns((pl.col("landing") / pl.col("adapter")).round(3).alias("ratio")).rows())
    assert set(landing["code"]) == set(adapter["code"])
    assert (both["landing"] <= both["adapter"]).all()  # the landing zone never adds a vital
    compared = both.filter(pl.col("code") != "VITAL//gcs_total")
    assert compared["landing"].sum() >= MIN_ACCEPTED * compared["adapter"].sum()
