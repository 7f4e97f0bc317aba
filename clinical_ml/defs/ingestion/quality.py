"""The data quality profile of each batch (aggregates only) and its trend over batches."""

import dagster as dg
import polars as pl
from pydantic import Field

from clinical_ml.core.delivery import rejects_path
from clinical_ml.core.ingestion import empty_accepted
from clinical_ml.core.quality import (
    MIN_CELL_PATIENTS,
    QualityProfile,
    TrendThresholds,
    compare_with_earlier,
    profile_batch,
    rules_over_share,
    trend_over_batches,
)
from clinical_ml.core.quality_report import (
    compared_words,
    profile_markdown,
    profile_page,
    trend_markdown,
    trend_page,
)
from clinical_ml.core.storage import code_version
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, batch_partitions, tags
from clinical_ml.defs.ingestion.assets import zone_paths
from clinical_ml.defs.ingestion.ranges import BATCH_BACKFILL_POLICY, BatchOutcome, batch_result
from clinical_ml.resources.zones import DataZones

PROFILED = ("encounters", "labs", "vitals")


class QualityConfig(dg.Config):
    """When a batch's quality is flagged (the WARN checks of quality_profile and the trend report)."""

    interval_factor: float = Field(
        default=2.0,
        description="Flag a code at a site whose median sampling interval is this many times longer or "
        "shorter than the median of the earlier batches.",
    )
    missing_points: float = Field(
        default=20.0,
        description="Flag a code at a site whose share of stays without a value rose by this many percentage "
        "points against the earlier batches.",
    )
    min_earlier_batches: int = Field(default=1, description="Earlier batches needed before comparing.")
    max_violation_share: float = Field(
        default=0.01,
        description="Share of same-time pairs that may break a cross-code rule (systolic >= diastolic, ...) "
        "before the check cross_code_rules_hold warns.",
    )
    min_cell_patients: int = Field(
        default=MIN_CELL_PATIENTS,
        description="A code at a site with fewer patients keeps its counts but no distribution summary.",
    )

    def thresholds(self) -> TrendThresholds:
        return TrendThresholds(
            interval_factor=self.interval_factor,
            missing_points=self.missing_points,
            min_earlier_batches=self.min_earlier_batches,
            max_violation_share=self.max_violation_share,
        )


def _accepted(zones: DataZones, source: str, batch_id: str) -> pl.DataFrame:
    """The batch's accepted rows; none when the file was quarantined or never delivered."""
    part = zones.phi_store().raw(source).part(batch_id)
    return part.read() if part.exists() else empty_accepted(source)


def _rejects(zones: DataZones, batch_id: str) -> dict[str, pl.DataFrame]:
    paths = zone_paths(zones)
    return {s: pl.read_parquet(p) for s in PROFILED if (p := rejects_path(paths, s, batch_id)).exists()}


def _profile_batch(zones: DataZones, config: QualityConfig, batch_id: str) -> BatchOutcome:
    deid = zones.deid_store()
    thresholds = config.thresholds()
    profile = profile_batch(
        batch_id,
        encounters=_accepted(zones, "encounters", batch_id),
        labs=_accepted(zones, "labs", batch_id),
        vitals=_accepted(zones, "vitals", batch_id),
        rejects=_rejects(zones, batch_id),
        min_cell_patients=config.min_cell_patients,
    )
    deid.quality.part(batch_id).write(profile)
    earlier = [p for p in deid.quality.read_all() if p.batch_id < batch_id]
    compared = thresholds.compares(len(earlier))
    flags = compare_with_earlier(profile, earlier, thresholds=thresholds)
    over = rules_over_share(profile, max_share=thresholds.max_violation_share)
    page = deid.quality_reports.write_report(
        f"batch_{batch_id}",
        profile_page(
            profile, flags, thresholds=thresholds, earlier_batches=len(earlier), code_version=code_version()
        ),
    )
    # names of sites, codes and rules only: never a value of a patient
    changed = [{"kind": f.kind, "source": f.source, "site": f.site, "code": f.code} for f in flags]
    broken = [{"rule": r.rule, "site": r.site, "pairs": r.pairs, "violations": r.violations} for r in over]
    return BatchOutcome(
        metadata={
            "sites": len(profile.sites),
            "codes_profiled": len(profile.codes),
            "changes_flagged": len(flags),
            "cross_code_rules_broken": len(over),
            "earlier_batches": len(earlier),
            "path": str(deid.quality.part(batch_id).path.relative_to(zones.deid)),
            "report_path": str(page.relative_to(zones.reports)),
            "report": dg.MetadataValue.md(
                profile_markdown(profile, flags, thresholds=thresholds, earlier_batches=len(earlier))
            ),
        },
        checks=[
            dg.AssetCheckResult(
                check_name="quality_steady_against_earlier_batches",
                passed=not flags,
                severity=dg.AssetCheckSeverity.WARN,
                description=None if compared else compared_words(len(earlier), thresholds),
                metadata={
                    "changes": dg.MetadataValue.json(changed),
                    "earlier_batches": len(earlier),
                    "judged": compared,
                },
            ),
            dg.AssetCheckResult(
                check_name="cross_code_rules_hold",
                passed=not over,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "broken": dg.MetadataValue.json(broken),
                    "max_violation_share": thresholds.max_violation_share,
                },
            ),
        ],
    )


