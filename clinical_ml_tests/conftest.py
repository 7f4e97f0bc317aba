"""Shared fixtures: a small synthetic hospital and one full in-process run of the graph per session."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from clinical_ml.core.landing import find_complete_batches
from clinical_ml.core.synthetic import SyntheticConfig, SyntheticHospital, generate_hospital

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
SMALL = SyntheticConfig(n_patients=1500, n_batches=3, n_sites=3, seed=11)


@dataclass(frozen=True)
class GraphRun:
    data_root: Path
    hospital: SyntheticHospital
    instance: dg.DagsterInstance
    defs: dg.Definitions
    results: dict[str, dg.ExecuteInProcessResult]


# The use cases of the shared graph run: three daily batches serve the 24 h mortality questions; 30-day
# readmission needs months of data (clinical_ml_tests/e2e/test_any_question.py runs the other questions).
GRAPH_USE_CASES = ("icu_mortality_24h", "eicu_mortality_24h")


def use_case_folder(folder: Path, names: tuple[str, ...]) -> Path:
    """A use case folder holding copies of the named shipped use cases (and their monitoring settings)."""
    (folder / "monitoring").mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(PROJECT_ROOT / "usecases" / f"{name}.yaml", folder / f"{name}.yaml")
        monitoring = PROJECT_ROOT / "usecases" / "monitoring" / f"{name}.yaml"
        if monitoring.exists():
            shutil.copy(monitoring, folder / "monitoring" / f"{name}.yaml")
    return folder


def run_full_graph(
    data_root: Path,
    instance: dg.DagsterInstance,
    *,
    n_bootstrap: int = 100,
    use_cases: tuple[str, ...] = GRAPH_USE_CASES,
) -> dg.Definitions:
    """Ingest every complete batch of the landing zone, then run the lifecycle job of ``use_cases``, in
    process."""
    from clinical_ml.defs.build import build_definitions
    from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
    from clinical_ml.resources.settings import AnonymizationSettings, EvaluationSettings

    defs = build_definitions(
        data_root=data_root,
        usecases_dir=use_case_folder(data_root / "usecases", use_cases),
        evaluation=EvaluationSettings(n_bootstrap=n_bootstrap),
        anonymization=AnonymizationSettings(pseudonym_seed=1),
    )
    batches = find_complete_batches(data_root / "landing")
    instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, [b.batch_id for b in batches])
    for b in batches:
        res = defs.resolve_job_def("batch_ingestion_job").execute_in_process(
            instance=instance, partition_key=b.batch_id
        )
        assert res.success
    res = defs.resolve_job_def("lifecycle_job").execute_in_process(instance=instance, raise_on_error=False)
    # a refusal is a decision, not a failure: the run succeeds whatever the gate decided
    assert res.success, failed_steps(res)
    return defs


def failed_steps(res: dg.ExecuteInProcessResult) -> set[str]:
    return {e.step_key for e in res.all_events if e.is_step_failure and e.step_key}


def promotion_gate_steps(defs: dg.Definitions) -> set[str]:
    """Step keys of the blocking promotion-gate checks of every use case."""
    from clinical_ml.defs.usecase.training import GATE_CHECKS

    keys = defs.resolve_asset_graph().asset_check_keys
    return {f"{'__'.join(k.asset_key.path)}_{k.name}" for k in keys if k.name in GATE_CHECKS.values()}


@pytest.fixture(scope="session")
def instance() -> dg.DagsterInstance:
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture(scope="session")
def graph_run(tmp_path_factory: pytest.TempPathFactory, instance: dg.DagsterInstance) -> GraphRun:
    """The real definitions materialized end to end on a small synthetic hospital (default scenario)."""
    root = tmp_path_factory.mktemp("data_root")
    hospital = generate_hospital(root / "landing", SMALL)
    defs = run_full_graph(root, instance)
    return GraphRun(root, hospital, instance, defs, {})
