"""The CDS Hooks service as plain functions of parsed requests: discovery, a hook call, feedback.

:mod:`clinical_ml.serve.app` only reads HTTP (size limit, JSON, the JWT) and writes what these return. A
request that is not what CDS Hooks 2.0 and FHIR R4 say gets HTTP 400 (412 when a prefetch the service needs
is absent) with a FHIR ``OperationOutcome`` naming the place at fault, never a value.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clinical_ml.core.artifacts import UseCaseStore
from clinical_ml.core.scoring import Score
from clinical_ml.core.site_mapping import SiteMapping
from clinical_ml.core.units import LAB_CODES
from clinical_ml.core.usecase import UseCase
from clinical_ml.serve.cards import (
    OVERRIDE_REASONS,
    OVERRIDE_SYSTEM,
    guardrail_words,
    hook_response,
    not_scored_card,
    scored_card,
)
from clinical_ml.serve.chart import (
    LOINC,
    VITAL_LOINC,
    VITAL_SYSTEM,
    Chart,
    CodedValues,
    Issue,
    PrefetchError,
    chart_from_prefetch,
)
from clinical_ml.serve.fhir import ObservationFacts
from clinical_ml.serve.models import ChampionWatch, NotServable, ServedModel, hook_for
from clinical_ml.serve.records import ServingRecords
from clinical_ml.serve.settings import ServiceSettings

UUID_PATTERN = r"^(urn:uuid:)?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
FHIR_ID = r"^[A-Za-z0-9\-.]{1,64}$"
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class Reply:
    """What to answer: the HTTP status, the JSON body, the model version used and an outcome code for the
    log (never a value)."""

    status: int
    body: dict
    model_version: str | None = None
    outcome: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def operation_outcome(issues: list[Issue], *, severity: str = "error") -> dict:
    """A FHIR R4 OperationOutcome listing each issue with where it is (FHIRPath-like) and what is wrong."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": severity,
                "code": i.code if i.code in _OO_CODES else "invalid",
                "diagnostics": i.detail,
                "expression": [i.location],
            }
            for i in issues
        ],
    }


# IssueType codes of FHIR R4 used here
_OO_CODES = {
    "invalid",
    "structure",
    "required",
    "value",
    "conflict",
    "security",
    "not-found",
    "too-long",
    "not-supported",
    "exception",
    "processing",
}


def rejected(status: int, issues: list[Issue], outcome: str) -> Reply:
    return Reply(status, operation_outcome(issues), outcome=outcome)


def failed(exc: BaseException) -> Reply:
    """The answer to a call the service failed on unexpectedly: by the error's type only (its message, or a
    traceback, may quote a value of the request)."""
    return rejected(
        500,
        [Issue("request", "exception", "the service failed; the error was logged")],
        f"error:{type(exc).__name__}",
    )


@dataclass(frozen=True)
class PendingCall:
    """A hook call read up to its chart, waiting to be scored (with the calls that arrived with it)."""

    use_case: UseCase
    request: "HookRequest"
    chart: Chart
    predicted_at: datetime
    now: datetime


def _pydantic_issues(exc: ValidationError, where: str) -> list[Issue]:
    return [
        Issue(".".join([where, *(str(p) for p in e["loc"])]), "invalid", f"not valid ({e['type']})")
        for e in exc.errors()[:20]
    ]


class HookContext(BaseModel):
    model_config = ConfigDict(extra="allow")
    userId: str | None = Field(None, max_length=256)
    patientId: str = Field(pattern=FHIR_ID)
    encounterId: str | None = Field(None, pattern=FHIR_ID)


class HookRequest(BaseModel):
    """A CDS Hooks 2.0 service request (the fields this service reads; others are allowed)."""

    model_config = ConfigDict(extra="allow")
    hook: str = Field(max_length=64)
    hookInstance: str = Field(pattern=UUID_PATTERN)
    fhirServer: str | None = Field(None, max_length=2048)
    fhirAuthorization: dict | None = None
    context: HookContext
    prefetch: dict[str, Any] | None = None