@dg.asset(
    deps=[f"raw_{s}" for s in PROFILED],
    group_name=Stage.INGESTION,
    partitions_def=batch_partitions,
    backfill_policy=BATCH_BACKFILL_POLICY,
    kinds={"polars", "html"},
    owners=ML_OWNERS,
    tags=tags(DataClass.AGGREGATE),
    description="The data quality of a batch per source, hospital site and code, from its accepted rows: "
    "stays with a value, sampling interval, time from sample to result (chart to storage), value quantiles, "
    "share outside the plausible range, repeated rows, and cross-code rules (systolic >= diastolic, HDL <= "
    "total cholesterol, ...). Aggregates only (JSON in the de-identified zone) and a page under reports/quality; "
    "distributions of fewer than 11 patients are left out.",
    check_specs=[
        dg.AssetCheckSpec(
            "quality_steady_against_earlier_batches",
            asset="quality_profile",
            description="No code at any site changed its sampling interval or share of stays without a value "
            "beyond the configured limits against the earlier batches, and no cross-code rule is broken where "
            "it never was (WARN; the metadata names the code and site, never a value).",
        ),
        dg.AssetCheckSpec(
            "cross_code_rules_hold",
            asset="quality_profile",
            description="At every site, each cross-code rule is broken in at most max_violation_share of the "
            "pairs measured together (WARN).",
        ),
    ],
)
def quality_profile(
    context: dg.AssetExecutionContext, zones: DataZones, config: QualityConfig
) -> dg.MaterializeResult:
    # in batch order: a batch is compared with the profiles of the batches before it
    return batch_result(
        context, {b: _profile_batch(zones, config, b) for b in sorted(context.partition_keys)}
    )


@dg.asset(
    deps=[quality_profile],
    group_name=Stage.MONITORING,
    kinds={"html"},
    owners=ML_OWNERS,
    tags=tags(DataClass.AGGREGATE),
    description="Data quality over every profiled batch: each batch against the batches before it, per site "
    "and code, with a small plot per flagged code. Refreshed with the monitoring reports.",
)
def quality_trend(
    context: dg.AssetExecutionContext, zones: DataZones, config: QualityConfig
) -> dg.MaterializeResult:
    deid = zones.deid_store()
    profiles: list[QualityProfile] = deid.quality.read_all()
    thresholds = config.thresholds()
    trend = trend_over_batches(profiles, thresholds=thresholds)
    page = deid.quality_reports.write_report(
        "quality_trend", trend_page(profiles, trend, thresholds=thresholds, code_version=code_version())
    )
    return dg.MaterializeResult(
        metadata={
            "batches": len(trend.batch_ids),
            "changes_flagged": len(trend.flags),
            "report_path": str(page.relative_to(zones.reports)),
            "report": dg.MetadataValue.md(trend_markdown(trend, profiles)),
        }
    )


quality_assets = [quality_profile, quality_trend]
