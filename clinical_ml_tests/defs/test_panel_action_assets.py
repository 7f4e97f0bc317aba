"""The recalibration challenger as a Dagster asset (issue #18 item 7), materialized on a small use case
whose champion's calibration drifted: what its page says, and that a second run offers nothing new."""

import dagster as dg

from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.usecase import load_use_case
from clinical_ml.defs.usecase.panel_actions import build_panel_action_assets
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones
from clinical_ml_tests.conftest import PROJECT_ROOT
from clinical_ml_tests.core.test_recalibration import _store


def _materialize(root, asset) -> dg.MaterializeResult:
    result = dg.materialize(
        [asset],
        resources={
            "zones": DataZones(root=str(root)),
            "evaluation": EvaluationSettings(n_bootstrap=100, latency_repeats=20),
        },
    )
    assert result.success
    (event,) = result.asset_materializations_for_node(asset.op.name)
    return event.metadata


def test_the_recalibration_challenger_is_offered_once_with_its_report(tmp_path):
    _, registry, _ = _store(tmp_path, drift=1.8)
    uc = load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")
    assets = {a.key.path[-1]: a for a in build_panel_action_assets(uc, MonitoringConfig(n_bootstrap=100))}
    asset = assets["icu_mortality_24h__recalibration_challenger"]
    first = _materialize(tmp_path, asset)
    assert first["status"].value == "offered"
    version = first["challenger_version"].value
    assert version == registry.versions()[-1] and registry.champion() != version
    assert first["report"].value.startswith(
        f"**Recalibration offered:** Awaiting sign-off: challenger {version}"
    )
    assert first["admissions_recent_labelled"].value == 1400
    second = _materialize(tmp_path, asset)
    assert second["status"].value == "already offered" and registry.versions()[-1] == version


def test_recalibration_runs_with_the_monitoring_reports_never_in_the_run_that_retrains(tmp_path):
    from clinical_ml.defs.build import build_definitions

    defs = build_definitions(data_root=tmp_path)

    def steps(job: str) -> set[str]:
        return {
            n for n in defs.resolve_job_def(job).graph.node_dict if n.endswith("__recalibration_challenger")
        }

    assert "icu_mortality_24h__icu_mortality_24h__recalibration_challenger" in steps("monitoring_report_job")
    assert steps("lifecycle_job") == set()
