"""The deployed champion of a use case in service: how its batches are scored, which reference a batch is
judged against, when a batch is held back from the EHR, and when monitoring asks for retraining.

These are the rules the monitoring assets and the nightly schedule apply; they are plain functions over the
use case's store and registry, tested directly.
"""

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl

from clinical_ml.core.approval import GroupThresholds, approved_group_thresholds
from clinical_ml.core.artifacts import DriftRecord, UseCaseStore
from clinical_ml.core.batch_monitoring import (
    PREDICTION_COLUMN,
    BatchMonitoring,
    MonitoringReference,
    monitor_batch,
    prepare_reference,
)
from clinical_ml.core.drift import FeatureDrift, batch_drift, n_tests_for, reference_profile
from clinical_ml.core.features import CATEGORICAL_STATIC, ROW_KEY, feature_matrix
from clinical_ml.core.fhir import ScoredAdmission
from clinical_ml.core.labeling import LABEL_WINDOW_END
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.performance_estimation import ConfidenceBasedEstimator
from clinical_ml.core.performance_monitoring import (
    PeriodRowsCache,
    label_maturity,
    newly_labelled,
    performance_by_period,
)
from clinical_ml.core.registry import ModelCard, Registry
from clinical_ml.core.scoring import Scorer

SUBGROUP_COLUMNS = ("sex", "age_band", "race_ethnicity")


class NoChampionError(RuntimeError):
    """The use case has no approved model yet, so there is nothing to score or monitor."""


@dataclass(frozen=True)
class Champion:
    card: ModelCard
    scorer: Scorer
    group_thresholds: GroupThresholds | None = None
    """Per-group thresholds the panel approved with this model (applied in :func:`score_batch`)."""

    @property
    def version(self) -> str:
        return self.card.version


def load_champion(registry: Registry) -> Champion:
    """The approved model with its operating threshold and training ranges, ready to score."""
    version = registry.champion()
    if version is None:
        raise NoChampionError(f"{registry.use_case} has no champion model yet: run lifecycle_job first.")
    card = registry.card(version)
    scorer = Scorer(
        model=registry.model(version), threshold=card.threshold, training_ranges=card.training_ranges
    )
    return Champion(card, scorer, approved_group_thresholds(registry, version))


def day_after(batch_id: str) -> datetime | None:
    """What is known once a daily batch has landed: everything before the start of the next day. None for a
    batch not named by its date (a hospital's own folder names, a research export): when its outcomes
    became known is not known, so none counts as matured."""
    try:
        day = date.fromisoformat(batch_id)
    except ValueError:
        return None
    return datetime.combine(day + timedelta(days=1), datetime.min.time())


def known_by(batch_ids: Iterable[str]) -> datetime | None:
    """What is known once the newest batch named by its date has landed (:func:`day_after`); None when no
    batch is named by its date."""
    days = [d for d in map(day_after, batch_ids) if d is not None]
    return max(days, default=None)


def monitoring_frame(store: UseCaseStore, batch_id: str | None = None) -> pl.DataFrame:
    """Features with batch, subgroup attributes, split and label of every admission (of ``batch_id`` only
    when given: the filter is pushed into the Parquet scans)."""
    cohort = store.cohort.scan().select(
        *ROW_KEY,
        "batch_id",
        "admit_time",
        "discharge_time",
        "death_time",
        *_window_end(store),
        *SUBGROUP_COLUMNS,
    )
    if batch_id is not None:
        cohort = cohort.filter(pl.col("batch_id") == batch_id)
    labels = store.labels.scan().select(*ROW_KEY, pl.col("boolean_value").alias("label"))
    return (
        store.features.scan()
        .join(cohort, on=ROW_KEY)
        .join(labels, on=ROW_KEY, how="left")
        # patients first seen after the last training have no split yet: they are monitored all the same
        .join(store.subject_splits.scan(), on="subject_id", how="left")
        .collect()
    )


