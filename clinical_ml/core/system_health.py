"""The system-health page of a use case (issue 20 item 7): is the machinery that delivers its predictions
working? Four parts, each a few numbers and one sentence true for them:

* runs: the runs that failed in the last ``days`` days (any job: a failed ingestion stops every use case),
  and the runs waiting or running past the stuck limit (:func:`clinical_ml.core.run_health.stuck_runs`);
* time to prediction: per batch, the hours from landing to predictions
  (:class:`clinical_ml.core.time_to_prediction.PredictionTiming`) against the use case's limit;
* the point-of-care service: calls answered in the last ``days`` days
  (:func:`clinical_ml.core.served_predictions.service_requests`), the latency of the hook calls answered
  with a card (p50 and p95 of the time the service took, as its log measures it: the network not included),
  the error rate (HTTP 5xx: the service failed) and the refusal rate (4xx: bad input, bad token), apart.

Counts only, no identifier: run ids and job names are the orchestrator's, not patients'. A part with nothing
to judge says so; it never passes for lack of data.
"""

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from clinical_ml.core.reports import md_escape
from clinical_ml.core.run_health import RunView, stuck_runs
from clinical_ml.core.time_to_prediction import PredictionTiming

_ENV = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True),
    undefined=StrictUndefined,
)
FAILED = "FAILURE"
MAX_LISTED = 10  # runs listed by id on the page; the counts cover all


@dataclass(frozen=True)
class RunsHealth:
    days: int
    failed: tuple[RunView, ...]  # newest first
    stuck: tuple[tuple[RunView, int], ...]  # with the minutes waited or running
    stuck_limit_minutes: int

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stuck

    def sentence(self) -> str:
        failed = f"{len(self.failed)} run(s) failed in the last {self.days} days"
        stuck = f"{len(self.stuck)} run(s) waiting or running for more than {self.stuck_limit_minutes} min"
        return f"{failed}; {stuck}."


@dataclass(frozen=True)
class TimingHealth:
    batches: tuple[PredictionTiming, ...]  # newest first

    @property
    def measured(self) -> list[PredictionTiming]:
        return [t for t in self.batches if t.hours is not None]

    @property
    def over(self) -> list[PredictionTiming]:
        return [t for t in self.measured if not t.within_limit]

    @property
    def ok(self) -> bool | None:
        return None if not self.measured else not self.over

    def sentence(self) -> str:
        if not self.batches:
            return "Time to prediction: no batch scored yet."
        m = self.measured
        if not m:
            return f"Time to prediction: {len(self.batches)} batch(es) scored, none with a recorded landing time."
        hours = [t.hours for t in m if t.hours is not None]
        newest = m[0]
        return (
            f"Time to prediction: {len(self.over)} of {len(m)} measured batch(es) over the limit of "
            f"{newest.limit_hours:g} h; the newest, {newest.batch_id}, took {newest.hours:.2f} h "
            f"(longest {max(hours):.2f} h)."
        )


@dataclass(frozen=True)
class ServiceHealth:
    days: int
    calls: int
    errors: int  # HTTP 5xx
    refused: int  # HTTP 4xx
    cards: int  # hook calls answered 200
    p50_ms: float | None
    p95_ms: float | None
    by_outcome: dict[str, int] = field(default_factory=dict)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None

    @property
    def refusal_rate(self) -> float | None:
        return self.refused / self.calls if self.calls else None

    @property
    def ok(self) -> bool | None:
        return None if not self.calls else self.errors == 0

    def sentence(self) -> str:
        if not self.calls:
            return f"Point-of-care service: no call recorded in the last {self.days} days."
        latency = (
            f"hook calls answered in {self.p50_ms:.1f} ms (median) and {self.p95_ms:.1f} ms (95th percentile)"
            if self.p50_ms is not None and self.p95_ms is not None
            else "no hook call answered with a card"
        )
        return (
            f"Point-of-care service: {self.calls} call(s) in the last {self.days} days, {self.errors} failed "
            f"({self.error_rate:.1%}) and {self.refused} refused as bad input or unauthorised "
            f"({self.refusal_rate:.1%}); {latency}."
        )


@dataclass(frozen=True)
class SystemHealth:
    runs: RunsHealth
    timing: TimingHealth
    service: ServiceHealth
    generated_at: str

    @property
    def attention(self) -> list[str]:
        """The parts that need a person now."""
        out = []
        if not self.runs.ok:
            out.append("runs")
        if self.timing.ok is False:
            out.append("time to prediction")
        if self.service.ok is False:
            out.append("point-of-care service")
        return out

    def headline(self) -> str:
        if self.attention:
            return "Needs attention: " + ", ".join(self.attention) + "."
        unjudged = [
            name
            for name, ok in (("time to prediction", self.timing.ok), ("service", self.service.ok))
            if ok is None
        ]
        tail = f" (nothing to judge yet for: {', '.join(unjudged)})" if unjudged else ""
        return f"No failed or stuck run, no batch over its limit, no service failure{tail}."

    def sentences(self) -> list[str]:
        return [self.headline(), self.runs.sentence(), self.timing.sentence(), self.service.sentence()]

    def metadata(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "runs_failed": len(self.runs.failed),
            "runs_stuck": len(self.runs.stuck),
            "batches_over_time_limit": len(self.timing.over),
            "service_calls": self.service.calls,
        }
        if self.timing.measured:
            out["hours_to_prediction_newest"] = float(self.timing.measured[0].hours or 0.0)
        if self.service.error_rate is not None:
            out["service_error_rate"] = self.service.error_rate
        if self.service.p95_ms is not None:
            out["service_p95_ms"] = self.service.p95_ms
        return out


