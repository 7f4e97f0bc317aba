"""Monitoring levels and knobs of one use case, read from ``usecases/monitoring/<use case>.yaml``.

Defaults apply when the file is absent; the use case contract itself forbids extra sections, so these
settings live in their own file.
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from clinical_ml.core.drift import DriftThresholds


@dataclass(frozen=True)
class MonitoringConfig:
    """Knobs of monitoring for one use case.

    Parameters
    ----------
    drift
        Levels and binning of the drift tests.
    subgroup_attributes
        Cohort columns whose groups are tested separately (their own Bonferroni family).
    min_subgroup_rows
        Groups smaller than this in the batch are not tested.
    n_bootstrap
        Bootstrap replicates of the 95% CIs of realised performance (per period and subgroup).
    auroc_min, sensitivity_min, calibration_slope_range, oe_range
        Minimums of realised performance: a period whose CI lies wholly below (or outside) is an ERROR.
    min_matured_share
        A period is "mature" when at least this share of its admissions have their outcome known.
    retrain_on
        Levels that request retraining (``error`` by default).
    min_reference_rows
        After a drift-triggered retraining, the drift reference is the derivation cohort from the batch
        where the drift began (the accepted new normal) when it has at least this many admissions; else
        the whole derivation cohort.
    """

    drift: DriftThresholds = field(default_factory=DriftThresholds)
    subgroup_attributes: tuple[str, ...] = ("sex", "age_band", "race_ethnicity")
    min_subgroup_rows: int = 30
    auroc_min: float = 0.70
    sensitivity_min: float = 0.60
    calibration_slope_range: tuple[float, float] = (0.5, 2.0)
    oe_range: tuple[float, float] = (0.5, 2.0)
    min_matured_share: float = 0.9
    n_bootstrap: int = 200
    retrain_on: tuple[str, ...] = ("error",)
    min_reference_rows: int = 100


def load_monitoring_config(path: Path | str | None) -> MonitoringConfig:
    """Read a monitoring YAML (``drift:`` thresholds plus the fields of :class:`MonitoringConfig`).

    A missing file gives the defaults; an unknown key raises ``ValueError`` naming it.
    """
    if path is None or not Path(path).exists():
        return MonitoringConfig()
    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = set(MonitoringConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown monitoring settings {unknown}")
    drift_raw = raw.pop("drift", {}) or {}
    bad = sorted(set(drift_raw) - set(DriftThresholds.__dataclass_fields__))
    if bad:
        raise ValueError(f"{path}: unknown drift settings {bad}")
    for k in ("subgroup_attributes", "calibration_slope_range", "oe_range", "retrain_on"):
        if k in raw:
            raw[k] = tuple(raw[k])
    return MonitoringConfig(drift=DriftThresholds(**drift_raw), **raw)