def score_batch(frame: pl.DataFrame, champion: Champion) -> pl.DataFrame:
    """The batch's admissions scored at their prediction time: risk, flag, reasons, guardrail flags."""
    scorer = champion.scorer
    scores = scorer.score(feature_matrix(frame, scorer.model.feature_names)) if frame.height else []
    scored = frame.select(
        "subject_id", "hadm_id", "prediction_time", "batch_id", *SUBGROUP_COLUMNS
    ).with_columns(
        pl.Series(PREDICTION_COLUMN, [s.risk for s in scores], dtype=pl.Float64),
        pl.Series("flagged", [s.flagged for s in scores], dtype=pl.Boolean),
        pl.Series("reasons", [json.dumps(s.reasons, default=str) for s in scores], dtype=pl.String),
        pl.Series("flags", [json.dumps(list(s.flags)) for s in scores], dtype=pl.String),
        pl.lit(champion.version).alias("model_version"),
    )
    return _apply_group_thresholds(scored, champion)


def _apply_group_thresholds(scored: pl.DataFrame, champion: Champion) -> pl.DataFrame:
    """Each row flagged at the threshold that applies to it: its group's, where the panel approved per-group
    thresholds for one attribute, else the single one (``threshold_applied`` says which value)."""
    single = pl.lit(champion.card.threshold, dtype=pl.Float64)
    gt = champion.group_thresholds
    if gt is None:
        return scored.with_columns(single.alias("threshold_applied"))
    if gt.attribute not in scored.columns:
        raise ValueError(
            f"the panel approved per-group thresholds by {gt.attribute}, which the scored rows do not carry"
        )
    applied = (
        pl.col(gt.attribute)
        .cast(pl.String)
        .replace_strict(gt.thresholds, default=None, return_dtype=pl.Float64)
        .fill_null(single)
    )
    risk = pl.col(PREDICTION_COLUMN)
    return scored.with_columns(applied.alias("threshold_applied")).with_columns(
        (risk.is_not_nan() & (risk >= pl.col("threshold_applied"))).fill_null(False).alias("flagged")
    )


def scored_summary(scored: pl.DataFrame) -> dict[str, float]:
    """Aggregates of a scored batch for the asset's metadata (no row values)."""
    if scored.height == 0:
        return {"risk_mean": 0.0, "flagged_share": 0.0, "guardrail_flagged_share": 0.0}
    return {
        "risk_mean": float(np.nan_to_num(scored[PREDICTION_COLUMN].to_numpy().mean())),
        "flagged_share": float(scored["flagged"].to_numpy().mean()),
        "guardrail_flagged_share": float((scored["flags"] != "[]").to_numpy().mean()),
    }


def scored_admissions(preds: pl.DataFrame, *, subject: str, encounter: str) -> list[ScoredAdmission]:
    """Scored rows as the FHIR export takes them, under the given subject and encounter id columns."""
    return [
        ScoredAdmission(
            subject_id=str(r[subject]),
            encounter_id=str(r[encounter]),
            prediction_time=r["prediction_time"],
            risk=r[PREDICTION_COLUMN],
            flagged=r["flagged"],
            reasons=tuple(str(x.get("label", x.get("feature", x))) for x in json.loads(r["reasons"])),
            flags=tuple(json.loads(r["flags"])),
        )
        for r in preds.iter_rows(named=True)
    ]


def drift_reference(
    frame: pl.DataFrame, champion: Champion, config: MonitoringConfig, *, exclude_batch: str
) -> tuple[MonitoringReference, str]:
    """Which reference a batch is judged against, profiled, with a sentence saying which.

    The champion's derivation cohort (train and tuning patients of the batches it was trained on, never the
    batch being judged), from the batch where a drift it was retrained for began when that window holds at
    least ``config.min_reference_rows`` admissions (the accepted new normal).
    """
    card = champion.card
    lineage = list(card.lineage.batch_ids) or frame["batch_id"].unique().to_list()
    ref = frame.filter(
        pl.col("split").is_in(["train", "tuning"])
        & pl.col("batch_id").is_in(lineage)
        & (pl.col("batch_id") != exclude_batch)
    )
    since = card.drift_reference_from
    described = f"the derivation cohort of model {card.version} ({ref.height} admissions)"
    if since:
        recent = ref.filter(pl.col("batch_id") >= since)
        if recent.height >= config.min_reference_rows:
            ref = recent
            described = (
                f"the derivation cohort of model {card.version} from batch {since}, where the drift "
                f"it was retrained for began ({ref.height} admissions: the accepted new normal)"
            )
        else:
            described += (
                f"; only {recent.height} admissions since the drift of {since}, fewer than "
                f"{config.min_reference_rows}, so the whole cohort is the reference"
            )
    model = champion.scorer.model
    ref = ref.with_columns(
        pl.Series(PREDICTION_COLUMN, model.predict(feature_matrix(ref, model.feature_names)))
    )
    labels = ref["label"].cast(pl.Boolean).fill_null(False).to_numpy()
    return prepare_reference(ref, model.feature_names, config=config, labels=labels), described


