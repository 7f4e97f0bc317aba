"""Batches run in delivery order through the real jobs, as the sensors would run them, recorded in the Dagster
instance (``$DAGSTER_HOME``) so ``make dev`` shows each batch's drift check, the retraining runs and the
promotion decisions on the right partition. Two commands use it:

``clinical-ml replay`` (``make demo-drift``): a synthetic month day by day::

    DAGSTER_HOME=$PWD/.dagster_home .venv/bin/clinical-ml replay \
        --scenario drift --batches 30 --drift-from-batch 20 --warmup 7

``clinical-ml demo --scenario drift`` (``make demo SCENARIO=drift``): the model is derived on the batches
before the drift the generator injected, then every later batch is monitored (see ``cli.py``).

After the derivation batches have trained the first champion, :func:`monitor_batches` re-checks each
derivation batch against the champion's reference without it (the UI's drift checks pass where nothing
changed), then, batch by batch: ingest it; rebuild features; score and check it (``batch_monitoring_job``)
and refresh the monitoring reports (``monitoring_report_job``); if a use case's check or report requested
retraining, run ``lifecycle_job`` for it (the promotion gate decides).

A command-line driver of the Dagster jobs, not wiring: it lives beside ``cli.py`` rather than in ``defs/``,
which nothing of the package imports upwards.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from clinical_ml.core.artifacts import DeidStore, DriftRecord
from clinical_ml.core.display_names import display_name_and_unit
from clinical_ml.core.drift import worst_level
from clinical_ml.core.landing import LandingBatch, find_complete_batches
from clinical_ml.core.locations import resolve_usecases_dir
from clinical_ml.core.registry import PromotionDecision, Registry
from clinical_ml.core.reports import decision_in_words
from clinical_ml.core.usecase import load_use_cases
from clinical_ml.defs.build import build_definitions
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME, RETRAIN_REASON_TAG
from clinical_ml.defs.monitoring.sensors import retraining_requests
from clinical_ml.defs.usecase.paths import stage_of

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# a drift ERROR fails its blocking check, and so the run, by design (it holds the batch's FHIR export): the
# replay says so in its own words, the run's page in the UI keeps the details
SILENT = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
JOBS = (
    "batch_ingestion_job",
    "feature_refresh_job",
    "batch_monitoring_job",
    "monitoring_report_job",
    "lifecycle_job",
)
MANUAL_APPROVAL = "manual approval for the demo; the gate had refused it"
MANUAL_SIGN_OFF = "manual approval for the demo, in place of the clinical panel's sign-off it awaited"
FIRST_CHAMPION = "first champion"


def record_manual_approvals(registry_root: Path, use_cases: list[str]) -> list[str]:
    """Demo only (``--approve-first-model``): for each use case without a champion whose last decision refused
    a model, record a manual approval of that model as a decision of its own (the gate's refusal stays in the
    log beside it). Returns the use cases approved."""
    approved = []
    for name in use_cases:
        models = Registry(registry_root, name)
        history = models.decisions()
        if models.champion() is not None or not history:
            continue
        why = MANUAL_SIGN_OFF if history[-1].awaiting_sign_off else MANUAL_APPROVAL
        models.record_decision(PromotionDecision(True, history[-1].challenger, None, (why,)))
        approved.append(name)
    return approved


def batch_drift_level(deid: DeidStore, use_cases: list[str], batch_id: str) -> str | None:
    """The worst drift level the use cases' checks recorded for ``batch_id``; None when none did (no
    champion yet, or the run failed)."""
    parts = [deid.use_case(name).drift_records.part(batch_id) for name in use_cases]
    levels = [p.read().level for p in parts if p.exists()]
    return worst_level(levels) if levels else None


@dataclass(frozen=True)
class UseCaseCheck:
    """What one use case's drift check decided for one batch, as the demo prints it."""

    level: str
    moved: tuple[tuple[str, str, int], ...]
    """What moved, by measurement: (its name and unit, the worst level of its predictors, how many of its
    predictors are at WARN or ERROR), the most significant first (the prediction counts as one)."""
    reasons: tuple[str, ...]
    retraining_requested: bool
    retraining_note: str

    @classmethod
    def of(cls, record: DriftRecord) -> "UseCaseCheck":
        prediction = record.check.get("prediction")
        columns = [*record.check.get("features", []), *([prediction] if prediction else [])]
        moved: dict[str, tuple[str, str, int]] = {}  # by measurement (``lactate`` of ``lactate__min_24h``)
        for c in columns:
            if c.get("level") not in ("warn", "error"):
                continue
            name, unit = display_name_and_unit(c["feature"])
            label = name.split(",")[0] + (f" ({unit})" if unit else "")
            stem = str(c["feature"]).partition("__")[0]
            _, level, n = moved.get(stem, (label, "WARN", 0))
            moved[stem] = (label, "ERROR" if "ERROR" in (level, str(c["level"]).upper()) else "WARN", n + 1)
        reasons = tuple(str(r) for r in record.check.get("reasons", []))
        ranked = sorted(moved.values(), key=lambda m: m[1] != "ERROR")  # ERROR first, then by significance
        return cls(record.level, tuple(ranked), reasons, record.retraining_requested, record.retraining_note)

    def words(self, *, top: int = 3) -> str:
        """``ERROR (Lactate (mmol/L): ERROR in 4 predictors; Age: WARN)``; a level raised by a subgroup or the
        label prevalence alone gives its first reason."""
        shown = "; ".join(
            f"{name}: {level}" + (f" in {n} predictors" if n > 1 else "")
            for name, level, n in self.moved[:top]
        )
        rest = len(self.moved) - top
        more = f" and {rest} more measurement{'s' * (rest > 1)}" if rest > 0 else ""
        if not shown and self.level != "ok" and self.reasons:
            shown = self.reasons[0]
        return self.level.upper() + (f" ({shown}{more})" if shown else "")