class Coding(BaseModel):
    model_config = ConfigDict(extra="allow")
    system: str | None = Field(None, max_length=512)
    code: str | None = Field(None, max_length=128)
    display: str | None = Field(None, max_length=512)


class OverrideReason(BaseModel):
    model_config = ConfigDict(extra="allow")
    reason: Coding | None = None
    userComment: str | None = Field(None, max_length=4000)


class FeedbackEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    card: str = Field(pattern=UUID_PATTERN)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[dict] = Field(default_factory=list, max_length=100)
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: datetime


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    feedback: list[FeedbackEntry] = Field(min_length=1, max_length=100)


_Body = TypeVar("_Body", bound=BaseModel)


def observation_query(use_case: UseCase) -> str:
    """The FHIR search for the Observations a use case's features need, by LOINC (labs and vital signs with
    one) or by vocabulary name (:data:`VITAL_SYSTEM`)."""
    loinc_of_vital: dict[str, str] = {}
    for loinc, name in VITAL_LOINC.items():
        loinc_of_vital.setdefault(name, loinc)
    codes = []
    for meds in use_case.features.codes:
        kind, _, code = meds.partition("//")
        if kind == "LAB" and code in LAB_CODES:
            codes.append(f"{LOINC}|{code}")
        elif code in loinc_of_vital:
            codes += [f"{LOINC}|{loinc}" for loinc, name in VITAL_LOINC.items() if name == code]
        else:
            codes.append(f"{VITAL_SYSTEM}|{code}")
    return (
        "Observation?patient={{context.patientId}}&encounter={{context.encounterId}}"
        f"&code={','.join(codes)}&_count=1000"
    )


def prefetch_templates(use_case: UseCase) -> dict[str, str]:
    templates = {
        "patient": "Patient/{{context.patientId}}",
        "encounter": "Encounter/{{context.encounterId}}",
        "observations": observation_query(use_case),
    }
    if use_case.features.history:
        templates["encounters"] = "Encounter?patient={{context.patientId}}"
    return templates