def cached_drift_reference(
    store: UseCaseStore, champion: Champion, config: MonitoringConfig, batch_id: str
) -> tuple[MonitoringReference, str]:
    """:func:`drift_reference`, profiled once per champion, drift baseline and monitoring levels; rebuilt
    without the batch when the champion was trained on it (a re-check)."""
    if champion.card.trained_on(batch_id):
        return drift_reference(monitoring_frame(store), champion, config, exclude_batch=batch_id)
    levels = hashlib.sha256(repr(config).encode()).hexdigest()[:12]  # new monitoring levels: a new profile
    since = champion.card.drift_reference_from or "all"
    cache = store.drift_reference_cache(f"{champion.version}_{since}_{levels}")
    return cache.get_or_build(
        lambda: drift_reference(monitoring_frame(store), champion, config, exclude_batch=batch_id)
    )


def drift_retraining_decision(
    *, requested: bool, batch_id: str, champion: ModelCard, refused: ModelCard | None
) -> tuple[bool, str]:
    """Whether a batch's drift ERROR requests retraining, and why not when it does not.

    Not when the champion was already trained on this batch (retraining on the same data changes nothing),
    nor again while a model retrained for this drift episode stands refused by the promotion gate (``refused``,
    from :meth:`Registry.refused_drift_retraining`): the check keeps failing until a model passes.
    """
    if not requested:
        return False, ""
    if champion.trained_on(batch_id):
        return (
            False,
            f"Retraining not requested: the champion ({champion.version}) was already trained on this batch.",
        )
    if refused is not None:
        return False, (
            f"Retraining not requested again: model {refused.version}, retrained for the drift that began "
            f"in batch {refused.drift_reference_from}, was refused by the promotion gate. The check fails "
            "until a model passes; the nightly schedule retrains when newly labelled admissions arrive."
        )
    return True, ""


def hold_reason(record: DriftRecord | None, *, batch_id: str, what: str) -> str | None:
    """Why ``what`` of a batch is held back (None: released).

    A later run (a manual materialization, a backfill) must not release what a drift check at ERROR
    held: the record written by the batch's drift check is the judge, whatever run wrote it.
    """
    if record is not None and record.released:
        return None
    state = "has not run" if record is None else f"is at {record.level.upper()}"
    return (
        f"{what} of batch {batch_id} held: its drift check {state}; rerun batch_drift for this batch "
        "(after retraining, with the new champion) first."
    )


def periods_to_retrain(rows: Sequence[dict], *, champion: str, newest: ModelCard | None) -> list[str]:
    """Periods whose realised performance failed while the champion scored them, once.

    Not when the newest registered model (promoted or refused) was already trained on them: the gate has
    judged a model that learnt from those periods.
    """
    seen = set(newest.lineage.batch_ids) if newest is not None else set()
    return sorted(
        {
            r["period"]
            for r in rows
            if r["level"] == "error" and champion in r.get("model_versions", []) and r["period"] not in seen
        }
    )


def nightly_retraining_reason(store: UseCaseStore, registry: Registry, *, as_of: datetime) -> str | None:
    """Why tonight's retraining should run for this use case (None: nothing new to learn from): no champion
    yet, or admissions whose outcome is now known from batches the champion never saw."""
    if not store.cohort.exists():
        return None
    card = registry.champion_card()
    if card is None:
        return f"{store.name}: no champion yet"
    cohort = store.cohort.read(
        columns=["batch_id", "admit_time", "discharge_time", "death_time", *_window_end(store)]
    )
    n = newly_labelled(cohort, trained_on=list(card.lineage.batch_ids), as_of=as_of)
    return (
        f"{store.name}: {n} newly labelled admissions since model {card.version} was trained" if n else None
    )