@dataclass(frozen=True)
class Retraining:
    """A retraining a batch started for one use case: why it was requested and what the gate decided."""

    reason: str
    decision: str


@dataclass(frozen=True)
class CheckedBatch:
    """One batch of the replay: its drift checks per use case and the decisions of the retraining it started."""

    batch_id: str
    derivation: bool
    """The first champion was derived on it (its check compares it with the rest of the derivation cohort)."""
    checks: dict[str, UseCaseCheck] = field(default_factory=dict)
    retraining: dict[str, Retraining] = field(default_factory=dict)
    """Per use case retrained because of this batch: why, and the promotion decision in words."""

    @property
    def level(self) -> str | None:
        """The worst level over the use cases checked; None when none was (no champion, or the run failed)."""
        return worst_level([c.level for c in self.checks.values()]) if self.checks else None


def _keys(
    job: dg.JobDefinition, use_cases: Sequence[str], *, shared: Sequence[str] = ()
) -> list[dg.AssetKey]:
    """The job's assets of the use cases named (and the shared assets named)."""
    return [
        k
        for k in job.asset_layer.executable_asset_keys
        if (len(k.path) > 1 and k.path[0] in use_cases) or k.to_user_string() in shared
    ]


def _latest_storage_id(instance: dg.DagsterInstance, keys: list[dg.AssetKey]) -> int:
    """Where retraining requests start: materializations of earlier runs in this instance are not ours."""
    newest = 0
    for key in keys:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key), limit=1, ascending=False
        )
        newest = max([newest, *(r.storage_id for r in records.records)])
    return newest


def decisions_in_words(registry_root: Path, use_cases: Sequence[str]) -> dict[str, str]:
    """The newest promotion decision of each use case that has one, in words."""
    out = {}
    for name in use_cases:
        history = Registry(registry_root, name).decisions()
        if not history:
            continue
        newest = history[-1]
        if newest.reasons in ((MANUAL_APPROVAL,), (MANUAL_SIGN_OFF,)):
            out[name] = (
                f"Promoted by hand: model {newest.challenger} is champion ({newest.reasons[0]}); the gate's "
                "decision stays in the decision log beside it."
            )
        else:
            out[name] = decision_in_words(newest.as_dict())
    return out


