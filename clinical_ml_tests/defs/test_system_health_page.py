"""The monitoring report's system-health page is written from the instance's runs and the use case's records."""

from pathlib import Path

import dagster as dg

from clinical_ml.core.artifacts import UseCaseStore
from clinical_ml.defs.usecase.health import system_health_metadata
from clinical_ml_tests.serve.conftest import use_case


def test_a_failed_run_shows_on_the_page(tmp_path: Path) -> None:
    @dg.op
    def broken() -> None:
        raise RuntimeError("boom")

    @dg.job
    def nightly_job() -> None:
        broken()

    with dg.instance_for_test() as instance:
        assert not nightly_job.execute_in_process(instance=instance, raise_on_error=False).success
        uc = use_case()
        store = UseCaseStore(tmp_path / "deid", tmp_path / "reports", uc.name)
        meta = system_health_metadata(instance, uc, store)
    assert meta["runs_failed"] == 1 and meta["runs_stuck"] == 0 and meta["service_calls"] == 0
    page = Path(meta["system_health_path"].value).read_text()
    assert "nightly_job" in page and "1 run(s) failed in the last 7 days" in page
    assert meta["system_health"].value.startswith("- Needs attention: runs.")
