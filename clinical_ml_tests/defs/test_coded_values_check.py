"""The WARN check on the coded values a site mapping leaves unmapped or sends to Other/Unknown."""

import dagster as dg

from clinical_ml.core.delivery import process_batch
from clinical_ml.defs.ingestion.assets import _coded_values_check
from clinical_ml_tests.core.test_site_mapping import PLANTED, site  # noqa: F401  (fixture)


def test_the_check_warns_above_the_share_and_names_fields_never_values(site):  # noqa: F811
    zones, folder = site
    outcomes = process_batch(zones=zones, batch_id="2024-01-06", mappings_dir=folder)
    # 1 of 4 stays unmapped in unit, site and disposition: 25%
    warned = _coded_values_check(outcomes["encounters"], 0.05)
    assert not warned.passed and warned.severity == dg.AssetCheckSeverity.WARN
    assert "discharge_disposition" in (warned.description or "") and "phi/unmapped" in (
        warned.description or ""
    )
    assert PLANTED not in str(warned.description) + str(warned.metadata)
    assert _coded_values_check(outcomes["encounters"], 0.30).passed
    # race: one unmapped, one sent to Other by the mapping: 2 of 4
    assert warned.metadata["share_by_field"].data["site"] == 0.25
    assert _coded_values_check(outcomes["patients"], 0.05).metadata["share_by_field"].data["race"] == 0.5