class BatchReplay:
    """The jobs of one data root run in order on one instance, for the use cases named."""

    def __init__(
        self,
        root: Path,
        instance: dg.DagsterInstance,
        defs: dg.Definitions,
        use_cases: Sequence[str],
        *,
        say: Callable[[str], None] = print,
    ) -> None:
        self.root, self.instance, self.use_cases, self.say = root, instance, list(use_cases), say
        self.jobs = {n: defs.resolve_job_def(n) for n in JOBS}
        self.deid = DeidStore(root / "deid", root / "reports")
        self.started = time.perf_counter()
        self.drift_keys = [
            k
            for k in defs.resolve_asset_graph().get_all_asset_keys()
            if len(k.path) > 1
            and k.path[0] in self.use_cases
            and stage_of(k) in ("batch_drift", "monitoring_report")
        ]
        self.cursor = _latest_storage_id(instance, self.drift_keys)

    def elapsed(self) -> str:
        return f"[{time.perf_counter() - self.started:5.0f} s]"

    def _run(
        self, job: str, keys: list[dg.AssetKey], *, run_config: dict = QUIET, **options: Any
    ) -> dg.ExecuteInProcessResult | None:
        if not keys:  # an empty selection would run the whole job
            return None
        return self.jobs[job].execute_in_process(
            instance=self.instance,
            raise_on_error=False,
            run_config=run_config,
            asset_selection=keys,
            **options,
        )

    def add_partitions(self, batches: Sequence[LandingBatch]) -> None:
        known = set(self.instance.get_dynamic_partitions(BATCH_PARTITIONS_NAME))
        self.instance.add_dynamic_partitions(
            BATCH_PARTITIONS_NAME, [b.batch_id for b in batches if b.batch_id not in known]
        )

    def ingest(self, batch: LandingBatch) -> bool:
        """Ingest and anonymize one batch (its own partition); whether the run succeeded."""
        job = self.jobs["batch_ingestion_job"]
        return job.execute_in_process(
            instance=self.instance,
            raise_on_error=False,
            run_config=QUIET,
            partition_key=batch.batch_id,
            tags={"batch_id": batch.batch_id, "content_sha256": batch.content_hash},
        ).success

    def train(
        self, use_cases: Sequence[str], *, tags: dict[str, str], shared: Sequence[str] = ()
    ) -> dict[str, str]:
        """``lifecycle_job`` for the use cases named (and the shared assets named), with ``tags`` (its
        retraining reason...); the promotion decision each reached, in words."""
        registry = self.root / "registry"
        before = {n: len(Registry(registry, n).decisions()) for n in use_cases}
        self._run("lifecycle_job", _keys(self.jobs["lifecycle_job"], use_cases, shared=shared), tags=tags)
        decided = decisions_in_words(registry, use_cases)
        return {
            n: decided[n]
            if len(Registry(registry, n).decisions()) > before[n]
            else "no decision: its lifecycle run failed before the promotion gate (the UI has the run's logs)"
            for n in use_cases
        }

    def monitored(self) -> list[str]:
        """The use cases with a champion (the others have nothing to score)."""
        return [n for n in self.use_cases if Registry(self.root / "registry", n).champion() is not None]

    def check(self, batch_id: str, *, derivation: bool) -> CheckedBatch:
        """Score and check one ingested batch for every monitored use case and refresh their reports; retrain
        the use cases whose check or report requested it (one run per request, narrowed to the use case)."""
        monitored = self.monitored()
        if not monitored:
            return CheckedBatch(batch_id, derivation)
        self._run(
            "batch_monitoring_job",
            _keys(self.jobs["batch_monitoring_job"], monitored),
            partition_key=batch_id,
            run_config=SILENT,
        )
        self._run("monitoring_report_job", _keys(self.jobs["monitoring_report_job"], monitored))
        checks = {}
        for name in monitored:
            part = self.deid.use_case(name).drift_records.part(batch_id)
            if part.exists():
                checks[name] = UseCaseCheck.of(part.read())
        return CheckedBatch(batch_id, derivation, checks, self.retrain_as_requested())

    def retrain_as_requested(self) -> dict[str, Retraining]:
        """Answer each retraining request the use cases' drift checks and monitoring reports made since the last
        call, as ``drift_retraining_sensor`` would, with a ``lifecycle_job`` run narrowed to the use case that
        asked (tagged with the request, so the sensor does not ask again under ``make dev``). Returns why each
        use case was retrained and the promotion decision, in words."""
        retrained: dict[str, Retraining] = {}
        newest = self.cursor
        for key in self.drift_keys:
            requests, seen = retraining_requests(self.instance, [key], self.cursor)
            newest = max(newest, seen)
            for req in requests:
                name, reason = key.path[0], req.tags[RETRAIN_REASON_TAG]
                decision = self.train([name], tags=dict(req.tags))[name]
                earlier = retrained.get(name)
                retrained[name] = Retraining(f"{earlier.reason}; {reason}" if earlier else reason, decision)
        self.cursor = newest
        return retrained

    def monitor(
        self, derivation: Sequence[LandingBatch], later: Sequence[LandingBatch]
    ) -> list[CheckedBatch]:
        """Re-check each derivation batch, then ingest, score and check each later batch in order (see the
        module docstring), saying what each found."""
        days = []
        n = len(derivation) + len(later)
        for i, b in enumerate([*derivation, *later], start=1):
            if i > len(derivation):
                if not self.ingest(b):
                    self.say(
                        f"{self.elapsed()} batch {i}/{n} {b.batch_id}: ingestion FAILED (the UI has its logs)"
                    )
                    days.append(CheckedBatch(b.batch_id, False))
                    continue
                self._run(
                    "feature_refresh_job",
                    _keys(self.jobs["feature_refresh_job"], self.use_cases),
                    tags={"batch_id": b.batch_id},
                )
            day = self.check(b.batch_id, derivation=i <= len(derivation))
            days.append(day)
            self.say(
                f"{self.elapsed()} batch {i}/{n} {b.batch_id}{' (derivation)' * day.derivation}: {day_words(day)}"
            )
            for name, r in day.retraining.items():
                self.say(f"    {name} retrained ({r.reason}): {r.decision}")
        return days