class CdsService:
    """Every use case of the use-case folder, served while it has an approved champion."""

    def __init__(
        self,
        settings: ServiceSettings,
        use_cases: list[UseCase],
        *,
        site_mapping: SiteMapping,
        records: ServingRecords,
    ) -> None:
        self.settings = settings
        self.use_cases = {uc.name: uc for uc in use_cases}
        self.watches = {uc.name: ChampionWatch(settings.data_root / "registry", uc) for uc in use_cases}
        self.site_mapping = site_mapping
        # the site mapping's answers for coded values seen before (few distinct ones: sexes, units, sites)
        self.coded = CodedValues(site_mapping)
        self.unit_types = site_mapping.unit_types()  # unit code -> ICU, WARD, ... (a population's unit_types)
        self.records = records
        # the site's clock: the service's setting, else the site mapping's, else UTC
        self.tz = ZoneInfo(settings.site_timezone or site_mapping.time_zone or "UTC")

    # URLs ------------------------------------------------------------------------------------------------
    def service_url(self, service_id: str | None = None) -> str:
        base = f"{self.settings.base_url}/cds-services"
        return f"{base}/{service_id}" if service_id else base

    def report_url(self, use_case: str, version: str | None) -> str | None:
        return f"{self.settings.base_url}/reports/{use_case}/{version}" if version else None

    def audiences(self, service_id: str | None, *, feedback: bool = False) -> list[str]:
        """The ``aud`` values a token for this endpoint may carry: the endpoint's URL (and, for feedback,
        its service's URL)."""
        if service_id is None:
            return [self.service_url()]
        urls = [self.service_url(service_id)]
        if feedback:
            urls.insert(0, f"{self.service_url(service_id)}/feedback")
        return urls

    # discovery -------------------------------------------------------------------------------------------
    def discovery(self) -> Reply:
        services = []
        for name, uc in sorted(self.use_cases.items()):
            if not self.watches[name].servable():
                continue
            services.append(
                {
                    "hook": hook_for(uc),
                    "id": name,
                    "title": uc.title,
                    "description": " ".join(uc.clinical_question.split()),
                    "prefetch": prefetch_templates(uc),
                    "usageRequirements": (
                        f"Call with an encounter in context; the model predicts {uc.prediction_time.describe()}."
                    ),
                }
            )
        return Reply(200, {"services": services}, outcome="discovery")

    def _parsed(
        self, service_id: str, body: Any, model: type[_Body], *, bad: str
    ) -> tuple[UseCase, _Body] | Reply:
        """The use case and the validated request body, or the refusal to send (unknown service, not a JSON
        object, a body the model refuses: ``bad`` is the outcome recorded for the last)."""
        uc = self.use_cases.get(service_id)
        if uc is None:
            return rejected(404, [Issue("service", "not-found", "no such CDS service")], "unknown_service")
        if not isinstance(body, dict):
            return rejected(400, [Issue("request", "structure", "expected a JSON object")], "bad_request")
        try:
            return uc, model.model_validate(body)
        except ValidationError as exc:
            return rejected(400, _pydantic_issues(exc, "request"), bad)

    # hook call ---------------------------------------------------------------------------------------------
    def call(
        self,
        service_id: str,
        body: Any,
        *,
        now: datetime | None = None,
        observations: list[ObservationFacts] | None = None,
    ) -> Reply:
        """The answer to a hook call (:meth:`prepare`, then :meth:`answer` of the one call)."""
        prepared = self.prepare(service_id, body, now=now, observations=observations)
        return prepared if isinstance(prepared, Reply) else self.answer([prepared])[0]

    def prepare(
        self,
        service_id: str,
        body: Any,
        *,
        now: datetime | None = None,
        observations: list[ObservationFacts] | None = None,
    ) -> "Reply | PendingCall":
        """A hook call up to its chart: the request checked and its prefetch read into the chart to score,
        or the answer when there is nothing to score (a refusal, no encounter, no approved model).
        ``observations``: the prefetch's Observations read with the body
        (:func:`clinical_ml.serve.hookbody.read_hook_body`), else read from the prefetch."""
        parsed = self._parsed(service_id, body, HookRequest, bad="bad_request")
        if isinstance(parsed, Reply):
            return parsed
        uc, req = parsed
        if req.hook != hook_for(uc):
            return rejected(
                400,
                [Issue("request.hook", "not-supported", f"this service answers {hook_for(uc)}")],
                "wrong_hook",
            )
        now = now or datetime.now(UTC)
        if req.context.encounterId is None:
            # a chart opened outside a stay: nothing this service predicts
            return Reply(200, hook_response([], version=None), outcome="no_encounter")
        try:
            self.watches[service_id].current()
        except NotServable as exc:
            return self._no_model(uc, exc)
        predicted_at = now.astimezone(self.tz).replace(tzinfo=None)
        try:
            chart = chart_from_prefetch(
                req.prefetch or {},
                context=req.context.model_dump(),
                prediction_time=predicted_at,
                site_mapping=self.coded,
                tz=self.tz,
                with_history=bool(uc.features.history),
                observations=observations,
            )
        except PrefetchError as exc:
            status = 412 if exc.missing else 400
            return rejected(status, exc.issues, "prefetch_missing" if exc.missing else "bad_fhir")
        return PendingCall(uc, req, chart, predicted_at, now)

    @staticmethod
    def _no_model(uc: UseCase, exc: NotServable) -> Reply:
        card = not_scored_card(uc, f"no approved model is available ({exc})", version=None, report_url=None)
        return Reply(200, hook_response([card], version=None), outcome="no_model")

    def answer(self, calls: Sequence["PendingCall"]) -> list[Reply]:
        """The answers to prepared hook calls, scored together: per use case, one champion (read once, so a
        promotion never mixes models within the batch), one aggregation of every stay, one LightGBM pass,
        and the served predictions written at once. What goes wrong with one call is that call's answer:
        a guardrail's abstention or a stay outside the population is its card; an error while scoring the
        batch scores each call alone, so only the call at fault fails."""
        replies: list[Reply | None] = [None] * len(calls)
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(calls):
            groups.setdefault(c.use_case.name, []).append(i)
        for name, members in groups.items():
            uc = self.use_cases[name]
            try:
                served = self.watches[name].current()
            except NotServable as exc:
                for i in members:
                    replies[i] = self._no_model(uc, exc)
                continue
            results: list[tuple[dict, dict] | Exception]
            try:
                results = list(self.cards_for(served, [calls[i].chart for i in members]))
            except Exception:
                results = []
                for i in members:
                    try:
                        results.append(self.cards_for(served, [calls[i].chart])[0])
                    except Exception as exc:
                        results.append(exc)
            written: list[tuple[int, dict]] = []
            for i, result in zip(members, results, strict=True):
                if isinstance(result, Exception):
                    replies[i] = failed(result)
                    continue
                card, record = result
                c = calls[i]
                record = {
                    **record,
                    "card_uuid": card["uuid"],
                    "hook_instance": c.request.hookInstance,
                    "patient_id": c.request.context.patientId,
                    "encounter_id": c.request.context.encounterId,
                    "prediction_time": c.predicted_at.isoformat(),
                }
                written.append((i, record))
                replies[i] = Reply(
                    200,
                    hook_response([card], version=served.version),
                    model_version=served.version,
                    outcome=record["outcome"],
                    headers={"X-Model-Version": served.version},
                )
            try:
                self.records.predictions(name, [(record, calls[i].now) for i, record in written])
            except Exception:
                # the batch's write failed: each record alone, so a call fails only with its own record
                for i, record in written:
                    try:
                        self.records.predictions(name, [(record, calls[i].now)])
                    except Exception as exc:
                        replies[i] = failed(exc)
        return [r if r is not None else failed(RuntimeError()) for r in replies]

    def ineligible(self, served: ServedModel, chart: Chart) -> str | None:
        """Why the model does not apply to this stay now (its population and prediction time), else None."""
        uc = served.use_case
        age = chart.stay["age_years"]
        pop = uc.population
        if (
            age is None
            or age < pop.min_age_years
            or (pop.max_age_years is not None and age > pop.max_age_years)
        ):
            return f"the patient's age is outside the model's population ({pop.inclusion.rstrip('.')})"
        # the population's coded filters, as the batch cohort applies them (a stay without a value is outside)
        stay = chart.stay
        unit_type = self.unit_types.get(stay["unit"]) if stay["unit"] is not None else None
        for what, value, allowed in (
            ("unit", stay["unit"], pop.units),
            ("unit type", unit_type, pop.unit_types),
            ("admission type", stay["admission_type"], pop.admission_types),
            ("site", stay["site"], pop.sites),
        ):
            if allowed is not None and value not in allowed:
                return f"the stay's {what} is outside the model's population ({pop.inclusion.rstrip('.')})"
        pt = uc.prediction_time
        if pt.anchor != "discharge" and chart.hours_since_admission < pt.offset_hours:
            return (
                f"the model predicts {pt.describe()}; this stay began {chart.hours_since_admission:.0f} h ago"
            )
        return None

    def card_for(self, served: ServedModel, chart: Chart) -> tuple[dict, dict]:
        """The card for a parsed chart and what the phi zone records of it."""
        return self.cards_for(served, [chart])[0]

    def cards_for(self, served: ServedModel, charts: Sequence[Chart]) -> list[tuple[dict, dict]]:
        """:meth:`card_for` of several charts, those the model applies to scored together."""
        uc, version = served.use_case, served.version
        report = self.report_url(uc.name, version)
        out: list[tuple[dict, dict] | None] = [None] * len(charts)
        eligible: list[int] = []
        for i, chart in enumerate(charts):
            why = self.ineligible(served, chart)
            if why is None:
                eligible.append(i)
                continue
            card = not_scored_card(uc, why, version=version, report_url=report)
            out[i] = card, {"model_version": version, "not_used": chart.not_used, "outcome": "not_eligible"}
        scores = served.score_many([charts[i] for i in eligible])
        g = uc.guardrails
        for i, (score, _) in zip(eligible, scores, strict=True):
            chart = charts[i]
            record: dict[str, Any] = {"model_version": version, "not_used": chart.not_used}
            words = guardrail_words(
                score, max_out_of_range=g.max_out_of_range, max_missing_fraction=g.max_missing_fraction
            )
            record |= _score_record(score)
            if score.abstained:
                card = not_scored_card(
                    uc, words or "the guardrail declined to score", version=version, report_url=report
                )
                out[i] = card, {**record, "outcome": "abstained"}
                continue
            card = scored_card(
                uc,
                score,
                version=version,
                threshold=served.card.threshold,
                report_url=report,
                guardrail=words,
                not_used=sum(chart.not_used.values()),
                critical_multiple=self.settings.critical_multiple,
            )
            out[i] = card, {**record, "outcome": "scored", "indicator": card["indicator"]}
        return [o for o in out if o is not None]

    # feedback ----------------------------------------------------------------------------------------------
    def feedback(self, service_id: str, body: Any, *, now: datetime | None = None) -> Reply:
        parsed = self._parsed(service_id, body, FeedbackRequest, bad="bad_feedback")
        if isinstance(parsed, Reply):
            return parsed
        uc, req = parsed
        for entry in req.feedback:
            card = entry.card.removeprefix("urn:uuid:")
            served = self.records.served_card(card, use_case=uc.name)
            reason = entry.overrideReason.reason if entry.overrideReason else None
            code = None
            if reason is not None:
                offered = reason.system == OVERRIDE_SYSTEM and reason.code in OVERRIDE_REASONS
                code = reason.code if offered else "not_offered"  # a code we did not offer may be any text
            self.records.feedback(
                uc.name,
                {
                    "card_uuid": card,
                    "outcome": entry.outcome,
                    "override_reason": code,
                    "user_comment": entry.overrideReason.userComment if entry.overrideReason else None,
                    "accepted_suggestions": len(entry.acceptedSuggestions),
                    "outcome_timestamp": entry.outcomeTimestamp.isoformat(),
                    "card_served_here": served is not None and served[0] == uc.name,
                    "model_version": served[1] if served else None,
                },
                now=now,
            )
        return Reply(200, {}, outcome=f"feedback:{len(req.feedback)}")

    # report card -------------------------------------------------------------------------------------------
    def report_card(self, use_case: str, version: str) -> bytes | None:
        """The HTML report card of a model version (aggregate data only), None when there is none."""
        if use_case not in self.use_cases or not VERSION_PATTERN.match(version):
            return None
        store = UseCaseStore(self.settings.data_root / "deid", self.settings.data_root / "reports", use_case)
        path = store.reports.report(f"report_card_{version}")
        return path.read_bytes() if path.is_file() else None


def _score_record(score: Score) -> dict:
    return {
        "risk": None if score.abstained else score.risk,
        "flagged": score.flagged,
        "abstained": score.abstained,
        "reason_code": score.reason_code,
        "reasons": [{"feature": r["feature"], "value": r["value"]} for r in score.reasons],
        "flags": list(score.flags),
    }


def settings_summary(settings: ServiceSettings) -> Mapping[str, object]:
    """What the service says about itself at start-up (no secret, no path to one)."""
    return {"auth": settings.auth, "base_url": settings.base_url, "max_body_bytes": settings.max_body_bytes}