def matured_labels(current: pl.DataFrame, *, batch_id: str) -> np.ndarray | None:
    """Outcomes of the batch's admissions already known the day after it landed (None: none yet)."""
    as_of = day_after(batch_id)
    if as_of is None:
        return None
    matured = current.filter(label_maturity(current, as_of=as_of) & pl.col("label").is_not_null())
    return matured["label"].to_numpy() if matured.height else None


def realised_performance(
    store: UseCaseStore,
    champion: Champion,
    frame: pl.DataFrame,
    config: MonitoringConfig,
    *,
    cache: bool = True,
) -> list[dict]:
    """Performance of the scored batches by period and subgroup: realised where outcomes have matured (as of
    the day after the newest batch), estimated without labels (confidence-based, fitted on the validation
    cohort when it holds at least 20 labelled admissions) where not. Admissions of the champion's derivation
    patients in the batches it was trained on are left out. A period's rows are computed once for the inputs
    they depend on and kept (:func:`performance_rows_cache`); ``cache=False`` computes every period afresh."""
    preds = store.batch_predictions.read_all(relaxed=True)
    if preds.height == 0:
        return []
    held = frame.filter((pl.col("split") == "held_out") & pl.col("label").is_not_null())
    model = champion.scorer.model
    estimator = (
        ConfidenceBasedEstimator.fit(
            model.predict(feature_matrix(held, model.feature_names)),
            held["label"].cast(pl.Boolean).to_numpy(),
            threshold=champion.card.threshold,
        )
        if held.height >= 20
        else None
    )
    info = frame.select(
        *ROW_KEY, "label", "split", "admit_time", "discharge_time", "death_time", *_window_end(frame)
    )
    preds = preds.join(info, on=ROW_KEY, how="left")
    # The champion's own derivation patients, in the batches it was trained on, would show the performance it
    # was fitted to (an AUROC of 0.96 beside 0.92 on validation): left out, as the report says.
    trained_on = list(champion.card.lineage.batch_ids)
    preds = preds.filter(
        ~(pl.col("batch_id").is_in(trained_on) & pl.col("split").is_in(["train", "tuning"])).fill_null(False)
    )
    as_of = known_by(preds["batch_id"].unique().to_list())
    matured = label_maturity(preds, as_of=as_of) if as_of is not None else pl.repeat(False, preds.height)
    preds = preds.with_columns(matured.alias("matured"))
    return performance_by_period(
        preds,
        threshold=champion.card.threshold,
        estimator=estimator,
        config=config,
        cache=performance_rows_cache(store) if cache else None,
    )


def performance_rows_cache(store: UseCaseStore) -> PeriodRowsCache:
    """Where each period's performance rows are kept beside the batch's drift record (derived data)."""
    return PeriodRowsCache(store.folder / "monitoring" / "performance")


def decisions_with_reasons(registry: Registry) -> list[dict]:
    """Every promotion decision, oldest first, with why its challenger was trained (``why``)."""
    out = []
    for d in registry.decisions():
        why = (
            registry.card(d.challenger).lineage.retraining_reason if registry.has_card(d.challenger) else None
        )
        out.append({**d.as_dict(), "why": why})
    return out


@dataclass(frozen=True)
class NewestBatchDrift:
    """Each predictor of the newest batch against the derivation cohort (for the feature drift report)."""

    batch_id: str
    n_reference: int
    n_current: int
    features: list[FeatureDrift]
    n_tests: int | None = None
    """The Bonferroni denominator ``m`` the levels were judged with."""


def newest_batch_drift(store: UseCaseStore, config: MonitoringConfig) -> NewestBatchDrift:
    """The newest batch's measured predictors (one-hot static attributes left out) against the derivation
    cohort of the other batches (all of it when the newest batch is the only one)."""
    cohort = store.cohort.read(columns=[*ROW_KEY, "batch_id"])
    feats = (
        store.features.read()
        .join(cohort, on=ROW_KEY)
        .join(store.subject_splits.read(), on="subject_id", how="left")
    )
    newest = max(cohort["batch_id"].unique().to_list())
    derivation = feats.filter(pl.col("split").is_in(["train", "tuning"]))
    reference = derivation.filter(pl.col("batch_id") != newest)
    if reference.height == 0:
        reference = derivation
    current = feats.filter(pl.col("batch_id") == newest)
    cols = [
        c
        for c in feats.columns
        if "__" in c and not c.startswith(tuple(f"{s}__" for s in CATEGORICAL_STATIC))
    ]
    profile = reference_profile(feature_matrix(reference, cols), cols, thresholds=config.drift)
    m = n_tests_for(profile)
    drift = batch_drift(profile, feature_matrix(current, cols), n_tests=m)
    return NewestBatchDrift(newest, reference.height, current.height, drift, m)