def drift_story(days: Sequence[CheckedBatch], *, injected_from: str | None) -> list[str]:
    """The conclusion of a drift replay in sentences, each true for the checks it reports: where the first
    drift ERROR is against where the drift was injected, what came before it, what moved, what was decided."""
    order = [d.batch_id for d in days]
    checked = [d for d in days if d.checks]
    found = next((d for d in checked if d.level == "error"), None)
    if found is None:
        injected = f"; the drift was injected from batch {injected_from}" if injected_from else ""
        return [f"No drift check reached ERROR in the {len(checked)} batches checked{injected}."]
    if injected_from is None or injected_from not in order:
        where = "no drift was injected in these batches, so it is a false alarm"
    else:
        late = order.index(found.batch_id) - order.index(injected_from)
        where = (
            "found on the batch it began"
            if late == 0
            else f"{late} batch{'es' * (late > 1)} after it began"
            if late > 0
            else f"{-late} batch{'es' * (late < -1)} before it began: a false alarm"
        )
    lines = [
        f"Drift onset: batch {found.batch_id} is the first whose drift check reached ERROR"
        + (
            f"; the drift was injected from batch {injected_from}: {where}."
            if injected_from
            else f"; {where}."
        )
    ]
    before = [d for d in checked if order.index(d.batch_id) < order.index(found.batch_id)]
    warned = sum(d.level == "warn" for d in before)
    lines.append(
        f"Before it: {len(before)} batch{'es' * (len(before) != 1)} checked, none at ERROR"
        + (f" ({warned} at WARN: significant, not material)." if warned else ".")
        if before
        else "Before it: no batch was checked."
    )
    for name, check in found.checks.items():
        what = check.words(top=6) if check.level != "ok" else "nothing (OK)"
        lines.append(f"What moved in batch {found.batch_id}, {name}: {what}.")
    for name, check in found.checks.items():
        if name not in found.retraining and check.level == "error":
            lines.append(f"Retraining of {name}: not requested. {check.retraining_note}".rstrip())
    after = [d for d in checked if order.index(d.batch_id) > order.index(found.batch_id)]
    if after:
        lines.append(
            "After it: "
            + ", ".join(f"batch {d.batch_id} {(d.level or 'not checked').upper()}" for d in after)
            + "."
        )
    for day in [found, *after]:
        for name, r in day.retraining.items():
            lines.append(
                f"Retraining of {name}, requested by batch {day.batch_id} ({r.reason}): {r.decision}"
            )
    return lines


def day_words(day: CheckedBatch) -> str:
    """One batch's checks in words: each use case's level and what moved, and whether it asked to retrain."""
    if not day.checks:
        return "not monitored (no champion yet, or the monitoring run failed: see the UI)"
    parts = []
    for name, check in day.checks.items():
        asked = " -> retraining requested" if check.retraining_requested else ""
        parts.append(f"{name} {check.words()}{asked}")
    return "; ".join(parts)


def replay(
    root: Path,
    instance: dg.DagsterInstance,
    *,
    warmup: int,
    usecases_dir: Path | None = None,
    approve_first_model: bool = False,
    defs: dg.Definitions | None = None,
    use_cases: Sequence[str] | None = None,
    say: Callable[[str], None] = print,
) -> list[CheckedBatch]:
    """Run every landed batch under ``root`` in order: the first ``warmup`` batches train the first champion,
    then each batch is monitored (see the module docstring). Returns one entry per batch.

    ``defs`` (default: built for ``root`` and ``usecases_dir``) and ``use_cases`` (default: every one of
    ``usecases_dir``) narrow what runs."""
    defs = defs or build_definitions(data_root=root, usecases_dir=usecases_dir)
    names = (
        list(use_cases)
        if use_cases
        else [uc.name for uc in load_use_cases(resolve_usecases_dir(usecases_dir))]
    )
    batches = find_complete_batches(root / "landing")
    run = BatchReplay(root, instance, defs, names, say=say)
    run.add_partitions(batches)
    for b in batches[:warmup]:
        run.ingest(b)
    first = run.train(names, tags={RETRAIN_REASON_TAG: FIRST_CHAMPION}, shared=["meds_dataset"])
    for name, decision in first.items():
        say(f"{run.elapsed()} {name}: {decision}")
    if approve_first_model:
        for name in record_manual_approvals(root / "registry", names):
            say(f"{name}: {decisions_in_words(root / 'registry', [name])[name]}")
    return run.monitor(batches[:warmup], batches[warmup:])
