"""A short drift scenario through the real graph, in process: the batch check fails on the first drifted
day, retraining is requested and goes through the promotion gate, the stable day's FHIR export validates, a
later run cannot release the held export, and the next drifted day does not retrain again."""

import json
import shutil
from datetime import datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from clinical_ml.core.artifacts import UseCaseStore
from clinical_ml.core.fhir import read_ndjson
from clinical_ml.core.landing import find_complete_batches
from clinical_ml.core.registry import PromotionDecision, Registry
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml.defs.build import build_definitions
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
from clinical_ml.defs.monitoring.sensors import DRIFT_FROM_TAG, RETRAIN_REASON_TAG, retraining_requests
from clinical_ml.defs.usecase.paths import use_case_key
from clinical_ml.resources.settings import AnonymizationSettings, EvaluationSettings

pytestmark = pytest.mark.slow
UC = "icu_mortality_24h"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _decisions(root: Path) -> list[str]:
    return (root / "registry" / UC / "decisions.jsonl").read_text().splitlines()


# the calibration fit of the fairness stage (not monitoring) may overflow exp() on a small hospital
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_drift_fails_the_check_on_its_first_day_and_requests_retraining(tmp_path):
    root = tmp_path / "data"
    hospital = generate_hospital(
        root / "landing",
        SyntheticConfig(n_patients=1800, n_batches=6, seed=11, scenario="drift", drift_from_batch=4),
    )
    cases = tmp_path / "usecases"
    cases.mkdir()
    shutil.copy(PROJECT_ROOT / "usecases" / f"{UC}.yaml", cases)
    defs = build_definitions(
        data_root=root,
        usecases_dir=cases,
        evaluation=EvaluationSettings(n_bootstrap=20),
        anonymization=AnonymizationSettings(pseudonym_seed=1),
        fhir_subject="site",  # also deliver under the site's ids to the phi zone's outbox
    )
    batches = find_complete_batches(root / "landing")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, [b.batch_id for b in batches])

        def ingest(batch_id: str) -> None:
            res = defs.resolve_job_def("batch_ingestion_job").execute_in_process(
                instance=instance, partition_key=batch_id
            )
            assert res.success

        for b in batches[:4]:
            ingest(b.batch_id)
        lifecycle = defs.resolve_job_def("lifecycle_job")
        # a challenger the gate refuses is a decision: the run succeeds and no champion is set
        lifecycle.execute_in_process(instance=instance, raise_on_error=False)
        models = Registry(root / "registry", UC)
        if models.champion() is None:  # a small hospital may miss the gate
            version = json.loads(_decisions(root)[-1])["challenger"]
            models.record_decision(PromotionDecision(True, version, None, ("test setup",)))
        monitor = defs.resolve_job_def("batch_monitoring_job")
        stable, drifted = hospital.batch_ids[3], hospital.manifest["drift"]["first_batch_id"]

        ok = monitor.execute_in_process(instance=instance, partition_key=stable, raise_on_error=False)
        assert ok.success
        # time to prediction: from the batch's first ledger entry to its predictions, within the limit
        timing = UseCaseStore(root / "deid", root / "reports", UC).prediction_timing.part(stable).read()
        ledger = [json.loads(p.read_text()) for p in (root / "archive" / "ledger" / stable).glob("*.json")]
        assert timing.landed_at == min(datetime.fromisoformat(e["recorded_at"]) for e in ledger).isoformat()
        assert timing.hours is not None and 0 <= timing.hours <= 24
        ok_checks = {e.check_name: e.passed for e in ok.get_asset_check_evaluations()}
        assert ok_checks["time_to_prediction_within_limit"] is True
        exported = read_ndjson(root / "deid" / "usecases" / UC / "fhir" / f"{stable}.ndjson")
        assert exported and all(r.prediction[0].probabilityDecimal is not None for r in exported)
        # the EHR copy: the same assessments under the site's MRNs and encounter ids, in the phi zone only
        delivered = read_ndjson(root / "phi" / "outbox" / UC / f"{stable}.ndjson")
        mrns = {
            line.split(",")[0]
            for b in hospital.batch_ids
            for line in (root / "landing" / b / "patients.csv").read_text().splitlines()[1:]
        }
        assert len(delivered) == len(exported)
        assert {r.subject.identifier.value for r in delivered} <= mrns
        assert not {r.subject.identifier.value for r in exported} & mrns
        assert not list((root / "deid").rglob("outbox"))

        ingest(drifted)
        assert defs.resolve_job_def("feature_refresh_job").execute_in_process(instance=instance).success
        bad = monitor.execute_in_process(instance=instance, partition_key=drifted, raise_on_error=False)
        assert not bad.success
        checks = {e.check_name: e.passed for e in bad.get_asset_check_evaluations()}
        assert checks == {"drift_below_error_level": False, "time_to_prediction_within_limit": True}
        # every eligible admission of the day is monitored, patients never seen in training included
        cohort = pl.read_parquet(root / "deid" / "usecases" / UC / "cohort.parquet")
        checked = json.loads((root / "deid" / "usecases" / UC / "monitoring" / f"{drifted}.json").read_text())
        assert checked["n_current"] == cohort.filter(pl.col("batch_id") == drifted).height > 50
        # downstream of the failed blocking check, the FHIR export of that day is held
        assert not (root / "deid" / "usecases" / UC / "fhir" / f"{drifted}.ndjson").exists()
        assert not (root / "phi" / "outbox" / UC / f"{drifted}.ndjson").exists()

        requests, cursor = retraining_requests(instance, [use_case_key(UC, "batch_drift")], 0)
        assert len(requests) == 1 and drifted in requests[0].tags[RETRAIN_REASON_TAG]
        assert requests[0].tags[DRIFT_FROM_TAG] == drifted

        # a later run cannot release what the failed blocking check held
        export = defs.resolve_job_def("batch_monitoring_job").get_subset(
            asset_selection={use_case_key(UC, "risk_assessment_export")}
        )
        held = export.execute_in_process(instance=instance, partition_key=drifted, raise_on_error=False)
        assert not held.success
        failure = held.get_step_failure_events()[0].step_failure_data.error
        assert failure is not None and "held" in failure.message
        assert not (root / "deid" / "usecases" / UC / "fhir" / f"{drifted}.ndjson").exists()

        decisions_before = len(_decisions(root))
        lifecycle.execute_in_process(instance=instance, raise_on_error=False, tags=requests[0].tags)
        assert len(_decisions(root)) == decisions_before + 1
        html = (root / "reports" / UC / "monitoring_report.html").read_text()
        assert drifted in html and "derivation cohort" in html
        latest = json.loads(_decisions(root)[-1])
        card = models.card(latest["challenger"])
        assert card.drift_reference_from == drifted
        assert card.lineage.retraining_reason == requests[0].tags[RETRAIN_REASON_TAG]

        # the next day is drifted too, but the drift was answered: no second retraining for one episode
        next_day = hospital.batch_ids[5]
        ingest(next_day)
        assert defs.resolve_job_def("feature_refresh_job").execute_in_process(instance=instance).success
        monitor.execute_in_process(instance=instance, partition_key=next_day, raise_on_error=False)
        record = json.loads((root / "deid" / "usecases" / UC / "monitoring" / f"{next_day}.json").read_text())
        again, _ = retraining_requests(instance, [use_case_key(UC, "batch_drift")], cursor)
        assert again == [] and record["retraining_requested"] is False
        if latest["promoted"]:
            # the new champion's reference starts at the drift: the new normal is no longer an ERROR
            assert record["level"] != "error" and f"from batch {drifted}" in record["reference"]
        else:
            assert record["level"] == "error" and "refused by the promotion gate" in record["retraining_note"]