@dataclass(frozen=True)
class BatchCheck:
    """One batch's drift check against the champion's reference, and what it decided."""

    record: DriftRecord
    result: BatchMonitoring
    n_reference: int


def check_batch(
    store: UseCaseStore, registry: Registry, champion: Champion, config: MonitoringConfig, batch_id: str
) -> BatchCheck:
    """Judge a scored batch against the champion's reference (outcomes known the day after it landed
    included), decide whether it requests retraining, and keep the record beside the batch."""
    reference, described = cached_drift_reference(store, champion, config, batch_id)
    preds = store.batch_predictions.part(batch_id).read().select(*ROW_KEY, PREDICTION_COLUMN)
    current = monitoring_frame(store, batch_id).join(preds, on=ROW_KEY)
    result = monitor_batch(
        batch_id=batch_id,
        reference=reference,
        current=current,
        config=config,
        current_labels=matured_labels(current, batch_id=batch_id),
    )
    requested, note = drift_retraining_decision(
        requested=result.retraining_requested,
        batch_id=batch_id,
        champion=champion.card,
        refused=registry.refused_drift_retraining() if result.retraining_requested else None,
    )
    record = DriftRecord(
        batch_id,
        result.level,
        requested,
        note,
        described,
        champion.version,
        {k: list(v) if isinstance(v, tuple) else v for k, v in config.drift.__dict__.items()},
        result.as_dict(),
    )
    store.drift_records.part(batch_id).write(record)
    return BatchCheck(record, result, reference.profile.n_rows)


@dataclass(frozen=True)
class PerformanceReview:
    """The champion's record in service: every batch's drift check, performance by period, and which
    periods ask for retraining."""

    champion: str
    batches: list[dict]
    rows: list[dict]
    retrain_for: list[str]

    @property
    def failing(self) -> list[dict]:
        return [r for r in self.rows if r["level"] == "error"]

    @property
    def retraining_reason(self) -> str:
        if not self.retrain_for:
            return ""
        return f"realised performance below its minimums in {', '.join(self.retrain_for)} (model {self.champion})"

    def summary(self) -> dict:
        """Aggregates for the asset's page (no row values)."""
        return {
            "retraining_requested": bool(self.retrain_for),
            "retraining_reason": self.retraining_reason,
            "batches_monitored": len(self.batches),
            "batches_drift_error": sum(b["level"] == "error" for b in self.batches),
            "periods_mature": sum(r["status"] == "mature" for r in self.rows if r["attribute"] == "all"),
        }

    def failing_summary(self, limit: int = 20) -> list[dict]:
        return [
            {"period": r["period"], "group": f"{r['attribute']}={r['group']}", "reasons": r["reasons"]}
            for r in self.failing
        ][:limit]


def review_performance(
    store: UseCaseStore,
    registry: Registry,
    champion: Champion,
    config: MonitoringConfig,
    *,
    cache: bool = True,
) -> PerformanceReview:
    """The champion's record in service (``cache``: see :func:`realised_performance`)."""
    rows = realised_performance(store, champion, monitoring_frame(store), config, cache=cache)
    return PerformanceReview(
        champion=champion.version,
        batches=[r.as_dict() for r in store.drift_records.read_all()],
        rows=rows,
        retrain_for=periods_to_retrain(rows, champion=champion.version, newest=registry.newest_card()),
    )


def _window_end(frame: "UseCaseStore | pl.DataFrame") -> list[str]:
    """The label window end column where the cohort has it (cohorts written before outcome types do not)."""
    names = frame.cohort.scan().collect_schema().names() if isinstance(frame, UseCaseStore) else frame.columns
    return [LABEL_WINDOW_END] if LABEL_WINDOW_END in names else []
