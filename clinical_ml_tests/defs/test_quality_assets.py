"""The quality profile through the real ingestion job on a small synthetic hospital: a profile and a page per
batch and site, a code that stopped arriving at one site flagged by the WARN check (naming site and code, never
a value) and plotted in the trend report, an odd delivered site name never markup, and no identifier in the
profiles, the pages or the event log."""

import re
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from clinical_ml.core.quality import QualityProfile
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital, write_completion_marker
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
from clinical_ml.defs.ingestion.quality import QualityConfig, quality_trend
from clinical_ml.resources.zones import DataZones

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ODD_SITE = "St. Mary's & <Annex>"  # delivered text that must reach the page as text
DROPPED = ("SITE_A", "heart_rate")  # stops arriving in the second batch


def _deliver(landing: Path) -> tuple[str, str]:
    first, second = generate_hospital(
        landing, SyntheticConfig(n_patients=300, n_batches=2, days_per_batch=14)
    ).batch_ids
    enc = pl.read_csv(landing / first / "encounters.csv", infer_schema=False)
    enc = enc.with_columns(
        pl.when(pl.col("site") == "SITE_C").then(pl.lit(ODD_SITE)).otherwise("site").alias("site")
    )
    enc.write_csv(landing / first / "encounters.csv")
    write_completion_marker(landing / first)
    at_a = pl.read_csv(landing / second / "encounters.csv", infer_schema=False).filter(
        pl.col("site") == DROPPED[0]
    )
    vitals = pl.read_csv(landing / second / "vitals.csv", infer_schema=False)
    vitals = vitals.filter(
        ~(pl.col("encounter_id").is_in(at_a["encounter_id"].to_list()) & (pl.col("code") == DROPPED[1]))
    )
    vitals.write_csv(landing / second / "vitals.csv")
    write_completion_marker(landing / second)
    return first, second


def _identifiers(landing: Path) -> tuple[set[str], set[str]]:
    """(MRNs and encounter ids, first and last names) of every delivered batch."""
    ids: set[str] = set()
    names: set[str] = set()
    for batch in (d for d in landing.iterdir() if d.is_dir()):
        pts = pl.read_csv(batch / "patients.csv", infer_schema=False)
        enc = pl.read_csv(batch / "encounters.csv", infer_schema=False)
        ids |= set(pts["mrn"]) | set(enc["encounter_id"]) | set(enc["mrn"])
        names |= set(pts["first_name"].drop_nulls()) | set(pts["last_name"].drop_nulls())
    return ids, names


def _leaks(text: str, ids: set[str], names: set[str]) -> list[str]:
    return [x for x in ids | names if re.search(rf"(?<![\w-]){re.escape(x)}(?![\w-])", text)]


def test_quality_profile_per_batch_and_site_flags_a_dropped_code_and_keeps_identifiers_out(tmp_path):
    from clinical_ml.defs.build import build_definitions

    root = tmp_path / "data"
    first, second = _deliver(root / "landing")
    cases = tmp_path / "usecases"
    cases.mkdir()
    shutil.copy(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml", cases)
    defs = build_definitions(data_root=root, usecases_dir=cases)
    job = defs.resolve_job_def("batch_ingestion_job")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, [first, second])
        results = {b: job.execute_in_process(instance=instance, partition_key=b) for b in (first, second)}
        assert all(r.success for r in results.values())
        checks = {
            b: {
                e.check_name: e
                for e in r.get_asset_check_evaluations()
                if e.asset_key.path == ["quality_profile"]
            }
            for b, r in results.items()
        }
        # what the quality step put in the event log (the UI shows it to every user)
        event_log = "\n".join(
            dg.serialize_value(e)
            for r in results.values()
            for e in instance.all_logs(r.run_id)
            if e.step_key == "quality_profile"
        )
    zones = DataZones(root=str(root))
    deid = zones.deid_store()

    profiles = {p.batch_id: p for p in deid.quality.read_all()}
    assert set(profiles) == {first, second}
    for batch, profile in profiles.items():
        delivered = pl.read_csv(root / "landing" / batch / "encounters.csv", infer_schema=False)
        # a site outside the hospital's site mapping (where one is configured) is profiled as unmapped
        assert {s.site for s in profile.sites} <= set(delivered["site"]) | {"unmapped"}
        assert sum(s.encounters for s in profile.sites) == delivered.height
        for site in profile.sites:
            assert {c.code for c in profile.codes if c.site == site.site and c.source == "vitals"} >= {
                "systolic_bp",
                "diastolic_bp",
            } or (batch, site.site) == (second, DROPPED[0])
        assert QualityProfile.from_dict(profile.as_dict()) == profile
        assert {r.rule for r in profile.rules} >= {"systolic_at_least_diastolic"}

    # the first batch has nothing to compare with; the second lost heart rate at one site
    assert checks[first]["quality_steady_against_earlier_batches"].passed
    steady = checks[second]["quality_steady_against_earlier_batches"]
    assert not steady.passed and steady.severity == dg.AssetCheckSeverity.WARN
    changes = steady.metadata["changes"].value
    assert {"kind": "missing_share", "source": "vitals", "site": DROPPED[0], "code": DROPPED[1]} in changes
    assert all(set(c) == {"kind", "source", "site", "code"} for c in changes)  # names, never a value
    assert checks[second]["cross_code_rules_hold"].severity == dg.AssetCheckSeverity.WARN

    result = quality_trend(context=dg.build_asset_context(), zones=zones, config=QualityConfig())
    assert result.metadata["batches"] == 2 and result.metadata["changes_flagged"] >= 1

    pages = {b: deid.quality_reports.report(f"batch_{b}").read_text() for b in (first, second)}
    trend = deid.quality_reports.report("quality_trend").read_text()
    # the odd site reaches the page as escaped text, or not at all where ingestion maps sites
    assert "<Annex>" not in pages[first] and "<Annex>" not in trend
    assert "St. Mary&#39;s &amp; &lt;Annex&gt;" in pages[first] or "unmapped" in pages[first]
    assert "heart rate" in pages[second] and "more stays without a value" in pages[second]
    assert trend.count('<img src="data:image/png;base64,') >= 1

    ids, names = _identifiers(root / "landing")
    written = [p.read_text() for p in (deid.root / "quality").glob("*.json")] + [*pages.values(), trend]
    assert _leaks("\n".join(written), ids, names) == []
    assert "quality_steady_against_earlier_batches" in event_log
    assert _leaks(event_log, ids, names) == []