def runs_health(
    runs: list[RunView], *, now: float, days: int = 7, stuck_limit_seconds: float = 7200.0
) -> RunsHealth:
    """Failed runs created in the last ``days`` days, and runs stuck past the limit (any age)."""
    since = now - days * 86400
    failed = sorted(
        (r for r in runs if r.status == FAILED and r.created_at >= since), key=lambda r: -r.created_at
    )
    stuck = stuck_runs(runs, now=now, limit_seconds=stuck_limit_seconds)
    return RunsHealth(
        days=days,
        failed=tuple(failed),
        stuck=tuple((s.run, s.minutes) for s in stuck),
        stuck_limit_minutes=int(stuck_limit_seconds // 60),
    )


def timing_health(timings: list[PredictionTiming]) -> TimingHealth:
    return TimingHealth(tuple(sorted(timings, key=lambda t: t.predicted_at, reverse=True)))


def service_health(requests: pl.DataFrame | None, *, today: date, days: int = 7) -> ServiceHealth:
    """The calls of the last ``days`` days (today included) of a :func:`service_requests` table."""
    if requests is None or requests.is_empty():
        return ServiceHealth(days, 0, 0, 0, 0, None, None)
    recent = requests.filter(pl.col("day") > today - timedelta(days=days))
    status = recent["status"]
    cards = recent.filter((pl.col("route") == "hook") & (pl.col("status") == 200))["ms"].drop_nulls()
    ms = cards.to_numpy()
    counts = recent["outcome"].value_counts()
    return ServiceHealth(
        days=days,
        calls=recent.height,
        errors=int((status >= 500).sum()),
        refused=int(((status >= 400) & (status < 500)).sum()),
        cards=int(cards.len()),
        p50_ms=float(np.percentile(ms, 50)) if ms.size else None,
        p95_ms=float(np.percentile(ms, 95)) if ms.size else None,
        by_outcome={str(o): int(n) for o, n in sorted(counts.iter_rows())},
    )


def system_health(
    *,
    runs: list[RunView],
    timings: list[PredictionTiming],
    requests: pl.DataFrame | None,
    now: datetime,
    days: int = 7,
    stuck_limit_seconds: float = 7200.0,
) -> SystemHealth:
    """The page's numbers (``now`` aware, UTC)."""
    return SystemHealth(
        runs=runs_health(runs, now=now.timestamp(), days=days, stuck_limit_seconds=stuck_limit_seconds),
        timing=timing_health(timings),
        service=service_health(requests, today=now.astimezone(UTC).date(), days=days),
        generated_at=now.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


def health_view(h: SystemHealth) -> dict:
    """Plain values for the page (the template escapes them)."""
    return {
        "headline": h.headline(),
        "attention": bool(h.attention),
        "runs_sentence": h.runs.sentence(),
        "failed": [
            {"run_id": r.run_id, "job": r.job_name, "created": _when(r.created_at)}
            for r in h.runs.failed[:MAX_LISTED]
        ],
        "stuck": [
            {"run_id": r.run_id, "job": r.job_name, "status": r.status, "minutes": m}
            for r, m in h.runs.stuck[:MAX_LISTED]
        ],
        "timing_sentence": h.timing.sentence(),
        "timings": [
            {
                "batch": t.batch_id,
                "hours": "not measured" if t.hours is None else f"{t.hours:.2f}",
                "limit": f"{t.limit_hours:g}",
                "verdict": "-" if t.within_limit is None else ("within" if t.within_limit else "over"),
            }
            for t in h.timing.batches[:MAX_LISTED]
        ],
        "service_sentence": h.service.sentence(),
        "outcomes": sorted(h.service.by_outcome.items()),
    }


def health_html(h: SystemHealth, *, use_case_name: str, use_case_hash: str, code_version: str) -> str:
    return _ENV.get_template("system_health.html.j2").render(
        title=f"System health: {use_case_name}",
        subtitle=f"Runs, time to prediction and the point-of-care service, as of {h.generated_at}",
        view=health_view(h),
        glossary=None,
        generated_at=h.generated_at,
        code_version=code_version,
        use_case_name=use_case_name,
        use_case_hash=use_case_hash,
        model_version="",  # about the service and the runs, not one model
    )


def health_markdown(h: SystemHealth) -> str:
    return "\n".join(f"- {md_escape(s)}" for s in h.sentences()) + "\n"
